"""The steps of tests/golden/tiny_dpo.yaml (LoRA DPO, sigmoid, on stories260K and the shipped SQuAD pairs) reproduce
the stored fp32 reference curve (CPU), as tests/golden/test_tiny_lora_curve.py does for SFT.

tiny_dpo_fp32.jsonl was recorded from a real run of this recipe (model.dtype pinned to float32 in the recipe).
Regenerate it only when numerics change on purpose (UPDATE_GOLDEN=1 pytest tests/golden/test_tiny_dpo_curve.py) and
say why in the commit.

The tolerance comes from measuring the same 10 steps on one AVX-512-BF16 CPU through different kernels
(ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 against the default), and 1 against 2 threads: AVX2 against
AVX-512 kernels differ by at most 1.6e-6 relative in the loss and 1.5e-6 in the grad norm (threads: bit-identical).
A 2e-5 relative band is 12x that, and 50x tighter than a 1e-3 change of one step's loss (which fails: the second
test). Step 1 is ln 2 exactly (lora_B = 0: the policy is the reference). The tokens of each step (the pair batches)
and the lr are held exactly."""
import json
import os
from pathlib import Path

import pytest

from tests.conftest import REPO, STORIES, read_metrics
from tests.tiny_recipes import one_torch_thread, skip_report_plots  # noqa: F401 (autouse)

pytestmark = pytest.mark.precision  # run again under AVX2-only kernels in CI (.ci/run)

HERE = Path(__file__).parent
GOLDEN = HERE / "tiny_dpo_fp32.jsonl"
STEPS = 10
TOLERANCE = 2e-5  # relative, loss and grad_norm, every step
KEYS = ("step", "loss", "grad_norm", "lr", "tokens", "pairs")


def mismatches(rows: list[dict], reference: list[dict]) -> list[str]:
    """The steps whose loss, grad norm, lr or batch leave the tolerance (empty: the curve matches)."""
    if [r["step"] for r in rows] != [r["step"] for r in reference]:
        return [f"steps {[r['step'] for r in rows]} != {[r['step'] for r in reference]}"]
    bad = []
    for got, want in zip(rows, reference):
        for key, tol in (("loss", TOLERANCE), ("grad_norm", TOLERANCE), ("lr", 1e-12), ("tokens", 0), ("pairs", 0)):
            if abs(got[key] - want[key]) > tol * abs(want[key]):
                bad.append(f"step {got['step']} {key}: {got[key]!r} vs reference {want[key]!r} (rel tol {tol})")
    return bad


def tiny_dpo_rows(tmp_path: Path, monkeypatch) -> list[dict]:
    # In this process, on one torch thread (the curve is bit-identical on two) and without the report's plots: the
    # command line's start-up and the plots would double the test's time. The recipe's paths are made absolute so
    # the run does not depend on the working directory.
    from tuneforge.api import finetune

    skip_report_plots(monkeypatch)
    run_dir = finetune(HERE / "tiny_dpo.yaml", [f"run.output_dir={tmp_path}", f"model.name_or_path={STORIES}",
                                                f"data.train.path={REPO / 'assets/data/squad_pairs/train.jsonl'}"])
    return [{k: r[k] for k in KEYS} for r in read_metrics(run_dir) if "loss" in r]


def test_tiny_dpo_steps_match_reference(tmp_path, monkeypatch):
    rows = tiny_dpo_rows(tmp_path, monkeypatch)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reference = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    assert reference[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-7)  # ln 2: the policy is the reference
    assert mismatches(rows, reference) == []


def test_tolerance_catches_a_loss_off_by_one_in_a_thousand():
    """The band is no wider than it must be: the reference itself passes, and the same curve with one step's loss
    moved by 1e-3 (relative, or absolute) fails at that step and nowhere else."""
    reference = [json.loads(line) for line in GOLDEN.read_text().splitlines()]
    assert len(reference) == STEPS and mismatches(reference, reference) == []
    for i in range(STEPS):
        for moved_loss in (reference[i]["loss"] * 1.001, reference[i]["loss"] + 1e-3):
            moved = [dict(r, loss=moved_loss) if j == i else r for j, r in enumerate(reference)]
            assert mismatches(moved, reference) == [f"step {i + 1} loss: {moved_loss!r} vs reference "
                                                    f"{reference[i]['loss']!r} (rel tol {TOLERANCE})"]
    scaled = [dict(r, grad_norm=r["grad_norm"] * 1.001) for r in reference]
    assert len(mismatches(scaled, reference)) == STEPS
