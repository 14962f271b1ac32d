"""Load any causal LM (or seq2seq / sequence-classification model) and its tokenizer, from a local directory or a Hub id."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import UserError

log = logging.getLogger("tuneforge")


@dataclass
class Precision:
    """fp32 master weights always; `autocast` is the dtype matmuls run in (None = fp32)."""
    device: str
    autocast: torch.dtype | None

    @property
    def name(self) -> str:
        return "bf16 autocast" if self.autocast == torch.bfloat16 else "fp32"

    def context(self):
        if self.autocast is None:
            return torch.autocast(self.device, enabled=False)
        return torch.autocast(self.device, dtype=self.autocast)


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays on CPUs with native bf16 matmuls (AVX-512 BF16 / AMX), ~2-4x faster than fp32 there."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(dtype: str, device: str) -> Precision:
    if dtype == "float32":
        return Precision(device, None)
    if dtype == "bfloat16":
        return Precision(device, torch.bfloat16)
    if device == "cuda":
        return Precision(device, torch.bfloat16 if torch.cuda.is_bf16_supported() else None)
    return Precision(device, torch.bfloat16 if cpu_supports_bf16() else None)


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


def _hub_kwargs(cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.trust_remote_code:
        log.warning("trust_remote_code is on: model code from %s will run", cfg.name_or_path)
    return kwargs


def _load_error(cfg: ModelConfig, what: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
    return UserError(f"model.name_or_path: cannot load {what} from '{cfg.name_or_path}' ({first})")


def load_tokenizer(cfg: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path or cfg.name_or_path, **_hub_kwargs(cfg))
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(cfg, "a tokenizer", e) from None
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


MODEL_KINDS = {"causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
               "sequence_classification": "AutoModelForSequenceClassification"}


def kind_of(config) -> str:
    """The model kind a checkpoint's config names: its architectures' suffix, else is_encoder_decoder."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence_classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal_lm"


def resolve_kind(cfg: ModelConfig, config=None) -> str:
    """model.kind, with auto resolved from the checkpoint's config (read without weights when not given)."""
    if cfg.kind != "auto":
        return cfg.kind
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(cfg.name_or_path, **_hub_kwargs(cfg))
        except (OSError, ValueError, KeyError) as e:
            raise _load_error(cfg, "a model config", e) from None
    return kind_of(config)


def auto_class(kind: str):
    """The transformers Auto class that loads a model of this kind."""
    import transformers

    return getattr(transformers, MODEL_KINDS[kind])


def model_class(kind: str, config):
    """The class that loads a config of this kind; classifiers may carry tuneforge's MLP head."""
    if kind == "sequence_classification":
        from tuneforge.models.classify import classifier_class

        return classifier_class(config)
    return auto_class(kind)


def load_model(cfg: ModelConfig, path: str | None = None, config=None):
    """fp32 weights (the optimizer's master copy); compute precision comes from autocast. `config` replaces the
    checkpoint's own (a classifier's labels and pad id, which come from the data and the tokenizer)."""
    from transformers import AutoConfig

    kwargs = _hub_kwargs(cfg)
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.quantization is not None:
        from tuneforge.models.quantize import build_bnb_config

        kwargs["quantization_config"] = build_bnb_config(cfg.quantization)  # Linear weights only; the rest fp32
    try:
        if config is None:
            config = AutoConfig.from_pretrained(path or cfg.name_or_path, **_hub_kwargs(cfg))
        kind = resolve_kind(cfg, config)
        model = model_class(kind, config).from_pretrained(path or cfg.name_or_path, config=config,
                                                          dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise _load_error(cfg, "a model", e) from None
    if cfg.quantization is not None:
        from tuneforge.models.quantize import avoid_unsupported_cpu_kernels

        avoid_unsupported_cpu_kernels(model)
    model.config.use_cache = False  # training: a KV cache only costs memory (and breaks packed attention)
    return model


def load_model_skeleton(cfg: ModelConfig, config=None):
    """The model's structure on the meta device (no memory, no weights): ranks other than 0 build this and
    receive their shards of rank 0's weights after sharding, so no rank but 0 ever holds the full model."""
    from transformers import AutoConfig

    config = config or AutoConfig.from_pretrained(cfg.name_or_path, **_hub_kwargs(cfg))
    kwargs = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    kind = resolve_kind(cfg, config)
    with torch.device("meta"):
        if kind == "sequence_classification":  # a concrete class: from_config is the Auto classes' spelling
            model = model_class(kind, config)._from_config(config, dtype=torch.float32, **kwargs)
        else:
            model = auto_class(kind).from_config(config, dtype=torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code, **kwargs)
    model.config.use_cache = False
    return model


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_weights_in(p) for p in model.parameters())
    return trainable, total


def _weights_in(p) -> int:
    # bitsandbytes stores 4-bit weights packed two to a uint8 element
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def is_local(path: str) -> bool:
    return Path(path).expanduser().is_dir()

