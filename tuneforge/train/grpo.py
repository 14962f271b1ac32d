"""Online RL with verifiable rewards inside tuneforge's loop: GRPO and its loss family (rl.loss_type grpo, dapo,
dr_grpo, bnpo). The policy being trained samples rl.num_generations completions of each prompt (eval/rollout.py),
the reward functions score them (eval/rewards.py), and the step learns from advantages = reward - its group's mean
(divided by a std per rl.scale_rewards), with the clipped surrogate and an optional KL term to a reference
(models/policy.py).

Batches: train.global_batch_size counts completions; a step's prompts are global_batch_size / num_generations, each
process taking whole groups. The completions of a generation serve rl.num_iterations optimizer steps; the first
forward of each micro-batch records the log-probs the later steps' ratios are taken against (with num_iterations 1,
the ratio is 1 by construction, as TRL's). Normalisation as models/policy.py says, over the whole step (all
micro-batches and processes), so micro-batch x accumulation x processes gives one big batch's gradient (bnpo, TRL's
per-micro-batch mean, aside).

With one gradient step per generation and no KL, the loss is ~0 by construction (the advantages of a group sum to 0,
every ratio is 1: exactly 0 for grpo, a remainder weighted by the completions' lengths for the token-level losses) and
only its gradient is not: watch reward, reward_std, frac_reward_zero_std and entropy."""
from __future__ import annotations

import copy
import json
import math
import time

import torch

from tuneforge.config.rules.rl import rl_reference_kind
from tuneforge.data.prompts import Prompt, prepare_prompts, prompt_summary_lines
from tuneforge.data.tokenize import IGNORE
from tuneforge.distributed import (DistEnv, all_gather_objects, all_reduce_sum, all_reduce_tensor, broadcast_object,
                                   evaluating, forwards_in_lockstep, set_gradient_sync, unwrap_ddp)
from tuneforge.errors import UserError
from tuneforge.eval.preference import adapter_off
from tuneforge.eval.rewards import check_rewards, held_out_rewards, load_rewards, reward_table, score
from tuneforge.eval.rollout import (SamplingMode, SamplingSettings, choose_sampling_mode, sample, sample_key,
                                    stop_token_ids)
from tuneforge.models.layers import transformers_model
from tuneforge.models.load import resolve_precision
from tuneforge.models.policy import (SUMS, _shared_batch, check_shared_prefix, completion_logps, completion_mask,
                                     micro_batch_loss, token_losses)
from tuneforge.train.metrics import truncate_metrics
from tuneforge.train.objective import Objective

COMPLETIONS_FILE = "completions.jsonl"
# The largest fp32 log-prob gap between sampling and the training forward a run accepts (with a line in the log): a
# model whose forward depends on the rows batched with it (MoE routing with capacity) differs by ~1e-3..1e-1; a
# sampler that is not the policy differs by more.
MAX_SAMPLER_GAP = 0.1


def as_list(prompts: list[Prompt]) -> list[Prompt]:
    """The loader's collator: a step's prompts stay records (the objective tokenizes completions itself)."""
    return list(prompts)


class Rollout:
    """One generation batch on this process: its rows (prompt + completion), which tokens the loss counts, the
    advantages, the sampler's log-probs, the log-probs later iterations compare with, and its reward metrics. Saved
    in a checkpoint, so a run resumed between the iterations of one generation reuses the same completions."""

    def __init__(self, rows, prompt_lens, counted, advantages, sampling_logps, metrics, texts, groups):
        self.rows, self.prompt_lens, self.counted, self.groups = rows, prompt_lens, counted, groups
        self.advantages, self.sampling_logps, self.metrics, self.texts = advantages, sampling_logps, metrics, texts
        self.old: list[torch.Tensor | None] = []  # per micro-batch, filled by the first iteration
        self.uses = 0

    def state_dict(self) -> dict:
        return {"rows": self.rows, "prompt_lens": self.prompt_lens, "counted": self.counted, "groups": self.groups,
                "advantages": self.advantages, "sampling_logps": self.sampling_logps, "metrics": self.metrics,
                "old": [t if t is not None else torch.empty(0) for t in self.old], "uses": self.uses}

    @classmethod
    def from_state(cls, saved: dict) -> "Rollout":
        r = cls(saved["rows"], saved["prompt_lens"], saved["counted"], saved["advantages"], saved["sampling_logps"],
                saved["metrics"], [], saved["groups"])
        r.old, r.uses = list(saved["old"]), int(saved["uses"])
        return r


