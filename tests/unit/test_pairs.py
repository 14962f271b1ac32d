"""Preference pairs: the three row shapes, the prompt tokenized once and shared, the boundary and bos traps, eos,
truncation with its counts, and the batch layouts."""
import json
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from tests.conftest import STORIES
from tuneforge.config.schema import DataConfig, DataSource, PreferenceConfig
from tuneforge.data.pairs import (PackedPairCollator, PairCollator, prepare_pairs, read_pair_texts, tokenize_pairs)
from tuneforge.errors import UserError

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(STORIES)


def write(tmp_path, rows, name="pairs.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_of(tmp_path, tok, rows, seq_length=128, pref=None, **data):
    cfg = DataConfig(train=DataSource(path=str(write(tmp_path, rows)), format="preference"), seq_length=seq_length,
                     **data)
    train, _ = prepare_pairs(cfg, pref or PreferenceConfig(), tok)
    return train


def test_string_pairs_share_the_prompt_and_end_with_eos(tmp_path, tok):
    train = pairs_of(tmp_path, tok, [{"prompt": "Once upon a time", "chosen": " there was a cat",
                                      "rejected": " the dog ran"}])
    p = train.examples[0]
    assert p.prompt == tok("Once upon a time").input_ids and p.prompt[0] == tok.bos_token_id  # bos once
    for text, ids in ((" there was a cat", p.chosen), (" the dog ran", p.rejected)):
        assert ids[-1] == tok.eos_token_id
        assert p.prompt + ids[:-1] == tok("Once upon a time" + text).input_ids  # the joint text's tokens


def test_a_merge_across_the_boundary_moves_the_token_to_both_completions(tmp_path, tok):
    train = pairs_of(tmp_path, tok, [{"prompt": "Once upon a time t", "chosen": "he story", "rejected": "he dog"}])
    p = train.examples[0]
    whole_c, whole_r = tok("Once upon a time the story").input_ids, tok("Once upon a time the dog").input_ids
    assert p.prompt + p.chosen[:-1] == whole_c and p.prompt + p.rejected[:-1] == whole_r
    assert len(p.prompt) < len(tok("Once upon a time t").input_ids)
    assert train.notes[0]["prompts whose last tokens merge into the completion (moved to the completion)"] == 1


def test_a_doubled_bos_loses_one(tmp_path, tok):
    p = pairs_of(tmp_path, tok, [{"prompt": "<s>Hello", "chosen": " a", "rejected": " b"}]).examples[0]
    assert p.prompt[:2] == [tok.bos_token_id, tok("<s>Hello").input_ids[2]]


def test_conversational_and_implicit_prompt_rows_render_through_the_chat_template(tmp_path, tok):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who ran?"}]
    chosen, rejected = [{"role": "assistant", "content": "The dog."}], [{"role": "assistant", "content": "A cat."}]
    rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected},
            {"chosen": prompt + chosen, "rejected": prompt + rejected},  # implicit: the shared messages
            {"prompt": prompt, "chosen": "The dog.", "rejected": "A cat."}]  # a string completion: the assistant's
    train = pairs_of(tmp_path, tok, rows, chat_template=CHATML)
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, chat_template=CHATML)
    whole = tok.apply_chat_template(prompt + chosen, tokenize=False, chat_template=CHATML)
    want_prompt = tok(head, add_special_tokens=False).input_ids
    for p in train.examples.pairs:
        assert p.prompt == want_prompt  # the template writes the turn markers; no bos added on top
        assert p.prompt + p.chosen == tok(whole, add_special_tokens=False).input_ids
        assert tok.decode(p.chosen).endswith("<|im_end|>\n")  # the end-of-turn marker ends it, no eos added


def test_prompt_style_chat_makes_a_string_prompt_the_user_turn(tmp_path, tok):
    train = pairs_of(tmp_path, tok, [{"prompt": "Who ran?", "chosen": "The dog.", "rejected": "A cat."}],
                     prompt_style="chat", chat_template=CHATML, system_prompt="Be brief.")
    text = tok.decode(train.examples[0].prompt)
    assert "system\nBe brief." in text and text.rstrip().endswith("assistant")


