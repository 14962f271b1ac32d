"""The data sources a recipe names, as lists: every train and validation source, the named validation sets, and
whether a path is a Hub dataset id. Plain functions of the schema, so the recipe rules (config/rules), the data
layer and evaluation all read a recipe's `data` section the same way."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DataConfig, DataSource
from tuneforge.errors import UserError

TABLE_SUFFIXES = (".json", ".jsonl", ".arrow", ".parquet", ".txt")
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def is_hub_id(path: str) -> bool:
    """`owner/name` that is not a local path: a Hugging Face Hub dataset."""
    return (not Path(path).exists() and _HUB_ID.fullmatch(path) is not None
            and not path.endswith(TABLE_SUFFIXES))


def as_sources(value: DataSource | list[DataSource] | None) -> list[DataSource]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def recipe_sources(d: DataConfig) -> list[tuple[str, DataSource]]:
    """(config path, source) of every train and validation source, whether given as one mapping or a list; the
    config path (data.train[1]) is what an error message names."""
    out = []
    for key, value in (("data.train", d.train), ("data.validation", d.validation)):
        if isinstance(value, list):
            out.extend((f"{key}[{i}]", src) for i, src in enumerate(value))
        elif value is not None:
            out.append((key, value))
    return out


def source_name(source: DataSource) -> str:
    """What a source is called in reports and metrics (val_loss/<name>): its `name`, else its file's stem (the last
    part of a directory or Hub id). Training and `tuneforge eval` both name their sets by this one rule."""
    if getattr(source, "name", None):
        return source.name
    p = Path(source.path)
    return p.stem if p.suffix else p.name


def validation_sets(data: DataConfig) -> list[tuple[str, Any]]:
    """(name, source) for every data.validation source, in recipe order (a mapping's keys are its names). Two sets
    of one name are refused: their val_loss/<name> would be one number."""
    if isinstance(data.validation, dict):
        return [(str(name), src) for name, src in data.validation.items()]
    named, seen = [], set()
    for source in as_sources(data.validation):
        name = source_name(source)
        if name in seen:
            raise UserError(f"data.validation: two sets are named '{name}'; give each a distinct `name`")
        seen.add(name)
        named.append((name, source))
    return named
