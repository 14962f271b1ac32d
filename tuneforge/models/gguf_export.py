"""`tuneforge export --format gguf | gguf-lora`: a run's model as one GGUF file for llama.cpp, Ollama and LM Studio,
or its LoRA adapter as a GGUF LoRA file (`llama-cli --lora`), in Python with the `gguf` package (its writer, tensor
names and quantizers) and no llama.cpp checkout or compiler.

What is ours, from the GGUF format and transformers' config and tokenizer:
- the hyper-parameter keys of each architecture (`ARCHES`: the Llama family, i.e. Llama 2/3, Mistral and SmolLM2,
  written as `llama`; Qwen2/2.5 as `qwen2`);
- llama's rotary layout: GGUF `llama` files store q and k with each head's rotary halves interleaved, so rows are
  permuted on the way out (`_interleave_rotary`; transformers' GGUF reader permutes them back);
- the tokenizer's `tokenizer.ggml.*` fields from the run's own tokenizer (`gguf_vocab`), and the chat template.
1-D tensors (norms, biases) stay F32, as llama.cpp keeps them; a tensor whose rows are not a whole number of
quantization blocks (32) falls back to F16, and the export says which. With q4_0 the token embedding (and an untied
output) are Q8_0, the higher type llama.cpp also gives these two at low bit widths."""
from __future__ import annotations

import json
import logging
import math
import re
import shlex
from pathlib import Path

from tuneforge.errors import UserError

log = logging.getLogger("tuneforge")

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
LORA_QUANTS = ("f32", "f16", "bf16")
# transformers model_type -> (GGUF architecture, q/k rows interleaved for llama's rotary layout)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
# tokenizer.ggml.pre for a byte-level BPE, from its split regex (transformers' own table of llama.cpp's names);
# where several names share a regex, the one llama.cpp's converter writes for that family
PREFERRED_PRE = ("llama-bpe", "qwen2", "smollm", "gpt-2")
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def _types():
    import gguf
    q = gguf.GGMLQuantizationType
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}


def _file_type(quant: str) -> int:
    import gguf
    f = gguf.LlamaFileType
    return {"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0,
            "q4_0": f.MOSTLY_Q4_0}[quant]


# ---- checks before anything loads ------------------------------------------------------------------------------
def check_request(out: Path, quant: str, overwrite: bool, lora: bool) -> None:
    """The checks that need no weights: the quant type and --out. Raises UserError (exit 2), nothing written."""
    allowed = LORA_QUANTS if lora else QUANTS
    if quant not in allowed:
        raise UserError(f"--quant {quant}: {'gguf-lora' if lora else 'gguf'} writes one of {', '.join(allowed)} "
                        "(the gguf package has no K-quants; llama.cpp's llama-quantize makes them from an f16 file)")
    if out.suffix != ".gguf":
        raise UserError(f"--out {out}: expected a file name ending in .gguf")
    if out.exists() and not overwrite:
        raise UserError(f"--out {out}: exists; pass --overwrite to replace it (the old file stays until the new "
                        "one is complete)")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory, expected a .gguf file name")


def model_type_of(config: dict, where: str) -> str:
    model_type = config.get("model_type")
    if model_type not in ARCHES:
        raise UserError(f"{where}: model_type {model_type!r} has no GGUF export here (supported: "
                        f"{', '.join(sorted(ARCHES))}); `tuneforge export --format vllm` writes a transformers model")
    return model_type


# ---- the tokenizer ---------------------------------------------------------------------------------------------
def _merge_text(merge) -> str:
    if isinstance(merge, str):
        return merge
    # a pair: a space inside a part is written as U+0120+ (llama.cpp's convention for pair-form merges)
    return " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge)


