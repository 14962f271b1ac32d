"""Sampling completions from the policy being trained (online RL): batched, with the KV cache, every row stopping at
eos / end of turn / max_new_tokens, and the log-probability of each sampled token recorded as it is drawn.

The sampler IS the policy: it calls the training model itself (under FSDP2 through the root module, which gathers
the weights), so no copy can fall behind the trained weights. The log-probs are of logits / temperature, the
distribution top-p / top-k then narrow, as TRL records them; with rl.num_iterations 1 they equal the training
forward's (a test), and the run reports the largest gap it sees (sampling/logp_diff_max).

Each completion draws from a random stream of its own, seeded by (run seed, step, the prompt's index in its set,
the completion's number in its group): the same completions whatever the number of processes, the batch they share
or where a resumed run restarts. Gumbel-max sampling: argmax(filtered logits + Gumbel noise) is a draw from the
softmax of the filtered logits."""
from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch

from tuneforge.distributed import DistEnv, all_gather_objects, all_reduce_sum, inner_model
from tuneforge.errors import first_line
from tuneforge.models.layers import transformers_model
from tuneforge.models.policy import _row_batch, completion_logps

_TURN_ENDS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


@dataclass(frozen=True)
class SamplingMode:
    """How completions are sampled for a model (choose_sampling_mode): prompts of different lengths left-padded into
    one batch or one length at a time; positions from the attention mask passed to the model or left to it (a model
    that derives its own, e.g. from the token ids); with the KV cache or each whole sequence at every step."""
    padded: bool = True
    positions: bool = True
    cached: bool = True

    def describe(self) -> str:
        return ", ".join(["left-padded batches" if self.padded else "one prompt length at a time",
                          "positions from the mask" if self.positions else "positions left to the model",
                          "KV cache" if self.cached else "no KV cache"])


@dataclass
class Samples:
    completions: list[list[int]]  # token ids, the stop token included where the row stopped
    logps: list[list[float]]      # log-prob of each token under logits / temperature, as sampled
    truncated: list[bool]         # reached max_new_tokens without a stop token


def stop_token_ids(tokenizer, model) -> set[int]:
    """eos, the generation config's eos ids and the chat template's end-of-turn token where the vocabulary has one."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config_eos = getattr(getattr(inner_model(model), "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos] if config_eos is not None else [])
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _TURN_ENDS if t in vocab and t in str(getattr(tokenizer, "chat_template", "") or ""))
    return {i for i in ids if i is not None}


def sample_key(seed: int, step: int, index: int, number: int) -> int:
    """The seed of one completion's random stream (64-bit mix of its coordinates)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB + number) % (1 << 63)
    x ^= x >> 31
    return (x * 0xD6E8FEB86659FD93) % (1 << 63)


