"""Read training records from files, saved `datasets` directories or the Hub.

Every format turns one row into a `Record` (the fields a prompt template may name, plus the completion), or for
`chat` into a list of messages. Parse errors name the file, the line or record, and the field."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tuneforge.config.sources import is_hub_id
from tuneforge.errors import UserError, first_line


@dataclass
class Record:
    """One example before tokenization: the fields a prompt template may name, and the completion text."""
    fields: dict[str, str]
    completion: str
    id: str | None = None
    references: list[str] = field(default_factory=list)  # every gold answer (SQuAD evaluation takes the best)
    truncatable: str | None = None  # field that may be shortened when the example is too long (QA: the context)
    messages: list[dict] | None = None  # format chat: the conversation, rendered by the tokenizer's chat template
    template: str | None = None  # the format's default prompt for this record (alpaca/dolly: with or without input)


# The default prompt of each format (`prompt_template` replaces it). Alpaca and dolly use the Alpaca wording, with
# the input/context section left out when that field is empty (as the Alpaca release does).
_ALPACA_HEAD = ("Below is an instruction that describes a task{extra}. Write a response that appropriately completes "
                "the request.\n\n### Instruction:\n{{instruction}}\n\n")
DEFAULT_TEMPLATES = {
    "squad": "Context: {context} Question: {question} Answer:",
    "input_output": "{input}",
    "alpaca": _ALPACA_HEAD.format(extra=", paired with an input that provides further context")
    + "### Input:\n{input}\n\n### Response:\n",
    "dolly": _ALPACA_HEAD.format(extra=", paired with an input that provides further context")
    + "### Input:\n{context}\n\n### Response:\n",
    "text": "",
    "chat": "",
}
_NO_INPUT_TEMPLATE = _ALPACA_HEAD.format(extra="") + "### Response:\n"

# Fields each format reads (canonical names; `columns:` maps them to a file's own column names).
FORMAT_FIELDS = {
    "squad": ("context", "question", "answers"),
    "input_output": ("input", "output"),
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
    "chat": ("messages",),
    "text": ("text",),
}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


# ---- rows: (location for error messages, dict) from any container --------------------------------------------

def iter_rows(path: str, split: str = "train") -> Iterator[tuple[str, Any]]:
    p = Path(path)
    if is_hub_id(path):
        yield from _dataset_rows(_load_hub(path, split), path)
    elif p.is_dir():
        yield from _dataset_rows(_load_saved(p, split), path)
    elif not p.exists():
        raise UserError(f"{path}: no such file, directory or Hub dataset id")
    elif p.suffix == ".jsonl":
        yield from _jsonl_rows(p)
    elif p.suffix == ".json":
        doc = _parse_json(p)
        rows = doc.get("data") if isinstance(doc, dict) else doc
        if not isinstance(rows, list):
            raise UserError(f"{p}: expected a JSON list of records (or an object with a 'data' list)")
        for i, row in enumerate(rows):
            yield f"{p}: record {i}", row
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        yield from _table_rows(pq.read_table(p), p)
    elif p.suffix == ".arrow":
        yield from _table_rows(_read_arrow(p), p)
    elif p.suffix == ".txt":
        for lineno, line in enumerate(_read_text(p).splitlines(), 1):
            if line.strip():
                yield f"{p}:{lineno}", {"text": line}
    else:
        raise UserError(f"{p}: unknown file type '{p.suffix}'; expected .json, .jsonl, .arrow, .parquet, .txt, a "
                        f"saved datasets directory or a Hub dataset id")


def _parse_json(p: Path) -> Any:
    return _loads(_read_text(p), p, None)


def _jsonl_rows(p: Path) -> Iterator[tuple[str, Any]]:
    for lineno, line in enumerate(_read_text(p).splitlines(), 1):
        if line.strip():
            yield f"{p}:{lineno}", _loads(line, p, lineno)


def _loads(text: str, p: Path, lineno: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{lineno or e.lineno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{p}:{lineno or 1}: JSON nested too deeply to read") from None


def _read_arrow(p: Path):
    import pyarrow as pa

    try:  # `datasets` writes the IPC stream format; plain pyarrow users often write the file format
        with pa.memory_map(str(p)) as src:
            return pa.ipc.open_stream(src).read_all()
    except pa.ArrowInvalid:
        with pa.memory_map(str(p)) as src:
            return pa.ipc.open_file(src).read_all()


def _table_rows(table, p: Path) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(table.to_pylist()):
        yield f"{p}: row {i}", row


def _load_saved(p: Path, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as e:
        raise UserError(f"{p}: not a saved datasets directory ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{p}: no split '{split}' (has: {', '.join(ds)}); set the source's `split`")
        ds = ds[split]
    return ds


def _load_hub(name: str, split: str):
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise UserError("Hub datasets need the `datasets` package: pip install datasets") from None
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown id, no such split: one line, not a traceback
        kind, detail = e.__class__.__name__, first_line(e)
        why = kind if detail == kind else f"{kind}: {detail}"  # the class name alone when the message is empty
        raise UserError(f"{name}: cannot load Hub dataset split '{split}' ({why})") from None


def _dataset_rows(ds, name: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(ds):
        yield f"{name}: row {i}", row


def dataset_fingerprint(path: str, split: str) -> str:
    """What identifies a Hub dataset's contents for the tokenization cache (the datasets library's fingerprint)."""
    return str(getattr(_load_hub(path, split), "_fingerprint", path))


# ---- formats: row -> Record ------------------------------------------------------------------------------------

def _get(obj: Any, key: str, tp: type | tuple, where: str, column: str | None = None) -> Any:
    column = column or key
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if column not in obj or obj[column] is None:
        raise UserError(f"{where}: missing field '{column}'")
    value = obj[column]
    if not isinstance(value, tp):
        name = tp.__name__ if isinstance(tp, type) else " or ".join(t.__name__ for t in tp)
        raise UserError(f"{where}: field '{column}' must be {name}, got {type(value).__name__}")
    return _check_text(value, where, column) if isinstance(value, str) else value


def _check_text(value: str, where: str, column: str) -> str:
    """JSON's \\u escapes can spell half of a UTF-16 pair, which no tokenizer (nor UTF-8) accepts."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise UserError(f"{where}: field '{column}' has an invalid character at position {e.start} "
                            f"(a lone surrogate, e.g. from a \\u{ord(value[e.start]):04x} escape)") from None
    return value


