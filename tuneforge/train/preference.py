"""The preference step (DPO and its family) inside tuneforge's loop: the reference model, one step's loss over its
micro-batches, the held-out preference metrics, and the precomputed reference log-probs stored with the run.

Loss of an optimizer step = (sum of the pair losses over all its micro-batches and ranks) / (pairs in that whole
step) [+ rpo_alpha (orpo: 1) x (sum of the chosen completions' token losses) / (chosen tokens in the step)], so
micro-batch b x accumulation k x ranks r gives the gradient of one batch of k*b*r pairs exactly, as SFT does.

The reference (config/rules/preference.py `reference_kind` decides which):
  adapter_off  the same module with its peft adapter switched off (peft's disable_adapter), in eval mode and without
               gradients: the base model, no second copy
  precomputed  the starting model's log-probs of every training and held-out pair, from one eval-mode pass before
               the first step (each rank computes its share, all-reduced), written to reference_logps.safetensors
               in the run directory and read back on resume
  none         simpo and orpo compare the policy with itself"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from tuneforge.config.schema import PreferenceConfig
from tuneforge.data.pairs import PairSet, count_pairs, pair_eval_batches
from tuneforge.distributed import DistEnv, all_reduce_tensor, evaluating, inner_model, set_gradient_sync, unwrap_ddp
from tuneforge.errors import UserError
from tuneforge.files import write_atomic
from tuneforge.models.preference import WITH_SFT, pair_losses

REFERENCE_FILE = "reference_logps.safetensors"
# the sums accumulate_preference and validate_pairs all-reduce, in this order; each but the last is a sum over pairs
_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected", "nll", "pairs")


class PreferenceStep:
    """What a preference batch's loss needs besides the policy: the settings, the reference, the SFT weight."""

    def __init__(self, pref: PreferenceConfig, reference: str, tables: dict[str, torch.Tensor] | None = None):
        self.pref, self.reference_kind, self.tables = pref, reference, tables or {}
        self.sft_weight = 1.0 if pref.loss_type in WITH_SFT else (pref.rpo_alpha or 0.0)

    def reference(self, module, batch: dict, set_name: str) -> torch.Tensor | None:
        """(n, 2) reference log-probs of the batch's pairs (chosen, rejected), without gradients; None for
        reference-free losses."""
        if self.reference_kind == "none":
            return None
        index = batch["pair_index"]
        if self.reference_kind == "precomputed":
            table = self.tables[set_name]
            return table[index.clamp(min=0).cpu()].to(device=index.device, dtype=torch.float32)
        with torch.no_grad(), adapter_off(module):
            sums, _ = unwrap_ddp(module)(batch)  # the TrainModule itself: a forward with no backward needs no DDP
        return _by_pair(sums)

    def terms(self, sums: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None, batch: dict):
        """(summed pair loss, summed chosen-token NLL, metric sums) of a batch; a filler pair counts for nothing."""
        p = self.pref
        valid = (batch["pair_index"] >= 0).to(sums.dtype)
        policy, tokens = _by_pair(sums), _by_pair(counts)
        loss, chosen_reward, rejected_reward, logps = pair_losses(p.loss_type, p.beta, policy, tokens, reference,
                                                                   p.label_smoothing, p.simpo_gamma)
        nll = -(policy[:, 0] * valid).sum()
        pair_loss = (loss * valid).sum()
        with torch.no_grad():
            metrics = torch.stack([pair_loss.detach(), (chosen_reward * valid).sum(), (rejected_reward * valid).sum(),
                                   ((chosen_reward > rejected_reward).to(valid.dtype) * valid).sum(),
                                   ((chosen_reward - rejected_reward) * valid).sum(),
                                   (logps[:, 0].detach() * valid).sum(), (logps[:, 1].detach() * valid).sum(),
                                   nll.detach(), valid.sum()]).double().cpu()
        return pair_loss, nll, metrics

    def chosen_tokens(self, batch: dict) -> int:
        """Completion tokens of the batch's chosen sequences (what the SFT term is divided by, over the step)."""
        n = batch["pair_index"].numel()
        valid = torch.cat([batch["pair_index"] >= 0, torch.zeros(n, dtype=torch.bool)])
        seg = batch["segments"][:, 1:]
        labelled = seg[batch["labels"][:, 1:] != -100]
        return int(valid[labelled].sum())

    def summarize(self, sums: torch.Tensor, chosen_tokens: int, prefix: str = "") -> dict:
        """Means per pair (the SFT term per chosen token) under TRL's metric names."""
        values = dict(zip(_SUMS, sums.tolist()))
        pairs = max(values.pop("pairs"), 1.0)
        nll = values.pop("nll") / max(chosen_tokens, 1)
        out = {f"{prefix}{k}": v / pairs for k, v in values.items()}
        out[f"{prefix}loss"] += self.sft_weight * nll
        if self.sft_weight:
            out[f"{prefix}nll_loss"] = nll
        return out


def _by_pair(values: torch.Tensor) -> torch.Tensor:
    """(2n,) sequences, chosen first -> (n, 2) pairs."""
    return values.view(2, -1).t()


@contextlib.contextmanager
def adapter_off(module):
    """The peft adapter switched off and dropout off, then both back as they were."""
    model = inner_model(module)
    train_module = unwrap_ddp(module)
    was_training = train_module.training
    train_module.eval()
    try:
        with model.disable_adapter():
            yield
    finally:
        train_module.train(was_training)