def _filtered(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits with the tokens outside top-k and top-p set to -inf (the likeliest token always kept)."""
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens past the mass top_p (the first never)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(decode, prompts: list[list[int]], keys: list[int], settings: SamplingSettings, pad_id: int,
           stop_ids: set[int], device, precision, env: DistEnv | None = None, lockstep: bool = False,
           groups: list[int] | None = None, mode: SamplingMode = SamplingMode()) -> Samples:
    """Completions drawn by `decode` (the model's forward: TrainModule.decode), one per key: of prompts[i] for row i,
    or with `groups` of prompts[groups[i]], each distinct prompt's prefill then computed once and its KV cache
    shared by its rows (where models/policy.py check_shared_prefix allows). `lockstep` (FSDP2): every process steps
    until every process's rows are done. `mode` (choose_sampling_mode's, for this model) may sample the rows of one
    prompt length at a time, leave the positions to the model, or decode without a KV cache."""
    groups = groups if groups is not None else list(range(len(prompts)))
    if not mode.cached:
        return _sample_uncached(decode, prompts, groups, [torch.Generator().manual_seed(k) for k in keys], settings,
                                pad_id, stop_ids, device, precision, env, lockstep)
    if not mode.padded:
        return _by_prompt_length(decode, prompts, keys, settings, pad_id, stop_ids, device, precision, env, lockstep,
                                 groups, mode)
    n = len(groups)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's next token lands in the same column
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(k) for k in keys]
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    tokens = torch.empty((n, 0), dtype=torch.long, device=device)
    logps = torch.empty((n, 0), dtype=torch.float32, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    keep_last = {"logits_to_keep": 1} if _takes(decode, "logits_to_keep") else {}
    # positions from the mask (left padding), for the models that take them (ALiBi models derive theirs from the mask)
    takes_positions = mode.positions and _takes(decode, "position_ids")

    def place(p):
        return {"position_ids": p} if takes_positions else {}
    with precision.context():
        out = decode(input_ids=ids, attention_mask=mask, use_cache=True, **place(positions), **keep_last)
    cache, logits = getattr(out, "past_key_values", None), out.logits[:, -1].float()
    if cache is None:  # no KV cache (state-space models): each group decoded alone, its whole sequence every step
        return _sample_uncached(decode, prompts, groups, generators, settings, pad_id, stop_ids, device, precision,
                                env, lockstep)
    if n != len(prompts) or groups != list(range(n)):  # each row continues its prompt's cache
        index = torch.tensor(groups, device=device)
        cache.batch_select_indices(index)
        logits, mask, positions = logits[index], mask[index], positions[index]
    for t in range(settings.max_new_tokens):
        token, token_logp = _choose(logits, settings, generators, device)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens = torch.cat([tokens, token[:, None]], 1)
        logps = torch.cat([logps, token_logp[:, None]], 1)
        done = done | torch.isin(token, stops)
        finished = bool(done.all())
        if lockstep:  # every process runs as many forwards (each is a collective under FSDP2)
            finished = all_reduce_sum(int(not finished), env) == 0
        if finished or t == settings.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], 1)
        positions = positions[:, -1:] + 1
        with precision.context():
            out = decode(input_ids=token[:, None], attention_mask=mask, past_key_values=cache, use_cache=True,
                         **place(positions), **keep_last)
        logits = out.logits[:, -1].float()
    return _samples(tokens, logps, stop_ids)


def _samples(tokens: torch.Tensor, logps: torch.Tensor, stop_ids: set[int]) -> Samples:
    """Each row cut after its first stop token (kept); a row without one is truncated."""
    completions, row_logps, truncated = [], [], []
    for row, lp in zip(tokens.tolist(), logps.tolist()):
        end = next((i + 1 for i, tok in enumerate(row) if tok in stop_ids), None)
        completions.append(row[:end] if end else row)
        row_logps.append(lp[:end] if end else lp)
        truncated.append(end is None)
    return Samples(completions, row_logps, truncated)


def _choose(logits: torch.Tensor, settings: SamplingSettings, generators: list, device) -> tuple:
    """(token, its log-prob under logits / temperature) per row: the argmax when greedy, else a Gumbel-max draw from
    the filtered distribution, each row from its own stream."""
    if settings.greedy:
        token = logits.argmax(-1)
        return token, logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1)
    logits = logits / settings.temperature
    noise = torch.stack([-torch.log(-torch.log(torch.rand(logits.size(-1), generator=g).clamp_(1e-20, 1.0)))
                         for g in generators]).to(device)
    token = (_filtered(logits, settings.top_k, settings.top_p) + noise).argmax(-1)
    return token, logits.log_softmax(-1).gather(1, token[:, None]).squeeze(1)


def _sample_uncached(decode, prompts, groups, generators, settings, pad_id, stop_ids, device, precision, env,
                     lockstep) -> Samples:
    """For a model whose forward returns no KV cache: the rows of each distinct prompt together (no padding, which a
    layer that carries state would read), their whole sequence through the model at every step."""
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    out_tokens, out_logps = [None] * len(groups), [None] * len(groups)
    order = sorted(set(groups))
    rounds = all_gather_max(len(order), env) if lockstep else len(order)
    for k in range(rounds):
        g = order[min(k, len(order) - 1)]  # lockstep: a process with fewer prompts repeats its last
        rows = [i for i, gi in enumerate(groups) if gi == g]
        ids = torch.tensor([prompts[g]] * len(rows), dtype=torch.long, device=device)
        tokens = torch.empty((len(rows), 0), dtype=torch.long, device=device)
        logps = torch.empty((len(rows), 0), dtype=torch.float32, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(settings.max_new_tokens):
            with precision.context():
                logits = decode(input_ids=torch.cat([ids, tokens], 1), use_cache=False).logits[:, -1].float()
            token, token_logp = _choose(logits, settings, [generators[i] for i in rows], device)
            token = torch.where(done, torch.full_like(token, pad_id), token)
            tokens, logps = torch.cat([tokens, token[:, None]], 1), torch.cat([logps, token_logp[:, None]], 1)
            done = done | torch.isin(token, stops)
            finished = bool(done.all())
            if lockstep:
                finished = all_reduce_sum(int(not finished), env) == 0
            if finished:
                break
        if k < len(order):
            for j, i in enumerate(rows):
                out_tokens[i], out_logps[i] = tokens[j], logps[j]
    width = max(t.numel() for t in out_tokens)
    padded = torch.stack([torch.cat([t, t.new_full((width - t.numel(),), pad_id)]) for t in out_tokens])
    padded_logps = torch.stack([torch.cat([lp, lp.new_zeros(width - lp.numel())]) for lp in out_logps])
    return _samples(padded, padded_logps, stop_ids)


def all_gather_max(value: int, env: DistEnv) -> int:
    return int(max(all_gather_objects(value, env)))


def _takes(decode, name: str) -> bool:
    """Whether the transformers model under `decode` (a TrainModule's bound method) takes keyword `name`."""
    owner = getattr(decode, "__self__", None)
    try:
        return name in inspect.signature(transformers_model(inner_model(owner)).forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _by_prompt_length(decode, prompts, keys, settings, pad_id, stop_ids, device, precision, env, lockstep,
                      groups, mode) -> Samples:
    """sample() once per prompt length (no padding), the rows put back in their order; under lockstep every process
    takes as many turns (a process with fewer lengths repeats its last, whose samples it drops)."""
    lengths = sorted({len(prompts[g]) for g in groups})
    turns = all_gather_max(len(lengths), env) if lockstep else len(lengths)
    completions, logps, truncated = [None] * len(groups), [None] * len(groups), [None] * len(groups)
    for k in range(turns):
        n = lengths[min(k, len(lengths) - 1)]
        rows = [i for i, g in enumerate(groups) if len(prompts[g]) == n]
        mine = sorted({groups[i] for i in rows})
        got = sample(decode, [prompts[g] for g in mine], [keys[i] for i in rows], settings, pad_id, stop_ids, device,
                     precision, env, lockstep, [mine.index(groups[i]) for i in rows],
                     dataclasses.replace(mode, padded=True))
        if k < len(lengths):
            for j, i in enumerate(rows):
                completions[i], logps[i], truncated[i] = got.completions[j], got.logps[j], got.truncated[j]
    return Samples(completions, logps, truncated)


# The ways to sample, tried in this order until one records the training forward's log-probs: the fastest first.
MODES = (("left-padded batches", "padded", "positions", "cached"), ("positions left to the model", "padded", "cached"),
         ("one prompt length at a time", "positions", "cached"), ("one prompt length at a time, positions left to the "
                                                                   "model", "cached"),
         ("without a KV cache, one prompt at a time",))


@torch.no_grad()
def choose_sampling_mode(model, vocab: int, pad_id: int, device, precision) -> tuple[SamplingMode, str | None, float]:
    """The first way of sampling (MODES) whose recorded log-probs equal the training forward's on the same completions
    (whole rows, no padding before them) for this model in fp32, with prompts of two lengths; where it is not the
    first, why not (one clause); and its largest log-prob gap. Where none does, the closest one."""
    prompts = [[(i * 37) % max(vocab - 3, 1) + 3 for i in range(7)], [(i * 53) % max(vocab - 3, 1) + 3
                                                                      for i in range(3)]]
    groups = [0, 0, 1, 1]
    gaps, reasons = [], []
    for name, *flags in MODES:
        mode = SamplingMode(padded="padded" in flags, positions="positions" in flags, cached="cached" in flags)
        try:
            got = sample(model.forward, [prompts[g] for g in groups], [11, 12, 13, 14], SamplingSettings(5), pad_id,
                         set(), device, precision, mode=mode)
            rows = [prompts[g] + c for g, c in zip(groups, got.completions)]
            want, _ = completion_logps(model, _row_batch(rows, [len(prompts[g]) for g in groups], pad_id, device))
            gap = float((want.cpu() - torch.tensor([lp for row in got.logps for lp in row])).abs().max())
        except Exception as e:  # noqa: BLE001 - this way fails for the model: try the next
            reasons.append(f"{name}: {first_line(e)[:120]}")
            gaps.append((math.inf, mode, name))
            continue
        if gap <= 1e-4:
            return mode, ("; ".join(reasons) or None) if reasons else None, gap
        reasons.append(f"{name}: log-prob gap {gap:.2g}")
        gaps.append((gap, mode, name))
    gap, mode, name = min(gaps, key=lambda g: g[0])
    return mode, f"no way of sampling matches the training forward; closest: {name} ({'; '.join(reasons)})", gap
