#!/usr/bin/env python3
"""Build DPO preference pairs from a SQuAD v1.1 json (standard library only, deterministic).

One jsonl line per question that gets a distractor:

    {"id": <question id>, "prompt": "Context: {context} Question: {question} Answer:",
     "chosen": <the question's first gold answer>, "rejected": <a hard distractor>}

The distractor is another question's first gold answer on the SAME paragraph: a plausible span of the same
context that answers a different question. Candidates whose SQuAD-normalised text (lowercase, no punctuation, no
articles a/an/the, single spaces) equals, contains or is contained in any of this question's gold answers (as whole
words: a contiguous run of the other's words) are excluded; among the rest one is drawn by a random generator
seeded with SEED and the question id, so a pair does not depend on --skip/--limit or on the other questions kept. Questions whose paragraph has no valid distractor
are skipped and counted.

Questions are read in tuneforge's SQuAD order (tuneforge/data/records.py read_squad): articles, then paragraphs,
then qas, in file order. --skip N drops the first N questions in that order (answerable or not, paired or not);
--limit N stops after N pairs are written.

Usage: python assets/data/squad_pairs/build.py SQUAD_JSON OUT_JSONL [--skip N] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
from collections import Counter

SEED = 20240611
TEMPLATE = "Context: {context} Question: {question} Answer:"  # tuneforge's default SQuAD template

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """SQuAD v1.1 evaluation normalisation: lowercase, strip punctuation and articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _within(inner: list[str], outer: list[str]) -> bool:
    """inner is a contiguous run of outer's tokens (whole words: 'one' is not within 'iphone')."""
    n = len(inner)
    return any(outer[i:i + n] == inner for i in range(len(outer) - n + 1))


def _clashes(candidate: str, golds: list[str]) -> bool:
    """True when the candidate equals, contains or is contained in one of the gold answers, comparing the
    normalised texts word by word. An empty normalised candidate or gold answer always clashes."""
    c = normalize(candidate).split()
    for gold in golds:
        g = normalize(gold).split()
        if not c or not g or _within(c, g) or _within(g, c):
            return True
    return False


def _answer_texts(qa: dict) -> list[str]:
    answers = qa.get("answers") or []
    if isinstance(answers, dict):  # Hub layout {"text": [...], "answer_start": [...]}
        return [t for t in answers.get("text") or [] if isinstance(t, str)]
    return [a["text"] for a in answers if isinstance(a, dict) and isinstance(a.get("text"), str)]


def build(doc: dict, skip: int = 0, limit: int | None = None) -> tuple[list[dict], Counter]:
    """Pairs for the questions of a SQuAD json, and counts of what was read, skipped and why."""
    counts: Counter = Counter()
    pairs: list[dict] = []
    index = 0  # question position in tuneforge's reading order
    for article in doc["data"]:
        for para in article["paragraphs"]:
            context = para["context"]
            qas = para["qas"]
            firsts = [(_answer_texts(qa) or [""])[0].strip() for qa in qas]
            for q, qa in enumerate(qas):
                index += 1
                if index <= skip:
                    counts["skipped: before --skip"] += 1
                    continue
                if limit is not None and len(pairs) >= limit:
                    counts["not read: --limit reached"] += 1
                    continue
                counts["questions read"] += 1
                golds = [t.strip() for t in _answer_texts(qa)]
                if not golds or not golds[0]:
                    counts["skipped: no gold answer (unanswerable)"] += 1
                    continue
                candidates: list[str] = []
                for other, text in enumerate(firsts):
                    if other != q and text and text not in candidates and not _clashes(text, golds):
                        candidates.append(text)
                if not candidates:
                    reason = ("skipped: only question on its paragraph" if len(qas) == 1 else
                              "skipped: every other answer on the paragraph overlaps a gold answer")
                    counts[reason] += 1
                    continue
                rng = random.Random(f"{SEED}:{qa['id']}")
                pairs.append({"id": str(qa["id"]),
                              "prompt": TEMPLATE.format(context=context, question=qa["question"]),
                              "chosen": golds[0],
                              "rejected": rng.choice(candidates)})
    counts["pairs written"] = len(pairs)
    return pairs, counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("squad_json", help="SQuAD v1.1 json ({'data': [{'paragraphs': [{'context', 'qas'}]}]})")
    ap.add_argument("out_jsonl", help="where to write the pairs (one json object a line)")
    ap.add_argument("--skip", type=int, default=0, help="drop the first N questions in tuneforge's reading order")
    ap.add_argument("--limit", type=int, default=None, help="write at most N pairs")
    args = ap.parse_args(argv)
    if args.skip < 0 or (args.limit is not None and args.limit < 1):
        ap.error("--skip must be >= 0 and --limit >= 1")
    with open(args.squad_json, encoding="utf-8") as f:
        doc = json.load(f)
    pairs, counts = build(doc, args.skip, args.limit)
    with open(args.out_jsonl, "w", encoding="utf-8", newline="\n") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    for key in sorted(counts):
        print(f"{key}: {counts[key]}")
    if pairs:
        chosen = sum(len(p["chosen"]) for p in pairs) / len(pairs)
        rejected = sum(len(p["rejected"]) for p in pairs) / len(pairs)
        print(f"average characters: chosen {chosen:.1f}, rejected {rejected:.1f}")
    print(f"wrote {len(pairs)} pairs to {args.out_jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
