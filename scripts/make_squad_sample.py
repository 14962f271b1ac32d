"""Rebuild assets/data/squad/{train,dev}.json from the full SQuAD v1.1 files.

Keeps questions whose prompt + answer fit 512 tokens of the stories260K tokenizer, at most 2 per paragraph, in
file order: 2,000 train and 300 dev questions (dev keeps every gold answer). Usage:
    python scripts/make_squad_sample.py ../shared/data/squad_v1.1 assets/data/squad
"""
import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

TEMPLATE = "Context: {context} Question: {question} Answer:"


def sample(src: Path, want: int, tok, per_paragraph: int = 2) -> dict:
    doc = json.loads(src.read_text())
    out, n = [], 0
    for article in doc["data"]:
        paragraphs = []
        for para in article["paragraphs"]:
            kept = []
            for qa in para["qas"]:
                if n >= want or len(kept) >= per_paragraph:
                    break
                text = TEMPLATE.format(context=para["context"], question=qa["question"]) + " " + qa["answers"][0]["text"]
                if len(tok(text).input_ids) + 1 <= 512:
                    kept.append(qa)
                    n += 1
            if kept:
                paragraphs.append({"context": para["context"], "qas": kept})
        if paragraphs:
            out.append({"title": article["title"], "paragraphs": paragraphs})
        if n >= want:
            break
    return {"version": "1.1", "data": out}


def main(src_dir: str, out_dir: str) -> None:
    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "assets/models/stories260K")
    for name, want in (("train", 2000), ("dev", 300)):
        data = sample(Path(src_dir) / f"{name}-v1.1.json", want, tok)
        count = sum(len(p["qas"]) for a in data["data"] for p in a["paragraphs"])
        Path(out_dir, f"{name}.json").write_text(json.dumps(data, ensure_ascii=False))
        print(f"{name}: {count} questions from {len(data['data'])} articles")


if __name__ == "__main__":
    main(*sys.argv[1:3])
