import json

import pytest
import torch

from tuneforge.data import IGNORE, MicroBatchSampler, build_train_loader, load_records, tokenize_records
from tuneforge.data.records import DEFAULT_TEMPLATES, Record
from tuneforge.errors import UserError
from tests.conftest import SQUAD_TRAIN


def test_squad_prompt_is_masked_and_answer_plus_eos_is_labelled(tok):
    records = load_records(str(SQUAD_TRAIN), "squad", limit=20)
    examples, stats = tokenize_records(records, tok, DEFAULT_TEMPLATES["squad"], 512)
    assert stats.examples == 20 and stats.truncated == 0
    for rec, ex in zip(records, examples):
        labelled = [t for t in ex.labels if t != IGNORE]
        assert labelled[-1] == tok.eos_token_id and ex.input_ids[-1] == tok.eos_token_id
        assert tok.decode(labelled[:-1]).strip() == rec.completion.strip()
        n_prompt = ex.labels.index(labelled[0])
        assert tok.decode(ex.input_ids[:n_prompt], skip_special_tokens=True).endswith("Answer:")
        assert ex.input_ids[0] == tok.bos_token_id


def test_train_on_inputs_labels_everything(tok):
    records = load_records(str(SQUAD_TRAIN), "squad", limit=3)
    examples, _ = tokenize_records(records, tok, DEFAULT_TEMPLATES["squad"], 512, train_on_inputs=True)
    assert all(ex.labels == ex.input_ids for ex in examples)


def test_long_context_is_truncated_around_the_answer_never_the_answer(tok):
    context = "The quick brown fox jumps over the lazy dog. " * 30 + "The secret word is zebra. " + "Filler. " * 30
    rec = Record({"context": context, "question": "What is the secret word?", "answer": "zebra"}, " zebra",
                 truncatable="context")
    examples, stats = tokenize_records([rec], tok, DEFAULT_TEMPLATES["squad"], 200)
    ex = examples[0]
    assert stats.truncated == 1 and len(ex.input_ids) <= 200
    text = tok.decode(ex.input_ids, skip_special_tokens=True)
    assert "The secret word is zebra" in text and text.endswith("Answer: zebra")
    assert tok.decode([t for t in ex.labels if t != IGNORE], skip_special_tokens=True).strip() == "zebra"


def test_prompt_without_context_is_cut_from_the_left(tok, tmp_path):
    path = tmp_path / "io.jsonl"
    path.write_text(json.dumps({"input": "x " * 300 + "END:", "output": " yes"}) + "\n")
    examples, stats = tokenize_records(load_records(str(path), "input_output"), tok, "{input}", 64)
    ex = examples[0]
    assert len(ex.input_ids) == 64 and stats.truncated == 1 and ex.input_ids[0] == tok.bos_token_id
    assert tok.decode(ex.input_ids, skip_special_tokens=True).endswith("END: yes")


def test_completion_longer_than_seq_length_is_dropped_and_counted(tok, tmp_path):
    path = tmp_path / "io.jsonl"
    path.write_text(json.dumps({"input": "Q:", "output": " long" * 100}) + "\n" +
                    json.dumps({"input": "Q:", "output": " ok"}) + "\n")
    examples, stats = tokenize_records(load_records(str(path), "input_output"), tok, "{input}", 64)
    assert len(examples) == 1 and stats.dropped["completion longer than seq_length"] == 1


@pytest.mark.parametrize("content, message", [
    ('{"input": "a", "output": "b"}\n{"input": "a" "output": "b"}\n', r"io\.jsonl:2: invalid JSON"),
    ('{"input": "a"}\n', r"io\.jsonl:1: missing field 'output'"),
    ('{"input": 3, "output": "b"}\n', r"io\.jsonl:1: field 'input' must be str, got int"),
    ('[1, 2]\n', r"io\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl_names_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "io.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_records(str(path), "input_output")


def test_bad_squad_and_bad_template(tmp_path, tok):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [{"question": "q"}]}]}]}))
    with pytest.raises(UserError, match=r"s\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]: missing field 'answers'"):
        load_records(str(path), "squad")
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(UserError, match="not UTF-8"):
        load_records(str(path), "squad")
    records = load_records(str(SQUAD_TRAIN), "squad", limit=1)
    with pytest.raises(UserError, match=r"prompt_template names field \{title\}"):
        tokenize_records(records, tok, "{title}: {question}", 512)


def test_sampler_is_seeded_and_resumes_exactly():
    a = MicroBatchSampler(50, 4, seed=1)
    first = [b for _, b in zip(range(30), a)]  # crosses the epoch boundary (12 micro-batches per epoch)
    assert first == [b for _, b in zip(range(30), MicroBatchSampler(50, 4, seed=1))]
    assert first != [b for _, b in zip(range(30), MicroBatchSampler(50, 4, seed=2))]
    b = MicroBatchSampler(50, 4, seed=1)
    it = iter(b)
    head = [next(it) for _ in range(17)]
    c = MicroBatchSampler(50, 4, seed=1)
    c.load_state_dict(b.state_dict())
    assert head + [x for _, x in zip(range(13), c)] == first


def test_ranks_split_the_same_step():
    """2 ranks x 1 micro-batch hold the examples that 1 rank x 2 accumulated micro-batches hold."""
    one = iter(MicroBatchSampler(64, 4, seed=3))
    r0, r1 = iter(MicroBatchSampler(64, 4, seed=3, rank=0, world_size=2)), iter(MicroBatchSampler(64, 4, seed=3, rank=1, world_size=2))
    for _ in range(8):
        assert sorted(next(one) + next(one)) == sorted(next(r0) + next(r1))


def test_stateful_loader_resumes_mid_epoch(tok):
    records = load_records(str(SQUAD_TRAIN), "squad", limit=40)
    examples, _ = tokenize_records(records, tok, DEFAULT_TEMPLATES["squad"], 512)
    loader = build_train_loader(examples, 4, tok.pad_token_id, seed=0)
    it = iter(loader)
    for _ in range(13):
        next(it)
    state = loader.state_dict()
    expected = [next(it)["input_ids"] for _ in range(5)]
    again = build_train_loader(examples, 4, tok.pad_token_id, seed=0)
    again.load_state_dict(state)
    it2 = iter(again)
    for e in expected:
        assert torch.equal(next(it2)["input_ids"], e)


def test_too_little_data_is_a_clear_error():
    with pytest.raises(UserError, match=r"3 examples, fewer than micro_batch_size \(4\)"):
        MicroBatchSampler(3, 4, seed=0)
