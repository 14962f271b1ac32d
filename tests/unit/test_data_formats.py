"""Every format and container, column mapping, templates, truncation policies and bad-data messages."""
import json
from collections import Counter
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tuneforge.config.schema import DataConfig, DataSource
from tuneforge.data import IGNORE, load_records, prepare_set, tokenize_chat, tokenize_records
from tuneforge.data.records import DEFAULT_TEMPLATES
from tuneforge.errors import UserError
from tests.conftest import STORIES

FIX = Path(__file__).resolve().parents[1] / "fixtures"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def labelled_text(tok, ex) -> str:
    return tok.decode([t for k, t in enumerate(ex.labels) if t != IGNORE and k > 0], skip_special_tokens=True)


def test_alpaca_uses_the_input_or_no_input_prompt_and_labels_only_the_output(tok):
    records = load_records(str(FIX / "alpaca_sample.json"), "alpaca")
    assert len(records) == 6
    examples, stats = tokenize_records(records, tok, DEFAULT_TEMPLATES["alpaca"], 512)
    for rec, ex in zip(records, examples):
        text = tok.decode(ex.input_ids, skip_special_tokens=True)
        assert ("### Input:" in text) == bool(rec.fields["input"].strip())
        assert labelled_text(tok, ex).strip() == rec.fields["output"].strip()


def test_dolly_context_is_the_input_and_is_truncated_first(tok):
    records = load_records(str(FIX / "dolly_sample.jsonl"), "dolly")
    with_ctx = [r for r in records if r.fields["context"]]
    assert with_ctx and all(r.truncatable == "context" for r in with_ctx)
    long = type(with_ctx[0])(dict(with_ctx[0].fields, context=with_ctx[0].fields["context"] * 8),
                             with_ctx[0].completion, truncatable="context", template=None)
    examples, stats = tokenize_records([long], tok, DEFAULT_TEMPLATES["dolly"], 300)
    assert stats.truncated == 1 and len(examples[0].input_ids) <= 300
    assert labelled_text(tok, examples[0]).strip() == long.completion.strip()
    assert "### Instruction:" in tok.decode(examples[0].input_ids)


def test_input_output_with_user_assistant_prompt(tok, tmp_path):
    path = tmp_path / "io.jsonl"
    path.write_text(json.dumps({"input": "User: Context: Paris is in France. Question: Where is Paris?\n\nAssistant:",
                                "output": " In France."}) + "\n")
    examples, _ = tokenize_records(load_records(str(path), "input_output"), tok, "{input}", 256)
    assert labelled_text(tok, examples[0]) == "In France."


def test_text_format_labels_everything_and_keeps_the_first_tokens(tok, tmp_path):
    path = tmp_path / "quotes.txt"
    path.write_text("Be yourself; everyone else is already taken.\n\n" + "word " * 200 + "\n")
    records = load_records(str(path), "text")
    examples, stats = tokenize_records(records, tok, DEFAULT_TEMPLATES["text"], 64)
    assert len(examples) == 2 and stats.truncated == 1 and len(examples[1].input_ids) == 64
    assert labelled_text(tok, examples[0]) == "Be yourself; everyone else is already taken."
    assert examples[0].labels[1:] == examples[0].input_ids[1:]


def test_chat_labels_assistant_turns_only(tok):
    records = load_records(str(FIX / "chat_sample.jsonl"), "chat")
    examples, stats = tokenize_chat(records, tok, 256, chat_template=CHAT_TEMPLATE)
    assert stats.examples == 3
    # Every labelled run decodes to exactly the assistant contents (the eos that ends each turn is labelled too).
    runs, cur = [], []
    for t, label in zip(examples[1].input_ids, examples[1].labels):
        if label != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    assert [tok.decode(r, skip_special_tokens=True) for r in runs] == ["An apple.", "A pear."]
    assert all(r[-1] == tok.eos_token_id for r in runs)


def test_chat_without_template_and_with_every_label_cut_away(tok, tmp_path):
    records = load_records(str(FIX / "chat_sample.jsonl"), "chat")
    with pytest.raises(UserError, match="chat template"):
        tokenize_chat(records, tok, 256)
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                                             {"role": "user", "content": "blah " * 200}]}) + "\n")
    with pytest.raises(UserError, match=r"c\.jsonl: no examples left after tokenization .*1 with no label tokens"):
        tokenize_chat(load_records(str(path), "chat"), tok, 64, source=str(path), chat_template=CHAT_TEMPLATE)


def test_squad_v2_unanswerable_policy(tmp_path):
    doc = {"data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "q1", "answers": [{"text": "a", "answer_start": 0}]},
        {"id": "2", "question": "q2", "answers": [], "is_impossible": True}]}]}]}
    path = tmp_path / "v2.json"
    path.write_text(json.dumps(doc))
    notes = Counter()
    assert [r.id for r in load_records(str(path), "squad", notes=notes)] == ["1"]
    assert sum(notes.values()) == 1
    fixed = load_records(str(path), "squad", unanswerable="unanswerable")
    assert [r.completion for r in fixed] == [" a", " unanswerable"]


def _rows():
    return [{"q": f"question {i}?", "a": f" answer {i}", "extra": i} for i in range(5)]


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "saved"])
def test_containers_and_column_mapping_give_the_same_records(tmp_path, kind):
    import datasets
    import pyarrow as pa

    rows = _rows()
    ds = datasets.Dataset.from_list(rows)
    path = tmp_path / {"jsonl": "d.jsonl", "json": "d.json", "parquet": "d.parquet", "arrow": "d.arrow",
                       "saved": "saved"}[kind]
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        ds.to_parquet(str(path))
    elif kind == "arrow":
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    else:
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    records = load_records(str(path), "input_output", limit=4, columns={"input": "q", "output": "a"})
    assert [(r.fields["input"], r.completion) for r in records] == [(f"question {i}?", f" answer {i}") for i in range(4)]
    assert records[0].fields["q"] == "question 0?"  # the file's own column names stay usable in templates


