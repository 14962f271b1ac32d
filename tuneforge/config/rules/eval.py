"""The eval section: eval.squad needs questions to answer, from its own file or a squad-format validation set."""
from __future__ import annotations

from pathlib import Path

from tuneforge.config.rules.common import check
from tuneforge.config.schema import Config
from tuneforge.config.sources import as_sources


def check_eval(cfg: Config, origin: str | None, check_paths: bool) -> None:
    sq = cfg.eval.squad
    if sq is None:
        return
    for key in ("every_steps", "limit"):
        value = getattr(sq, key)
        check(value is None or value >= 1, origin, f"eval.squad.{key}: must be >= 1 or null, got {value}")
    for key in ("max_new_tokens", "batch_size"):
        value = getattr(sq, key)
        check(value >= 1, origin, f"eval.squad.{key}: must be >= 1, got {value}")
    if sq.path is not None:
        check(not check_paths or Path(sq.path).is_file(), origin, f"eval.squad.path: no such file '{sq.path}'")
        return
    check(any(src.format == "squad" for src in as_sources(cfg.data.validation)), origin,
          "eval.squad: needs eval.squad.path (a SQuAD json) or a squad-format data.validation set")
