"""The first steps of recipes/quickstart.yaml reproduce the stored reference curve (CPU, deterministic).

The reference was recorded from a real run of this recipe. Regenerate it only when numerics change on purpose
(UPDATE_GOLDEN=1 pytest tests/golden) and say why in the commit."""
import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, run_cli

GOLDEN = Path(__file__).with_name("quickstart.jsonl")
STEPS = 8


def test_quickstart_first_steps_match_reference(tmp_path):
    run_cli("finetune", "-c", str(REPO / "recipes/quickstart.yaml"), f"run.output_dir={tmp_path}",
            f"train.stop_at_step={STEPS}", "data.validation=null", "logging.tensorboard=false")
    rows = [{"step": r["step"], "loss": r["loss"], "grad_norm": r["grad_norm"], "lr": r["lr"]}
            for r in read_metrics(tmp_path / "quickstart") if "loss" in r]  # step 0 holds the recipe's SQuAD baseline
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    for got, want in zip(rows, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), got["step"]
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5), got["step"]
        assert got["lr"] == pytest.approx(want["lr"], rel=1e-12)
