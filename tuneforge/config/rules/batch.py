"""Batch arithmetic: an optimizer step is micro_batch_size x accumulation x data-parallel size examples, so the
global batch must be a whole number of micro-batches on every process. Depends on the process count, which is why
the launcher and `tuneforge slurm` check it at the size they start, not at 1."""
from __future__ import annotations

from tuneforge.config.rules.common import check
from tuneforge.config.schema import Config


def check_batch(cfg: Config, origin: str | None, world_size: int) -> None:
    t = cfg.train
    check(t.micro_batch_size >= 1, origin, f"train.micro_batch_size: must be >= 1, got {t.micro_batch_size}")
    check(t.global_batch_size >= 1, origin, f"train.global_batch_size: must be >= 1, got {t.global_batch_size}")
    per_step = t.micro_batch_size * world_size
    check(t.global_batch_size % per_step == 0, origin,
          f"train.global_batch_size ({t.global_batch_size}) is not divisible by micro_batch_size "
          f"({t.micro_batch_size}) x data-parallel size ({world_size}) = {per_step}")
    if cfg.rl is not None and t.global_batch_size % cfg.rl.num_generations == 0:
        groups = t.global_batch_size // cfg.rl.num_generations
        check(groups % world_size == 0, origin,
              f"train.global_batch_size ({t.global_batch_size}) / rl.num_generations ({cfg.rl.num_generations}) = "
              f"{groups} prompts a step, not divisible by the data-parallel size ({world_size}): each process "
              "samples whole groups")