def test_hub_dataset_is_loaded_with_datasets_and_cached(tmp_path, tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, split=None, **kw):
        calls.append((name, split))
        return datasets.Dataset.from_list([{"instruction": f"Say {i}.", "output": f"{i}"} for i in range(6)])
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = DataConfig(train=DataSource(path="someone/tiny-alpaca", format="alpaca", split="train"),
                      cache_dir=str(tmp_path))
    first = prepare_set(data, [data.train], tok, progress=False)
    assert ("someone/tiny-alpaca", "train") in calls and len(first.examples) == 6
    again = prepare_set(data, [data.train], tok, progress=False)
    assert again.sources[0].cached and again.examples.ids.tolist() == first.examples.ids.tolist()


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(name, split=None, **kw):
        raise ConnectionError("offline\nmore")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match=r"^someone/x: cannot load Hub dataset split 'train' \(ConnectionError: offline\)$"):
        load_records("someone/x", "alpaca")


@pytest.mark.parametrize("fmt, content, message", [
    ("alpaca", '[{"instruction": "a", "output": 3}]', r"a\.json: record 0: field 'output' must be str, got int"),
    ("alpaca", '[{"instruction": "a"}]', r"a\.json: record 0: missing field 'output'"),
    ("dolly", '{"instruction": "a", "response": "b"}\n{"instruction": "a"\n', r"a\.jsonl:2: invalid JSON"),
    ("chat", '{"messages": [{"role": "user", "content": "hi"}]}\n', r"a\.jsonl:1: field 'messages' has no assistant"),
    ("chat", '{"messages": [{"role": "bot", "content": "hi"}]}\n', r"a\.jsonl:1: messages\[0\]\.role must be"),
    ("text", '{"txt": "a"}\n', r"a\.jsonl:1: missing field 'text'"),
    ("text", '{"text": "a"}', r"a\.json: expected a JSON list of records"),
])
def test_bad_records_name_file_record_and_field(tmp_path, fmt, content, message):
    path = tmp_path / ("a.json" if content.startswith("[") or "\n" not in content else "a.jsonl")
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_records(str(path), fmt)


def test_undecodable_bytes_unknown_container_and_empty_result(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"b\.jsonl: not UTF-8 text"):
        load_records(str(bad), "text")
    odd = tmp_path / "d.csv"
    odd.write_text("a,b\n")
    with pytest.raises(UserError, match=r"d\.csv: unknown file type '\.csv'"):
        load_records(str(odd), "text")
    v2 = tmp_path / "v2.json"
    v2.write_text(json.dumps({"data": [{"paragraphs": [{"context": "c", "qas": [
        {"id": "1", "question": "q", "answers": []}]}]}]}))
    with pytest.raises(UserError, match=r"v2\.json: no usable examples"):
        load_records(str(v2), "squad")


def test_template_naming_a_missing_field(tok):
    records = load_records(str(FIX / "alpaca_sample.json"), "alpaca")
    with pytest.raises(UserError, match=r"prompt_template names field \{question\}.*available: input, instruction, output"):
        tokenize_records(records, tok, "{question}", 512, source="alpaca_sample.json")


def test_truncation_policies(tok, tmp_path):
    path = tmp_path / "io.jsonl"
    path.write_text(json.dumps({"input": "x " * 300 + "END:", "output": " yes"}) + "\n"
                    + json.dumps({"input": "short:", "output": " ok"}) + "\n")
    records = load_records(str(path), "input_output")
    left, stats = tokenize_records(records, tok, "{input}", 64, truncation="left")
    assert len(left) == 2 and stats.truncated == 1 and len(left[0].input_ids) == 64
    kept, stats = tokenize_records(records, tok, "{input}", 64, truncation="drop")
    assert len(kept) == 1 and stats.dropped["longer than seq_length (truncation: drop)"] == 1
    assert labelled_text(tok, kept[0]) == "ok"


@pytest.mark.parametrize("tokenizer", ["stories", "gpt2"])
def test_shared_context_tokenization_equals_whole_text(tokenizer, monkeypatch):
    """SQuAD contexts are tokenized once per context, not per question; the examples are the whole-text ones."""
    from tuneforge.data import tokenize as T
    from tests.conftest import SQUAD_TRAIN

    path = STORIES if tokenizer == "stories" else Path("/work/shared/models/gpt2-tokenizer")
    if not path.exists():
        pytest.skip("GPT-2 tokenizer files not present")
    tk = AutoTokenizer.from_pretrained(path)
    records = load_records(str(SQUAD_TRAIN), "squad", limit=200)
    prompts = [T.render_prompt(DEFAULT_TEMPLATES["squad"], r, "x") for r in records]
    shared = T._encode_shared(records, prompts, DEFAULT_TEMPLATES["squad"], tk, False)
    assert sum(ex is not None for ex in shared) >= 0.95 * len(records)
    seq = 300 if tokenizer == "stories" else 160
    fast, fast_stats = tokenize_records(records, tk, DEFAULT_TEMPLATES["squad"], seq)
    monkeypatch.setattr(T, "_encode_shared", lambda records, *a: [None] * len(records))
    whole, whole_stats = tokenize_records(records, tk, DEFAULT_TEMPLATES["squad"], seq)
    assert fast == whole and fast_stats.summary() == whole_stats.summary()
    assert fast_stats.truncated > 0  # the comparison covers the truncation path too
