"""The training state one checkpoint holds, as one object on one process and on many.

`TrainState` is what `save_checkpoint` writes and `load_checkpoint` restores: the trained weights and the optimizer
(the sharded part under torchrun: every rank holds its shards), and the progress of this process (learning-rate
schedule, data position, RNG, step). The recipe builds it once in setup and advances `step`; nothing else about a
checkpoint is the recipe's business."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    module: nn.Module   # what trains: the TrainModule, wrapped by DDP / FSDP2 or not (a bare model in unit tests)
    optimizer: torch.optim.Optimizer
    scheduler: Any      # an LRScheduler: state_dict / load_state_dict
    loader: Any         # the stateful training loader: state_dict / load_state_dict give its data position
    step: int = 0       # optimizer steps taken
    objective: Any = None  # the objective's own state (online RL: the completions a later step reuses), or None

    def progress(self) -> dict:
        """This process's own part: saved per rank, since each rank reads its own share of the data."""
        saved = {"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(), "rng": rng_state(),
                 "step": self.step}
        if self.objective is not None:
            saved["objective"] = self.objective.state_dict()
        return saved

    def load_progress(self, saved: dict) -> None:
        self.scheduler.load_state_dict(saved["scheduler"])
        self.loader.load_state_dict(saved["loader"])
        set_rng_state(saved["rng"])
        self.step = int(saved["step"])
        if self.objective is not None and "objective" in saved:
            self.objective.load_state_dict(saved["objective"])
