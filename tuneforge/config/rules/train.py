"""The optimisation and checkpoint sections: values no run can use (a zero learning rate, checkpoints every 0
steps, a resume path that is not there)."""
from __future__ import annotations

from tuneforge.config.rules.common import check, exists
from tuneforge.config.schema import Config


def check_train(cfg: Config, origin: str | None) -> None:
    t = cfg.train
    check(t.max_steps is None or t.max_steps >= 1, origin, f"train.max_steps: must be >= 1, got {t.max_steps}")
    check(t.stop_at_step is None or t.stop_at_step >= 1, origin,
          f"train.stop_at_step: must be >= 1 or null, got {t.stop_at_step}")
    check(t.num_epochs > 0, origin, f"train.num_epochs: must be > 0, got {t.num_epochs}")
    check(t.optimizer.lr > 0, origin, f"train.optimizer.lr: must be > 0, got {t.optimizer.lr}")
    check(len(t.optimizer.betas) == 2 and all(0 <= b < 1 for b in t.optimizer.betas), origin,
          f"train.optimizer.betas: expected two numbers in [0, 1), got {t.optimizer.betas}")
    check(t.grad_clip is None or t.grad_clip > 0, origin, f"train.grad_clip: must be > 0 or null, got {t.grad_clip}")
    check(t.max_bad_steps >= 1, origin, f"train.max_bad_steps: must be >= 1, got {t.max_bad_steps}")
    check(t.log_every_steps >= 1, origin, f"train.log_every_steps: must be >= 1, got {t.log_every_steps}")
    check(t.val_every_steps is None or t.val_every_steps >= 1, origin,
          f"train.val_every_steps: must be >= 1 or null, got {t.val_every_steps}")
    check(t.lr_scheduler.warmup_steps >= 0, origin, "train.lr_scheduler.warmup_steps: must be >= 0")
    check(t.loss_chunk_tokens >= 0, origin, f"train.loss_chunk_tokens: must be >= 0, got {t.loss_chunk_tokens}")
    check(t.release_memory_every_steps is None or t.release_memory_every_steps >= 1, origin,
          f"train.release_memory_every_steps: must be >= 1 or null, got {t.release_memory_every_steps}")


def check_checkpoint(cfg: Config, origin: str | None, check_paths: bool) -> None:
    c = cfg.checkpoint
    check(c.every_steps is None or c.every_steps >= 1, origin, "checkpoint.every_steps: must be >= 1 or null")
    check(c.keep_last is None or c.keep_last >= 1, origin, "checkpoint.keep_last: must be >= 1 or null")
    check(not check_paths or c.resume in ("auto", "never") or exists(c.resume, "is_dir"), origin,
          f"checkpoint.resume: expected auto, never or an existing checkpoint directory, got '{c.resume}'")
