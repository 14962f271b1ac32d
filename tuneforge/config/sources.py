"""The data sources a recipe names, as lists: every train and validation source, the named validation sets, and
whether a path is a Hub dataset id. Plain functions of the schema, so the recipe rules (config/rules), the data
layer and evaluation all read a recipe's `data` section the same way."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tuneforge.config.schema import DataConfig, DataSource

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


def validation_sources(data: DataConfig) -> list[tuple[str, Any]]:
    """(name, source) for every validation set, in recipe order; a lone source is named 'validation'."""
    val = data.validation
    if val is None:
        return []
    if isinstance(val, dict):
        return [(str(name), src) for name, src in val.items()]
    if isinstance(val, (list, tuple)):
        named = []
        for i, src in enumerate(val):
            name = getattr(src, "name", None) or Path(src.path).stem or f"validation_{i}"
            named.append((name, src))
        return _unique(named)
    return [("validation", val)]


def _unique(named: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: dict[str, int] = {}
    out = []
    for name, src in named:
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}_{seen[name]}", src))
    return out
