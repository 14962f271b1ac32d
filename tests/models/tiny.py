"""Tiny random models of every causal-LM architecture that transformers knows, for sweeps that train each one.

`tiny_config` shrinks a model type's default config generically: it instantiates the config class with its defaults,
overrides the size fields under the names the class really has (its `attribute_map` aliases included), shrinks
per-layer lists to the fewest layers that still hold every kind of layer, and recurses into nested sub-configs. A
short table of per-type fix-ups covers what the generic rules cannot know.

Some classes' default configs cannot build or run a model at all (a required size left None: hunyuan_v1_*,
ministral, nemotron, deepseek_v2, dots1, qwen4_exp; no layer types or rope per layer type: lfm2_moe,
cohere_compass_text; dbrx's attention settings; reformer's is_decoder): the shrinker sets what real checkpoints set.
The types that still do not train are listed at the bottom of this file.

`python -m tests.models.tiny` runs one LoRA step on every type and prints what trains and what does not.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

CAUSAL_LM_TYPES: list[str] = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

HIDDEN, HEADS, HEAD_DIM, FFN, EXPERT_FFN, EXPERTS, MAX_POSITIONS, WINDOW = 64, 4, 16, 128, 32, 4, 512, 16

# Size fields by role; each set lists the spellings that configs use for that role. A field is only overridden when
# its default is set (None usually means "derived from the others", which then follows the small values).
_HIDDEN = {"hidden_size", "n_embd", "d_model", "emb_dim", "embed_dim", "dim", "word_embed_proj_dim",
           "hidden_size_global"}
_LAYERS = {"num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
           "num_decoder_layers", "num_encoder_layers"}
_HEADS = {"num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
          "decoder_attention_heads", "attention_heads", "num_encoder_attention_heads", "num_decoder_attention_heads",
          "swa_num_attention_heads", "linear_num_heads"}
_KV_HEADS = {"num_key_value_heads", "num_kv_heads", "kv_n_heads", "swa_num_key_value_heads", "num_query_groups"}
_HEAD_DIM = {"head_dim", "kv_channels", "attention_head_dim", "d_head", "d_kv", "dim_head", "attention_head_size",
             "swa_head_dim", "linear_head_dim", "linear_key_head_dim", "linear_value_head_dim", "mamba_d_head",
             "mamba_head_dim", "mamba_headdim", "index_head_dim", "indexer_head_dim"}
_FFN = {"intermediate_size", "ffn_dim", "n_inner", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "d_inner", "dim_ff",
        "ffn_hidden_size", "intermediate_size_mlp", "dense_intermediate_size", "prefix_dense_intermediate_size",
        "feed_forward_size", "dff", "mlp_dim"}
_EXPERT_FFN = {"moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size",
               "shared_intermediate_size", "shared_experts_intermediate_size", "moe_shared_expert_intermediate_size"}
_EXPERTS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_TOP_K = {"num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk", "moe_top_k", "top_k_experts"}
_SHARED_EXPERTS = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}
_POSITIONS = {"max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length",
              "max_target_positions", "max_source_positions", "model_max_length"}
# a window shorter than the 24-token batches, so that sliding/chunked layers really differ from full ones
_WINDOWS = {"sliding_window", "sliding_window_size", "attention_window_size", "attention_chunk_size",
            "local_attention_window_len", "keep_window_size"}
_STATE = {"state_size", "ssm_state_size", "mamba_d_state", "d_state"}
# random noise in the forward pass (besides dropout) that would make two runs differ
_NOISE = {"router_jitter_noise", "input_jitter_noise", "moe_jitter_eps", "mask_time_prob", "mask_feature_prob"}
# layer-index lists: which layers get some feature; remapped onto the kept layers
_INDEX_LISTS = ("_layers", "_idxs", "_indexes", "_indices", "_layer_ids")

_ROLES = [(_HIDDEN, HIDDEN), (_HEADS, HEADS), (_HEAD_DIM, HEAD_DIM), (_FFN, FFN), (_EXPERT_FFN, EXPERT_FFN),
          (_POSITIONS, MAX_POSITIONS), (_STATE, 16),
          # multi-head latent attention: small ranks, and a value head size unlike the q/k one, as in the real models
          ({"q_lora_rank", "kv_lora_rank", "o_lora_rank"}, 32), ({"qk_rope_head_dim"}, 8),
          ({"qk_nope_head_dim", "v_head_dim"}, 16), ({"qk_head_dim"}, 24), ({"o_groups"}, 2),
          ({"mamba_d_ssm"}, 2 * HIDDEN), ({"hc_lowrank", "hidden_size_per_layer_input", "router_hidden_size"}, 16),
          # widths into or out of another model's hidden size
          ({"out_hidden_size", "projector_input_dim", "projector_output_dim", "backbone_hidden_size"}, HIDDEN),
          # factorised embeddings narrower than the hidden size
          ({"embedding_size", "input_embedding_size", "output_embedding_size", "shape_embed_dim",
            "pronunciation_embed_dim", "prompt_mid_dim"}, HIDDEN // 2),
          ({"index_n_heads", "indexer_n_heads"}, 2), ({"indexer_kv_heads"}, 1),
          ({"index_topk", "indexer_budget"}, 8), ({"time_step_rank", "mamba_dt_rank"}, 8)]


def _get(config: PreTrainedConfig, name: str, default=None):
    """An attribute of the global config, also one that a heterogeneous config overrides per layer."""
    return config._getattr_without_heterogeneous_validation(name, default)


def _fields(config: PreTrainedConfig) -> dict:
    """The config's constructor settings (its dataclass fields) with their current values. Attributes that
    `__post_init__` derives (e.g. `qk_head_dim`) are left out: passing them back would override the derivation."""
    return {f.name: _get(config, f.name) for f in dataclasses.fields(config) if f.init}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _select_layers(per_layer: dict[str, list], n: int) -> list[int]:
    """The fewest layer indices (greedy set cover) that still hold every value of every per-layer feature: each kind
    of attention, mixer, MLP, ... of a hybrid model survives the shrinking. At least two layers, in their order."""
    def kinds(i):
        return {(name, repr(values[i])) for name, values in per_layer.items()}

    wanted = set().union(*(kinds(i) for i in range(n)))
    chosen: list[int] = []
    while wanted:
        best = max(range(n), key=lambda i: (len(wanted & kinds(i)), -i))
        chosen.append(best)
        wanted -= kinds(best)
    chosen += [i for i in range(n) if i not in chosen][:max(0, min(2, n) - len(chosen))]
    return sorted(chosen)


def _even_rotary(factor: float, head_dim: int = HEAD_DIM) -> float:
    """A partial-rotary factor whose share of the small head size is an even number of dims (RoPE rotates pairs)."""
    dims = max(2, 2 * round(head_dim * factor / 2))
    return dims / head_dim


def _shrink_rope(rope):
    if not isinstance(rope, dict):
        return rope
    rope = {k: _shrink_rope(v) if isinstance(v, dict) else v for k, v in rope.items()}
    if isinstance(rope.get("partial_rotary_factor"), float):
        rope["partial_rotary_factor"] = _even_rotary(rope["partial_rotary_factor"])
    if _is_int(rope.get("max_position_embeddings")):
        rope["max_position_embeddings"] = MAX_POSITIONS
    if _is_int(rope.get("original_max_position_embeddings")):
        # context-extension RoPE (llama3, yarn) scales from the pre-extension length by `factor`: keep that ratio
        factor = rope.get("factor") or 1
        rope["original_max_position_embeddings"] = max(2, int(MAX_POSITIONS // factor))
    return rope


_KEEP = object()  # "no small value for this field": the default stays


class _Target(NamedTuple):
    vocab_size: int
    hidden_sizes: set[int]  # the default hidden sizes of the config and its sub-configs
    vocab_sizes: set[int]  # and their default vocabulary sizes
    heads: int | None = None  # the default number of attention heads of the config being shrunk


def _default_sizes(config: PreTrainedConfig, names: set[str]) -> set[int]:
    fields = _fields(config)
    sizes = {v for name, v in fields.items() if name in names and _is_int(v)}
    return sizes.union(*(_default_sizes(v, names) for v in fields.values() if isinstance(v, PreTrainedConfig)))


def _small_value(name: str, value, fields: dict, target: _Target):
    """The small setting of one scalar field, or `_KEEP`."""
    if value is None:
        # a required size left unset by the class defaults (real checkpoints set it): the small value
        if name == "head_dim":
            return HEAD_DIM
        if name == "num_key_value_heads":
            return 2
        if name in _EXPERTS:
            return EXPERTS
        if name in _TOP_K:
            return 2
        if name == "moe_intermediate_size":
            return EXPERT_FFN
        return _KEEP
    if name in _KV_HEADS and _is_int(value):
        heads = fields.get(name.replace("key_value", "attention")) if "key_value" in name else target.heads
        # keep the attention flavour: multi-head (kv == heads), multi-query (1 kv head) or grouped
        return HEADS if value == heads else 1 if value == 1 else 2
    if name in _EXPERTS and _is_int(value):
        return min(value, EXPERTS)
    if name in _TOP_K and _is_int(value):
        return min(value, 2)
    if name in _SHARED_EXPERTS and _is_int(value):
        return min(value, 1)
    if name in ("n_group", "num_expert_group") and _is_int(value):
        return min(value, 2)
    if name == "topk_group" and _is_int(value):
        return 1
    if name in _WINDOWS and _is_int(value):
        return min(value, WINDOW)
    if name == "linear_num_key_heads" and _is_int(value):
        return 2
    if name == "linear_num_value_heads" and _is_int(value):
        # value heads are a multiple of key heads in gated delta nets
        return 2 * max(1, value // (fields.get("linear_num_key_heads") or value))
    if name in ("mamba_n_heads", "mamba_num_heads", "n_mamba_heads") and _is_int(value):
        return 2 * HIDDEN // HEAD_DIM  # expand 2 over heads of HEAD_DIM
    if name in ("mamba_n_groups", "n_groups", "mamba_ngroups") and _is_int(value):
        return min(value, 2)
    if name in ("decoder_sparse_step", "interleave_moe_layer_step", "attn_layer_period", "expert_layer_period",
                "global_attn_every_n_layers", "sliding_window_pattern", "no_rope_layer_interval") and _is_int(value):
        return min(value, 2)  # an every-k-th-layer pattern: every second layer, so two layers hold both kinds
    if name in ("attn_layer_offset", "expert_layer_offset", "max_window_layers") and _is_int(value):
        return min(value, 1)
    if name == "rotary_dim" and _is_int(value):
        return HEAD_DIM // 2
    if name == "partial_rotary_factor" and isinstance(value, float):
        return _even_rotary(value)
    if name == "rope_parameters":
        return _shrink_rope(value)
    if ("dropout" in name or "pdrop" in name or "layerdrop" in name or name in _NOISE) and isinstance(
            value, (int, float)) and not isinstance(value, bool):
        return type(value)(0)
    if name == "vocab_size" and _is_int(value) or "vocab" in name and value in target.vocab_sizes:
        return target.vocab_size
    if name == "use_cache":
        return False
    for names, small in _ROLES:
        if name in names and _is_int(value) and value > 0:
            return small
    if ("dim" in name or "hidden" in name or name.endswith(("input_size", "output_size", "embedding_size"))) and (
            value in target.hidden_sizes):
        # a width that matches some model's hidden size (an adapter into the text model, a projector out of the
        # vision tower, ...) is that hidden size, now the small one
        return HIDDEN
    return _KEEP


# canonical names that a class may store under another name (its `attribute_map`), e.g. a vision tower's `depth`
_CANONICAL = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "max_position_embeddings", "head_dim"}


def _role_names(config: PreTrainedConfig) -> dict[str, str]:
    """Field name -> the name its role goes by in the tables above (itself, or the canonical name it stores)."""
    known = set().union(*(names for names, _ in _ROLES), _LAYERS, _KV_HEADS, _EXPERTS, _TOP_K)
    return {stored: canonical for canonical, stored in type(config).attribute_map.items()
            if canonical in _CANONICAL and stored not in known}


def _layer_features(config: PreTrainedConfig, fields: dict, n: int) -> tuple[dict, dict, dict]:
    """The per-layer lists (one entry per layer), the layer-index lists, and per-layer features that some int
    fields imply (dense prefix, kv-sharing suffix, heterogeneous per-layer overrides)."""
    per_layer = {name: list(v) for name, v in fields.items()
                 if isinstance(v, (list, tuple)) and len(v) == n and name != "eos_token_id"
                 and not (name.endswith(_INDEX_LISTS) and list(v) == sorted(set(v)))}
    index_lists = {name: list(v) for name, v in fields.items()
                   if isinstance(v, (list, tuple)) and name.endswith(_INDEX_LISTS) and name not in per_layer
                   and all(_is_int(i) and 0 <= i < n for i in v) and list(v) == sorted(set(v))}
    # an index list splits the layers into two kinds (listed or not): keep one of each
    implied = {name: [i in v for i in range(n)] for name, v in index_lists.items()}
    for name in ("first_k_dense_replace", "num_dense_layers"):
        if _is_int(fields.get(name)):
            implied[name] = [i < fields[name] for i in range(n)]
    if _is_int(fields.get("num_kv_shared_layers")):
        # layers that reuse another layer's kv cache need a producer of their own attention kind before them
        first_shared = n - fields["num_kv_shared_layers"]
        types = fields.get("layer_types") or [None] * n
        implied["num_kv_shared_layers"] = [(types[i], i >= first_shared) for i in range(n)]
    if config.is_heterogeneous:
        # a layer that overrides some settings is a kind of its own (whatever the values)
        overrides = config._heterogeneity_spec.per_layer_overrides
        implied["per_layer_config"] = [sorted(overrides.get(i, {})) for i in range(n)]
    return per_layer, index_lists, implied


def _derived(config: PreTrainedConfig) -> set[str]:
    """Scalar fields that default to None and that `__post_init__` fills in from the others (e.g. a head size of
    hidden / heads): left unset, they follow the small values."""
    return {f.name for f in dataclasses.fields(config) if f.init and f.default is None and f.name not in _WINDOWS
            and not isinstance(_get(config, f.name), (type(None), list, tuple, dict, PreTrainedConfig))}


def _shrink_kwargs(config: PreTrainedConfig, target: _Target, fixup: dict) -> dict:
    """Constructor kwargs of a small config of `config`'s class; `fixup` wins over the generic rules."""
    fields = _fields(config)
    fixup = {**_FIXUPS.get(config.model_type, {}), **fixup}
    derived, roles = _derived(config), _role_names(config)
    own = target._replace(heads=_get(config, "num_attention_heads"))
    kwargs = {}
    for name, value in fields.items():
        if isinstance(value, PreTrainedConfig):
            sub_fixup = fixup.pop(name, {})
            kwargs[name] = _shrink(value, target, sub_fixup if isinstance(sub_fixup, dict) else {})
        elif name not in derived and (small := _small_value(roles.get(name, name), value, fields, own)) is not _KEEP:
            kwargs[name] = small
    if _is_int(rope := fields.get("qk_rope_head_dim")) and _is_int(nope := fields.get("qk_nope_head_dim")):
        # multi-head latent attention: the fields that name the rotary slice or the whole q/k head keep doing so
        for name in ("head_dim", "swa_head_dim", "qk_head_dim"):
            if name in kwargs and fields[name] == rope:
                kwargs[name] = kwargs["qk_rope_head_dim"]
            elif name in kwargs and fields[name] == rope + nope:
                kwargs[name] = kwargs["qk_rope_head_dim"] + kwargs["qk_nope_head_dim"]
    # the tokenizer's special ids: bos 1, eos 2, and unk 0 as the pad where the config has a pad
    specials = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    small_ids = {}
    for name, small in specials.items():
        if name in fields and (name != "pad_token_id" or fields[name] is not None):
            kwargs[name] = small
            ids = fields[name] if isinstance(fields[name], list) else [fields[name]]
            small_ids.update({i: small for i in ids if _is_int(i)})
    for name, value in fields.items():
        if name.endswith("_token_id") and name not in specials and value in small_ids:
            kwargs[name] = small_ids[value]  # e.g. a decoder start token that is the pad or the eos
    if _is_int(start := fields.get("decoder_start_token_id")) and start >= target.vocab_size and start not in small_ids:
        kwargs["decoder_start_token_id"] = 1  # a start token of its own: the bos
    if "is_decoder" in fields and not fields.get("is_encoder_decoder"):
        kwargs["is_decoder"] = True  # BERT-style stacks attend causally (and their CausalLM heads insist) only so

    n = _get(config, "num_hidden_layers")
    if not _is_int(n):
        n = next((fields[name] for name in _LAYERS if _is_int(fields.get(name))), 0)
    per_layer, index_lists, implied = _layer_features(config, fields, n)
    keep = _select_layers({**per_layer, **implied}, n) if n > 2 else list(range(n))
    for name in fields:
        if roles.get(name, name) in _LAYERS and _is_int(fields[name]) and fields[name] > 0:
            kwargs[name] = min(fields[name], len(keep))
    for name, values in per_layer.items():
        new = [values[i] for i in keep]
        if all(_is_int(v) for v in values) and "head" in name:
            new = [HEADS] * len(keep)
        elif all(_is_int(v) for v in values) and "intermediate" in name:
            new = [FFN] * len(keep)
        kwargs[name] = type(fields[name])(new)
    for name, values in index_lists.items():
        kwargs[name] = type(fields[name])(keep.index(i) for i in values if i in keep)
    for name in ("first_k_dense_replace", "num_dense_layers"):
        if name in implied:
            kwargs[name] = sum(implied[name][i] for i in keep)
    if "num_kv_shared_layers" in implied:
        kwargs["num_kv_shared_layers"] = sum(implied["num_kv_shared_layers"][i][1] for i in keep)
    if config.is_heterogeneous:
        # per-layer overrides keep their ratio to the (now small) global value: a layer with twice the head size
        # keeps twice the head size
        per_layer_config = {}
        for new_i, i in enumerate(keep):
            layer = {}
            for name, value in config._heterogeneity_spec.per_layer_overrides.get(i, {}).items():
                old, small = fields.get(name, _get(config, name)), kwargs.get(name)
                if name in _EXPERTS and _is_int(value):
                    value = min(value, EXPERTS)
                elif _is_int(value) and _is_int(old) and old > 0 and _is_int(small):
                    value = max(1, round(small * value / old))
                layer[name] = value
            if layer:
                per_layer_config[new_i] = layer
        kwargs["per_layer_config"] = per_layer_config
    kwargs.update(fixup)
    return kwargs


