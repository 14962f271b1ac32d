"""Rebuild assets/data/dolly/sample.jsonl and assets/data/alpaca/sample.json from the full data sets.

Keeps the first 48 records (file order; for Dolly the first 6 of each of its 8 categories) whose instruction,
input/context and answer together stay under 400 characters, so that each fits 512 tokens of the stories260K
tokenizer with the Alpaca prompt. Usage:
    python scripts/make_instruction_samples.py ../shared/data assets/data
"""
import json
import sys
from pathlib import Path

KEEP, MAX_CHARS = 48, 400


def short(records: list[dict], fields: tuple[str, ...], keep: int = KEEP) -> list[dict]:
    kept = [r for r in records if sum(len(r[f]) for f in fields) < MAX_CHARS]
    return [{f: r[f] for f in fields} for r in kept[:keep]]


def per_category(records: list[dict], fields: tuple[str, ...]) -> list[dict]:
    categories = sorted({r["category"] for r in records})
    per = KEEP // len(categories)
    return [r for c in categories for r in short([r for r in records if r["category"] == c], fields, per)]


def main(src: str, out: str) -> None:
    src_dir, out_dir = Path(src), Path(out)
    dolly_rows = [json.loads(line) for line in (src_dir / "dolly/databricks-dolly-15k.jsonl").open()]
    dolly = per_category(dolly_rows, ("instruction", "context", "response", "category"))
    (out_dir / "dolly").mkdir(parents=True, exist_ok=True)
    (out_dir / "dolly/sample.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dolly))
    alpaca = short(json.loads((src_dir / "alpaca/alpaca_data_5k.json").read_text()), ("instruction", "input", "output"))
    (out_dir / "alpaca").mkdir(parents=True, exist_ok=True)
    (out_dir / "alpaca/sample.json").write_text(json.dumps(alpaca, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
