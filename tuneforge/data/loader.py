"""Batches for training and validation: a resumable, rank-sharded micro-batch sampler and the collators.

Batching modes (data.batching):
  pad_longest        micro-batches of examples, right-padded to the longest (the default)
  pad_to_max_length  the same, padded to seq_length (fixed shapes, e.g. for compiled models)
  group_by_length    examples of similar length share a micro-batch (less padding); the micro-batches are shuffled
  packing            several examples per row of seq_length tokens; micro_batch_size counts rows. Positions restart
                     at every example and there is no attention mask: the attention reads each example's block
                     from the positions (tuneforge's per-example attention with sdpa, transformers' packed-sequence
                     mask with eager, the flash-attention varlen kernel on CUDA), and the first token of each example
                     is never a target of the previous example's last token. Whether that is exact for a model is
                     checked at setup (models/packing.py).

Every mode plans a whole epoch as a pure function of (seed, epoch), so the sampler's state is just (epoch,
micro-batches taken): a resumed run continues with exactly the batch an uninterrupted one would have drawn."""
from __future__ import annotations

import bisect
from typing import Iterator, Sequence

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from tuneforge.data.tokenize import IGNORE, Example
from tuneforge.errors import UserError

BATCHING = ("pad_longest", "pad_to_max_length", "group_by_length", "packing")
_GROUP_CHUNK = 64  # group_by_length sorts within windows of 64 micro-batches: similar lengths, still random
_PACK_WINDOW = 2048  # packing bins examples within windows of this many (best-fit decreasing)