def accumulate_preference(module, micro_batches: list[dict], precision, env: DistEnv,
                          step: PreferenceStep) -> tuple[float, int, dict]:
    """Forward and backward over one step's micro-batches of pairs; returns (loss, pairs, metrics), all over every
    rank. Each micro-batch's summed pair loss is divided by the pairs of the WHOLE step, its chosen-token NLL by the
    chosen tokens of the whole step; DDP and FSDP average gradients over ranks, so each share is scaled back up by
    the world size (as accumulate_gradients does for SFT)."""
    counts = torch.tensor([[count_pairs(mb), step.chosen_tokens(mb) if step.sft_weight else 0]
                           for mb in micro_batches], dtype=torch.float64).sum(0)
    pairs, chosen_tokens = (int(v) for v in all_reduce_tensor(counts, env).tolist())
    sums = torch.zeros(len(_SUMS), dtype=torch.float64)
    for i, mb in enumerate(micro_batches):
        mb = {k: v.to(env.device) for k, v in mb.items()}
        with set_gradient_sync(module, i == len(micro_batches) - 1):  # all-reduce once, on the last micro-batch
            with precision.context():
                reference = step.reference(module, mb, "train")
                seq_sums, seq_counts = module(mb)
            pair_loss, nll, metrics = step.terms(seq_sums, seq_counts, reference, mb)
            loss = pair_loss * (env.world_size / max(pairs, 1))
            if step.sft_weight:
                loss = loss + nll * (step.sft_weight * env.world_size / max(chosen_tokens, 1))
            loss.backward()
        sums += metrics
    metrics = step.summarize(all_reduce_tensor(sums, env), chosen_tokens)
    return metrics.pop("loss"), pairs, metrics


@torch.no_grad()
def validate_pairs(module, batches: dict[str, list], precision, env: DistEnv, step: PreferenceStep) -> dict:
    """The held-out preference metrics over every set (all ranks' shares): val_loss, val_rewards/accuracies, ...;
    with several sets also each set's under its name (val_rewards/accuracies/<name>)."""
    per_set = {}
    with evaluating(module):
        for name, set_batches in batches.items():
            sums, tokens = torch.zeros(len(_SUMS), dtype=torch.float64), 0
            for batch in set_batches:
                batch = {k: v.to(env.device) for k, v in batch.items()}
                with precision.context():
                    reference = step.reference(module, batch, f"val/{name}")
                    seq_sums, seq_counts = module(batch)
                sums += step.terms(seq_sums, seq_counts, reference, batch)[2]
                tokens += step.chosen_tokens(batch) if step.sft_weight else 0
            reduced = all_reduce_tensor(torch.cat([sums, torch.tensor([float(tokens)], dtype=torch.float64)]), env)
            per_set[name] = (reduced[:-1], int(reduced[-1]))
    total = sum(s for s, _ in per_set.values())
    out = step.summarize(total, sum(t for _, t in per_set.values()), "val_")
    if len(per_set) > 1:
        for name, (sums, tokens) in per_set.items():
            out.update({f"{k}/{name}": v for k, v in step.summarize(sums, tokens, "val_").items()})
    return out


# ---- precomputed reference log-probs -------------------------------------------------------------------------------

def pairs_fingerprint(sets: dict[str, PairSet]) -> str:
    """sha256 of every pair's token ids, per set in order: what the stored log-probs belong to."""
    h = hashlib.sha256()
    for name, pairs in sets.items():
        h.update(name.encode())
        for p in pairs.pairs:
            h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference(module, sets: dict[str, PairSet], batch_size: int, pad_id: int, seq_length: int, precision,
                      env: DistEnv) -> dict[str, torch.Tensor]:
    """The starting model's summed log-probs (n, 2) of every pair of every set, in eval mode: each rank computes
    every world_size-th pair (as many forwards on every rank: FSDP gathers weights in each), then a sum over ranks
    gives every rank the whole table."""
    tables = {}
    with evaluating(module):
        for name, pairs in sets.items():
            table = torch.zeros(len(pairs), 2, dtype=torch.float64)
            for batch in pair_eval_batches(pairs, batch_size, pad_id, env.rank, env.world_size, "pad_longest",
                                           seq_length):
                index = batch["pair_index"]
                with precision.context():
                    sums, _ = module({k: v.to(env.device) for k, v in batch.items()})
                valid = index >= 0
                table[index[valid]] = _by_pair(sums.double().cpu())[valid]
            tables[name] = all_reduce_tensor(table, env)
    return tables


def load_reference(run_dir: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    path = run_dir / REFERENCE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        stored = (f.metadata() or {}).get("pairs_sha256")
    if stored != fingerprint:
        raise UserError(f"{path}: the stored reference log-probs belong to other pairs than this run's data "
                        "(the data, tokenizer or seq_length changed); start again with --overwrite")
    return load_file(str(path))


def save_reference(run_dir: Path, tables: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Written whole or not at all (files.write_atomic)."""
    write_atomic(run_dir / REFERENCE_FILE, save({k: v.contiguous() for k, v in tables.items()},
                                                metadata={"pairs_sha256": fingerprint}))
