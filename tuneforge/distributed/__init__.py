"""Process-group state. Single process today; torchrun (DDP / FSDP2) plugs in here."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_env() -> DistEnv:
    """Where this process runs; reads torchrun's variables when present."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise NotImplementedError("multi-process training is not available yet; run one process")
    return DistEnv(device="cuda" if torch.cuda.is_available() else "cpu")