class _Reader:
    """Reads canonical fields through the source's `columns` mapping; other string columns stay available."""

    def __init__(self, fmt: str, columns: dict[str, str] | None):
        self.fmt, self.columns = fmt, dict(columns or {})

    def get(self, row: Any, key: str, tp: type | tuple, where: str, optional: bool = False) -> Any:
        column = self.columns.get(key, key)
        if optional and isinstance(row, dict) and row.get(column) is None:
            return ""
        return _get(row, key, tp, where, column)

    def extra(self, row: dict, where: str) -> dict[str, str]:
        """String columns under their own names and, for mapped ones, their canonical names (for templates)."""
        fields = {k: _check_text(v, where, k) for k, v in row.items() if isinstance(v, str)}
        for key, column in self.columns.items():
            if isinstance(row.get(column), str):
                fields[key] = row[column]
        return fields


def _squad_record(r: _Reader, row: Any, where: str, unanswerable: str | None, notes: Counter) -> Record | None:
    context = r.get(row, "context", str, where)
    question = r.get(row, "question", str, where)
    answers = r.get(row, "answers", (list, dict), where)
    if isinstance(answers, dict):  # the Hub layout: {"text": [...], "answer_start": [...]}
        texts = answers.get("text") or []
    else:
        texts = [_get(a, "text", str, f"{where}.answers[{i}]") for i, a in enumerate(answers)]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{where}: field 'answers' must hold answer texts (strings)")
    if not texts:  # SQuAD v2 unanswerable question
        if unanswerable is None:
            notes["unanswerable question (skipped; set unanswerable: to train on a fixed answer)"] += 1
            return None
        texts = [unanswerable]
    return Record({"context": context, "question": question, "answer": texts[0]}, " " + texts[0].strip(),
                  id=str(row.get("id", where)), references=texts, truncatable="context")


