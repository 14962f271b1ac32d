"""What tuneforge checks about a model instead of assuming it: the attention backend the architecture supports, the LM
head split (backbone, then the output layer on labelled positions) against the model's own logits, and packing
against padding. Tiny random models of real transformers architectures, fp32."""
import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from tuneforge.config.schema import ModelConfig
from tuneforge.data import IGNORE
from tuneforge.errors import UserError
from tuneforge.models.attention import (BLOCK_MASK, PER_EXAMPLE, attention_name, use_model_attention,
                                        use_per_example_attention)
from tuneforge.models.backend import choose_attention
from tuneforge.models.head import check_split_head, set_split_verdict, split_head, split_verdict
from tuneforge.models.loss import causal_lm_loss
from tuneforge.models.preference import sequence_logps
from tuneforge.models.packing import (CARRIES_STATE, DIFFERS_FROM_PADDED, PackedAttention, check_packing,
                                      choose_packed_attention)

pytestmark = pytest.mark.precision  # run again under AVX2-only kernels in CI (.ci/run)

SMALL = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             use_cache=False)


def tiny(model_type: str, **overrides):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**SMALL, **overrides})).eval()


def batch(rows=3, width=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    labels = ids.clone()
    labels[:, :8] = IGNORE
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def assert_loss_is_the_models_own(model):
    b = batch()
    n = int((b["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        ours = causal_lm_loss(model, b) / n  # what training sums and divides by the step's label tokens
        own = model(**b).loss  # transformers' own causal-LM loss, mean over label tokens
    assert float(ours) == pytest.approx(float(own), rel=1e-5)


# ---- attention backend ---------------------------------------------------------------------------------------
def test_auto_attention_is_sdpa_where_the_architecture_has_it_and_the_models_own_elsewhere():
    auto = ModelConfig(name_or_path="x")
    assert auto.attn_implementation == "auto"
    llama = choose_attention(auto, LlamaConfig(), "causal_lm", device="cpu")
    assert (llama.implementation, llama.reason) == ("sdpa", "auto: LlamaForCausalLM supports sdpa")
    gemma2 = choose_attention(auto, AutoConfig.for_model("gemma2"), "causal_lm", device="cpu")
    assert gemma2.implementation is None and "Gemma2ForCausalLM has no sdpa path" in gemma2.reason
    # flash-attention is never picked on CPU
    assert choose_attention(auto, LlamaConfig(), "causal_lm", device="cpu").implementation != "flash_attention_2"


def test_an_explicit_attention_the_architecture_lacks_is_one_line_naming_the_ones_it_has():
    with pytest.raises(UserError) as e:
        choose_attention(ModelConfig(name_or_path="x", attn_implementation="sdpa"), AutoConfig.for_model("gemma2"),
                         "causal_lm", device="cpu")
    assert str(e.value).startswith("model.attn_implementation: Gemma2ForCausalLM does not support 'sdpa'; it supports "
                                   "eager") and "\n" not in str(e.value)
    eager = choose_attention(ModelConfig(name_or_path="x", attn_implementation="eager"), LlamaConfig(), "causal_lm")
    assert eager.implementation == "eager"


# ---- the LM head split -----------------------------------------------------------------------------------------
class TransformedHeadLlama(LlamaForCausalLM):
    """A planted head: the logits are lm_head(tanh(transform(hidden))), while get_output_embeddings() is lm_head
    alone, as in BERT-style heads. Applying lm_head to the backbone's output would give other logits."""

    def __init__(self, config):
        super().__init__(config)
        self.transform = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **kwargs).last_hidden_state
        logits = self.lm_head(torch.tanh(self.transform(hidden)))
        loss = self.loss_function(logits, labels, self.config.vocab_size) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_planted_head_transform_makes_the_loss_use_the_full_forward():
    torch.manual_seed(0)
    model = TransformedHeadLlama(LlamaConfig(**SMALL, num_key_value_heads=2)).eval()
    assert "differs from the model's own logits" in check_split_head(model)
    assert split_head(model) is None  # the causal loss and the preference head (sequence_logps) both ask this
    assert "differs" in split_verdict(model)
    assert_loss_is_the_models_own(model)


def test_the_preference_head_takes_the_same_verdict():
    """DPO's per-sequence log-probs (sequence_logps) go through the same check: on the planted head they are the full
    forward's; forcing the split (a wrong verdict) would give other numbers."""
    from tuneforge.data.pairs import Pair, PairCollator, PairSet

    torch.manual_seed(0)
    model = TransformedHeadLlama(LlamaConfig(**SMALL, num_key_value_heads=2)).eval()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (6, 3, 4, 5, 2, 3)]
    batch = PairCollator(0)(PairSet([Pair([1] + ids[0], ids[1] + [2], ids[2] + [2]),
                                     Pair([1] + ids[3], ids[4] + [2], ids[5] + [2])]).pairs)
    with torch.no_grad():
        checked, _ = sequence_logps(model, batch)
        full, _ = sequence_logps(model, batch, full_forward=True)
        set_split_verdict(model, None)  # claim the split is exact
        forced, _ = sequence_logps(model, batch)
    assert torch.allclose(checked, full, rtol=1e-6)
    assert not torch.allclose(forced, full, rtol=1e-2)


def test_llama_keeps_the_split_head():
    model = tiny("llama", num_key_value_heads=2)
    assert check_split_head(model) is None
    assert split_head(model) is not None and split_verdict(model) is None
    assert_loss_is_the_models_own(model)


@pytest.mark.parametrize("model_type, overrides", [
    ("roberta", dict(is_decoder=True)),   # dense + norm before the output layer
    ("bert", dict(is_decoder=True)),
    ("electra", dict(is_decoder=True, embedding_size=32)),  # the head changes the width too
])
def test_bert_style_heads_get_the_models_own_loss(model_type, overrides):
    model = tiny(model_type, **overrides)
    assert check_split_head(model) is not None
    assert_loss_is_the_models_own(model)


def test_soft_capped_logits_skip_the_split_by_config_and_pack_through_transformers_mask():
    model = tiny("gemma2", num_key_value_heads=2, head_dim=16, sliding_window=4)
    assert "final_logit_softcapping" in check_split_head(model)
    assert_loss_is_the_models_own(model)
    # eager attention with soft-capped scores and a sliding window every other layer: transformers' packed-sequence
    # mask is exact for it, so packing takes that path
    assert model.config._attn_implementation == "eager"
    assert choose_packed_attention(model, per_example=False) == PackedAttention("model")


# ---- packing ---------------------------------------------------------------------------------------------------
def test_packing_is_exact_for_llama_with_per_example_attention():
    model = tiny("llama", num_key_value_heads=2)
    assert use_per_example_attention(model)
    assert choose_packed_attention(model, per_example=True) == PackedAttention("per_example")
    assert model.config._attn_implementation == PER_EXAMPLE


def test_a_recurrent_model_is_refused_packing():
    assert check_packing(tiny("rwkv", attention_hidden_size=64, context_length=64)) == CARRIES_STATE


def test_positions_computed_from_the_input_ids_are_refused_packing():
    model = tiny("roberta", is_decoder=True)
    assert use_per_example_attention(model)
    assert check_packing(model) == DIFFERS_FROM_PADDED
    packed = choose_packed_attention(model, per_example=True)
    assert packed.not_exact.startswith(f"with per-example attention {DIFFERS_FROM_PADDED}; with transformers' own "
                                       f"attention {CARRIES_STATE}")
    assert model.config._attn_implementation == "sdpa"  # given back its own attention


def test_per_example_attention_not_exact_for_a_model_falls_back_to_transformers_block_mask():
    # GPT-BigCode does not hand position_ids to its attention function: per-example attention cannot see the blocks
    model = tiny("gpt_bigcode", bos_token_id=1, eos_token_id=2)
    assert use_per_example_attention(model)
    packed = choose_packed_attention(model, per_example=True)
    assert packed == PackedAttention("model", (f"per-example attention: {CARRIES_STATE}",))
    assert model.config._attn_implementation == "sdpa"


def gpt_oss(**overrides):
    return tiny("gpt_oss", num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                layer_types=["sliding_attention", "full_attention"], sliding_window=4, **overrides)


def test_gpt_oss_packs_exactly_under_a_block_mask_with_its_sinks_and_sliding_window(tmp_path):
    """GPT-OSS's mask code never reads position_ids, so transformers' packed-sequence mask does not reach it; its own
    eager attention (the sinks) under tuneforge's block mask does, window included (4 < the probe's examples)."""
    model = gpt_oss()
    assert model.config._attn_implementation == "eager"  # no sdpa path: attn_implementation auto leaves its own
    assert check_packing(model) == CARRIES_STATE
    packed = choose_packed_attention(model, per_example=False)
    assert packed == PackedAttention("block_mask", (f"transformers' own attention: {CARRIES_STATE}",))
    assert model.config._attn_implementation == BLOCK_MASK + "eager" and attention_name(model) == "eager"
    assert check_packing(model) is None
    assert check_split_head(model) is None  # its head is a plain output layer: the split stays
    model.save_pretrained(tmp_path)  # nothing of tuneforge's reaches a saved config
    assert "tuneforge" not in (tmp_path / "config.json").read_text()
    # a packed batch of four examples gives each its padded loss, the sliding window reaching across none of them
    g = torch.Generator().manual_seed(1)
    examples = [torch.randint(3, 512, (n,), generator=g) for n in (9, 5, 12, 7)]
    packed_ids = torch.cat(examples)[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    with torch.no_grad():
        packed_logits = model(input_ids=packed_ids, position_ids=positions).logits[0]
        use_model_attention(model)
        at = 0
        for e in examples:
            alone = model(input_ids=e[None]).logits[0]
            assert torch.allclose(packed_logits[at:at + len(e)], alone, atol=1e-5)
            at += len(e)


def test_a_model_exact_with_none_of_the_paths_is_given_back_its_own_attention():
    model = tiny("rwkv", attention_hidden_size=64, context_length=64)
    packed = choose_packed_attention(model, per_example=False)
    assert packed.path == "model" and packed.not_exact == CARRIES_STATE
    assert model.config._attn_implementation == "eager"


@pytest.mark.parametrize("autocast", [False, True])
def test_per_example_attention_takes_value_heads_narrower_than_query_heads(autocast):
    # Multi-head latent attention (MiniCPM3, DeepSeek): q/k heads of 16, value heads of 8
    model = tiny("minicpm3", num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8)
    assert use_per_example_attention(model)
    assert check_packing(model) is None
    ids = torch.randint(3, 512, (1, 12))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        packed = model(input_ids=ids, position_ids=positions).logits
        second = model(input_ids=ids[:, 6:]).logits
    assert torch.allclose(packed[0, 6:].float(), second[0].float(), atol=2e-2 if autocast else 1e-5)
