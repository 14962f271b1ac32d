"""Tokenized data as the loaders read it: a flat token table per set, what each source contributed, and the
val_split hold-out. Shared by the text pipeline (prepare.py) and classification (classify.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from tuneforge.data.records import Record
from tuneforge.data.tokenize import IGNORE, Example, TokenizeStats
from tuneforge.errors import UserError


class TokenTable:
    """Examples as flat arrays: ids[offsets[i]:offsets[i+1]] is example i; mask marks its labelled tokens."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray):
        self.ids, self.mask, self.offsets = ids, mask, offsets
        self.lengths = np.diff(offsets)

    @classmethod
    def from_examples(cls, examples: list[Example]) -> "TokenTable":
        lengths = np.fromiter((len(ex.input_ids) for ex in examples), dtype=np.int64, count=len(examples))
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        n = int(offsets[-1])  # chain.from_iterable + fromiter stay in C: ~20x faster than a generator expression
        ids = np.fromiter(chain.from_iterable(ex.input_ids for ex in examples), dtype=np.int32, count=n)
        mask = np.fromiter(chain.from_iterable(ex.labels for ex in examples), dtype=np.int64, count=n) != IGNORE
        return cls(ids, mask, offsets)

    @classmethod
    def concat(cls, tables: list["TokenTable"]) -> "TokenTable":
        if len(tables) == 1:
            return tables[0]
        starts = np.cumsum([0] + [int(t.offsets[-1]) for t in tables[:-1]])
        offsets = np.concatenate([tables[0].offsets[:1]] + [t.offsets[1:] + s for t, s in zip(tables, starts)])
        return cls(np.concatenate([t.ids for t in tables]), np.concatenate([t.mask for t in tables]), offsets)

    def subset(self, index: np.ndarray) -> "TokenTable":
        return TokenTable.from_examples([self[int(i)] for i in index])

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> Example:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b].astype(np.int64)
        return Example(ids.tolist(), np.where(self.mask[a:b], ids, IGNORE).tolist())

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_label_tokens(self) -> int:
        return int(self.mask.sum())


@dataclass
class SourceReport:
    """What one source contributed, for logs and `tuneforge prepare-data`."""
    name: str
    path: str
    format: str
    records: int
    stats: TokenizeStats
    tokens: int = 0
    label_tokens: int = 0
    cached: bool = False
    seconds: float = 0.0
    weight: float = 1.0

    def line(self) -> str:
        how = "cached" if self.cached else f"tokenized in {self.seconds:.1f}s"
        return (f"{self.name} ({self.format}, {self.path}): {self.records} records -> {self.stats.summary()}; "
                f"{self.tokens:,} tokens, {self.label_tokens:,} labelled; {how}")


@dataclass
class PreparedData:
    """One training mixture or one validation set."""
    examples: TokenTable
    sources: list[SourceReport]
    bounds: list[int] = field(default_factory=list)  # example index where each source starts, plus the total
    records: list[Record] | None = None

    @property
    def stats(self) -> TokenizeStats:
        total = TokenizeStats()
        for s in self.sources:
            total.examples += s.stats.examples
            total.truncated += s.stats.truncated
            total.dropped.update(s.stats.dropped)
        return total

    @property
    def bounds_sizes(self) -> list[int]:
        return [hi - lo for lo, hi in zip(self.bounds, self.bounds[1:])]

    @property
    def weights(self) -> list[float]:
        return [s.weight for s in self.sources]


def split_validation(train: PreparedData, val_split: float, seed: int) -> tuple[PreparedData, PreparedData]:
    """Hold out a fraction (val_split < 1) or a number of examples (val_split >= 1) of the training data, the same
    share of every source (seeded); both parts keep their source boundaries."""
    fraction = val_split if val_split < 1 else val_split / len(train.examples)
    keep_parts, held_parts, kb, hb = [], [], [0], [0]
    g = np.random.default_rng(seed)
    for s in range(len(train.sources)):
        lo, hi = train.bounds[s], train.bounds[s + 1]
        order = lo + g.permutation(hi - lo)
        n_held = max(1, int(round(fraction * (hi - lo))))
        if n_held >= hi - lo:
            raise UserError(f"data.val_split: {val_split:g} of {hi - lo} examples of {train.sources[s].name} "
                            f"leaves nothing to train on")
        held_parts.append(np.sort(order[:n_held]))
        keep_parts.append(np.sort(order[n_held:]))
        kb.append(kb[-1] + hi - lo - n_held)
        hb.append(hb[-1] + n_held)
    keep = train.examples.subset(np.concatenate(keep_parts))
    held = train.examples.subset(np.concatenate(held_parts))
    return (PreparedData(keep, train.sources, kb), PreparedData(held, train.sources, hb))
