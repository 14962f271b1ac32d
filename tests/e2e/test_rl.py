"""Online RL (GRPO) through the real command line, on one shared recipe: stories260K LoRA learns a length reward
(the reward and the held-out greedy reward rise), TRL's metric names are logged, completions.jsonl is written, and a
run SIGKILLed between the two iterations of one generation (num_iterations 2, a KL term) resumes to the weights,
metrics and completions of an uninterrupted run, bit for bit. A reward function that returns the wrong count is
refused in one line (exit 2)."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, STORIES, cli_in_process, read_metrics, run_cli

PROMPTS = REPO / "tests/fixtures/rl_prompts.jsonl"
STEPS = 10  # 5 generations, 2 optimizer steps each
TIMING = {"tokens_per_s", "step_seconds", "peak_rss_mb", "generation_seconds", "generation_tokens_per_s",
          "training_seconds", "training_tokens_per_s"}
TRL_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "rewards/length/mean", "rewards/length/std",
               "completions/mean_length", "completions/min_length", "completions/max_length",
               "completions/clipped_ratio", "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/low_min",
               "clip_ratio/high_mean", "clip_ratio/high_max", "clip_ratio/region_mean")


def rl_args(recipe, out, name, *extra):
    """16 prompts, 4 a step x 4 completions of at most 24 tokens, rewarded towards 20 characters; a KL term to the
    adapter switched off; every completion batch serves two steps; a checkpoint every step."""
    return ["finetune", "-c", str(recipe), f"run.output_dir={out}", f"run.name={name}", "run.seed=1",
            f"model.name_or_path={STORIES}", "model.dtype=float32",
            "peft={method: lora, lora_rank: 8, lora_alpha: 16, target_modules: all-linear}",
            f"data.train={{path: {PROMPTS}, format: prompt}}",
            f"data.validation={{path: {PROMPTS}, format: prompt}}", "data.seq_length=64",
            "train.micro_batch_size=8", "train.global_batch_size=16", f"train.max_steps={STEPS}",
            "train.optimizer.lr=0.02", "train.val_every_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
            "logging.tensorboard=false", "logging.progress=false",
            "rl.num_generations=4", "rl.max_completion_length=24", "rl.num_iterations=2", "rl.beta=0.04",
            "rl.rewards=[{function: length, target: 20}]", *extra]


def kill_between_iterations(args, run_dir, env) -> int:
    """SIGKILL while the checkpoint of a generation's second step (an even step) is being written: the newest whole
    checkpoint is then the first step's, whose rollout (completions, advantages, old log-probs) the resumed run must
    reuse. A kill that lands after the write published retries at the next one. Returns the step resumed from."""
    ckpts = run_dir / "checkpoints"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "tuneforge", *args], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            writing = [int(m.group(1)) for p in ckpts.glob(".tmp-step_*")
                       if (m := re.match(r"\.tmp-step_(\d+)", p.name))]
            if any(s % 2 == 0 and s >= STEPS - 2 for s in writing):  # late: the resumed run is short
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        assert proc.wait(timeout=60) == -signal.SIGKILL, "the run ended before the kill"
        latest = int((ckpts / "LATEST").read_text().strip().split("_")[1])
        if latest % 2 == 1:
            return latest
    pytest.fail("three kills all landed after the checkpoint write published")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_recipe):
    """An uninterrupted run, and the same run killed between two iterations, then resumed (both at once)."""
    out = tmp_path_factory.mktemp("rl")
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    whole = subprocess.Popen([sys.executable, "-m", "tuneforge", *rl_args(tiny_recipe, out, "whole")], cwd=REPO,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    resumed_from = kill_between_iterations(rl_args(tiny_recipe, out, "killed"), out / "killed", env)
    resumed = run_cli(*rl_args(tiny_recipe, out, "killed"))
    stdout, stderr = whole.communicate(timeout=300)
    assert whole.returncode == 0, stderr
    return out, stdout, resumed.stdout, resumed_from


def test_the_policy_learns_the_reward_and_logs_trls_metrics(runs):
    out, stdout, _, _ = runs
    rows = read_metrics(out / "whole")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(set(TRL_METRICS) <= set(r) and r["completions"] == 16 for r in steps)
    reward = [r["reward"] for r in steps]
    assert reward[0] < 0.05 and sum(reward[-4:]) / 4 > sum(reward[:4]) / 4 + 0.3, reward  # 2 generations each
    # the greedy reward of the 16 prompts: 0 for the base model, whose greedy stories run past 20 characters; it
    # swings as greedy decoding flips between modes of a 260K-parameter model, but stays above where it started
    val = [(r["step"], r["val_reward"]) for r in rows if "val_reward" in r]
    assert [s for s, _ in val] == list(range(0, STEPS + 1, 2)) and val[0][1] == 0.0, val
    later = [v for _, v in val[1:]]
    assert min(later) > 0 and max(later) > 0.5 and sum(later) / len(later) > 0.3, val
    # the first step of each generation records the sampler's log-probs against the training forward's; the second
    # reuses the completions (same reward metrics) with ratios against the first's log-probs
    firsts, seconds = steps[0::2], steps[1::2]
    assert all(r["sampling/logp_diff_max"] < 1e-4 for r in firsts)
    assert not any("sampling/logp_diff_max" in r for r in seconds)
    assert all(a["reward"] == b["reward"] and a["completions/mean_length"] == b["completions/mean_length"]
               for a, b in zip(firsts, seconds))
    assert all(r["clip_ratio/region_mean"] == 0 for r in firsts)  # the ratio is 1 on a generation's first step
    assert steps[0]["kl"] == 0.0 and all(r["kl"] > 0 for r in steps[1:])  # lora_B = 0: the policy starts at the
    assert "reference: adapter_off" in stdout                              # reference, then leaves it
    assert f"reward {reward[0]:.3f} -> " in stdout and "held-out greedy reward 0.000 -> " in stdout
    assert all("val_rewards/length/mean" in r for r in rows if "val_reward" in r)
    lines = [json.loads(line) for line in (out / "whole/completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [s for s in range(1, STEPS + 1, 2) for _ in range(4)]  # 4 per generation
    assert all(set(r) == {"step", "prompt", "completion", "reward"} and isinstance(r["completion"], str)
               for r in lines)
    shown = {json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()}
    assert {r["prompt"] for r in lines} <= shown and len({r["prompt"] for r in lines}) > 1
    assert (out / "whole/final/adapter_model.safetensors").is_file()


def test_resume_after_sigkill_between_two_iterations_is_bit_identical(runs):
    out, _, resumed_stdout, resumed_from = runs
    assert f"resuming after step {resumed_from} from" in resumed_stdout
    a = load_file(out / "whole/final/adapter_model.safetensors")
    b = load_file(out / "killed/final/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_metrics(out / "killed")) == strip(read_metrics(out / "whole"))
    assert (out / "killed/completions.jsonl").read_text() == (out / "whole/completions.jsonl").read_text()


@pytest.fixture(scope="module")
def bad_reward(tmp_path_factory, tiny_recipe):
    """The shared recipe with a reward function that returns one value too many, run in this process: (exit code,
    stderr lines, what it left in the output directory)."""
    from tuneforge import cli

    out = tmp_path_factory.mktemp("bad")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(rl_args(tiny_recipe, out, "bad",
                                f"data.validation={{path: {PROMPTS}, format: prompt, limit: 4}}",
                                "rl.rewards=[{function: 'tests.fixtures.rl_rewards:wrong_count'}]"))
    return code, err.getvalue().strip().splitlines(), sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_a_reward_returning_the_wrong_count_exits_2_in_one_line(bad_reward):
    code, err, _ = bad_reward
    assert code == 2
    assert err == ["tuneforge: error: rl.rewards[0] (tests.fixtures.rl_rewards:wrong_count): returned 3 values for 2 "
                   "completions; expected one float (or None) per completion"], err


def test_a_reward_returning_the_wrong_count_writes_nothing(bad_reward):
    assert bad_reward[2] == []


def test_eval_of_a_finished_rl_run_scores_its_held_out_prompts_as_training_did(runs):
    """`tuneforge eval --run` on an RL run: the greedy reward of its validation prompts, the number the run's last
    validation logged (the same final weights, the same greedy completions)."""
    out = runs[0]
    scores = json.loads(cli_in_process("eval", "--run", str(out / "whole")))
    last = [r for r in read_metrics(out / "whole") if "val_reward" in r][-1]
    assert scores["val_reward"] == pytest.approx(last["val_reward"], abs=1e-6)
    assert scores["val_rewards/length/mean"] == pytest.approx(last["val_rewards/length/mean"], abs=1e-6)
