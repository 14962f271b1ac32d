"""Load any causal LM (or seq2seq / sequence-classification model) and its tokenizer, from a local directory or a
Hub id."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import UserError
from tuneforge.models.backend import choose_attention
from tuneforge.models.classify import classifier_class
from tuneforge.models.kind import auto_class, hub_kwargs, load_error, resolve_kind
from tuneforge.models.quantize import avoid_unsupported_cpu_kernels, build_bnb_config

log = logging.getLogger("tuneforge")


@dataclass
class Precision:
    """fp32 master weights always; `autocast` is the dtype matmuls run in (None = fp32). `reason` says why, for the
    run's first lines."""
    device: str
    autocast: torch.dtype | None
    reason: str = ""
    emulated: bool = False  # bf16 asked for where the hardware has no bf16 matmuls: it works, slowly

    @property
    def name(self) -> str:
        return "bf16 autocast" if self.autocast == torch.bfloat16 else "fp32"

    def describe(self) -> str:
        return f"{self.name} on {self.device}" + (f" ({self.reason})" if self.reason else "")

    def context(self):
        if self.autocast is None:
            return torch.autocast(self.device, enabled=False)
        return torch.autocast(self.device, dtype=self.autocast)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) at or above which its bf16 matmuls run natively (AVX-512 BF16 or AMX).
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2",
                     "DEFAULT", "ALL")
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_unsupported_reason(environ=None, cpu_flags: set[str] | None = None) -> str | None:
    """None when this CPU's kernels will run bf16 matmuls natively, else why not (one clause for the log).

    oneDNN alone is not enough to ask: it reports bf16 as supported on any AVX-512 CPU (it can emulate bf16 there),
    and ATen's own kernels follow ATEN_CPU_CAPABILITY, which oneDNN never reads. So all three must agree: the CPU has
    the instructions, ONEDNN_MAX_CPU_ISA (if set) admits them, and ATEN_CPU_CAPABILITY (if set) is AVX-512."""
    environ = os.environ if environ is None else environ
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if isa and isa not in _ONEDNN_BF16_ISAS:
        return f"ONEDNN_MAX_CPU_ISA={isa} leaves oneDNN without bf16 matmul kernels; bf16 autocast would be emulated"
    aten = environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten and not aten.startswith("avx512"):
        return f"ATEN_CPU_CAPABILITY={aten} limits ATen to {aten} kernels, which have no bf16 instructions"
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    if flags is not None and not flags & set(_CPU_BF16_FLAGS):
        return "this CPU has no bf16 matmul instructions; bf16 autocast would be emulated and slower"
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "oneDNN finds no bf16 support on this CPU; bf16 autocast would be emulated and slower"
    except (AttributeError, RuntimeError):
        return "this torch build has no oneDNN bf16 support"
    return None


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays on CPUs with native bf16 matmuls (AVX-512 BF16 / AMX), ~2-4x faster than fp32 there."""
    return cpu_bf16_unsupported_reason() is None


def resolve_precision(dtype: str, device: str) -> Precision:
    """The precision `model.dtype` asks for on this device. bf16 asked for explicitly is honoured everywhere (a CPU
    without bf16 instructions emulates it, slowly, and the caller warns); `auto` picks bf16 only where it is native."""
    if dtype == "float32":
        return Precision(device, None, "model.dtype=float32")
    if device == "cuda":
        native = torch.cuda.is_bf16_supported()
        if dtype == "bfloat16":
            return Precision(device, torch.bfloat16, "model.dtype=bfloat16" if native else
                             "model.dtype=bfloat16, but this GPU has no native bf16; emulated, slower", not native)
        return Precision(device, torch.bfloat16 if native else None,
                         "model.dtype=auto: native bf16" if native else "model.dtype=auto: this GPU has no bf16")
    why_not = cpu_bf16_unsupported_reason() if device == "cpu" else "no bf16 autocast on this device"
    if dtype == "bfloat16":
        return Precision(device, torch.bfloat16,
                         f"model.dtype=bfloat16, but {why_not}" if why_not else "model.dtype=bfloat16", bool(why_not))
    if why_not:
        return Precision(device, None, f"model.dtype=auto: {why_not}")
    return Precision(device, torch.bfloat16, "model.dtype=auto: this CPU has native bf16 matmuls")


def store_frozen_linears(model, dtype: torch.dtype) -> int:
    """Cast the weights (and biases) of frozen nn.Linear layers to the autocast dtype. Autocast would cast them to
    exactly these values before every matmul (round to nearest even), so the results are unchanged; the fp32 copies
    and the per-step casts go. Embeddings and norms stay fp32 (they feed the fp32 residual stream), and so does a
    head tied to the embeddings. Returns the number of layers cast."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = embeddings.weight if embeddings is not None else None
    cast = 0
    for module in model.modules():
        if (type(module) is torch.nn.Linear and not any(p.requires_grad for p in module.parameters())
                and module.weight is not tied and module.weight.dtype == torch.float32):
            module.to(dtype)
            cast += 1
    return cast


