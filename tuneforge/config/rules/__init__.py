"""Every recipe rule: pure functions of the Config and of plain values (the process count, a strategy name, a model
kind), with no torch and nothing above the config layer. One module per part of the recipe; `check_recipe` runs
them all, and every subcommand that takes a recipe runs it through load_config, so `finetune`, `plan`, `slurm`,
`prepare-data` and the torchrun launcher refuse the same recipes with the same one-line message.

Rules that need more than the recipe (the checkpoint's config.json, the disk, an installed package) are the
pre-flight's (tuneforge/preflight.py), which calls back into these for what depends on the process count and on the
model kind it resolves."""
from __future__ import annotations

from tuneforge.config.rules.batch import check_batch
from tuneforge.config.rules.data import check_data
from tuneforge.config.rules.distributed import check_strategy
from tuneforge.config.rules.eval import check_eval
from tuneforge.config.rules.kind import check_kind
from tuneforge.config.rules.model import check_model
from tuneforge.config.rules.peft import validate_peft_section
from tuneforge.config.rules.preference import check_preference
from tuneforge.config.rules.rl import check_rl
from tuneforge.config.rules.train import check_checkpoint, check_train
from tuneforge.config.schema import Config


def check_recipe(cfg: Config, origin: str = "<config>", world_size: int = 1, check_paths: bool = True) -> None:
    """Refuse, in one line naming `origin` and the field, a recipe no run of `world_size` processes can train.
    check_paths=False skips the files the recipe names (a finished run's recorded recipe, read on another machine)."""
    check_model(cfg, origin, check_paths)
    check_data(cfg, origin, check_paths)
    check_train(cfg, origin)
    check_checkpoint(cfg, origin, check_paths)
    validate_peft_section(cfg, origin)
    check_eval(cfg, origin, check_paths)
    check_preference(cfg, origin)
    check_rl(cfg, origin)
    check_world(cfg, world_size, origin)
    if cfg.model.kind != "auto":  # otherwise the kind comes from config.json: the pre-flight checks it
        check_kind(cfg, cfg.model.kind, origin)


def check_world(cfg: Config, world_size: int, origin: str | None = None) -> str:
    """The rules that depend on the process count: batch arithmetic and the strategy. Returns the strategy
    `world_size` processes run with."""
    check_batch(cfg, origin, world_size)
    return check_strategy(cfg, world_size, origin)


__all__ = ["check_recipe", "check_world"]