def _pre_tokenizer_name(pre: dict | None, origin_pre: str | None) -> str:
    """llama.cpp's name for how a byte-level BPE splits text before merging."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    if origin_pre:  # the model came from a GGUF file: its own name, which llama.cpp chose for it
        return origin_pre
    parts = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (parts[0].get("pattern") or {}).get("Regex")
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex]
        if regex == GPT2_SPLIT:
            names.append("gpt-2")
        for name in PREFERRED_PRE + tuple(names):
            if name in names:
                return name
    raise UserError(f"tokenizer: its pre-tokenizer ({json.dumps(pre)[:160]}) is not one llama.cpp names here; "
                    "export --format vllm, or convert with llama.cpp's convert_hf_to_gguf.py")


def gguf_vocab(tokenizer, n_vocab: int, origin_pre: str | None = None) -> dict:
    """The `tokenizer.ggml.*` fields of a transformers fast tokenizer: tokenizer model (gpt2 = byte-level BPE,
    llama = sentencepiece-style BPE with byte fallback), pre-tokenizer name, tokens, token types, scores,
    merges, special ids and the add-bos/eos flags, for `n_vocab` rows (ids the tokenizer lacks are [PADn], unused).

    Ours rather than gguf.vocab's classes: those read files from a directory and give a sentencepiece-style
    vocabulary a placeholder score for every token, where llama.cpp's tokenizer picks merges by score; here the
    scores follow the merge order (-rank of the merge that makes the token)."""
    import gguf
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"tokenizer: a {model.get('type')} tokenizer model has no GGUF export here (BPE only)")
    spm = bool(model.get("byte_fallback"))
    T = gguf.TokenType
    tokens: list[str | None] = [None] * n_vocab
    types = [T.NORMAL] * n_vocab
    for text, i in model["vocab"].items():
        if i < n_vocab:
            tokens[i] = text
    for added in spec.get("added_tokens", []):
        i = added["id"]
        if i < n_vocab:
            tokens[i] = added["content"]
            types[i] = T.CONTROL if added.get("special") else T.USER_DEFINED
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i], types[i] = f"[PAD{i}]", T.UNUSED
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types[i] = T.BYTE
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < n_vocab:
        types[tokenizer.unk_token_id] = T.UNKNOWN if spm else types[tokenizer.unk_token_id]
    merges = [_merge_text(m) for m in model.get("merges", [])]
    out = {"model": "llama" if spm else "gpt2", "tokens": tokens, "types": [int(t) for t in types],
           "merges": merges}
    if spm:
        scores = [0.0] * n_vocab
        index = {t: i for i, t in enumerate(tokens)}
        for rank, merge in enumerate(merges):
            made = index.get(merge.replace(" ", "", 1) if isinstance(merge, str) else "")
            if made is not None and scores[made] == 0.0:
                scores[made] = -float(rank + 1)
        out["scores"] = scores
        out["pre"] = "default"
        metaspace = [p for p in _flatten(spec.get("pre_tokenizer")) + _flatten(spec.get("normalizer"))
                     if p.get("type") in ("Metaspace", "Prepend")]
        out["add_space_prefix"] = any(p.get("prepend_scheme", "always") != "never" for p in metaspace)
    else:
        out["pre"] = _pre_tokenizer_name(spec.get("pre_tokenizer"), origin_pre)
    probe = tokenizer("a")["input_ids"]
    out["add_bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    out["add_eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "unk", "pad")}
    # a pad token added past the model's rows (some tokenizers carry one) names no token the model has
    out["special"] = {k: i for k, i in ids.items() if i is not None and 0 <= i < n_vocab}
    return out


def _flatten(node: dict | None) -> list[dict]:
    if not node:
        return []
    inner = node.get("pretokenizers") or node.get("normalizers")
    return [p for child in inner for p in _flatten(child)] if inner else [node]


def add_vocab(writer, vocab: dict, chat_template: str | None, eot_id: int | None) -> None:
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
        writer.add_add_space_prefix(vocab["add_space_prefix"])
    if vocab["merges"]:
        writer.add_token_merges(vocab["merges"])
    for kind, token_id in vocab["special"].items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    if eot_id is not None and eot_id != vocab["special"].get("eos"):
        writer.add_eot_token_id(eot_id)
    writer.add_add_bos_token(vocab["add_bos"])
    writer.add_add_eos_token(vocab["add_eos"])
    if chat_template:
        writer.add_chat_template(chat_template)


# ---- hyper-parameters and tensors ------------------------------------------------------------------------------
def rope_settings(config: dict) -> tuple[float, dict]:
    """(rope theta, rope_scaling) from a transformers config of either generation (rope_theta + rope_scaling, or
    rope_parameters)."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    if (scaling or {}).get("rope_type", scaling.get("type") if scaling else None) in (None, "default"):
        scaling = {}
    return float(theta), scaling


def add_hparams(writer, config: dict, arch: str, name: str, quant: str) -> dict:
    """The architecture keys llama.cpp reads; returns the rope scaling so the caller can add rope_freqs."""
    import gguf
    d, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    writer.add_name(name)
    writer.add_file_type(_file_type(quant))
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(d)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != d // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, scaling = rope_settings(config)
    writer.add_rope_freq_base(theta)
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "llama3"):
        raise UserError(f"config.json: rope scaling {kind!r} has no GGUF export here (none, linear and llama3 do)")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return scaling


