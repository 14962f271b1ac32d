"""Preference tuning through the real command line: TRL's metric names in every sink, the precomputed reference
stored with the run and restored after SIGTERM and SIGKILL (bit-identical end), the NaN guard, `tuneforge plan`."""
import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, read_metrics, run_cli, tiny_overrides
from tests.e2e.test_reliability import wait_for
from tuneforge.config import load_config

PAIRS = REPO / "assets/data/squad_pairs/train.jsonl"
DEV_PAIRS = REPO / "assets/data/squad_pairs/dev.jsonl"
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
TIMING = {"tokens_per_s", "step_seconds", "peak_rss_mb"}


def dpo_overrides(tmp_path, name, *extra):
    """stories260K on 32 shipped SQuAD pairs, the prompt's end (question and 'Answer:') in 96 tokens."""
    return tiny_overrides(tmp_path, name, f"data.train.path={PAIRS}", "data.train.format=preference",
                          "data.train.limit=32", "data.seq_length=128", "preference.loss_type=sigmoid",
                          "preference.max_prompt_length=96", "train.micro_batch_size=4", "train.global_batch_size=4",
                          "train.lr_scheduler.name=constant", "train.optimizer.lr=0.01", *extra)


def validation(limit=6):
    return [f"data.validation.path={DEV_PAIRS}", "data.validation.format=preference", f"data.validation.limit={limit}"]


