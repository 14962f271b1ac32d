"""Which strategy a recipe runs with at a given process count, and what each strategy cannot train. Pure: the
process group and the wrapping live in tuneforge.distributed, which asks here for the strategy."""
from __future__ import annotations

from tuneforge.config.peft_methods import BY_NAME
from tuneforge.config.rules.common import check, fail
from tuneforge.config.rules.peft import peft_parts
from tuneforge.config.rules.preference import reference_kind
from tuneforge.config.schema import Config, DistributedConfig


def resolve_strategy(cfg: DistributedConfig, world_size: int, origin: str | None = None) -> str:
    """auto: single for one process; fsdp2 when sharding is asked for (offload, HSDP); otherwise ddp."""
    if cfg.strategy == "auto":
        if world_size == 1:
            return "single"
        return "fsdp2" if (cfg.cpu_offload or cfg.dp_replicate > 1) else "ddp"
    if cfg.strategy == "single" and world_size > 1:
        fail(origin, f"distributed.strategy: single cannot run on {world_size} processes; use ddp or fsdp2")
    if cfg.strategy == "ddp" and world_size == 1:
        return "single"
    return cfg.strategy


def check_strategy_fits(cfg: Config, strategy: str, origin: str | None = None) -> None:
    """What the resolved strategy cannot train: FSDP2 shards one peft model (not a stack of them, nor tuneforge's
    hooked bottleneck adapters), and bitsandbytes' quantized weights neither shard nor replicate."""
    parts = peft_parts(cfg.peft)
    if strategy == "fsdp2" and (len(parts) > 1 or any(not BY_NAME[p.method].fsdp2 for p in parts)):
        fail(origin, "distributed.strategy: fsdp2 trains one peft method at a time; use ddp for adapter lists and "
                     "bottleneck adapters")
    if cfg.model.quantization is not None and strategy != "single":
        fail(origin, "model.quantization: QLoRA runs in one process; use distributed.strategy=single")
    reference_kind(cfg, strategy, origin)  # preference.reference: adapter_off refuses fsdp2


def check_dp_replicate(dp_replicate: int, world_size: int, origin: str | None = None) -> None:
    """HSDP splits the processes into dp_replicate replicas of equal size."""
    check(dp_replicate <= 1 or world_size % dp_replicate == 0, origin,
          f"distributed.dp_replicate ({dp_replicate}) must divide the world size ({world_size})")


def check_strategy(cfg: Config, world_size: int, origin: str | None = None) -> str:
    """The strategy `world_size` processes run this recipe with, refused if it cannot train it; returns it."""
    strategy = resolve_strategy(cfg.distributed, world_size, origin)
    check_strategy_fits(cfg, strategy, origin)
    if strategy == "fsdp2":
        check_dp_replicate(cfg.distributed.dp_replicate, world_size, origin)
    return strategy
