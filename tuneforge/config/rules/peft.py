"""Recipe checks for the peft section, model.quantization and train.trainable, run at load time (before any work).

Imports only the schema and the PEFT method registry, so the config loader can call it without pulling in torch or
peft."""
from __future__ import annotations

import dataclasses
import re
from typing import Union

from tuneforge.config.peft_methods import BY_NAME, FIELD_METHODS, PROMPT_LEARNING, WEIGHT_TUNERS
from tuneforge.config.rules.common import fail
from tuneforge.config.schema import Config, PeftConfig


def peft_parts(peft: Union[PeftConfig, list[PeftConfig], None]) -> list[PeftConfig]:
    """The configured adapters as a list (empty for full / partial fine-tuning)."""
    if peft is None:
        return []
    return list(peft) if isinstance(peft, list) else [peft]


def validate_peft_part(p: PeftConfig, where: str, origin: str) -> None:
    defaults = PeftConfig(method=p.method)
    for name, methods in FIELD_METHODS.items():
        if p.method not in methods and getattr(p, name) != getattr(defaults, name):
            fail(origin, f"{where}.{name}: applies to method {' / '.join(methods)}, not {p.method}; "
                          f"remove it or leave it at its default ({getattr(defaults, name)!r})")
    positive = {"lora_rank": p.lora_rank, "num_virtual_tokens": p.num_virtual_tokens,
                "encoder_hidden_size": p.encoder_hidden_size, "encoder_num_layers": p.encoder_num_layers,
                "adapter_len": p.adapter_len, "bottleneck_size": p.bottleneck_size}
    for name, value in positive.items():
        if value < 1:
            fail(origin, f"{where}.{name}: must be >= 1, got {value}")
    if p.adapter_layers is not None and p.adapter_layers < 1:
        fail(origin, f"{where}.adapter_layers: must be >= 1 or null, got {p.adapter_layers}")
    if not 0 <= p.lora_dropout < 1:
        fail(origin, f"{where}.lora_dropout: must be in [0, 1), got {p.lora_dropout}")
    # only prompt_tuning gets here with a prompt_init_text: the field loop above refuses it for other methods
    if p.prompt_init_text is not None and not p.prompt_init_text.strip():
        fail(origin, f"{where}.prompt_init_text: must be non-empty text or null")


def validate_peft_list(parts: list[PeftConfig], origin: str) -> None:
    """Which adapters can train together: each kind at most once, and no two that rewrite the same layers."""
    methods = [p.method for p in parts]
    if not parts:
        fail(origin, "peft: an empty list; use null for full fine-tuning or list one or more adapters")
    for i, m in enumerate(methods):
        if m in methods[:i]:
            fail(origin, f"peft[{i}].method: {m} is listed twice")
    if len(parts) == 1:
        return
    for i, m in enumerate(methods):
        if BY_NAME[m].solo is not None:
            fail(origin, f"peft[{i}].method: {m} {BY_NAME[m].solo} and is trained on its own, not in a list")
    for group, what in ((WEIGHT_TUNERS, f"weight adapters ({', '.join(WEIGHT_TUNERS)})"),
                        (PROMPT_LEARNING, "prompt methods")):
        chosen = [m for m in methods if m in group]
        if len(chosen) > 1:
            fail(origin, f"peft: at most one of the {what} per run, got {' + '.join(chosen)}")


def validate_peft_section(cfg: Config, origin: str) -> None:
    parts = peft_parts(cfg.peft)
    if isinstance(cfg.peft, list):
        validate_peft_list(parts, origin)
        for i, p in enumerate(parts):
            validate_peft_part(p, f"peft[{i}]", origin)
    elif parts:
        validate_peft_part(parts[0], "peft", origin)
    validate_quantization(cfg, parts, origin)
    validate_trainable(cfg, parts, origin)


def validate_quantization(cfg: Config, parts: list[PeftConfig], origin: str) -> None:
    q = cfg.model.quantization
    if q is None:
        return
    if not parts:
        fail(origin, "model.quantization: quantized weights cannot be trained; add an adapter (peft: {method: lora}) "
                      "for QLoRA, or set model.quantization: null")
    if q.bits == 8:
        defaults = dataclasses.replace(q, quant_type="nf4", double_quant=True, compute_dtype="bfloat16")
        for name in ("quant_type", "double_quant", "compute_dtype"):
            if getattr(q, name) != getattr(defaults, name):
                fail(origin, f"model.quantization.{name}: applies to bits: 4 only")


def validate_trainable(cfg: Config, parts: list[PeftConfig], origin: str) -> None:
    tr = cfg.train.trainable
    if tr is None:
        return
    if parts:
        fail(origin, "train.trainable: partial fine-tuning is for peft: null; with an adapter, train extra "
                      "modules through peft.modules_to_save")
    if tr.top_layers is not None and tr.top_layers < 0:
        fail(origin, f"train.trainable.top_layers: must be >= 0 or null, got {tr.top_layers}")
    if not (tr.top_layers or tr.patterns or tr.lm_head or tr.embeddings or tr.head):
        fail(origin, "train.trainable: selects no parameters; set top_layers, patterns, lm_head, embeddings or head "
                      "(or train.trainable: null to train every weight)")
    for i, pattern in enumerate(tr.patterns):
        try:
            re.compile(pattern)
        except re.error as e:
            fail(origin, f"train.trainable.patterns[{i}]: invalid regex {pattern!r} ({e})")


def method_label(peft) -> str:
    """How a saved config's `peft` section reads in a report or model card: 'full fine-tuning',
    'lora (rank 16, alpha 32)', or several methods joined with ' + '."""
    parts = peft if isinstance(peft, list) else [peft] if peft else []
    labels = []
    for part in parts:
        method = part.get("method", "lora")
        labels.append(f"{method} (rank {part.get('lora_rank')}, alpha {part.get('lora_alpha')})"
                      if method == "lora" else method)
    return " + ".join(labels) or "full fine-tuning"