def test_lora_dpo_logs_trl_metrics_everywhere_from_ln2(tiny_recipe, tmp_path, capsys):
    out = run_cli("finetune", "-c", str(tiny_recipe),
                  *dpo_overrides(tmp_path, "dpo", "logging.tensorboard=true", "train.val_every_steps=4", "train.max_steps=8",
                                 "data.train.limit=8", "train.optimizer.lr=0.003", *validation()))
    assert "reference: adapter_off" in out.stdout
    rows = read_metrics(tmp_path / "dpo")
    steps = [r for r in rows if "loss" in r]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6  # the policy starts at the reference: lora_B = 0
    assert all(set(TRL_METRICS) <= set(r) and r["pairs"] == 4 for r in steps)
    assert (steps[-1]["loss"] + steps[-2]["loss"]) / 2 < math.log(2)  # 8 pairs, each seen four times
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 4, 8] and abs(val[0]["val_loss"] - math.log(2)) < 1e-6
    assert all(f"val_{k}" in r for r in val for k in TRL_METRICS)
    assert "held-out rewards/accuracies 0.000 -> " in out.stdout and "chosen likelier" in out.stdout
    assert 0 < val[0]["val_logps/accuracies"] < 1  # the base model's own preference, already at step 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(tmp_path / "dpo/tb")).Reload().Tags()["scalars"]
    assert {"train/rewards/accuracies", "val/val_rewards/margins"} <= set(tags) or \
        {"rewards/accuracies", "val_rewards/margins"} <= set(tags), tags
    assert "rewards/accuracies" in (tmp_path / "dpo/report.html").read_text()
    assert (tmp_path / "dpo/final/adapter_model.safetensors").is_file()
    assert not (tmp_path / "dpo/reference_logps.safetensors").exists()  # the adapter off is the reference
    # a finished preference run: eval scores its held-out pairs as the last validation did; generate and
    # prepare-data show pairs
    from tuneforge import cli  # in this process: three more interpreter start-ups would add seconds, not checks

    assert cli.main(["eval", "--run", str(tmp_path / "dpo")]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("val_loss", *(f"val_{k}" for k in TRL_METRICS)):
        assert scores[key] == pytest.approx(val[-1][key], rel=1e-5, abs=1e-6), key
    assert cli.main(["generate", "--run", str(tmp_path / "dpo"), "--examples", "2", "--max-new-tokens", "3"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("   chosen: ") == 2 and "dev.jsonl:2" in shown
    assert cli.main(["prepare-data", "-c", str(tiny_recipe), *dpo_overrides(tmp_path, "dpo")]) == 0
    report = capsys.readouterr().out
    assert "pairs" in report and ">>>" in report


def test_full_dpo_reference_is_stored_and_survives_sigterm_and_sigkill(tiny_recipe, tmp_path):
    """Full fine-tuning precomputes the reference; a run stopped by SIGTERM, then killed inside a checkpoint write
    (SIGKILL), finishes with the weights and metrics of an uninterrupted run."""
    steps = ["peft=null", "train.optimizer.lr=0.0005", "train.max_steps=8", "checkpoint.every_steps=1",
             "checkpoint.keep_last=2", "train.val_every_steps=4", *validation(4)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "tuneforge", "finetune", "-c", str(tiny_recipe)]
    whole = subprocess.Popen([*command, *dpo_overrides(tmp_path, "whole", *steps)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = [*command, *dpo_overrides(tmp_path, "parts", *steps)]
    rng = random.Random(1)
    proc = subprocess.Popen(parts, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for("training", proc, tmp_path / "parts", rng)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "SIGTERM: checkpointing at step" in out, err
    assert "reference: log-probs of the starting model for 36 pairs" in out
    stored = load_file(tmp_path / "parts/reference_logps.safetensors")
    assert stored["train"].shape == (32, 2) and stored["val/dev"].shape == (4, 2)
    for moment in ("write",):
        proc = subprocess.Popen(parts, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(moment, proc, tmp_path / "parts", rng)
        assert proc.poll() is None, f"the run ended before the '{moment}' kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    w_out, w_err = whole.communicate(timeout=300)
    assert whole.returncode == 0, w_err
    out = run_cli(*parts[3:])
    assert "reference: precomputed log-probs read from reference_logps.safetensors" in out.stdout
    a, b = (load_file(tmp_path / f"{name}/final/model.safetensors") for name in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "parts")) == strip(read_metrics(tmp_path / "whole"))
    assert torch.equal(stored["train"], load_file(tmp_path / "whole/reference_logps.safetensors")["train"])


def test_non_finite_preference_step_is_skipped(tiny_recipe, tmp_path, monkeypatch):
    import tuneforge.models.loss as loss_mod
    from tuneforge.train import finetune

    real, calls = loss_mod.sequence_logps, {"n": 0}

    def logps(model, batch, **kwargs):  # simpo has no reference: one call per step
        calls["n"] += 1
        sums, counts = real(model, batch, **kwargs)
        return (sums * float("nan") if calls["n"] == 3 else sums), counts
    monkeypatch.setattr(loss_mod, "sequence_logps", logps)
    finetune(load_config(tiny_recipe, dpo_overrides(tmp_path, "nan", "preference.loss_type=simpo",
                                                    "preference.beta=2.0", "train.max_steps=4")))
    rows = read_metrics(tmp_path / "nan")
    assert rows[2]["step"] == 3 and rows[2]["loss"] == "nan" and rows[2]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != 3)


def test_plan_sizes_a_preference_run(tiny_recipe, tmp_path, capsys):
    from tuneforge import cli

    assert cli.main(["plan", "-c", str(tiny_recipe), *dpo_overrides(tmp_path, "plan")]) == 0
    out = capsys.readouterr().out
    assert "preference sigmoid: micro batch counts pairs, 2 sequences each; reference = adapter off" in out, out


def test_orpo_trains_with_its_sft_term_and_no_reference(tiny_recipe, tmp_path):
    """ipo, hinge and robust take sigmoid's path through the loop (their formulas: tests/unit/test_preference.py);
    orpo has no reference and an SFT term of its own."""
    from tuneforge.train import finetune

    finetune(load_config(tiny_recipe, dpo_overrides(tmp_path, "orpo", "preference.loss_type=orpo", "train.max_steps=2",
                                                    *validation(2))))
    rows = read_metrics(tmp_path / "orpo")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["nll_loss"] > 0 and math.isfinite(r["loss"]) for r in rows[1:])
    assert rows[-1]["val_nll_loss"] > 0 and not (tmp_path / "orpo/reference_logps.safetensors").exists()