def checkpointing_kwargs() -> dict:
    """transformers' gradient_checkpointing_kwargs for every activation-checkpointed run, QLoRA's included.
    Non-reentrant: works with frozen inputs, no enable_input_require_grads."""
    return {"use_reentrant": False}


def apply_activation_checkpointing(model, enabled: bool):
    """distributed.activation_checkpointing: recompute each decoder layer's activations in backward (less memory,
    ~30% more compute). A quantized base gets it from peft's prepare_model_for_kbit_training instead, which
    switches it on itself."""
    if enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs())
    return model


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path or cfg.name_or_path, **hub_kwargs(cfg))
    except (OSError, ValueError, KeyError) as e:
        raise load_error(cfg, "a tokenizer", e) from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"model.name_or_path: '{cfg.name_or_path}' has no fast tokenizer (tokenizer.json); "
                        "tuneforge needs one for offsets")
    if tok.pad_token_id is None:
        # Never add a token (that would resize the embeddings): reuse unk, else eos. Padding positions carry
        # label -100 and attention 0, so the choice never reaches the loss.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    if tok.pad_token_id is None:
        raise UserError(f"model.name_or_path: tokenizer of '{cfg.name_or_path}' has no pad, unk or eos token")
    return tok


def check_tokenizer_fits(tokenizer, model, name: str) -> None:
    """Every id the tokenizer can give (its pad included) has a row in the model's input embeddings. A checkpoint whose
    tokenizer grew (added tokens) without its embeddings would otherwise stop mid-run with an index error."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is None:
        return
    highest = max(len(tokenizer) - 1, tokenizer.pad_token_id or 0)
    if highest >= rows:
        raise UserError(f"model.name_or_path: the tokenizer of '{name}' has ids up to {highest} "
                        f"({len(tokenizer)} tokens, pad {tokenizer.pad_token!r} = {tokenizer.pad_token_id}), but the "
                        f"model's input embeddings have {rows} rows; resize the embeddings to the tokenizer "
                        "(model.resize_token_embeddings) and save the checkpoint again")


def model_class(kind: str, config):
    """The class that loads a config of this kind; classifiers may carry tuneforge's MLP head."""
    if kind == "sequence_classification":
        return classifier_class(config)
    return auto_class(kind)


def load_model(cfg: ModelConfig, path: str | None = None, config=None):
    """fp32 weights (the optimizer's master copy); compute precision comes from autocast. `config` replaces the
    checkpoint's own (a classifier's labels and pad id, which come from the data and the tokenizer)."""
    from transformers import AutoConfig

    kwargs = hub_kwargs(cfg)
    if cfg.quantization is not None:
        kwargs["quantization_config"] = build_bnb_config(cfg.quantization)  # Linear weights only; the rest fp32
    try:
        if config is None:
            config = AutoConfig.from_pretrained(path or cfg.name_or_path, **hub_kwargs(cfg))
        kind = resolve_kind(cfg, config)
        kwargs.update(attention_kwargs(cfg, config, kind))
        model = model_class(kind, config).from_pretrained(path or cfg.name_or_path, config=config,
                                                          dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise load_error(cfg, "a model", e) from None
    if cfg.quantization is not None:
        avoid_unsupported_cpu_kernels(model)
    model.config.use_cache = False  # training: a KV cache only costs memory (and breaks packed attention)
    return model


def load_model_skeleton(cfg: ModelConfig, config=None):
    """The model's structure on the meta device (no memory, no weights): ranks other than 0 build this and
    receive their shards of rank 0's weights after sharding, so no rank but 0 ever holds the full model."""
    from transformers import AutoConfig

    config = config or AutoConfig.from_pretrained(cfg.name_or_path, **hub_kwargs(cfg))
    kind = resolve_kind(cfg, config)
    kwargs = attention_kwargs(cfg, config, kind)
    with torch.device("meta"):
        if kind == "sequence_classification":  # a concrete class: from_config is the Auto classes' spelling
            model = model_class(kind, config)._from_config(config, dtype=torch.float32, **kwargs)
        else:
            model = auto_class(kind).from_config(config, dtype=torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code, **kwargs)
    model.config.use_cache = False
    return model


def attention_kwargs(cfg: ModelConfig, config, kind: str) -> dict:
    """from_pretrained's attn_implementation for model.attn_implementation (auto: what the architecture supports)."""
    implementation = choose_attention(cfg, config, kind).implementation
    return {"attn_implementation": implementation} if implementation else {}


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_weights_in(p) for p in model.parameters())
    return trainable, total


def _weights_in(p) -> int:
    # bitsandbytes stores 4-bit weights packed two to a uint8 element
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def is_local(path: str) -> bool:
    return Path(path).expanduser().is_dir()

