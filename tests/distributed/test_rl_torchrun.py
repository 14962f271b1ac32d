"""Online RL under torchrun: 2 processes (DDP, and FSDP2 in lockstep) sample the same completions and train what one
process trains, step for step. Each completion draws from a random stream of its own (keyed by seed, step, prompt and
number), so the split of the prompts over the processes changes no sample."""
import pytest
import torch

from tests.conftest import REPO, read_metrics
from tests.distributed.test_torchrun import final_logits, run

pytestmark = pytest.mark.slow

PROMPTS = REPO / "tests/fixtures/rl_prompts.jsonl"
# 4 prompts x 4 completions a step (one process: micro 8 x accumulation 2; two: micro 8 each), 3 steps; 4 held-out
# prompts answered greedily at steps 0, 2 and 3
RL = [f"data.train.path={PROMPTS}", "data.train.format=prompt", "data.train.limit=null",
      f"data.validation.path={PROMPTS}", "data.validation.format=prompt", "data.validation.limit=4",
      "data.seq_length=64", "train.micro_batch_size=8", "train.global_batch_size=16", "train.max_steps=3",
      "train.val_every_steps=2", "train.optimizer.fused=false", "train.optimizer.lr=0.01", "rl.num_generations=4",
      "rl.max_completion_length=12", "rl.rewards=[{function: length, target: 20}]", "rl.loss_type=dapo"]
SAME = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completion_tokens", "val_reward")


def test_two_processes_sample_and_train_what_one_does(tiny_recipe, tmp_path):
    run(tiny_recipe, tmp_path, "one", *RL)
    want_rows, want = read_metrics(tmp_path / "one"), final_logits(tmp_path / "one/final", True)
    for strategy in ("ddp", "fsdp2"):
        two = run(tiny_recipe, tmp_path, strategy, *RL, f"distributed.strategy={strategy}", nproc=2)
        assert f"x 2 process(es) [{strategy}]" in two.stdout
        got_rows = read_metrics(tmp_path / strategy)
        assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
        for g, w in zip(got_rows, want_rows):
            for key in SAME:  # the same completions: identical rewards and lengths
                assert g.get(key) == w.get(key), (strategy, g["step"], key)
            for key in ("loss", "grad_norm", "entropy"):
                if key in w:
                    assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (strategy, g["step"], key)
        got = final_logits(tmp_path / strategy / "final", True)
        assert torch.allclose(got, want, atol=1e-4), (strategy, (got - want).abs().max())
