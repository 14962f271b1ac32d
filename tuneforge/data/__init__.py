"""Data: sources -> prompt rendering -> tokenization with a loss mask -> batches."""
from __future__ import annotations

from dataclasses import dataclass

from tuneforge.config.schema import DataConfig, DataSource
from tuneforge.data.loader import Collator, MicroBatchSampler, build_eval_batches, build_train_loader
from tuneforge.data.sources import DEFAULT_TEMPLATES, Record, load_records
from tuneforge.data.tokenize import IGNORE, Example, TokenizeStats, tokenize_records


@dataclass
class PreparedData:
    records: list[Record]
    examples: list[Example]
    stats: TokenizeStats


def template_for(data: DataConfig, source: DataSource) -> str:
    return data.prompt_template or DEFAULT_TEMPLATES[source.format]


def prepare_source(data: DataConfig, source: DataSource, tokenizer) -> PreparedData:
    records = load_records(source.path, source.format, source.limit)
    examples, stats = tokenize_records(records, tokenizer, template_for(data, source), data.seq_length,
                                       data.train_on_inputs, source=source.path)
    return PreparedData(records, examples, stats)


__all__ = ["IGNORE", "Collator", "Example", "MicroBatchSampler", "PreparedData", "Record", "TokenizeStats",
           "build_eval_batches", "build_train_loader", "prepare_source", "template_for", "tokenize_records"]
