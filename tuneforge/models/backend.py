"""Which attention implementation a model trains with.

`model.attn_implementation: auto` (the default) asks the architecture rather than forcing one backend on every model:
flash-attention 2 on CUDA where flash-attn is installed and the architecture supports it, else sdpa where the
architecture has an sdpa path, else the model's own default (eager attention: Gemma 2's soft-capping, GPT-OSS's sinks,
ALiBi models). An explicit value the architecture does not support is a one-line error naming the ones it does."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import UserError
from tuneforge.models.kind import auto_class

AUTO = "auto"
_FLAGS = (("sdpa", "_supports_sdpa"), ("flash_attention_2", "_supports_flash_attn"),
          ("flash_attention_3", "_supports_flash_attn"), ("flex_attention", "_supports_flex_attn"))


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str | None  # what from_pretrained gets; None = the model's own default
    reason: str                 # why, for the run's first lines


def model_class(config, kind: str):
    """The transformers class the kind's Auto class builds for this config; None for remote code or an unknown type."""
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, auto_class(kind)._model_mapping)
    except (KeyError, ValueError):
        return None


def supported_attention(cls) -> list[str]:
    """The attention implementations a transformers model class declares, eager first."""
    return ["eager"] + [name for name, flag in _FLAGS if getattr(cls, flag, False)]


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_attention(cfg: ModelConfig, config, kind: str, device: str | None = None) -> AttentionChoice:
    """The attention implementation for this model on this device (cuda / cpu; None = where this process trains)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    value, cls = cfg.attn_implementation, model_class(config, kind)
    name = cls.__name__ if cls is not None else config.__class__.__name__.removesuffix("Config")
    if value in (None, AUTO):
        if cls is None:  # remote code: its own choice
            return AttentionChoice(None, "auto: the model's own default (its code is not transformers')")
        if device.startswith("cuda") and getattr(cls, "_supports_flash_attn", False) and flash_attn_installed():
            return AttentionChoice("flash_attention_2", f"auto: flash-attn is installed and {name} supports it")
        if getattr(cls, "_supports_sdpa", False):
            return AttentionChoice("sdpa", f"auto: {name} supports sdpa")
        return AttentionChoice(None, f"auto: {name} has no sdpa path; its own default")
    known = {"eager"} | {n for n, _ in _FLAGS}
    if cls is not None and value in known and value not in supported_attention(cls):
        raise UserError(f"model.attn_implementation: {name} does not support '{value}'; it supports "
                        f"{', '.join(supported_attention(cls))} (or auto)")
    return AttentionChoice(value, f"model.attn_implementation={value}")
