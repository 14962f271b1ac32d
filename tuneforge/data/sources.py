"""Read training records from files. Each record is a dict of text fields plus the name of the field holding the
completion; parse errors name the file, the line or record, and the field."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tuneforge.errors import UserError


@dataclass
class Record:
    """One example before tokenization: the fields a prompt template may name, and the completion text."""
    fields: dict[str, str]
    completion: str
    id: str | None = None
    references: list[str] = field(default_factory=list)  # every gold answer (SQuAD evaluation takes the best)
    truncatable: str | None = None  # field that may be shortened when the example is too long (QA: the context)


# The default prompt of each format (`data.prompt_template` replaces it).
DEFAULT_TEMPLATES = {
    "squad": "Context: {context} Question: {question} Answer:",
    "input_output": "{input}",
}


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (undecodable byte at offset {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def read_squad(path: Path) -> list[Record]:
    """SQuAD v1.1 json: {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}.
    The completion is ' ' + the first answer; all answers are kept as references."""
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise UserError(f"{path}: expected SQuAD json with a top-level 'data' list")
    records = []
    for a, article in enumerate(doc["data"]):
        for p, para in enumerate(_get(article, "paragraphs", list, path, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = _get(para, "context", str, path, where)
            for q, qa in enumerate(_get(para, "qas", list, path, where)):
                qwhere = f"{where}.qas[{q}]"
                question = _get(qa, "question", str, path, qwhere)
                answers = _get(qa, "answers", list, path, qwhere)
                texts = [_get(ans, "text", str, path, f"{qwhere}.answers[{i}]") for i, ans in enumerate(answers)]
                if not texts:
                    continue  # unanswerable (v2) questions: no target to learn
                records.append(Record({"context": context, "question": question, "answer": texts[0]},
                                      " " + texts[0].strip(), id=str(qa.get("id", len(records))),
                                      references=texts, truncatable="context"))
    return records


def read_input_output(path: Path) -> list[Record]:
    """jsonl with string fields `input` and `output`; other string fields are available to the template."""
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        where = f"line {lineno}"
        _get(row, "input", str, path, where, lineno)
        output = _get(row, "output", str, path, where, lineno)
        fields = {k: v for k, v in row.items() if isinstance(v, str)}
        records.append(Record(fields, output, id=str(row.get("id", lineno)), references=[output.strip()]))
    return records


def _get(obj: Any, key: str, tp: type, path: Path, where: str, lineno: int | None = None) -> Any:
    loc = f"{path}:{lineno}" if lineno else f"{path}: {where}"
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{loc}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, tp):
        raise UserError(f"{loc}: field '{key}' must be {tp.__name__}, got {type(value).__name__}")
    return value


READERS: dict[str, Callable[[Path], list[Record]]] = {"squad": read_squad, "input_output": read_input_output}


def load_records(path: str, fmt: str, limit: int | None = None) -> list[Record]:
    if fmt not in READERS:
        raise UserError(f"unknown data format '{fmt}'; expected one of {', '.join(READERS)}")
    records = READERS[fmt](Path(path))
    if limit is not None:
        records = records[:limit]
    if not records:
        raise UserError(f"{path}: no usable examples")
    return records