def test_truncation_cuts_the_prompt_first_and_counts(tmp_path, tok):
    long_prompt = "Once upon a time there was a little dog who liked to run in the park every day"
    n = len(tok(long_prompt).input_ids)
    rows = [{"prompt": long_prompt, "chosen": " yes", "rejected": " no it was not"}]
    kept = pairs_of(tmp_path, tok, rows, pref=PreferenceConfig(max_prompt_length=8)).examples[0]
    assert len(kept.prompt) == 8 and kept.prompt[0] == tok.bos_token_id  # keep_end keeps bos and the end
    assert kept.prompt[1:] == tok(long_prompt).input_ids[-7:]
    start = pairs_of(tmp_path, tok, rows, pref=PreferenceConfig(max_prompt_length=8, truncation_mode="keep_start"))
    assert start.examples[0].prompt == tok(long_prompt).input_ids[:8]
    fit = pairs_of(tmp_path, tok, rows, seq_length=n + 2)
    p = fit.examples[0]
    assert len(p.prompt) + len(p.rejected) == n + 2 and p.rejected[-1] == tok.eos_token_id  # completions kept
    assert fit.notes[0]["prompt truncated to fit seq_length"] == 1 and fit.sources[0].stats.truncated == 1


@pytest.mark.parametrize("row,message", [
    ({"prompt": "a", "chosen": "b"}, ":1: missing field 'rejected'"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, ":1: field 'chosen' is empty"),
    ({"prompt": "a", "chosen": " b", "rejected": " b"}, ":1: chosen and rejected are the same"),
    ({"chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]},
     ":1: missing field 'prompt' (and chosen and rejected share no first message"),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, ":1: field 'chosen' must be str or list, got int"),
])
def test_bad_rows_are_one_line_with_the_line_number(tmp_path, tok, row, message):
    source = DataSource(path=str(write(tmp_path, [row])), format="preference")
    with pytest.raises(UserError, match=None) as e:
        texts = read_pair_texts(source, DataConfig(chat_template=CHATML), tok)
        tokenize_pairs(texts, tok, 64, PreferenceConfig(), Counter())
    assert f"pairs.jsonl{message}" in str(e.value) and "\n" not in str(e.value)


def test_batches_put_chosen_first_and_mark_every_completion_token(tmp_path, tok):
    rows = [{"prompt": f"Once upon a time {i}", "chosen": " yes" * (i + 1), "rejected": " no"} for i in range(3)]
    pairs = pairs_of(tmp_path, tok, rows).examples
    unpacked = PairCollator(0)(pairs.pairs)
    assert unpacked["input_ids"].shape[0] == 6 and unpacked["pair_index"].tolist() == [0, 1, 2]
    packed = PackedPairCollator(0)([[pairs[0], pairs[1]], [pairs[2]]])
    for batch in (unpacked, packed):
        seg, labels = batch["segments"], batch["labels"]
        assert torch.equal(seg >= 0, labels != -100)
        for j, p in enumerate(pairs.pairs):
            assert labels[seg == j].tolist() == p.chosen and labels[seg == 3 + j].tolist() == p.rejected
    starts = (packed["position_ids"] == 0).sum(1).tolist()
    assert starts == [4, 3]  # row 0: two pairs' four sequences; row 1: one pair's two, then its padding's block


def test_packed_rows_hold_seq_length_or_the_longest_pair(tmp_path, tok):
    from tuneforge.data.pairs import pack_capacity, pair_eval_batches

    rows = [{"prompt": "Once upon a time " * (1 + 3 * i), "chosen": " yes", "rejected": " no"} for i in range(4)]
    pairs = pairs_of(tmp_path, tok, rows, seq_length=64).examples
    longest = int(pairs.lengths.max())
    assert longest > 64 and pack_capacity(pairs, 64) == longest and pack_capacity(pairs, 512) == 512
    batches = pair_eval_batches(pairs, 8, 0, 0, 1, "packing", 64)
    assert all(b["input_ids"].shape[1] <= longest for b in batches)
    assert sorted(i for b in batches for i in b["pair_index"].tolist()) == [0, 1, 2, 3]