def llama3_rope_factors(config: dict):
    """llama.cpp's `rope_freqs` tensor for Llama 3.1+ rope scaling: per rotary frequency, the base inverse
    frequency over the scaled one (transformers' own rope initialisation computes both)."""
    import numpy as np
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = AutoConfig.for_model(**config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    base, _ = ROPE_INIT_FUNCTIONS["default"](cfg, "cpu") if "default" in ROPE_INIT_FUNCTIONS else (None, None)
    if base is None:
        theta, _ = rope_settings(config)
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        base = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
        return (base / scaled.double().numpy()).astype(np.float32)
    return (base.double() / scaled.double()).float().numpy()


def _interleave_rotary(w, heads: int):
    """transformers' q/k rows (each head: first rotary half, then second) -> GGUF llama's (pairs interleaved)."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_rows(name: str, rows, config: dict, model_type: str):
    """`rows` (a weight, or a LoRA B, of GGUF tensor `name`) in the GGUF file's layout: q and k interleaved for
    the rotary layout of architectures written as llama, everything else as it is."""
    if not ARCHES[model_type][1] or not (".attn_q." in name or ".attn_k." in name):
        return rows
    heads = config["num_attention_heads"]
    return _interleave_rotary(rows, heads if ".attn_q." in name else config.get("num_key_value_heads") or heads)


def _qtype_for(name: str, array, quant: str, notes: list[str]):
    """GGML type of one tensor: 1-D stays F32; rows that do not split into whole blocks fall back to F16."""
    import gguf
    types = _types()
    if array.ndim == 1 or quant == "f32":
        return types["f32"]
    want = "q8_0" if quant == "q4_0" and name in ("token_embd.weight", "output.weight") else quant
    qtype = types[want]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if array.shape[-1] % block:
        notes.append(f"{name}: rows of {array.shape[-1]} are not whole {block}-blocks, written F16")
        return types["f16"]
    return qtype


def _add_tensor(writer, name: str, array, qtype) -> None:
    import gguf
    import numpy as np
    data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)
    if data.dtype in (np.float32, np.float16):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)


def gguf_tensors(state: dict, config: dict, model_type: str):
    """(GGUF name, fp32 numpy array) of every weight of a causal LM's state dict, in llama.cpp's layout."""
    import gguf
    arch, _ = ARCHES[model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    for key, tensor in state.items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"weights: {key} has no GGUF name for architecture {arch}")
        yield name, _llama_rows(name, tensor.detach().float().cpu().numpy(), config, model_type)


def write_gguf(out: Path, state: dict, config: dict, tokenizer, quant: str, name: str,
               origin_pre: str | None = None, eot_id: int | None = None) -> list[str]:
    """One GGUF model file from a merged causal LM's fp32 state dict; returns the notes (fallbacks) to print."""
    import gguf
    model_type = config["model_type"]
    arch, _ = ARCHES[model_type]
    writer = gguf.GGUFWriter(str(out), arch)
    scaling = add_hparams(writer, config, arch, name, quant)
    vocab = gguf_vocab(tokenizer, config["vocab_size"], origin_pre)
    add_vocab(writer, vocab, tokenizer.chat_template, eot_id)
    notes: list[str] = []
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    for tensor_name, array in gguf_tensors(state, config, model_type):
        _add_tensor(writer, tensor_name, array, _qtype_for(tensor_name, array, quant, notes))
    _finish(writer)
    return notes


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- the adapter as a GGUF LoRA ---------------------------------------------------------------------------------
def write_gguf_lora(out: Path, adapter_dir: Path, config: dict, quant: str, name: str) -> int:
    """llama.cpp's LoRA file: general.type adapter, adapter.lora.alpha, and per adapted linear layer its
    `<base tensor>.lora_a` (r x in) and `.lora_b` (out x r) in the base file's layout (q/k rows of B interleaved
    as the base's are). Returns the number of adapted layers."""
    import gguf
    from safetensors.torch import load_file
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    where = adapter_dir / "adapter_config.json"
    if adapter_cfg.get("peft_type") != "LORA" or adapter_cfg.get("use_dora"):
        raise UserError(f"{where}: gguf-lora takes a plain LoRA adapter (this is "
                        f"{'DoRA' if adapter_cfg.get('use_dora') else adapter_cfg.get('peft_type')}); "
                        "export --format gguf merges it into the model instead")
    if adapter_cfg.get("modules_to_save") or adapter_cfg.get("rank_pattern") or adapter_cfg.get("alpha_pattern"):
        raise UserError(f"{where}: the adapter also trains whole modules or per-layer ranks, which a GGUF LoRA "
                        "cannot carry; export --format gguf merges it into the model instead")
    rank, alpha = adapter_cfg["r"], float(adapter_cfg["lora_alpha"])
    if adapter_cfg.get("use_rslora"):
        alpha = alpha * math.sqrt(rank)  # llama.cpp scales by alpha / r; rsLoRA's scale is alpha / sqrt(r)
    model_type = model_type_of(config, "base config.json")
    arch, _ = ARCHES[model_type]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    qtype = _types()[quant]
    layers = 0
    for key in sorted(k for k in weights if k.endswith("lora_A.weight")):
        module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise UserError(f"{adapter_dir}: adapted module {module} has no GGUF name for architecture {arch}")
        a = weights[key].float().numpy()
        b = _llama_rows(target, weights[key.replace("lora_A", "lora_B")].float().numpy(), config, model_type)
        _add_tensor(writer, f"{target}.lora_a", a, qtype)
        _add_tensor(writer, f"{target}.lora_b", b, qtype)
        layers += 1
    _finish(writer)
    return layers


def usage_lines(out: Path, name: str, modelfile: Path | None, lora_base: str | None = None) -> list[str]:
    model = shlex.quote(str(out))
    if lora_base is not None:
        base = shlex.quote(lora_base)
        return [f"llama-cli -m {base} --lora {model} -cnv", f"llama-server -m {base} --lora {model} --port 8080"]
    lines = [f"llama-cli -m {model} -cnv", f"llama-server -m {model} --port 8080"]
    if modelfile is not None:
        tag = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-") or "tuneforge"
        lines = [f"cd {shlex.quote(str(modelfile.parent))} && ollama create {tag} -f Modelfile && ollama run {tag}"
                 ] + lines
    return lines