def read_squad(path: Path, unanswerable: str | None = None, notes: Counter | None = None,
               columns: dict | None = None) -> list[Record]:
    """SQuAD v1.1/v2.0 json: {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}.
    The completion is ' ' + the first answer; all answers are kept as references."""
    notes = notes if notes is not None else Counter()
    doc = _parse_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(f"{path}: expected SQuAD json with a top-level 'data' list")
    reader = _Reader("squad", columns)
    records = []
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(_get(article, "paragraphs", list, f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = _get(para, "context", str, where)
            for q, qa in enumerate(_get(para, "qas", list, where)):
                row = dict(qa, context=context) if isinstance(qa, dict) else qa
                rec = _squad_record(reader, row, f"{where}.qas[{q}]", unanswerable, notes)
                if rec is not None:
                    rec.id = str(qa.get("id", len(records)))
                    records.append(rec)
    return records


def _alpaca_like(r: _Reader, row: Any, where: str, out_key: str, in_key: str) -> Record:
    instruction = r.get(row, "instruction", str, where)
    extra = r.get(row, in_key, str, where, optional=True)
    output = r.get(row, out_key, str, where)
    fields = dict(r.extra(row, where), instruction=instruction, **{in_key: extra, out_key: output})
    template = DEFAULT_TEMPLATES[r.fmt] if extra.strip() else _NO_INPUT_TEMPLATE
    return Record(fields, output, id=str(row.get("id", where)), references=[output.strip()],
                  truncatable=in_key if r.fmt == "dolly" and extra.strip() else None, template=template)


def _row_record(fmt: str, r: _Reader, row: Any, where: str) -> Record:
    if fmt == "input_output":
        r.get(row, "input", str, where)
        output = r.get(row, "output", str, where)
        return Record(r.extra(row, where), output, id=str(row.get("id", where)), references=[output.strip()])
    if fmt == "alpaca":
        return _alpaca_like(r, row, where, "output", "input")
    if fmt == "dolly":
        return _alpaca_like(r, row, where, "response", "context")
    if fmt == "text":
        text = r.get(row, "text", str, where)
        return Record(r.extra(row, where), text, id=str(row.get("id", where)))
    if fmt == "chat":
        messages = r.get(row, "messages", list, where)
        for i, m in enumerate(messages):
            role = _get(m, "role", str, f"{where}: messages[{i}]")
            _get(m, "content", str, f"{where}: messages[{i}]")
            if role not in ("system", "user", "assistant", "tool"):
                raise UserError(f"{where}: messages[{i}].role must be system, user, assistant or tool, got '{role}'")
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: field 'messages' has no assistant turn (nothing to learn)")
        return Record({}, "", id=str(row.get("id", where)), messages=messages)
    raise UserError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMAT_FIELDS)}")


def load_records(path: str, fmt: str, limit: int | None = None, *, columns: dict | None = None,
                 unanswerable: str | None = None, split: str = "train", notes: Counter | None = None) -> list[Record]:
    """The first `limit` records of a source. `notes` counts records skipped on purpose (e.g. unanswerable)."""
    if fmt not in FORMAT_FIELDS:
        raise UserError(f"unknown data format '{fmt}'; expected one of {', '.join(FORMAT_FIELDS)}")
    if columns is not None and not (isinstance(columns, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in columns.items())):
        raise UserError(f"{path}: columns must map field names to column names (strings), got {columns!r}")
    notes = notes if notes is not None else Counter()
    p = Path(path)
    if fmt == "squad" and p.suffix == ".json" and p.is_file():
        records = read_squad(p, unanswerable, notes, columns)
    else:
        reader = _Reader(fmt, columns)
        records = []
        for where, row in iter_rows(path, split):
            if limit is not None and len(records) >= limit:
                break
            if fmt == "squad":
                rec = _squad_record(reader, row, where, unanswerable, notes)
            else:
                rec = _row_record(fmt, reader, row, where)
            if rec is not None:
                records.append(rec)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise UserError(f"{path}: no usable examples")
    return records


def load_source_records(source, notes: Counter | None = None) -> list[Record]:
    """load_records for a config `DataSource`."""
    return load_records(source.path, source.format, source.limit, columns=source.columns,
                        unanswerable=source.unanswerable, split=source.split, notes=notes)