def _shrink(config: PreTrainedConfig, target: _Target, fixup: dict | None = None) -> PreTrainedConfig:
    """A small sub-config of `config`'s class that keeps the settings in which `config` differs from its class
    defaults (a composite config builds its sub-configs with such settings)."""
    cls = type(config)
    defaults, derived = _fields(cls()), _derived(config)
    base = {name: value for name, value in _fields(config).items()
            if name not in derived and not isinstance(value, PreTrainedConfig) and value != defaults[name]}
    return cls(**{**base, **_shrink_kwargs(config, target, fixup or {})})


# Per-type fix-ups, applied over the generic kwargs before the config is built: only what the generic rules miss.
# A dict value for a sub-config field applies to that sub-config; a nested config also gets its own type's fix-ups.
_FIXUPS: dict[str, dict] = {
    # the byte n-gram hash embeddings' table; a global width of cross_attn_k local widths, as in the defaults (so
    # the local encoder's output needs no projection)
    "blt": {"encoder_hash_byte_group_vocab": 1024, "global_config": {"hidden_size": 2 * HIDDEN},
            "encoder_config": {"hidden_size_global": 2 * HIDDEN}, "decoder_config": {"hidden_size_global": 2 * HIDDEN}},
    # per-layer-type rope whose mrope sections must add up to half the (small) head size
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [4, 2, 2]}}},
    # the attention reads attn_config.rope_theta, which real checkpoints carry but the class no longer declares
    # (and clamps q/k/v by clip_qkv, which the class defaults leave unset)
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0}},
    # the class defaults leave the MoE unset (real checkpoints set it)
    "dots1": {"n_shared_experts": 1},
    # the compressed-attention rates must leave something to compress in a short sequence
    "deepseek_v4": {"compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 8}},
    # the sliding-window layers' head size is their nope + rope q/k head size (16 * 192/128 + 8: their nope size is a
    # per-layer override, which keeps its ratio to the global one)
    "dots3_note_text": {"head_dim": 24 + 8},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # the class defaults make every layer attention; the real models are mostly short-convolution layers
    "lfm2": {"full_attn_idxs": [1], "layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "mamba2": {"num_heads": 2 * HIDDEN // HEAD_DIM},  # heads * head_dim = expand * hidden
    # the sparse-attention indexer is unset in the class defaults
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": HEAD_DIM,
                       "indexer_budget": 8, "indexer_compress_ratio": 4},
    # axial position embeddings: their dims add up to the hidden size, their shape multiplies to the max length
    "reformer": {"axial_pos_embds_dim": (16, 48), "axial_pos_shape": (16, 32)},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},  # the repeating block pattern, one of each
    "xmod": {"default_language": "en_XX"},  # the adapter of the one language the class lists
    # the shared attention block is tied across hybrid layers: it takes two of them to have something to tie
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
}
# settings without which the class's default config cannot even be built
_DEFAULT_FIXUPS: dict[str, dict] = {
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
}