def epoch_order(sizes: Sequence[int], weights: Sequence[float] | None, seed: int, epoch: int) -> torch.Tensor:
    """The example indices of one epoch. One source: a seeded permutation. Several: sum(sizes) draws, each picking a
    source with probability weight / sum(weights), and from it the next example of that source's own permutation
    (re-shuffled when a small, heavily weighted source runs out)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    n = int(sum(sizes))
    if len(sizes) == 1:
        return torch.randperm(n, generator=g)
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    picks = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    out = torch.empty(n, dtype=torch.long)
    start = 0
    for s, size in enumerate(sizes):
        where = (picks == s).nonzero().flatten()
        need = len(where)
        if need == 0:
            start += size
            continue
        rounds = -(-need // size)
        perm = torch.cat([torch.randperm(size, generator=g) for _ in range(rounds)])[:need]
        out[where] = perm + start
        start += size
    return out


def pack_rows(order: Sequence[int], lengths: np.ndarray, capacity: int, window: int = _PACK_WINDOW) -> list[tuple]:
    """Best-fit-decreasing bin packing of `order` into rows of `capacity` tokens, within windows of the order (so
    the epoch stays shuffled at large scale). Returns rows as tuples of example indices."""
    rows: list[tuple] = []
    order = list(order)
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: -int(lengths[i]))
        free: list[tuple[int, int]] = []  # (free tokens, bin id), sorted
        bins: list[list[int]] = []
        for i in chunk:
            n = int(lengths[i])
            k = bisect.bisect_left(free, (n, -1))
            if k < len(free):
                room, b = free.pop(k)
            else:
                room, b = capacity, len(bins)
                bins.append([])
            bins[b].append(i)
            if room - n > 0:
                bisect.insort(free, (room - n, b))
        rows.extend(tuple(b) for b in bins)
    return rows


class MicroBatchSampler:
    """Endless micro-batches of example indices (or, for packing, of rows = tuples of indices), epoch after epoch.

    Epoch e's micro-batches are dealt round-robin to the data-parallel ranks, so an optimizer step (accumulation x
    ranks micro-batches) holds the same examples whatever the split: micro 4 x accumulation 2 on one rank sees what
    micro 4 x 2 ranks sees. An incomplete last micro-batch is dropped so every rank does the same number of steps.
    `state_dict` is the position (epoch, micro-batches taken), which StatefulDataLoader saves and restores."""

    def __init__(self, num_examples: int, micro_batch_size: int, seed: int, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, batching: str = "pad_longest",
                 lengths: np.ndarray | None = None, seq_length: int | None = None,
                 sizes: Sequence[int] | None = None, weights: Sequence[float] | None = None):
        if batching not in BATCHING:
            raise UserError(f"data.batching: expected one of {'|'.join(BATCHING)}, got '{batching}'")
        if batching in ("group_by_length", "packing") and lengths is None:
            raise ValueError(f"{batching} needs the example lengths")
        self.n, self.size, self.seed, self.shuffle = num_examples, micro_batch_size, seed, shuffle
        self.rank, self.world, self.batching = rank, world_size, batching
        self.lengths, self.seq_length = lengths, seq_length
        self.sizes = list(sizes) if sizes else [num_examples]
        self.weights = list(weights) if weights else [1.0] * len(self.sizes)
        self._plans: dict[int, list] = {}
        self.per_rank = len(self._plan(0)) // world_size
        if self.per_rank == 0:
            unit = "packed rows" if batching == "packing" else "examples"
            have = len(pack_rows(range(num_examples), lengths, seq_length)) if batching == "packing" else num_examples
            raise UserError(f"training data has {have} {unit}, fewer than micro_batch_size "
                            f"({micro_batch_size}) x data-parallel size ({world_size})")
        self.epoch, self.taken = 0, 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return epoch_order(self.sizes, self.weights, self.seed, epoch)

    def _plan(self, epoch: int) -> list:
        """All micro-batches of an epoch (before the rank split); a pure function of (seed, epoch)."""
        if epoch not in self._plans:
            self._plans = {epoch: self._build_plan(epoch)}  # keep one epoch: the plan of 87k examples is ~1 MB
        return self._plans[epoch]

    def _build_plan(self, epoch: int) -> list:
        order = self._order(epoch).tolist()
        m = self.size
        if self.batching == "packing":
            rows = pack_rows(order, self.lengths, self.seq_length)
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7)
            rows = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()] if self.shuffle else rows
            return [rows[k:k + m] for k in range(0, len(rows) - m + 1, m)]
        batches = [order[k:k + m] for k in range(0, len(order) - m + 1, m)]
        if self.batching == "group_by_length":
            window = m * _GROUP_CHUNK
            flat = order[: len(batches) * m]
            batches = []
            for w in range(0, len(flat), window):
                chunk = sorted(flat[w:w + window], key=lambda i: -int(self.lengths[i]))
                batches.extend(chunk[k:k + m] for k in range(0, len(chunk), m))
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 11)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list]:
        while True:
            plan = self._plan(self.epoch)
            while self.taken < len(plan) // self.world:
                k = self.taken * self.world + self.rank
                self.taken += 1
                yield plan[k]
            self.epoch, self.taken = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])


class ExampleSet(torch.utils.data.Dataset):
    """Indexable examples; a tuple index (a packed row) returns the list of its examples."""

    def __init__(self, examples):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return [self.examples[i] for i in index]
        return self.examples[index]


class Collator:
    """Right-pads a list of examples to the longest, or to `width` (labels -100 and attention 0 on padding)."""

    def __init__(self, pad_id: int, width: int | None = None):
        self.pad_id, self.width = pad_id, width

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = self.width or max(len(ex.input_ids) for ex in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ex in enumerate(batch):
            n = len(ex.input_ids)
            ids[i, :n] = torch.tensor(ex.input_ids)
            labels[i, :n] = torch.tensor(ex.labels)
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackedCollator:
    """Rows of packed examples -> input_ids, labels, position_ids (restarting at 0 for every example), no attention
    mask. Shapes (rows, longest row). The first label of each example is -100: in the unpacked layout it is never a
    target either (labels shift by one), so packed and unpacked losses are the same sum over the same tokens.
    Padding at a row's end is its own position run, so it is a separate block that nothing real attends to."""

    def __init__(self, pad_id: int, width: int | None = None):
        self.pad_id, self.width = pad_id, width

    def __call__(self, rows: list[list[Example]]) -> dict[str, torch.Tensor]:
        lengths = [sum(len(ex.input_ids) for ex in row) for row in rows]
        width = self.width or max(lengths)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for ex in row:
                n = len(ex.input_ids)
                ids[r, at:at + n] = torch.tensor(ex.input_ids)  # the example at row offset `at`
                # labels[r, at] stays -100: after the loss's shift by one it would be a target of the previous
                # example's last token, which unpacked has no next token
                labels[r, at + 1:at + n] = torch.tensor(ex.labels[1:])
                positions[r, at:at + n] = torch.arange(n)  # a restart at 0 opens a new attention block
                at += n
            positions[r, at:] = torch.arange(width - at)  # (width - at) padding tokens: a block of their own
        return {"input_ids": ids, "labels": labels, "position_ids": positions,
                "num_tokens": torch.tensor(sum(lengths))}


def check_packing_backend(attn_implementation: str | None, device: str) -> None:
    """An explicit flash_attention_2 for packed rows needs flash-attn and CUDA (its varlen kernel reads the example
    blocks from the restarted position_ids); sdpa and eager read them through per-example attention or transformers'
    packed-sequence mask."""
    if attn_implementation == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            raise UserError("model.attn_implementation=flash_attention_2 needs flash-attn: pip install "
                            "'tuneforge[flash]' (CUDA only), or use sdpa") from None
        if device == "cpu":
            raise UserError("model.attn_implementation=flash_attention_2 runs on CUDA only; use sdpa on CPU")


