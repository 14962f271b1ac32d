"""What every registry of the config layer (PEFT methods, preference losses) does alike: index its entries by name."""
from __future__ import annotations

from typing import Iterable, TypeVar

E = TypeVar("E")  # an entry with a `name`


def index_by_name(entries: Iterable[E], what: str) -> dict[str, E]:
    """{entry.name: entry}, in registry order; a name listed twice is a mistake in the registry ("{what} X is
    registered twice")."""
    index: dict[str, E] = {}
    for entry in entries:
        if entry.name in index:
            raise ValueError(f"{what} {entry.name} is registered twice")
        index[entry.name] = entry
    return index
