"""The preference step (DPO and its family) inside tuneforge's loop: one step's loss over its micro-batches, and
the pass that precomputes the reference log-probs before the first step.

Loss of an optimizer step = (sum of the pair losses over all its micro-batches and ranks) / (pairs in that whole
step) [+ rpo_alpha (orpo: 1) x (sum of the chosen completions' token losses) / (chosen tokens in the step)], so
micro-batch b x accumulation k x ranks r gives the gradient of one batch of k*b*r pairs exactly, as SFT does.
The reference and the metrics: eval/preference.py."""
from __future__ import annotations

import time

import torch

from tuneforge.config.rules.preference import reference_kind
from tuneforge.data.pairs import (PairSet, build_pair_collator, count_pairs, pack_capacity, pair_eval_batches,
                                  pair_summary_lines, prepare_pairs)
from tuneforge.distributed import DistEnv, all_reduce_tensor, barrier, evaluating, set_gradient_sync
from tuneforge.errors import UserError
from tuneforge.eval.preference import SUMS, PreferenceStep, by_pair, validate_pairs
from tuneforge.run.reference import REFERENCE_FILE, load_reference, pairs_fingerprint, save_reference
from tuneforge.train.objective import Objective


class PreferenceObjective(Objective):
    """DPO and its family (the recipe's preference section): pairs in, a step's loss divided by the pairs of the
    whole step, held-out pairs scored against the run's reference."""
    name = "preference"
    counts = "pairs"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.settings: PreferenceStep | None = None  # the loss settings and the reference, from start()

    def prepare_data(self, tokenizer):
        return prepare_pairs(self.cfg.data, self.cfg.preference, tokenizer)

    def collator(self, tokenizer, model_config):
        data = self.cfg.data
        return build_pair_collator(data.batching, tokenizer.pad_token_id, data.seq_length)

    def row_tokens(self, train_data) -> int:
        data = self.cfg.data  # a packed row holds both sequences of its pairs
        return pack_capacity(train_data.examples, data.seq_length) if data.batching == "packing" else data.seq_length

    def eval_batches(self, vals: dict, tokenizer, env: DistEnv, collate) -> dict:
        t, data = self.cfg.train, self.cfg.data
        return {name: pair_eval_batches(val.examples, t.micro_batch_size, tokenizer.pad_token_id, env.rank,
                                        env.world_size, data.batching, data.seq_length)
                for name, val in vals.items()}

    def summary_lines(self, train_data, vals: dict, sampler) -> list[str]:
        return pair_summary_lines(train_data, vals, self.cfg.data.seq_length, self.cfg.data.batching)

    def start(self, training, train_data, vals: dict) -> None:
        """The reference: adapter_off needs nothing more; precomputed log-probs are read from the run directory, or
        computed now with the starting weights (before any step) and stored there."""
        cfg, env = self.cfg, training.env
        kind = reference_kind(cfg, training.strategy)
        tables = None
        if kind == "precomputed":
            sets = {"train": train_data.examples, **{f"val/{name}": val.examples for name, val in vals.items()}}
            fingerprint = pairs_fingerprint(sets)
            tables = load_reference(training.run_dir, fingerprint)
            if tables is None:
                if training.state.step > 0:
                    raise UserError(f"{training.run_dir / REFERENCE_FILE}: missing, and this run has trained past its "
                                    "starting weights: the reference cannot be computed again; start again with "
                                    "--overwrite")
                started = time.perf_counter()
                tables = compute_reference(training.state.module, sets, cfg.train.micro_batch_size,
                                           training.tokenizer.pad_token_id, cfg.data.seq_length, cfg.data.batching,
                                           training.precision, env)
                if env.is_main:
                    save_reference(training.run_dir, tables, fingerprint)
                barrier(env)
                training.info(f"reference: log-probs of the starting model for {sum(len(v) for v in sets.values())} "
                              f"pairs in {time.perf_counter() - started:.1f}s, stored in {REFERENCE_FILE}")
            else:
                training.info(f"reference: precomputed log-probs read from {REFERENCE_FILE}")
        else:
            training.info(f"reference: {'none (' + cfg.preference.loss_type + ')' if kind == 'none' else kind}")
        self.settings = PreferenceStep(cfg.preference, kind, tables)

    def step(self, module, micro_batches: list[dict], precision, env: DistEnv) -> tuple[float, int, dict]:
        return accumulate_preference(module, micro_batches, precision, env, self.settings)

    def validate(self, module, val_batches: dict, precision, env: DistEnv) -> dict:
        return validate_pairs(module, val_batches, precision, env, self.settings)


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