def count_input_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch, for throughput."""
    if "attention_mask" in batch:  # seq2seq batches: encoder plus decoder tokens
        return sum(int(batch[k].sum()) for k in ("attention_mask", "decoder_attention_mask") if k in batch)
    return int(batch["num_tokens"])


def build_collator(batching: str, pad_id: int, seq_length: int | None = None):
    if batching == "packing":
        return PackedCollator(pad_id)
    return Collator(pad_id, seq_length if batching == "pad_to_max_length" else None)


def build_train_loader(examples, micro_batch_size: int, pad_id: int, seed: int, rank: int = 0, world_size: int = 1,
                       batching: str = "pad_longest", seq_length: int | None = None,
                       sizes: Sequence[int] | None = None, weights: Sequence[float] | None = None,
                       shuffle: bool = True, num_workers: int = 0, collate_fn=None) -> StatefulDataLoader:
    """`collate_fn` replaces the collator `batching` picks (seq2seq models bring their own)."""
    lengths = getattr(examples, "lengths", None)
    if lengths is None and batching in ("group_by_length", "packing"):
        lengths = np.array([len(ex.input_ids) for ex in examples])
    sampler = MicroBatchSampler(len(examples), micro_batch_size, seed, shuffle, rank=rank, world_size=world_size,
                                batching=batching, lengths=lengths, seq_length=seq_length, sizes=sizes,
                                weights=weights)
    return StatefulDataLoader(ExampleSet(examples), batch_sampler=sampler,
                              collate_fn=collate_fn or build_collator(batching, pad_id, seq_length),
                              num_workers=num_workers)


def build_eval_batches(examples, batch_size: int, pad_id: int, rank: int = 0, world_size: int = 1,
                       batching: str = "pad_longest", seq_length: int | None = None,
                       collate_fn=None, row_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Validation batches in file order (this rank's share); built once, reused at every validation. Packing packs
    in file order too (rows of row_tokens, default seq_length), so the validation set and its loss are the same as
    unpacked. Every rank gets the same number of batches (FSDP gathers weights in each forward, so all ranks must
    run as many): ranks with fewer add batches whose labels are all masked (and, for preference pairs, whose pair
    index is -1), which add nothing to the loss or the counts."""
    lengths = getattr(examples, "lengths", None)

    def plan(r: int) -> list[list]:
        idx = list(range(r, len(examples), world_size))
        if batching == "packing":
            sizes = lengths if lengths is not None else np.array([len(ex.input_ids) for ex in examples])
            rows = pack_rows(idx, sizes, row_tokens or seq_length)
            return [[[examples[i] for i in row] for row in rows[k:k + batch_size]]
                    for k in range(0, len(rows), batch_size)]
        return [[examples[i] for i in idx[k:k + batch_size]] for k in range(0, len(idx), batch_size)]

    collate = collate_fn or build_collator(batching, pad_id, seq_length)
    batches = [collate(group) for group in plan(rank)]
    most = max(len(plan(r)) for r in range(world_size)) if world_size > 1 else len(batches)
    while len(batches) < most:
        filler = collate([[examples[0]]] if batching == "packing" else [examples[0]])
        filler["labels"].fill_(IGNORE)
        if "pair_index" in filler:
            filler["pair_index"].fill_(-1)
        batches.append(filler)
    return batches


def batching_report(lengths: np.ndarray, plan: list, batching: str, seq_length: int) -> dict:
    """Padding waste (pad tokens / tokens computed) or packing efficiency (real tokens / row capacity) of a plan."""
    real = computed = 0
    for mb in plan:
        if batching == "packing":
            sizes = [int(sum(lengths[i] for i in row)) for row in mb]
            real += sum(sizes)
            computed += len(mb) * max(sizes)
        else:
            sizes = [int(lengths[i]) for i in mb]
            real += sum(sizes)
            computed += len(mb) * (seq_length if batching == "pad_to_max_length" else max(sizes))
    out = {"micro_batches": len(plan), "real_tokens": real, "computed_tokens": computed,
           "padding_waste": 1 - real / max(computed, 1)}
    if batching == "packing":
        rows = sum(len(mb) for mb in plan)
        out.update(rows=rows, examples_per_row=sum(len(r) for mb in plan for r in mb) / max(rows, 1),
                   packing_efficiency=real / max(rows * seq_length, 1))
    return out
