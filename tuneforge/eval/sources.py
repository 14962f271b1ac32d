"""Which data a run is evaluated on: --dataset, eval.squad.path, or the recipe's validation sets (named by
config.sources.validation_sets, as training names them)."""
from __future__ import annotations

from pathlib import Path

from tuneforge.config.schema import Config, DataSource
from tuneforge.config.sources import validation_sets
from tuneforge.errors import UserError


def squad_source(cfg: Config, dataset: str | None = None, limit: int | None = None) -> DataSource | None:
    """The SQuAD questions to answer: --dataset, else eval.squad.path, else the first squad-format validation set.
    `limit` (None = the source's own limit, if any) caps the number of questions."""
    sq = cfg.eval.squad
    if dataset is not None:
        return DataSource(path=dataset, format="squad", limit=limit) if dataset_format(dataset) == "squad" else None
    if sq is not None and sq.path:
        return DataSource(path=sq.path, format="squad", limit=limit)
    for _, src in validation_sets(cfg.data):
        if src.format == "squad":
            return DataSource(path=src.path, format="squad", limit=limit if limit is not None else src.limit,
                              split=src.split)
    return None


def dataset_format(path: str) -> str:
    """--dataset FILE: a .jsonl file holds input/output lines, anything else is SQuAD json."""
    if not Path(path).is_file():
        raise UserError(f"--dataset: no such file '{path}'")
    return "input_output" if path.endswith(".jsonl") else "squad"
