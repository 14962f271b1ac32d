"""SQuAD v1.1 EM / F1 on hand-worked cases (official normalisation and best-of-golds)."""
from pathlib import Path

import pytest

from tests.conftest import SQUAD_DEV
from tuneforge.data.records import read_squad
from tuneforge.eval.squad import exact_match, f1, normalize_answer, squad_scores


@pytest.mark.parametrize("text, normal", [
    ("The Eiffel Tower", "eiffel tower"),                 # article and case
    ("  an   apple,  a pear!  ", "apple pear"),          # articles, punctuation, whitespace
    ("Theatre of the Absurd", "theatre of absurd"),       # 'the' inside a word stays
    ("U.S.-based", "usbased"),                            # punctuation is deleted, not replaced by a space
    ("A", ""),
    ("", ""),
])
def test_normalize_answer(text, normal):
    assert normalize_answer(text) == normal


def test_exact_match_ignores_case_articles_and_punctuation():
    assert exact_match("the Denver Broncos!", "Denver Broncos") == 1.0
    assert exact_match("Denver Broncos won", "Denver Broncos") == 0.0


def test_f1_on_token_overlap():
    # pred {denver, broncos, won} vs gold {denver, broncos}: P = 2/3, R = 1 -> F1 = 2PR/(P+R) = 0.8
    assert f1("Denver Broncos won", "the Denver Broncos") == pytest.approx(0.8)
    # repeated tokens count once per match: common = {red: 1, car: 1} -> P = 2/3, R = 1
    assert f1("red red car", "red car") == pytest.approx(0.8)
    # P = 1/3 (in, paris, france), R = 1/3 (city, of, paris) -> 1/3
    assert f1("in Paris France", "the city of Paris") == pytest.approx(1 / 3)
    assert f1("completely wrong", "Paris") == 0.0


def test_empty_prediction_scores_zero():
    assert exact_match("", "Paris") == 0.0 and f1("", "Paris") == 0.0
    assert squad_scores({"q": ""}, {"q": ["Paris", "the city"]}) == {"squad_em": 0.0, "squad_f1": 0.0}


def test_each_question_takes_its_best_gold_answer():
    refs = {"q": ["Paris", "the city of Paris"]}
    # vs 'paris' F1 = 2*(1/3*1)/(1/3+1) = 0.5; vs 'city of paris' 1/3 -> best 0.5
    assert squad_scores({"q": "in Paris France"}, refs) == {"squad_em": 0.0, "squad_f1": pytest.approx(50.0)}
    assert squad_scores({"q": "The city of Paris."}, refs) == {"squad_em": 100.0, "squad_f1": 100.0}


def test_totals_are_percentages_over_all_questions_and_missing_answers_score_zero():
    refs = {"a": ["Denver Broncos"], "b": ["the Denver Broncos"], "c": ["Paris"], "d": ["x"]}
    preds = {"a": "Denver Broncos", "b": "Denver Broncos won", "c": ""}  # 'd' unanswered
    scores = squad_scores(preds, refs)
    assert scores["squad_em"] == pytest.approx(100 * 1 / 4)
    assert scores["squad_f1"] == pytest.approx(100 * (1 + 0.8 + 0 + 0) / 4)


def test_gold_answers_as_predictions_score_100():
    records = read_squad(Path(SQUAD_DEV))
    refs = {r.id: r.references for r in records}
    for pick in (0, -1):  # the first and the last gold answer of each question
        preds = {r.id: r.references[pick] for r in records}
        assert squad_scores(preds, refs) == {"squad_em": 100.0, "squad_f1": 100.0}
    assert any(len(r.references) > 1 for r in records)  # several golds per question are exercised
