"""model.init_from: a new run starts from an earlier run's weights only, at step 0 with a fresh optimizer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import SQUAD_TRAIN, read_metrics, tiny_overrides
from tests.tiny_recipes import one_torch_thread, skip_report_plots  # noqa: F401 (autouse)
from tuneforge.api import finetune
from tuneforge.errors import UserError

# No shuffle and a validation set that is the first training micro-batch: run B's first training batch is exactly
# the batch run A validated on last, so B's first loss must be A's last validation loss.
SAME_BATCH = ["data.shuffle=false", f"data.validation={{path: {SQUAD_TRAIN}, format: squad, limit: 8}}",
              "data.train.limit=16", "data.seq_length=128", "train.max_steps=2", "checkpoint.every_steps=2"]


@pytest.fixture(scope="module", autouse=True)
def no_report_plots():
    with pytest.MonkeyPatch.context() as mp:
        skip_report_plots(mp)
        yield


@pytest.fixture(scope="module")
def run_a(tiny_recipe, tmp_path_factory) -> Path:
    return finetune(tiny_recipe, tiny_overrides(tmp_path_factory.mktemp("a"), "a", *SAME_BATCH))


def start_from(tiny_recipe, tmp_path, source: Path, *extra: str) -> Path:
    return finetune(tiny_recipe, tiny_overrides(tmp_path, "b", *SAME_BATCH, f"model.init_from={source}",
                                                "train.max_steps=1", "checkpoint.every_steps=1", *extra))


@pytest.mark.parametrize("source", ["run", "checkpoint"])
def test_starts_at_step_0_with_the_earlier_weights_and_a_fresh_optimizer(run_a, tiny_recipe, tmp_path, source):
    a_last_val = [r["val_loss"] for r in read_metrics(run_a) if "val_loss" in r][-1]
    b = start_from(tiny_recipe, tmp_path, run_a if source == "run" else run_a / "checkpoints/step_2")
    rows = read_metrics(b)
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(a_last_val, rel=1e-6)
    assert rows[1]["step"] == 1 and rows[1]["loss"] == pytest.approx(a_last_val, rel=1e-6)
    assert rows[1]["lr"] == read_metrics(run_a)[1]["lr"]  # the schedule restarts: warmup's first value again
    state = torch.load(b / "checkpoints/step_1/state.pt", weights_only=True)
    assert state["step"] == 1
    # one Adam update per tensor since B began (A's optimizer had taken 2)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {1.0}


def test_a_different_adapter_is_one_line_error(run_a, tiny_recipe, tmp_path):
    with pytest.raises(UserError, match=r"model.init_from: .*adapter_model.safetensors: tensor .*lora_A.weight has "
                                        r"shape \[4, \d+\], the base model .* needs \[8, \d+\]"):
        start_from(tiny_recipe, tmp_path, run_a, "peft.lora_rank=8")
