"""SIGUSR1 / SIGTERM (Slurm preemption) checkpoint at the next step boundary and exit; rerunning continues."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, read_metrics, tiny_overrides
from tuneforge.checkpoint import find_latest, verify


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_exits_then_resume_finishes(tiny_recipe, tmp_path, sig):
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


def test_second_sigint_exits_at_once_and_leaves_only_whole_checkpoints(tiny_recipe, tmp_path):
    """The first Ctrl-C starts the stop checkpoint; a second one during it exits 130 without publishing it."""
    args = [sys.executable, "-m", "tuneforge", "finetune", "-c", str(tiny_recipe),
            *tiny_overrides(tmp_path, "int", "train.max_steps=400", "data.seq_length=128", "checkpoint.every_steps=2",
                            "peft=null")]  # full fine-tuning: the checkpoint write takes a while
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = tmp_path / "int/checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts / "LATEST").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:  # the stop checkpoint is being written once this is printed
        if "SIGINT: checkpointing at step" in line:
            break
    proc.send_signal(signal.SIGINT)
    interrupted = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - interrupted < 3
    # (the message is the second-Ctrl-C one unless the stop checkpoint was already done: then Python's own handler)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and lines[0].startswith("tuneforge: interrupted"), err
    visible = [p.name for p in ckpts.iterdir() if not p.name.startswith(".")]
    assert "LATEST" in visible and all(verify(ckpts / name) is None for name in visible if name != "LATEST")
    assert find_latest(ckpts) == ckpts / (ckpts / "LATEST").read_text()
    step = int(find_latest(ckpts).name.split("_")[1])
    resumed = subprocess.run(args + [f"train.stop_at_step={step + 1}"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0 and f"resuming after step {step}" in resumed.stdout, resumed.stderr


def test_second_sigint_inside_a_checkpoint_write_publishes_nothing(tiny_recipe, tmp_path, monkeypatch):
    import tuneforge.checkpoint as ckpt_mod
    from tuneforge.config import load_config
    from tuneforge.train import finetune

    real_save, calls = ckpt_mod.save_file, []

    def save_file(tensors, path):
        calls.append(path)
        if len(calls) == 3:  # writing step 3: Ctrl-C twice
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        real_save(tensors, path)
    monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    cfg = load_config(tiny_recipe, tiny_overrides(tmp_path, "w", "train.max_steps=4", "checkpoint.every_steps=1"))
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under a shell's background job
    with pytest.raises(KeyboardInterrupt, match="a second Ctrl-C stops at once"):
        finetune(cfg)
    ckpts = tmp_path / "w/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["LATEST", "step_1", "step_2"]
    assert find_latest(ckpts) == ckpts / "step_2" and verify(ckpts / "step_2") is None
    assert signal.getsignal(signal.SIGINT) is before  # the run gave the process its handler back
