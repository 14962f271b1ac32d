"""Prepare the configured sources for training: read, render, tokenize (once, cached on disk), hold out.

The tokenized examples of a set live in three flat numpy arrays (token ids, a labelled-position mask, offsets), so a
cached set loads in milliseconds with mmap and 87k SQuAD examples cost ~3 bytes per token instead of two Python
lists of ints per example (~70 bytes per token)."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from tuneforge.config.schema import DataConfig, DataSource
from tuneforge.config.sources import as_sources, is_hub_id, source_name, validation_sets
from tuneforge.data.classify import prepare_classification_data, uses_classification
from tuneforge.data.records import DEFAULT_TEMPLATES, Record, dataset_fingerprint, load_source_records
from tuneforge.data.tables import PreparedData, SourceReport, TokenTable, split_validation
from tuneforge.data.tokenize import (TokenizeStats, chat_prompts_for, fit_chat_records, tokenize_chat,
                                    tokenize_records)
from tuneforge.errors import UserError
from tuneforge.files import atomic_dir

CACHE_VERSION = 1  # bump when tokenization changes what it produces for the same inputs


def template_for(data: DataConfig, source: DataSource) -> str:
    return source.prompt_template or data.prompt_template or DEFAULT_TEMPLATES[source.format]


# ---- cache -----------------------------------------------------------------------------------------------------

def cache_root(data: DataConfig) -> Path:
    return Path(data.cache_dir or os.environ.get("TUNEFORGE_CACHE_DIR") or
                Path.home() / ".cache" / "tuneforge" / "data").expanduser()


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def content_fingerprint(source: DataSource) -> str:
    """sha256 of the data itself (not its name or mtime), so an edited file misses and a copied one hits."""
    if is_hub_id(source.path):
        return f"hub:{source.path}:{source.split}:{dataset_fingerprint(source.path, source.split)}"
    h, p = hashlib.sha256(), Path(source.path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for q in files:
        h.update(str(q.relative_to(p) if p.is_dir() else "").encode())
        _hash_file(q, h)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         getattr(tokenizer, "chat_template", None), getattr(tokenizer, "add_bos_token", None),
                         getattr(tokenizer, "add_eos_token", None)], default=str).encode())
    return h.hexdigest()


def cache_key(data: DataConfig, source: DataSource, tokenizer) -> str:
    parts = {"version": CACHE_VERSION, "data": content_fingerprint(source),
             "tokenizer": tokenizer_fingerprint(tokenizer),
             "format": source.format, "columns": source.columns, "limit": source.limit, "split": source.split,
             "unanswerable": source.unanswerable, "truncation": source.truncation,
             "template": template_for(data, source), "chat_template": data.chat_template,
             "prompt_style": data.prompt_style, "system_prompt": data.system_prompt,
             "seq_length": data.seq_length, "train_on_inputs": data.train_on_inputs}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _load_cached(entry: Path) -> tuple[TokenTable, dict] | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        arrays = [np.load(entry / f"{k}.npy", mmap_mode="r") for k in ("ids", "mask", "offsets")]
    except (OSError, ValueError):
        return None
    return TokenTable(*arrays), meta


def _save_cached(entry: Path, table: TokenTable, meta: dict) -> None:
    """Built in a temporary directory and swapped in (files.atomic_dir), so a crash never leaves a half entry that
    later loads, nor removes a (damaged) old one before the new one is whole."""
    try:
        with atomic_dir(entry) as tmp:
            for k in ("ids", "mask", "offsets"):
                np.save(tmp / f"{k}.npy", getattr(table, k))
            (tmp / "meta.json").write_text(json.dumps(meta))
    except OSError as e:  # a read-only or full cache directory slows the next run down; it is not an error
        print(f"tuneforge: warning: cannot write data cache {entry} ({e.strerror})", file=sys.stderr)


# ---- tokenization of one source --------------------------------------------------------------------------------

class _Progress:
    """A rich progress bar on a terminal (large sources only); silent in logs and tests."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.bar = None
        if enabled and total >= 5000 and sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)
            self.task = self.bar.add_task(f"tokenizing {label}", total=total)
            self.bar.start()

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def tokenize_source(data: DataConfig, source: DataSource, tokenizer, records: list[Record], notes: Counter,
                    progress: bool = True) -> tuple[TokenTable, TokenizeStats]:
    bar = _Progress(len(records), source_name(source), progress)
    # The CLI turns tokenizer threads off (they warn on fork); the one big batched encode is where they pay off,
    # and nothing forks during it.
    parallel = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        chat = chat_prompts_for(data, tokenizer, source.path) if source.format != "chat" else None
        if chat is not None:  # prompt/answer pairs asked and answered in chat turns
            records = fit_chat_records(records, template_for(data, source), chat, tokenizer, data.seq_length,
                                       source.path)
        if source.format == "chat" or chat is not None:
            examples, stats = tokenize_chat(records, tokenizer, data.seq_length, data.train_on_inputs, source.path,
                                            source.truncation, chat.template if chat else data.chat_template,
                                            progress=bar)
        else:
            examples, stats = tokenize_records(records, tokenizer, template_for(data, source), data.seq_length,
                                               data.train_on_inputs, source.path, source.truncation, progress=bar)
    finally:
        bar.close()
        if parallel is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallel
    stats.dropped.update(notes)
    return TokenTable.from_examples(examples), stats


