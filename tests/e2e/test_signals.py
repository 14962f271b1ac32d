"""SIGUSR1 / SIGTERM (Slurm preemption) checkpoint at the next step boundary and exit; rerunning continues."""
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, read_metrics, tiny_overrides


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_exits_then_resume_finishes(tiny_recipe, tmp_path, sig):
    import os

    args = [sys.executable, "-m", "tuneforge", "finetune", "-c", str(tiny_recipe),
            *tiny_overrides(tmp_path, "pre", "train.max_steps=400", "data.seq_length=128")]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "pre/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    step = read_metrics(tmp_path / "pre")[-1]["step"]
    assert f"{sig.name}: checkpointing at step {step} and exiting" in out
    assert step < 400 and (tmp_path / f"pre/checkpoints/step_{step}/manifest.json").is_file()
    assert not (tmp_path / "pre/final").exists()
    resumed = subprocess.run(args + [f"train.stop_at_step={step + 2}"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and f"resuming after step {step}" in resumed.stdout, resumed.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "pre")] == list(range(1, step + 3))
