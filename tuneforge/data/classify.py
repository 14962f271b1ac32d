"""Classification data (format: classification): one text and one label per row.

Rows come from any container the other formats read (json, jsonl, arrow, parquet, a saved dataset, the Hub). The
text is the row's `text` column, or `prompt_template` filled from its string columns ("{title}\\n{body}");
`columns: {text: sentence, label: category}` maps other column names. A label is a name (string) or an id
(integer, indexing data.labels when given). The label set is data.labels, else the training data's distinct names
sorted (ids 0..max for integer labels): the same data always gives the same ids, and they are saved in the model's
config (id2label). A validation label outside the set stops the run, naming the file and line.

An example is its token ids with the label id at its last token (-100 elsewhere): batches, the sampler and the
loss normalisation are the language-model ones unchanged, with one labelled position per example."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from tuneforge.config.schema import DataConfig, DataSource
from tuneforge.config.sources import as_sources, source_name, validation_sets
from tuneforge.data.records import Record, _Reader, iter_rows
from tuneforge.data.tables import PreparedData, SourceReport, TokenTable, split_validation
from tuneforge.data.tokenize import IGNORE, Example, TokenizeStats, render_prompt
from tuneforge.errors import UserError

DEFAULT_TEMPLATE = "{text}"


class ClassTable(TokenTable):
    """TokenTable whose labelled position (each example's last token) carries the example's label id."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, classes: np.ndarray):
        super().__init__(ids, mask, offsets)
        self.classes = classes

    @classmethod
    def from_examples(cls, examples: list[Example]) -> "ClassTable":
        table = TokenTable.from_examples(examples)
        classes = np.fromiter((ex.labels[-1] for ex in examples), dtype=np.int64, count=len(examples))
        return cls(table.ids, table.mask, table.offsets, classes)

    @classmethod
    def concat(cls, tables: list["ClassTable"]) -> "ClassTable":
        joined = TokenTable.concat(tables)
        return cls(joined.ids, joined.mask, joined.offsets, np.concatenate([t.classes for t in tables]))

    def subset(self, index: np.ndarray) -> "ClassTable":
        return ClassTable.from_examples([self[int(i)] for i in index])

    def __getitem__(self, i: int) -> Example:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return Example(self.ids[a:b].astype(np.int64).tolist(), [IGNORE] * (b - a - 1) + [int(self.classes[i])])


def template_of(data: DataConfig, source: DataSource) -> str:
    return source.prompt_template or data.prompt_template or DEFAULT_TEMPLATE


def read_rows(data: DataConfig, source: DataSource) -> list[tuple[str, str, Any]]:
    """(where, text, label) of each row, label as found (a name or an integer id)."""
    reader, template = _Reader("classification", source.columns), template_of(data, source)
    label_column = reader.columns.get("label", "label")
    rows = []
    for where, row in iter_rows(source.path, source.split):
        if source.limit is not None and len(rows) >= source.limit:
            break
        if template == DEFAULT_TEMPLATE:
            text = reader.get(row, "text", str, where)
        else:
            text = render_prompt(template, Record(reader.extra(row, where), ""), f"{where}")
        label = reader.get(row, "label", (str, int), where)
        if isinstance(label, bool):
            raise UserError(f"{where}: field '{label_column}' must be a label name or an integer id, got a boolean")
        rows.append((where, text, label))
    if not rows:
        raise UserError(f"{source.path}: no usable examples")
    return rows


def label_names(data: DataConfig, rows: list[tuple[str, str, Any]]) -> list[str]:
    """data.labels, else the sorted names of the training rows (ids 0..max when the labels are integers)."""
    if data.labels is not None:
        return list(data.labels)
    kinds = {type(label) for _, _, label in rows}
    if kinds == {int}:
        return [str(i) for i in range(max(label for _, _, label in rows) + 1)]
    if kinds != {str}:
        where = next(w for w, _, label in rows if isinstance(label, int))
        raise UserError(f"{where}: labels mix names and integer ids; use one kind in a dataset (or set data.labels)")
    return sorted({label for _, _, label in rows})


def label_id(label: Any, names: list[str], where: str) -> int:
    if isinstance(label, int):
        if not 0 <= label < len(names):
            raise UserError(f"{where}: label id {label} is outside 0..{len(names) - 1} ({', '.join(names)})")
        return label
    ids = {name: i for i, name in enumerate(names)}
    if label not in ids:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise UserError(f"{where}: label '{label}' is not one of the training labels ({shown})")
    return ids[label]


def encode_rows(rows: list[tuple[str, str, Any]], names: list[str], tokenizer, seq_length: int,
                truncation: str) -> tuple[ClassTable, TokenizeStats]:
    """Tokenize (batched, with the tokenizer's special tokens) and attach the label ids. Over-long texts keep their
    start (auto), their end (left, after a leading bos) or are dropped (drop)."""
    stats = TokenizeStats()
    label_ids = [label_id(label, names, where) for where, _, label in rows]  # every bad label fails before work
    examples = []
    bos = tokenizer.bos_token_id
    for start in range(0, len(rows), 1024):
        encoded = tokenizer([text for _, text, _ in rows[start:start + 1024]], add_special_tokens=True)["input_ids"]
        for ids, label in zip(encoded, label_ids[start:start + 1024]):
            if len(ids) > seq_length:
                if truncation == "drop":
                    stats.dropped["longer than seq_length"] += 1
                    continue
                if truncation != "left":
                    ids = ids[:seq_length]
                elif bos is not None and ids[0] == bos:  # the model was trained to read bos first
                    ids = [bos] + ids[len(ids) - seq_length + 1:]
                else:
                    ids = ids[len(ids) - seq_length:]
                stats.truncated += 1
            if len(ids) < 2:  # the label sits on a position the loss counts from the second token on
                stats.dropped["shorter than 2 tokens"] += 1
                continue
            examples.append(Example(ids, [IGNORE] * (len(ids) - 1) + [label]))
    stats.examples = len(examples)
    if not examples:
        raise UserError(f"{rows[0][0].split(':')[0]}: no example left after tokenization ({stats.summary()})")
    return ClassTable.from_examples(examples), stats


def prepare_classification_set(data: DataConfig, sources: list[DataSource], tokenizer, names: list[str],
                               rows: list[list] | None = None) -> PreparedData:
    tables, reports = [], []
    for i, source in enumerate(sources):
        started = time.perf_counter()
        source_rows = rows[i] if rows is not None else read_rows(data, source)
        table, stats = encode_rows(source_rows, names, tokenizer, data.seq_length, source.truncation)
        tables.append(table)
        reports.append(SourceReport(source_name(source), source.path, source.format, len(source_rows), stats,
                                    table.num_tokens, table.num_label_tokens, False, time.perf_counter() - started,
                                    source.weight))
    bounds = [0] + list(np.cumsum([len(t) for t in tables]).tolist())
    return PreparedData(ClassTable.concat(tables), reports, bounds)


def prepare_classification_data(data: DataConfig, tokenizer, seed: int,
                                names: list[str] | None = None) -> tuple[PreparedData, dict[str, PreparedData]]:
    """prepare_data for classification: the label set comes from `names` (a trained model's id2label), else
    data.labels, else the training rows; the names ride along as `.names` of every set's examples."""
    train_sources = as_sources(data.train)
    train_rows = [read_rows(data, s) for s in train_sources]
    names = names or label_names(data, [r for rows in train_rows for r in rows])
    if len(names) < 2:
        raise UserError(f"{train_sources[0].path}: classification needs at least 2 labels, the data has "
                        f"{len(names)} ({', '.join(names)})")
    train = prepare_classification_set(data, train_sources, tokenizer, names, train_rows)
    vals = {name: prepare_classification_set(data, [source], tokenizer, names)
            for name, source in validation_sets(data)}
    if data.val_split and not vals:
        train, vals["val_split"] = split_validation(train, data.val_split, seed)
    for prepared in (train, *vals.values()):
        prepared.examples.names = names
    return train, vals


def uses_classification(data: DataConfig) -> bool:
    return any(s.format == "classification" for s in as_sources(data.train) + as_sources(data.validation))

