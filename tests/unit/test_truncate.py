"""Cutting over-long examples (`tuneforge/data/truncate.py`): the batched context shortening that tokenizing uses
gives every SQuAD example the very tokens and labels of the per-example cut it replaced."""
import pytest

from tests.conftest import SQUAD_DEV, SQUAD_TRAIN
from tuneforge.data import IGNORE, load_records, tokenize_records
from tuneforge.data.records import DEFAULT_TEMPLATES, Record
from tuneforge.data.tokenize import Example, render_prompt
from tuneforge.data.truncate import ROUNDS, cut_around

TEMPLATE = DEFAULT_TEMPLATES["squad"]


def encode(tok, prompt: str, completion: str) -> Example:
    """prompt + completion + eos, labels on the completion and eos: one tokenizer call for one example."""
    enc = tok(prompt + completion, return_offsets_mapping=True, add_special_tokens=True)
    boundary = next(k for k, (s, e) in enumerate(enc["offset_mapping"]) if e > len(prompt) and e > s)
    ids = list(enc["input_ids"]) + [tok.eos_token_id]
    return Example(ids, [IGNORE] * boundary + ids[boundary:])


def cut_one(record: Record, tok, seq_length: int) -> Example | None:
    """The per-example cut (tuneforge before the batched one): cut the context around the answer by what is over,
    re-render and re-tokenize this one example, for at most ROUNDS rounds."""
    ex = encode(tok, render_prompt(TEMPLATE, record, "x"), record.completion)
    if len(ex.input_ids) <= seq_length:
        return ex
    if sum(label != IGNORE for label in ex.labels) + 8 > seq_length:
        return None
    text = record.fields["context"]
    for _ in range(ROUNDS):
        if len(ex.input_ids) <= seq_length:
            return ex
        offsets = tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
        text = cut_around(text, record.fields["answer"], len(ex.input_ids) - seq_length + 2, offsets)
        if not text:
            return None
        ex = encode(tok, render_prompt(TEMPLATE, Record(dict(record.fields, context=text), ""), "x"),
                    record.completion)
    return ex if len(ex.input_ids) <= seq_length else None


@pytest.mark.parametrize("seq_length", [64, 128, 192, 256])
@pytest.mark.parametrize("path", [SQUAD_TRAIN, SQUAD_DEV], ids=["train", "dev"])
def test_batched_context_shortening_equals_the_per_example_cut(tok, path, seq_length):
    records = load_records(str(path), "squad")
    examples, stats = tokenize_records(records, tok, TEMPLATE, seq_length)
    one_by_one = [cut_one(r, tok, seq_length) for r in records]
    expected = [ex for ex in one_by_one if ex is not None]
    assert stats.truncated >= 100  # the comparison is about cut examples
    assert len(examples) == len(expected) and sum(stats.dropped.values()) == len(records) - len(expected)
    for got, want in zip(examples, expected):
        assert got.input_ids == want.input_ids and got.labels == want.labels


def test_the_cut_keeps_the_answer_and_cuts_from_the_end_when_it_can(tok):
    text = "The river runs north. " * 20 + "The answer is Nile. " + "More words follow here. " * 20
    offsets = tok(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert cut_around(text, "Nile", 10, offsets) == text[: offsets[len(offsets) - 11][1]]  # the answer stays in
    window = cut_around(text, "Nile", len(offsets) - 30, offsets)
    assert "Nile" in window and window in text and not text.startswith(window)
    assert len(tok(window, add_special_tokens=False)["input_ids"]) <= 31
    assert cut_around(text, None, 10, offsets) == cut_around(text, "absent", 10, offsets)  # no answer: the end goes
    assert cut_around(text, "Nile", len(offsets), offsets) == ""
