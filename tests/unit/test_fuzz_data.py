"""Any file content, in any format, gives records and examples or a clean one-line UserError: never an unhandled
exception. Contents are random text or bytes, and JSON shaped like each format with fields of every kind."""
import json

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge.data import load_records, tokenize_chat, tokenize_records
from tuneforge.data.records import DEFAULT_TEMPLATES, FORMAT_FIELDS
from tuneforge.errors import UserError
from tests.unit.test_data_formats import CHAT_TEMPLATE

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FORMATS = sorted(FORMAT_FIELDS)
SEQ = 48  # short enough that many examples need truncating
# texts with every kind of character, lone surrogates included (JSON escapes can spell them)
texts = st.one_of(st.text(max_size=40), st.text(st.characters(exclude_categories=()), max_size=12),
                  st.sampled_from(["", " ", "{x}", "{0}", "}{", "\n", "Answer:", "\ud800", "a\udfffb"]))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)), max_leaves=8)


def mostly(good):
    """The right kind of value seven times in eight, anything else otherwise (null: a missing field)."""
    return st.integers(0, 7).flatmap(lambda i: json_values if i == 0 else good)


answer_list = st.lists(st.fixed_dictionaries({"text": mostly(texts), "answer_start": mostly(st.integers())}),
                       min_size=1, max_size=3)
answers = st.one_of(answer_list, st.fixed_dictionaries({"text": mostly(st.lists(mostly(texts), max_size=3))}))  # Hub
messages = st.lists(st.fixed_dictionaries({"role": mostly(st.sampled_from(["system", "user", "assistant", "tool"])),
                                           "content": mostly(texts)}), max_size=4)
FIELDS = {"squad": {"context": texts, "question": texts, "answers": answers}, "chat": {"messages": messages},
          "input_output": {"input": texts, "output": texts}, "text": {"text": texts},
          "alpaca": {"instruction": texts, "input": texts, "output": texts},
          "dolly": {"instruction": texts, "context": texts, "response": texts}}


def rows(fmt):
    return st.fixed_dictionaries({k: mostly(v) for k, v in FIELDS[fmt].items()},
                                 optional={"id": json_values, "extra": json_values})


def files(fmt):
    """(suffix, content): a JSON list, JSON lines or a SQuAD document, any JSON value or text, or any bytes."""
    some_rows = st.lists(mostly(rows(fmt)), min_size=1, max_size=3)
    paragraphs = st.lists(st.fixed_dictionaries({"context": mostly(texts), "qas": st.lists(mostly(rows(fmt)),
                                                                                           max_size=3)}), max_size=2)
    squad = st.lists(st.fixed_dictionaries({"paragraphs": mostly(paragraphs)}), max_size=2)
    suffixes = st.sampled_from([".json", ".jsonl", ".txt"])
    return st.one_of(st.tuples(st.just(".json"), some_rows.map(json.dumps)),
                     st.tuples(st.just(".jsonl"), some_rows.map(lambda rs: "\n".join(json.dumps(r) for r in rs))),
                     st.tuples(st.just(".json"), squad.map(lambda data: json.dumps({"data": data}))),
                     st.tuples(suffixes, json_values.map(json.dumps)), st.tuples(suffixes, st.text(max_size=80)),
                     st.tuples(suffixes, st.binary(max_size=60)))


def parse_and_tokenize(path, fmt, tok):
    records = load_records(str(path), fmt)
    if fmt == "chat":
        return tokenize_chat(records, tok, SEQ, source=str(path), chat_template=CHAT_TEMPLATE)
    return tokenize_records(records, tok, DEFAULT_TEMPLATES[fmt], SEQ, source=str(path))


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.data())
def test_any_file_gives_examples_or_a_user_error(tmp_path_factory, tok, fmt, data):
    suffix, content = data.draw(files(fmt))
    path = tmp_path_factory.mktemp("fuzz") / f"data{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    try:
        examples, stats = parse_and_tokenize(path, fmt, tok)
    except UserError as e:
        assert "\n" not in str(e)
    else:
        assert examples and all(len(ex.input_ids) == len(ex.labels) <= SEQ for ex in examples)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_json_nested_too_deeply_is_a_user_error(tmp_path, suffix):
    (tmp_path / f"deep{suffix}").write_text("[" * 100_000)
    with pytest.raises(UserError, match=f"deep{suffix}:1: JSON nested too deeply to read"):
        load_records(str(tmp_path / f"deep{suffix}"), "text")
