"""Data: sources -> prompt rendering -> tokenization with a loss mask (cached) -> padded or packed batches."""
from __future__ import annotations

from tuneforge.config.sources import as_sources, source_name, validation_sets
from tuneforge.data.loader import (Collator, MicroBatchSampler, PackedCollator, batching_report, build_collator,
                                   build_eval_batches, build_train_loader, count_input_tokens)
from tuneforge.data.prepare import prepare_data, prepare_set, prepare_source, template_for
from tuneforge.data.records import DEFAULT_TEMPLATES, Record, load_records, load_source_records
from tuneforge.data.tables import PreparedData, TokenTable
from tuneforge.data.tokenize import IGNORE, Example, TokenizeStats, tokenize_chat, tokenize_records

__all__ = ["DEFAULT_TEMPLATES", "IGNORE", "Collator", "Example", "MicroBatchSampler", "PackedCollator",
           "PreparedData", "Record", "TokenTable", "TokenizeStats", "as_sources", "batching_report",
           "build_collator", "build_eval_batches", "build_train_loader", "count_input_tokens", "load_records",
           "load_source_records", "prepare_data", "prepare_set", "prepare_source", "source_name", "template_for",
           "tokenize_chat", "tokenize_records", "validation_sets"]