def prepare_one(data: DataConfig, source: DataSource, tokenizer, keep_records: bool = False,
                progress: bool = True) -> tuple[TokenTable, SourceReport, list[Record] | None]:
    started = time.perf_counter()
    entry = cache_root(data) / cache_key(data, source, tokenizer) if data.cache else None
    cached = _load_cached(entry) if entry is not None and not keep_records else None
    records = None
    if cached is not None:
        table, meta = cached
        stats = TokenizeStats(meta["examples"], meta["truncated"], Counter(meta["dropped"]))
        n_records = meta["records"]
    else:
        notes: Counter = Counter()
        records = load_source_records(source, notes)
        table, stats = tokenize_source(data, source, tokenizer, records, notes, progress)
        n_records = len(records) + sum(notes.values())
        if entry is not None:
            _save_cached(entry, table, {"examples": stats.examples, "truncated": stats.truncated,
                                        "dropped": dict(stats.dropped), "records": n_records,
                                        "path": source.path, "format": source.format})
    report = SourceReport(source_name(source), source.path, source.format, n_records, stats, table.num_tokens,
                          table.num_label_tokens, cached is not None, time.perf_counter() - started, source.weight)
    return table, report, records


def prepare_set(data: DataConfig, sources: list[DataSource], tokenizer, keep_records: bool = False,
                progress: bool = True) -> PreparedData:
    tables, reports, records = [], [], []
    for source in sources:
        table, report, recs = prepare_one(data, source, tokenizer, keep_records, progress)
        tables.append(table)
        reports.append(report)
        records.extend(recs or [])
    bounds = [0] + list(np.cumsum([len(t) for t in tables]).tolist())
    return PreparedData(TokenTable.concat(tables), reports, bounds, records if keep_records else None)


def prepare_source(data: DataConfig, source: DataSource, tokenizer) -> PreparedData:
    """One source, as the first version of the API had it."""
    return prepare_set(data, [source], tokenizer)


def prepare_data(data: DataConfig, tokenizer, seed: int, progress: bool = True,
                 keep_records: bool = False) -> tuple[PreparedData, dict[str, PreparedData]]:
    """The training mixture and the named validation sets (one per validation source, or the val_split hold-out)."""
    if uses_classification(data):  # one label per text, not a completion: see data/classify.py
        if keep_records:
            raise UserError("prepare-data --out: writes prompt/completion records; classification rows are "
                            "already text and label (run without --out)")
        return prepare_classification_data(data, tokenizer, seed)
    train = prepare_set(data, as_sources(data.train), tokenizer, keep_records, progress)
    vals = {name: prepare_set(data, [source], tokenizer, keep_records, progress)
            for name, source in validation_sets(data)}
    if data.val_split and not vals:
        train, vals["val_split"] = split_validation(train, data.val_split, seed)
    return train, vals
