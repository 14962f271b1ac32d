"""The data section: lengths, workers, every source (its limit, weight and path), validation carved from train,
chat prompts, and the label names of classification data."""
from __future__ import annotations

from tuneforge.config.rules.common import check, exists
from tuneforge.config.schema import Config, DataSource
from tuneforge.config.sources import is_hub_id, recipe_sources


def check_data(cfg: Config, origin: str | None, check_paths: bool) -> None:
    d = cfg.data
    check(d.seq_length >= 1, origin, f"data.seq_length: must be >= 1, got {d.seq_length}")
    check(d.num_workers >= 0, origin, f"data.num_workers: must be >= 0, got {d.num_workers}")
    for name, src in recipe_sources(d):
        check_source(name, src, origin, check_paths)
    check(isinstance(d.train, DataSource) or len(d.train) >= 1, origin, "data.train: needs at least one source")
    check(d.val_split is None or 0 < d.val_split < 1 or (d.val_split >= 1 and float(d.val_split).is_integer()),
          origin, f"data.val_split: expected a fraction in (0, 1) or a whole number of examples, got {d.val_split}")
    check(d.val_split is None or not d.validation, origin,
          "data.val_split: carves validation data from train only when data.validation is not given")
    check_chat(cfg, origin)
    check(d.labels is None or (len(d.labels) >= 2 and len(set(d.labels)) == len(d.labels)), origin,
          f"data.labels: expected at least 2 distinct label names, got {d.labels}")


def check_source(name: str, src: DataSource, origin: str | None, check_paths: bool) -> None:
    """One source; a path that is neither on disk nor a Hub dataset id is refused (unless paths are not checked:
    a finished run's recorded recipe may name files of another machine)."""
    check(src.limit is None or src.limit >= 1, origin, f"{name}.limit: must be >= 1 or null, got {src.limit}")
    check(src.weight > 0, origin, f"{name}.weight: must be > 0, got {src.weight}")
    check(bool(src.path), origin, f"{name}.path: required")
    check(not check_paths or exists(src.path) or is_hub_id(src.path), origin,
          f"{name}.path: no such file '{src.path}'")


def check_chat(cfg: Config, origin: str | None) -> None:
    """prompt_style chat turns a prompt/answer pair into chat turns: formats without a prompt cannot take it."""
    d = cfg.data
    if d.prompt_style == "chat":
        plain = [name for name, src in recipe_sources(d) if src.format in ("text", "classification")]
        check(not plain, origin, f"data.prompt_style: chat renders prompt/answer pairs as chat turns; "
              f"{plain[0] if plain else ''} has format text or classification, which have no prompt")
    check(d.system_prompt is None or d.prompt_style == "chat", origin,
          "data.system_prompt: needs data.prompt_style: chat")
