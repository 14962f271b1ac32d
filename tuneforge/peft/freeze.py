"""Partial fine-tuning without adapters: train the top decoder layers, named parameters, the LM head or the
embeddings; freeze the rest. Frozen parameters get no gradient, no optimizer state (build_optimizer takes only
trainable ones: Adam's two fp32 moments are 8 bytes per trained weight) and are left out of checkpoints."""
from __future__ import annotations

import re

import torch

from tuneforge.config.schema import TrainableConfig
from tuneforge.errors import UserError
from tuneforge.models.classify import classifier_head, is_classifier
from tuneforge.models.layers import find_decoder_layers


def select_trainable(model, cfg: TrainableConfig) -> tuple[set[str], list[str]]:
    """(names of the parameters to train, one description per selector)."""
    names = [n for n, _ in model.named_parameters()]  # shared (tied) tensors appear once, under their first name
    chosen, described = set(), []
    if cfg.top_layers:
        prefix, layers = find_decoder_layers(model)
        if cfg.top_layers > len(layers):
            raise UserError(f"train.trainable.top_layers: {cfg.top_layers} is more than the model's "
                            f"{len(layers)} decoder layers")
        first = len(layers) - cfg.top_layers
        picked = tuple(f"{prefix}.{i}." for i in range(first, len(layers)))
        chosen.update(n for n in names if n.startswith(picked))
        described.append(f"top {cfg.top_layers} of {len(layers)} decoder layers ({prefix}.{first}-{len(layers) - 1})")
    for i, pattern in enumerate(cfg.patterns):
        hits = [n for n in names if re.search(pattern, n)]
        if not hits:
            raise UserError(f"train.trainable.patterns[{i}]: {pattern!r} matches no parameter of this model "
                            f"(names look like {names[len(names) // 2]})")
        chosen.update(hits)
        described.append(f"/{pattern}/ ({len(hits)} tensors)")
    if cfg.head or (cfg.lm_head and is_classifier(model)):
        described.append(_select_classifier_head(model, cfg, chosen))
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    if tied and cfg.lm_head != cfg.embeddings:
        # One tensor serves both: training "only the head" would silently change the input embeddings too.
        raise UserError("train.trainable: this model ties its LM head to the input embeddings (one tensor); "
                        "set lm_head and embeddings both true to train it, or both false")
    by_id = {id(p): n for n, p in model.named_parameters()}
    if cfg.lm_head and head is not None:
        chosen.update(by_id[id(p)] for p in head.parameters())
        described.append("lm_head" + (" (tied to the embeddings)" if tied else ""))
    if cfg.embeddings:
        chosen.update(by_id[id(p)] for p in embed.parameters())
        if not tied:
            described.append("embeddings")
    return chosen, described


def apply_trainable(model, cfg: TrainableConfig) -> list[str]:
    chosen, described = select_trainable(model, cfg)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    return described


def _select_classifier_head(model, cfg: TrainableConfig, chosen: set[str]) -> str:
    """Adds the classification head's parameters (every layer of an MLP head) to `chosen`; its description."""
    if not is_classifier(model):
        raise UserError("train.trainable.head: this model has no classification head (model.kind: "
                        "sequence_classification adds one)")
    if cfg.lm_head:
        raise UserError("train.trainable.lm_head: a classifier has no LM head; train.trainable.head trains its "
                        "classification head")
    name, head = classifier_head(model)
    params = [f"{name}.{n}" for n, _ in head.named_parameters()]
    chosen.update(params)
    layers = sum(isinstance(m, torch.nn.Linear) for m in head.modules())
    return f"classification head {name} ({layers} linear layer{'s' if layers > 1 else ''}, {len(params)} tensors)"
