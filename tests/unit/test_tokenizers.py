"""The tokenizer cases real checkpoints bring, each on tokenization and masking: sentencepiece with bos (stories260K, a
Llama tokenizer), byte-level BPE with no pad, no bos and no unk (GPT-2 style, built here), a chat template whose
end-of-turn marker is not the eos, and a tokenizer with more ids than the model has embedding rows."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tests.conftest import STORIES
from tuneforge.config.schema import ModelConfig
from tuneforge.data import IGNORE, tokenize_records
from tuneforge.data.loader import Collator, PackedCollator
from tuneforge.data.records import DEFAULT_TEMPLATES, Record
from tuneforge.data.tokenize import tokenize_chat
from tuneforge.data.truncate import cut_left
from tuneforge.errors import UserError
from tuneforge.models.load import check_tokenizer_fits, load_tokenizer

CORPUS = ["Which colour is the sky? It is blue.", "Name the river that runs north. The Nile runs north.",
          "Question: what follows red green? Answer: blue yellow", "user assistant system hello there"] * 20
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory):
    """A GPT-2-style tokenizer: byte-level BPE, eos <|endoftext|>, no pad, no bos, no unk; ChatML turn markers as
    special tokens and a ChatML chat template whose end-of-turn marker (<|im_end|>) is not the eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("byte_bpe")
    fast.save_pretrained(path)
    return load_tokenizer(ModelConfig(name_or_path=str(path)))


def record(prompt="Which colour is the sky?", answer=" It is blue."):
    return Record(fields={"input": prompt}, completion=answer)


def labelled(ex):
    return [t for t in ex.labels if t != IGNORE]


def test_no_pad_no_bos_no_unk_pads_with_eos_and_keeps_the_real_eos_labelled(byte_bpe):
    tok = byte_bpe
    assert tok.bos_token_id is None and tok.unk_token_id is None
    assert tok.pad_token_id == tok.eos_token_id  # reused, never added: the embeddings keep their size
    short, long = tokenize_records([record(), record(answer=" The Nile runs north, it is blue.")], tok,
                                   DEFAULT_TEMPLATES["input_output"], 64)[0]
    for ex, answer in ((short, " It is blue."), (long, " The Nile runs north, it is blue.")):
        assert ex.input_ids[0] != tok.eos_token_id  # no bos, and nothing in its place
        assert ex.input_ids.count(tok.eos_token_id) == 1 and ex.input_ids[-1] == tok.eos_token_id
        assert labelled(ex)[-1] == tok.eos_token_id and tok.decode(labelled(ex)[:-1]) == answer
    # padding with the eos id: padded positions carry no label, the example's own eos keeps its label
    batch = Collator(tok.pad_token_id)([short, long])
    n = len(short.input_ids)
    assert batch["labels"][0, n - 1] == tok.eos_token_id and (batch["labels"][0, n:] == IGNORE).all()
    assert (batch["attention_mask"][0, n:] == 0).all() and (batch["input_ids"][0, n:] == tok.eos_token_id).all()
    packed = PackedCollator(tok.pad_token_id, 64)([[short, long]])
    assert int((packed["labels"] == tok.eos_token_id).sum()) == 2  # one labelled eos per example


def test_left_truncation_without_bos_keeps_the_answer(byte_bpe):
    tok = byte_bpe
    ex = tokenize_records([record(prompt="Name the river that runs north. " * 4)], tok,
                          DEFAULT_TEMPLATES["input_output"], 512)[0][0]
    cut = cut_left(ex, tok, len(ex.input_ids) - 5)
    assert cut.input_ids == ex.input_ids[5:] and labelled(cut) == labelled(ex)


def test_sentencepiece_with_bos_masks_the_bos_and_keeps_it_when_cut():
    tok = load_tokenizer(ModelConfig(name_or_path=str(STORIES)))
    assert tok.pad_token_id == tok.unk_token_id != tok.eos_token_id  # unk before eos where there is one
    ex = tokenize_records([record(prompt="Which colour is the sky? " * 6)], tok, DEFAULT_TEMPLATES["input_output"],
                          512)[0][0]
    assert ex.input_ids[0] == tok.bos_token_id and ex.labels[0] == IGNORE
    assert labelled(ex)[-1] == tok.eos_token_id and ex.input_ids.count(tok.eos_token_id) == 1
    cut = cut_left(ex, tok, len(ex.input_ids) - 6)
    assert cut.input_ids[0] == tok.bos_token_id and cut.input_ids[1:] == ex.input_ids[7:]
    assert labelled(cut) == labelled(ex)


def test_a_chat_template_whose_end_of_turn_is_not_the_eos_labels_its_own_marker(byte_bpe):
    tok = byte_bpe
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end != tok.eos_token_id
    messages = [{"role": "user", "content": "Which colour is the sky?"},
                {"role": "assistant", "content": "It is blue."},
                {"role": "user", "content": "And the river?"},
                {"role": "assistant", "content": "The Nile runs north."}]
    ex = tokenize_chat([Record(fields={}, completion="", id="r0", messages=messages)], tok, 256)[0][0]
    # each assistant turn is trained with the template's own end-of-turn marker, no eos is appended, and the user
    # turns and the turn headers are not trained
    assert tok.eos_token_id not in ex.input_ids
    spans, current = [], []
    for t in ex.labels:
        if t == IGNORE:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(t)
    spans += [current] if current else []
    assert [tok.decode(s) for s in spans] == ["It is blue.<|im_end|>\n", "The Nile runs north.<|im_end|>\n"]
    assert sum(t == im_end for t in labelled(ex)) == 2 and ex.input_ids.count(im_end) == 4


def test_a_tokenizer_with_ids_past_the_embeddings_is_one_line():
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.add_tokens(["<extra>"])  # 513 ids; a checkpoint whose embeddings were never resized
    small = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=512, hidden_size=16,
                                                                  num_hidden_layers=1, num_attention_heads=2,
                                                                  intermediate_size=32))
    with pytest.raises(UserError) as e:
        check_tokenizer_fits(tok, small, "ckpt")
    assert str(e.value).startswith("model.name_or_path: the tokenizer of 'ckpt' has ids up to 512 (513 tokens")
    assert "input embeddings have 512 rows" in str(e.value)
    small.resize_token_embeddings(len(tok))
    check_tokenizer_fits(tok, small, "ckpt")