class GRPOObjective(Objective):
    name = "rl"
    counts = "completions"
    has_state = True  # the rollout a later iteration reuses

    def __init__(self, cfg):
        super().__init__(cfg)
        self.rl = cfg.rl
        self.rewards = load_rewards(cfg.rl.rewards)  # an import that fails is refused before anything is written
        self.rollout: Rollout | None = None
        self.reference = None  # a frozen copy of the starting model (rl.reference copy)
        self.training = None
        self.shared_prefix = False  # each prompt's forward once for its group (models/policy.py), where checked
        self.sampling_mode = SamplingMode()  # how this model is sampled (eval/rollout.py choose_sampling_mode)

    # ---- data and batches ---------------------------------------------------------------------------------------
    def prepare_data(self, tokenizer):
        self.tokenizer = tokenizer
        train, vals = prepare_prompts(self.cfg.data, self.rl, tokenizer)
        check_rewards(self.rewards, train.examples[0])  # a bad reward is refused before the run directory is written
        return train, vals

    def collator(self, tokenizer, model_config):
        return as_list

    def loader_batch_size(self, world_size: int) -> int:
        """Prompts per process per generation: whole groups, every process as many."""
        return self.cfg.train.global_batch_size // (self.rl.num_generations * world_size)

    def steps_per_epoch(self, per_rank: int, accum: int) -> float:
        return per_rank * self.rl.num_iterations

    def draw(self, batches, accum: int, step: int) -> list:
        """A new generation's prompts on its first step, nothing on the steps that reuse its completions."""
        return [next(batches)] if step % self.rl.num_iterations == 0 or self.rollout is None else []

    def eval_batches(self, vals: dict, tokenizer, env: DistEnv, collate) -> dict:
        return {name: val.examples[env.rank::env.world_size] for name, val in vals.items()}

    def summary_lines(self, train_data, vals: dict, sampler) -> list[str]:
        rl, t = self.rl, self.cfg.train
        return prompt_summary_lines(train_data, vals, rl) + [
            f"rl: {rl.loss_type}, {t.global_batch_size // rl.num_generations} prompts x {rl.num_generations} "
            f"completions a step, at most {rl.max_completion_length} tokens each, temperature {rl.temperature}"
            + (f", top_p {rl.top_p}" if rl.top_p < 1 else "") + (f", top_k {rl.top_k}" if rl.top_k else "")
            + f"; beta {rl.beta}; {rl.num_iterations} step(s) per generation; rewards "
            + ", ".join(f"{r.name} x {r.weight:g}" for r in self.rewards)]

    def prepare_model(self, model, strategy: str, env: DistEnv) -> list[str]:
        """Before wrapping, resuming and storing frozen weights in the compute dtype: whether completions may run on
        their group's shared prompt cache, and how the model is sampled so that it records the training forward's
        log-probs (each checked on this model in fp32 on rank 0, every rank taking its answer; a model that no way of
        sampling follows within MAX_SAMPLER_GAP is refused), and the frozen copy of the starting model (rl.reference
        copy). Returns lines for the log."""
        if rl_reference_kind(self.cfg, strategy) == "copy":
            if strategy == "fsdp2":
                raise UserError("rl.reference: a frozen copy of the weights is not available under fsdp2 (the other "
                                "ranks hold no weights to copy); use ddp or one process, or a LoRA/IA3 adapter "
                                "(reference adapter_off)")
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        why_not = mode = why_mode = None
        if env.is_main:  # both checks in eval mode and fp32, on the weights rank 0 holds
            chunk, full = self.cfg.train.loss_chunk_tokens, not self.cfg.train.head_on_labels_only
            vocab = transformers_model(model).get_input_embeddings().num_embeddings
            device = next(p.device for p in model.parameters() if p.device.type != "meta")
            pad, was_training = self.tokenizer.pad_token_id, model.training
            model.eval()
            try:
                why_not = check_shared_prefix(lambda b: completion_logps(model, b, full, chunk), vocab, pad, device)
                mode, why_mode, gap = choose_sampling_mode(model, vocab, pad, device,
                                                           resolve_precision("float32", device.type))
                if gap > MAX_SAMPLER_GAP:  # not the policy: refused, before anything is written
                    why_mode = f"refused: {why_mode}"
            finally:
                model.train(was_training)
        why_not, mode, why_mode = broadcast_object((why_not, mode, why_mode), env)
        if why_mode and why_mode.startswith("refused: "):
            raise UserError(f"rl: cannot sample from {type(transformers_model(model)).__name__} as it trains: "
                            f"{why_mode[len('refused: '):]}")
        self.shared_prefix, self.sampling_mode = why_not is None, mode
        lines = [f"rl: each completion's whole row runs through the model, not its group's shared prompt cache "
                 f"({why_not})"] if why_not else []
        if why_mode:
            lines.append(f"rl: sampling with {mode.describe()} ({why_mode})")
        return lines

    def start(self, training, train_data, vals: dict) -> None:
        self.training = training
        self.tokenizer, self.env = training.tokenizer, training.env
        self.stop_ids = stop_token_ids(training.tokenizer, training.state.module)
        self.reference_kind = rl_reference_kind(self.cfg, training.strategy)
        training.state.objective = self
        if training.env.is_main:
            truncate_metrics(training.run_dir / COMPLETIONS_FILE, training.start_step)
        training.info(f"reference: {'none (rl.beta 0)' if self.reference_kind == 'none' else self.reference_kind}; "
                      f"sampling stops at token ids {sorted(self.stop_ids)} or {self.rl.max_completion_length} tokens")

    def state_dict(self) -> dict:
        return {"rollout": self.rollout.state_dict() if self.rollout is not None else {}}

    def load_state_dict(self, saved: dict) -> None:
        self.rollout = Rollout.from_state(saved["rollout"]) if saved.get("rollout") else None

    def input_tokens(self, draws: list, env: DistEnv) -> int:
        return int(all_reduce_sum(sum(len(r) for r in self.rollout.rows), env)) if self.rollout else 0

    # ---- generation --------------------------------------------------------------------------------------------
    def _sample(self, module, prompts: list[Prompt], numbers: int, settings: SamplingSettings, precision,
                env: DistEnv, step: int, batch_size: int | None):
        rows = [(p, j) for p in prompts for j in range(numbers)]
        keys = [sample_key(self.cfg.run.seed, step, p.index, j) for p, j in rows]
        lockstep = forwards_in_lockstep(module, env)
        size = batch_size or len(rows) or 1
        completions, logps, truncated = [], [], []
        with evaluating(module):
            decode = unwrap_ddp(module).decode
            for start in range(0, max(len(rows), 1), size):
                chunk = rows[start:start + size] or rows[:1]  # an empty share (lockstep) still steps
                prompts, groups = _groups([p for p, _ in chunk]) if self.shared_prefix else \
                    ([p.ids for p, _ in chunk], None)
                got = sample(decode, prompts, keys[start:start + size] or keys[:1], settings,
                             self.tokenizer.pad_token_id, self.stop_ids, env.device, precision, env, lockstep, groups,
                             self.sampling_mode)
                if rows[start:start + size]:
                    completions += got.completions
                    logps += got.logps
                    truncated += got.truncated
        return rows, completions, logps, truncated

    def _texts(self, completions: list[list[int]]) -> list[str]:
        stops = self.stop_ids
        return [self.tokenizer.decode([t for t in c if t not in stops], skip_special_tokens=True)
                for c in completions]

    def _rewards(self, rows, completions, texts) -> torch.Tensor:
        """(completions, functions) rewards of this process's completions; NaN where a function gave None."""
        values = score(self.rewards, [p.shown for p, _ in rows], texts, completions, [p.columns for p, _ in rows])
        return reward_table(self.rewards, values)

    def generate(self, module, prompts: list[Prompt], precision, env: DistEnv, step: int) -> Rollout:
        rl = self.rl
        started = time.perf_counter()
        settings = SamplingSettings(rl.max_completion_length, rl.temperature, rl.top_p, rl.top_k)
        rows, completions, logps, truncated = self._sample(module, prompts, rl.num_generations, settings, precision,
                                                           env, step, rl.generation_batch_size)
        generation_seconds = time.perf_counter() - started
        texts = self._texts(completions)
        per_fn = self._rewards(rows, completions, texts)
        weights = torch.tensor([r.weight for r in self.rewards])
        unscorable = per_fn.isnan().all(1)
        rewards = (per_fn * weights).nansum(1).masked_fill(unscorable, math.nan)
        groups = rewards.view(-1, rl.num_generations)
        mean = groups.nanmean(1, keepdim=True).expand_as(groups).reshape(-1)
        # every process's rewards: the step's reward metrics and a batch std see all completions
        every = torch.cat([torch.tensor(x) for x in all_gather_objects(per_fn.tolist(), env)]).reshape(
            -1, len(self.rewards))
        all_rewards = (every * weights).nansum(1).masked_fill(every.isnan().all(1), math.nan)
        group_std = _nanstd(groups, dim=1).repeat_interleave(rl.num_generations)
        std = (_nanstd(all_rewards).expand_as(rewards) if rl.scale_rewards == "batch" else group_std)
        advantages = rewards - mean
        if rl.scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
        advantages = torch.nan_to_num(advantages, nan=0.0)
        counted = [not (rl.mask_truncated_completions and cut) for cut in truncated]
        lengths = torch.tensor([float(len(c)) for c in completions])
        all_lengths = torch.cat([torch.tensor(x) for x in all_gather_objects(lengths.tolist(), env)])
        all_cut = torch.cat([torch.tensor(x, dtype=torch.float32) for x in all_gather_objects(
            [float(c) for c in truncated], env)])
        zero_std = torch.cat([torch.tensor(x) for x in all_gather_objects(
            torch.isclose(_nanstd(groups, dim=1), torch.zeros(())).float().tolist(), env)])
        new_tokens = int(all_reduce_sum(sum(len(c) for c in completions), env))
        metrics = {"reward": float(all_rewards.nanmean()), "reward_std": float(_nanstd(all_rewards)),
                   "frac_reward_zero_std": float(zero_std.mean()),
                   "completions/mean_length": float(all_lengths.mean()),
                   "completions/min_length": float(all_lengths.min()),
                   "completions/max_length": float(all_lengths.max()),
                   "completions/clipped_ratio": float(all_cut.mean()),
                   "generation_seconds": generation_seconds,
                   "generation_tokens_per_s": new_tokens / max(generation_seconds, 1e-9)}
        for i, r in enumerate(self.rewards):
            metrics[f"rewards/{r.name}/mean"] = float(every[:, i].nanmean())
            metrics[f"rewards/{r.name}/std"] = float(_nanstd(every[:, i]))
        if env.is_main and self.training is not None and self.rl.log_completions:
            self._log_completions(step + 1, rows, texts, rewards)
        return Rollout([p.ids + c for (p, _), c in zip(rows, completions)], [len(p.ids) for p, _ in rows], counted,
                       advantages, logps, metrics, texts, [i // rl.num_generations for i in range(len(rows))])

    def _log_completions(self, step: int, rows, texts, rewards) -> None:
        with open(self.training.run_dir / COMPLETIONS_FILE, "a") as f:
            for (p, _), text, r in list(zip(rows, texts, rewards.tolist()))[:self.rl.log_completions]:
                shown = p.shown if isinstance(p.shown, str) else p.shown[-1].get("content", "")
                f.write(json.dumps({"step": step, "prompt": shown[-300:], "completion": text,
                                    "reward": None if math.isnan(r) else r}) + "\n")

    # ---- the step ----------------------------------------------------------------------------------------------
    def micro_batches(self, rollout: Rollout) -> list[dict]:
        """The rollout's rows as micro-batches of train.micro_batch_size completions, in order: each distinct prompt
        once and the completions on its cache (the shared prefix), or whole right-padded rows."""
        size, pad = self.cfg.train.micro_batch_size, self.tokenizer.pad_token_id
        out = []
        for start in range(0, len(rollout.rows), size):
            rows = rollout.rows[start:start + size]
            if self.shared_prefix:
                ks = range(start, start + len(rows))
                firsts = {}
                for k in ks:
                    firsts.setdefault(rollout.groups[k], k)
                prompts = [rollout.rows[k][:rollout.prompt_lens[k]] for k in firsts.values()]
                order = {g: i for i, g in enumerate(firsts)}
                batch = _shared_batch(prompts, [order[rollout.groups[k]] for k in ks],
                                      [rollout.rows[k][rollout.prompt_lens[k]:] for k in ks], pad, "cpu")
                for i, k in enumerate(ks):
                    if not rollout.counted[k]:
                        batch["labels"][i] = IGNORE
                batch["temperature"] = torch.tensor(self.rl.temperature)
                out.append({**batch, "first": torch.tensor(start)})
                continue
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                k = start + i
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
                if rollout.counted[k]:
                    labels[i, rollout.prompt_lens[k]:len(row)] = ids[i, rollout.prompt_lens[k]:len(row)]
            out.append({"input_ids": ids, "attention_mask": mask, "labels": labels,
                        "temperature": torch.tensor(self.rl.temperature), "first": torch.tensor(start)})
        return out

    def step(self, module, draws: list, precision, env: DistEnv) -> tuple[float, int, dict]:
        state = self.training.state if self.training is not None else None
        step = state.step if state is not None else 0
        if draws:
            self.rollout = self.generate(module, draws[0], precision, env, step)
        started = time.perf_counter()
        loss, completions, metrics = accumulate_policy(module, self.rollout, self.micro_batches(self.rollout),
                                                       self.rl, precision, env, self._reference(module))
        metrics.update(self.rollout.metrics)
        metrics["training_seconds"] = time.perf_counter() - started
        metrics["training_tokens_per_s"] = self.input_tokens([], env) / max(metrics["training_seconds"], 1e-9)
        if step == 0 and self.training is not None and not self.rl.beta:
            self.training.info("rl: the loss is not the signal here: with the first ratio 1 and a group's advantages "
                               "summing to 0 it is ~0 by construction (exactly 0 for loss_type grpo, a length-weighted "
                               "remainder otherwise), and only its gradient is not; watch reward, reward_std, "
                               "frac_reward_zero_std and entropy")
        return loss, completions, metrics

    def _reference(self, module):
        """(batch) -> reference log-probs of its completion tokens, without gradients; None with beta 0."""
        kind = rl_reference_kind(self.cfg, self.training.strategy if self.training else "single")
        if kind == "none":
            return None
        if kind == "copy":
            ref, chunk = self.reference, self.cfg.train.loss_chunk_tokens

            def of(batch):
                return completion_logps(ref, batch, chunk_tokens=chunk)[0]
            return of

        def off(batch):
            with adapter_off(module):
                return unwrap_ddp(module)(batch)[0]
        return off

    # ---- held-out prompts ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, module, val_batches: dict, precision, env: DistEnv) -> dict:
        """The greedy reward of every validation set's prompts: val_reward, val_rewards/<name>/mean (and per set
        val_reward/<set> where there are several)."""
        settings = SamplingSettings(self.rl.max_completion_length, greedy=True)
        per_set = {}
        for set_name, prompts in val_batches.items():
            rows, completions, _, _ = self._sample(module, prompts, 1, settings, precision, env, 0, None)
            per_fn = self._rewards(rows, completions, self._texts(completions)) if rows else \
                torch.empty(0, len(self.rewards))
            per_set[set_name] = torch.cat([torch.tensor(x).reshape(-1, len(self.rewards))
                                           for x in all_gather_objects(per_fn.tolist(), env)])
        return held_out_rewards(self.rewards, per_set)

def accumulate_policy(module, rollout: Rollout, micro_batches: list[dict], rl, precision, env: DistEnv,
                      reference) -> tuple[float, int, dict]:
    """Forward and backward over one step's micro-batches of completions; returns (loss, completions, metrics),
    all over every process. Each micro-batch's share is normalised over the WHOLE step (models/policy.py), and DDP
    and FSDP average gradients over processes, so each share is scaled back up by the world size."""
    first = rollout.uses == 0
    if first:
        rollout.old = [None] * len(micro_batches)
    tokens = sum(int(completion_mask(mb).sum()) for mb in micro_batches)
    counts = torch.tensor([float(len(rollout.rows)), float(tokens)], dtype=torch.float64)
    step_completions, step_tokens = (int(v) for v in all_reduce_tensor(counts, env).tolist())
    eps_high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
    sums = torch.zeros(len(SUMS), dtype=torch.float64)
    logp_gap = torch.zeros((), dtype=torch.float64)
    seq_low, seq_high = [], []
    for i, mb in enumerate(micro_batches):
        first_row = int(mb.pop("first"))
        mb = {k: v.to(env.device) for k, v in mb.items()}
        keep = completion_mask(mb)
        seq = keep.nonzero()[:, 0]  # each counted token's row in the micro-batch
        rows = mb["labels"].size(0)
        advantages = rollout.advantages[first_row:first_row + rows].to(env.device)[seq]
        with set_gradient_sync(module, i == len(micro_batches) - 1):  # all-reduce once, on the last micro-batch
            with precision.context():
                logps, entropy = module(mb)
                ref = None
                if reference is not None:
                    with torch.no_grad():
                        ref = reference(mb).detach()
            if first:
                old = logps.detach()
                if rl.num_iterations > 1:
                    rollout.old[i] = old.clone().cpu()
                sampled = torch.tensor([lp for k in range(first_row, first_row + rows) if rollout.counted[k]
                                        for lp in rollout.sampling_logps[k]], dtype=torch.float32)
                if sampled.numel() == old.numel() and old.numel():
                    logp_gap = torch.maximum(logp_gap, (sampled - old.cpu()).abs().max().double())
            else:
                old = rollout.old[i].to(env.device)
            losses, parts = token_losses(logps, old, advantages, ref, rl.epsilon, eps_high, rl.beta,
                                         rl.kl_ratio_correction)
            share = micro_batch_loss(rl.loss_type, losses, seq, rows, step_completions, step_tokens,
                                     int(keep.sum()), len(micro_batches), rl.max_completion_length, env.world_size)
            (share * env.world_size).backward()
        with torch.no_grad():
            kl = parts["kl"].sum() if "kl" in parts else torch.zeros(())
            sums += torch.stack([t.double().cpu() for t in (share.detach(), kl, entropy.sum(), parts["low"].sum(),
                                                            parts["high"].sum(), parts["region"].sum(),
                                                            torch.tensor(float(seq.numel())))])
            for flag, out in (("low", seq_low), ("high", seq_high)):
                per_row = torch.zeros(rows, dtype=torch.float64).index_add_(0, seq.cpu(), parts[flag].double().cpu())
                n = torch.zeros(rows, dtype=torch.float64).index_add_(0, seq.cpu(), torch.ones(seq.numel(),
                                                                                               dtype=torch.float64))
                out.extend((per_row[n > 0] / n[n > 0]).tolist())
    rollout.uses += 1
    total = all_reduce_tensor(sums, env)
    tokens = max(float(total[SUMS.index("tokens")]), 1.0)
    metrics = {"entropy": float(total[SUMS.index("entropy")]) / tokens,
               "clip_ratio/low_mean": float(total[SUMS.index("clip_ratio/low_mean")]) / tokens,
               "clip_ratio/high_mean": float(total[SUMS.index("clip_ratio/high_mean")]) / tokens,
               "clip_ratio/region_mean": float(total[SUMS.index("clip_ratio/region_mean")]) / tokens,
               "completion_tokens": int(step_tokens)}
    lows = [v for part in all_gather_objects(seq_low, env) for v in part]
    highs = [v for part in all_gather_objects(seq_high, env) for v in part]
    metrics["clip_ratio/low_min"] = min(lows) if lows else 0.0
    metrics["clip_ratio/high_max"] = max(highs) if highs else 0.0
    if reference is not None:
        metrics["kl"] = float(total[SUMS.index("kl")]) / tokens
    if first:
        gap = all_gather_objects(float(logp_gap), env)
        metrics["sampling/logp_diff_max"] = max(gap)
    return float(total[SUMS.index("loss")]), step_completions, metrics


def _groups(prompts: list[Prompt]) -> tuple[list[list[int]], list[int]]:
    """(each distinct prompt's ids, each row's index among them), for rows whose equal prompts are consecutive."""
    ids, groups = [], []
    for k, p in enumerate(prompts):
        if k == 0 or p is not prompts[k - 1]:
            ids.append(p.ids)
        groups.append(len(ids) - 1)
    return ids, groups


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation ignoring NaNs (Bessel-corrected, as TRL's nanstd)."""
    if dim is None:
        x, dim = x.reshape(-1), 0
    mean = x.nanmean(dim, keepdim=True)
    count = (~x.isnan()).sum(dim, keepdim=True).float()
    var = ((x - mean) ** 2).nanmean(dim, keepdim=True) * count / (count - 1).clamp(min=1)
    return var.sqrt().squeeze(dim)
