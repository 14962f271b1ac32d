"""Optimizer and learning-rate schedule."""
from __future__ import annotations

import math

import torch

from tuneforge.config.schema import OptimizerConfig, SchedulerConfig


def build_optimizer(model, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam(W) over trainable parameters; biases and norm weights (1-D) get no weight decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    fused = cfg.fused if cfg.fused is not None else _fused_by_default(decay + no_decay)
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


def _fused_by_default(params: list[torch.Tensor]) -> bool:
    """The fused kernel updates every parameter in one pass instead of one op per tensor per Adam term; torch has
    it for CPU and CUDA tensors. FSDP2's DTensor shards keep the foreach path: fused Adam on DTensors rounds
    differently from fused Adam on the same values unsharded."""
    from torch.distributed.tensor import DTensor

    return all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for p in params)


def lr_factor(step: int, cfg: SchedulerConfig, total_steps: int) -> float:
    """Multiplier of the peak lr for the step about to run (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.name == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def build_scheduler(optimizer, cfg: SchedulerConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))
