"""The preference metrics of a batch of pairs, with its reference, and of held-out pair sets: shared by the training
step (train/preference.py), validation during training and `tuneforge eval`.

The reference (config/rules/preference.py `reference_kind` decides which):
  adapter_off  the same module with its peft adapter switched off (peft's disable_adapter), in eval mode and without
               gradients: the base model, no second copy
  precomputed  the starting model's log-probs of every training and held-out pair, looked up by the pair's index in
               its set (computed before the first step and stored with the run: run/reference.py)
  none         simpo and orpo compare the policy with itself"""
from __future__ import annotations

import contextlib

import torch

from tuneforge.config.preference_losses import WITH_SFT
from tuneforge.config.schema import PreferenceConfig
from tuneforge.data.tokenize import IGNORE
from tuneforge.distributed import DistEnv, all_reduce_tensor, evaluating, inner_model, unwrap_ddp
from tuneforge.models.preference import pair_losses

# what a step (train/preference.py) and validate_pairs all-reduce, in this order; all but "pairs" are sums over pairs
# (logps/accuracies, not a TRL metric: the share of pairs whose chosen completion the model itself finds likelier, by
# summed log-prob; unlike rewards/accuracies it says something at step 0, where every reward is 0)
SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
        "logps/rejected", "logps/accuracies", "nll", "pairs")


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
        return by_pair(sums)

    def terms(self, sums: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None, batch: dict):
        """(summed pair loss, summed chosen-token NLL, metric sums) of a batch; a filler pair counts for nothing."""
        p = self.pref
        valid = (batch["pair_index"] >= 0).to(sums.dtype)
        policy, tokens = by_pair(sums), by_pair(counts)
        loss, chosen_reward, rejected_reward, logps = pair_losses(p.loss_type, p.beta, policy, tokens, reference,
                                                                   p.label_smoothing, p.simpo_gamma)
        nll = -(policy[:, 0] * valid).sum()
        pair_loss = (loss * valid).sum()
        with torch.no_grad():
            metrics = torch.stack([pair_loss.detach(), (chosen_reward * valid).sum(), (rejected_reward * valid).sum(),
                                   ((chosen_reward > rejected_reward).to(valid.dtype) * valid).sum(),
                                   ((chosen_reward - rejected_reward) * valid).sum(),
                                   (logps[:, 0].detach() * valid).sum(), (logps[:, 1].detach() * valid).sum(),
                                   ((policy[:, 0] > policy[:, 1]).to(valid.dtype) * valid).sum(), nll.detach(),
                                   valid.sum()]).double()
        return pair_loss, nll, metrics  # metrics stay on the device: one copy to the host per step, not per batch

    def chosen_tokens(self, batch: dict) -> int:
        """Completion tokens of the batch's chosen sequences (what the SFT term is divided by, over the step)."""
        index = batch["pair_index"]
        valid = torch.cat([index >= 0, torch.zeros(index.numel(), dtype=torch.bool, device=index.device)])
        seg = batch["segments"][:, 1:]
        labelled = seg[batch["labels"][:, 1:] != IGNORE]
        return int(valid[labelled].sum())

    def summarize(self, sums: torch.Tensor, chosen_tokens: int, prefix: str = "") -> dict:
        """Means per pair (the SFT term per chosen token) under TRL's metric names."""
        values = dict(zip(SUMS, sums.tolist()))
        pairs = max(values.pop("pairs"), 1.0)
        nll = values.pop("nll") / max(chosen_tokens, 1)
        out = {f"{prefix}{k}": v / pairs for k, v in values.items()}
        out[f"{prefix}loss"] += self.sft_weight * nll
        if self.sft_weight:
            out[f"{prefix}nll_loss"] = nll
        return out


def by_pair(values: torch.Tensor) -> torch.Tensor:
    """(2n,) sequences, chosen first -> (n, 2) pairs."""
    return values.view(2, -1).t()


@contextlib.contextmanager
def adapter_off(module):
    """The peft adapter switched off and dropout off, then both back as they were."""
    model = inner_model(module)
    train_module = unwrap_ddp(module)
    was_training = train_module.training
    train_module.eval()
    try:  # a model without an adapter (`tuneforge eval --base`) is its own reference
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            yield
    finally:
        train_module.train(was_training)


@torch.no_grad()
def validate_pairs(module, batches: dict[str, list], precision, env: DistEnv, step: PreferenceStep) -> dict:
    """The held-out preference metrics over every set (all ranks' shares): val_loss, val_rewards/accuracies, ...;
    with several sets also each set's under its name (val_rewards/accuracies/<name>)."""
    per_set = {}
    with evaluating(module):
        for name, set_batches in batches.items():
            sums, tokens = torch.zeros(len(SUMS), dtype=torch.float64, device=env.device), 0
            for batch in set_batches:
                tokens += step.chosen_tokens(batch) if step.sft_weight else 0
                batch = {k: v.to(env.device) for k, v in batch.items()}
                with precision.context():
                    reference = step.reference(module, batch, f"val/{name}")
                    seq_sums, seq_counts = module(batch)
                sums += step.terms(seq_sums, seq_counts, reference, batch)[2]
            reduced = all_reduce_tensor(torch.cat([sums.cpu(), torch.tensor([float(tokens)], dtype=torch.float64)]),
                                        env)
            per_set[name] = (reduced[:-1], int(reduced[-1]))
    total = sum(s for s, _ in per_set.values())
    out = step.summarize(total, sum(t for _, t in per_set.values()), "val_")
    if len(per_set) > 1:
        for name, (sums, tokens) in per_set.items():
            out.update({f"{k}/{name}": v for k, v in step.summarize(sums, tokens, "val_").items()})
    return out
