"""Crash safety and the non-finite guard."""
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, SQUAD_DEV, read_metrics, run_cli, tiny_overrides
from tuneforge.config import load_config
from tuneforge.errors import TrainingAborted


def flaky_loss(monkeypatch, bad_calls):
    """Make tuneforge's loss non-finite on the given (1-based) calls."""
    import tuneforge.models.loss as loss_mod

    real, calls = loss_mod.causal_lm_loss, {"n": 0}

    def loss(model, batch, **kwargs):
        calls["n"] += 1
        out = real(model, batch, **kwargs)
        return out * float("nan") if bad_calls(calls["n"]) else out
    monkeypatch.setattr(loss_mod, "causal_lm_loss", loss)


def test_non_finite_step_is_skipped_and_counted(tiny_recipe, tmp_path, monkeypatch):
    from tuneforge.train import finetune

    flaky_loss(monkeypatch, lambda n: n == 3)
    finetune(load_config(tiny_recipe, tiny_overrides(tmp_path, "nan", "train.max_steps=5", "checkpoint.every_steps=1",
                                                     "checkpoint.keep_last=null")))
    rows = read_metrics(tmp_path / "nan")
    assert rows[2]["step"] == 3 and rows[2]["loss"] == "nan" and rows[2]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    two, three = (load_file(tmp_path / f"nan/checkpoints/step_{s}/trainable.safetensors") for s in (2, 3))
    assert all(torch.equal(two[k], three[k]) for k in two)  # the bad step changed nothing
    final = load_file(tmp_path / "nan/final/adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_consecutive_non_finite_steps_abort(tiny_recipe, tmp_path, monkeypatch):
    from tuneforge.train import finetune

    flaky_loss(monkeypatch, lambda n: n >= 2)
    cfg = load_config(tiny_recipe, tiny_overrides(tmp_path, "div", "train.max_steps=8", "train.max_bad_steps=3",
                                                  "checkpoint.every_steps=1"))
    with pytest.raises(TrainingAborted, match="3 consecutive steps had a non-finite loss"):
        finetune(cfg)
    assert not (tmp_path / "div/final").exists()
    newest = load_file(tmp_path / "div/checkpoints/step_3/trainable.safetensors")
    assert all(torch.isfinite(v).all() for v in newest.values())


FP32_STEPS = ["train.max_steps=16", "data.train.limit=48", "data.seq_length=128"]
# bf16 autocast (slow on CPUs without bf16 matmuls: shorter), validating often so that kills also land there
BF16_STEPS = ["model.dtype=bfloat16", "train.max_steps=10", "data.train.limit=24", "data.seq_length=96",
              "train.val_every_steps=2", f"data.validation={{path: {SQUAD_DEV}, format: squad, limit: 4}}"]


@pytest.mark.parametrize("steps,moments", [(FP32_STEPS, ["write", "any", "any"] * 2),
                                           (BF16_STEPS, ["write", "training", "write"])], ids=["fp32", "bf16"])
@pytest.mark.precision
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tiny_recipe, tmp_path, steps, moments):
    """A SIGKILL at each moment (inside a checkpoint write; anywhere; after training started), each followed by
    the same command again; the last rerun finishes with the weights and metrics of an uninterrupted run."""
    steps = ["checkpoint.every_steps=1", "checkpoint.keep_last=2", "train.micro_batch_size=4",
             "train.global_batch_size=4", *steps]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "tuneforge", "finetune", "-c", str(tiny_recipe)]
    whole = subprocess.Popen([*command, *tiny_overrides(tmp_path, "whole", *steps)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # alongside the kills
    killed = [*command, *tiny_overrides(tmp_path, "killed", *steps)]
    rng = random.Random(0)
    for moment in moments:
        proc = subprocess.Popen(killed, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(moment, proc, tmp_path / "killed", rng)
        assert proc.poll() is None, f"the run ended before the '{moment}' kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    run_cli(*killed[3:])
    a = load_file(tmp_path / "whole/final/adapter_model.safetensors")
    b = load_file(tmp_path / "killed/final/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    timing = {"tokens_per_s", "step_seconds", "peak_rss_mb"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "killed")) == strip(read_metrics(tmp_path / "whole"))


def wait_for(moment: str, proc, run_dir, rng, timeout: float = 60) -> None:
    """Return at the moment to kill: while a checkpoint is being written ('write'), soon after the run has
    metrics at all, often still starting up ('any'), or at a random point of the steps after this process's
    first one ('training': mid-step, mid-validation or mid-write)."""
    ckpts, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    lines = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    writes = lambda: {p.name for p in ckpts.glob(".tmp-step*")}  # noqa: E731
    started, old_writes, deadline = lines(), writes(), time.time() + timeout  # a killed write leaves its directory
    while proc.poll() is None and time.time() < deadline:
        if moment == "write" and writes() - old_writes:
            return
        if moment == "any" and metrics.exists() and rng.random() < 0.05:
            return
        if moment == "training" and lines() > started:
            time.sleep(rng.uniform(0, 0.5))
            return
        time.sleep(0.002)


def test_tokens_and_keys_never_reach_the_run_directory(tiny_recipe, tmp_path):
    secrets = {"HF_TOKEN": "hf_tuneforgeSECRETtoken123", "WANDB_API_KEY": "wandbSECRETkey456"}
    run_cli("finetune", "-c", str(tiny_recipe), *tiny_overrides(tmp_path, "s", "train.max_steps=2",
                                                                "checkpoint.every_steps=1",
                                                                "logging.tensorboard=true"), env=secrets)
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert len(files) > 8
    for path in files:
        data = path.read_bytes()
        for value in secrets.values():
            assert value.encode() not in data, path
