"""SQuAD v1.1 exact match and F1, with the official definitions (the evaluate-v1.1.py script).

An answer is normalised (lower case, punctuation removed, the articles a/an/the dropped, whitespace collapsed)
before comparison; F1 is over the bag of normalised tokens; each question scores the best of its gold answers;
the totals are percentages over all questions."""
from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: list[str]) -> float:
    return max(metric(prediction, gold) for gold in golds)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """{"squad_em", "squad_f1"} in percent over every referenced question; a missing prediction scores 0."""
    if not references:
        return {"squad_em": 0.0, "squad_f1": 0.0}
    em = f1_sum = 0.0
    for qid, golds in references.items():
        prediction = predictions.get(qid, "")
        em += best_over_golds(exact_match, prediction, golds)
        f1_sum += best_over_golds(f1, prediction, golds)
    n = len(references)
    return {"squad_em": 100.0 * em / n, "squad_f1": 100.0 * f1_sum / n}
