"""The preference step (DPO and its family) inside tuneforge's loop: one step's loss over its micro-batches, and
the pass that precomputes the reference log-probs before the first step.

Loss of an optimizer step = (sum of the pair losses over all its micro-batches and ranks) / (pairs in that whole
step) [+ rpo_alpha (orpo: 1) x (sum of the chosen completions' token losses) / (chosen tokens in the step)], so
micro-batch b x accumulation k x ranks r gives the gradient of one batch of k*b*r pairs exactly, as SFT does.
The reference and the metrics: eval/preference.py."""
from __future__ import annotations

import torch

from tuneforge.data.pairs import PairSet, count_pairs, pair_eval_batches
from tuneforge.distributed import DistEnv, all_reduce_tensor, evaluating, set_gradient_sync
from tuneforge.eval.preference import SUMS, PreferenceStep, by_pair


def accumulate_preference(module, micro_batches: list[dict], precision, env: DistEnv,
                          step: PreferenceStep) -> tuple[float, int, dict]:
    """Forward and backward over one step's micro-batches of pairs; returns (loss, pairs, metrics), all over every
    rank. Each micro-batch's summed pair loss is divided by the pairs of the WHOLE step, its chosen-token NLL by the
    chosen tokens of the whole step; DDP and FSDP average gradients over ranks, so each share is scaled back up by
    the world size (as accumulate_gradients does for SFT)."""
    counts = torch.tensor([[count_pairs(mb), step.chosen_tokens(mb) if step.sft_weight else 0]
                           for mb in micro_batches], dtype=torch.float64).sum(0)
    pairs, chosen_tokens = (int(v) for v in all_reduce_tensor(counts, env).tolist())
    sums = torch.zeros(len(SUMS), dtype=torch.float64, device=env.device)
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
    metrics = step.summarize(all_reduce_tensor(sums.cpu(), env), chosen_tokens)
    return metrics.pop("loss"), pairs, metrics


@torch.no_grad()
def compute_reference(module, sets: dict[str, PairSet], batch_size: int, pad_id: int, seq_length: int, batching: str,
                      precision, env: DistEnv) -> dict[str, torch.Tensor]:
    """The starting model's summed log-probs (n, 2) of every pair of every set, in eval mode, batched as training
    batches them (packed or padded: the same kernels round alike, so step 1's rewards start at ~0): each rank
    computes every world_size-th pair (as many forwards on every rank: FSDP gathers weights in each), then a sum
    over ranks gives every rank the whole table."""
    tables = {}
    with evaluating(module):
        for name, pairs in sets.items():
            table = torch.zeros(len(pairs), 2, dtype=torch.float64)
            for batch in pair_eval_batches(pairs, batch_size, pad_id, env.rank, env.world_size, batching, seq_length):
                index = batch["pair_index"]
                with precision.context():
                    sums, _ = module({k: v.to(env.device) for k, v in batch.items()})
                valid = index >= 0
                table[index[valid]] = by_pair(sums.double().cpu())[valid]
            tables[name] = all_reduce_tensor(table, env)
    return tables