def tiny_config(model_type: str, vocab_size: int = 512) -> PreTrainedConfig:
    """A small, dropout-free config of `model_type` (see the module docstring)."""
    cls = CONFIG_MAPPING[model_type]
    default = cls(**_DEFAULT_FIXUPS.get(model_type, {}))
    target = _Target(vocab_size, _default_sizes(default, _HIDDEN), _default_sizes(default, {"vocab_size"}))
    return cls(**_shrink_kwargs(default, target, {}))


def build_tiny_model(model_type: str, vocab_size: int = 512, seed: int = 0):
    """`AutoModelForCausalLM` of `tiny_config(model_type)`, randomly initialised from `seed`, fp32 on the CPU."""
    config = tiny_config(model_type, vocab_size)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def plain_peft_step(model_type: str) -> float:
    """One LoRA forward/backward of the tiny model with peft alone (no tuneforge): the loss. Raises whatever
    transformers or peft raise when the model cannot be trained that way."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model(model_type),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 512, (2, 24), generator=generator)  # past the tokenizer's unk, bos and eos
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.item()


if __name__ == "__main__":
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    passed, start = 0, time.perf_counter()
    for model_type in CAUSAL_LM_TYPES:
        t0 = time.perf_counter()
        try:
            loss = plain_peft_step(model_type)
        except Exception as e:  # every failure is reported, none stops the sweep
            line = (str(e).strip().splitlines() or [""])[0]
            print(f"{model_type:28s} FAIL {type(e).__name__}: {line[:200]}", flush=True)
            continue
        if math.isfinite(loss):
            passed += 1
            print(f"{model_type:28s} ok {loss:.4f} {time.perf_counter() - t0:.2f}s", flush=True)
        else:
            print(f"{model_type:28s} FAIL non-finite loss {loss}", flush=True)
    print(f"{passed}/{len(CAUSAL_LM_TYPES)} types train; {time.perf_counter() - start:.1f}s")

# Types that do not train with plain transformers + peft on the CPU (transformers 5.23.0, peft 0.21.2), and why. None
# of it comes from the small sizes: transformers' own errors come from the full-size default configs too (built on the
# meta device), peft's from the module class or the model type.
#   deepseek_v4              peft wraps DeepseekV4GroupedLinear (an nn.Linear applied per output group) as a plain
#                            Linear: the LoRA output's shape does not match (any o_groups > 1, as in the real models)
#   falcon_h1, falcon_mamba, peft refuses "all-linear" for these types: LoRA on the Mamba out_proj/conv1d is not
#   mamba, mamba2, nemotron_h supported (its own check, by model type)
#   gemma3n                  the multimodal model builds a timm vision tower; timm is not installed (gemma3n_text
#                            trains)
#   gemma4_assistant,        assistants reuse the target model's kv cache in every layer: built alone, their config's
#   gemma4_unified_assistant kv_sharing_modes raises (they need the target's shared_kv_states)
#   git                      the loss drops the image-patch positions that only pixel_values provide: text-only logits
#                            are cut to nothing
#   llama4, llama4_text,     the MoE router is an nn.Linear subclass that returns a tuple; peft's "all-linear" wraps it
#   phimoe                   and reads .dtype of that tuple
#   musicgen,                AutoModelForCausalLM gives the composite config to the decoder-only class, which reads the
#   musicgen_melody          decoder's settings from it (and would want audio codebook ids, not text)
#   reformer                 training needs the sequence length to equal prod(axial_pos_shape) and to be a multiple of
#                            the attention chunk lengths
