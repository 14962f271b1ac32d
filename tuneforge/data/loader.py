"""Batches for training and validation: a resumable, rank-sharded micro-batch sampler and a padding collator."""
from __future__ import annotations

from typing import Iterator

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from tuneforge.data.tokenize import IGNORE, Example
from tuneforge.errors import UserError


class MicroBatchSampler:
    """Endless micro-batches of example indices, epoch after epoch.

    Epoch e shuffles with seed (seed, e). Its micro-batches are dealt round-robin to the data-parallel ranks, so an
    optimizer step (accumulation x ranks micro-batches) holds the same examples whatever the split: micro 4 x
    accumulation 2 on one rank sees what micro 4 x 2 ranks sees. An incomplete last micro-batch is dropped so every
    rank does the same number of steps. `state_dict` is the position (epoch, micro-batches taken), which
    StatefulDataLoader saves and restores, so a resumed run continues with exactly the next batch."""

    def __init__(self, num_examples: int, micro_batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        self.n, self.size, self.seed, self.shuffle = num_examples, micro_batch_size, seed, shuffle
        self.rank, self.world = rank, world_size
        self.per_rank = num_examples // (micro_batch_size * world_size)
        if self.per_rank == 0:
            raise UserError(f"training data has {num_examples} examples, fewer than micro_batch_size "
                            f"({micro_batch_size}) x data-parallel size ({world_size})")
        self.epoch, self.taken = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            order = self._order(self.epoch)
            while self.taken < self.per_rank:
                k = self.taken * self.world + self.rank
                self.taken += 1
                yield order[k * self.size:(k + 1) * self.size].tolist()
            self.epoch, self.taken = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])


class Collator:
    """Right-pads a list of examples to the longest (labels -100 and attention 0 on padding)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(ex.input_ids) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex.input_ids)
            ids[i, :n] = torch.tensor(ex.input_ids)
            labels[i, :n] = torch.tensor(ex.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def build_train_loader(examples: list[Example], micro_batch_size: int, pad_id: int, seed: int,
                       rank: int = 0, world_size: int = 1) -> StatefulDataLoader:
    sampler = MicroBatchSampler(len(examples), micro_batch_size, seed, rank=rank, world_size=world_size)
    return StatefulDataLoader(examples, batch_sampler=sampler, collate_fn=Collator(pad_id), num_workers=0)


def build_eval_batches(examples: list[Example], batch_size: int, pad_id: int,
                       rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Validation batches in file order (this rank's share); built once, reused at every validation."""
    collate = Collator(pad_id)
    mine = examples[rank::world_size]
    return [collate(mine[i:i + batch_size]) for i in range(0, len(mine), batch_size)]
