"""Online RL (GRPO and its loss family): the policy's per-token log-probabilities of sampled completions, and the
clipped surrogate loss of a micro-batch, normalised as the recipe's rl.loss_type says.

An RL batch is right-padded rows of prompt + completion, labels -100 except on completion tokens, and a scalar
`temperature`: the log-probs are of logits / temperature (the distribution the sampler drew from before top-p / top-k,
as TRL defines them). The LM head runs on completion positions only and never materialises full logits
(models/preference.py HeadLogProbs), as SFT and DPO do.

Per completion token t of completion i, with advantage A_i, ratio r = exp(log pi - log pi_old):
  loss_t = -min(r A_i, clip(r, 1 - epsilon, 1 + epsilon_high) A_i) + beta [r] (exp(ref - log pi) - (ref - log pi) - 1)
where the factor r on the KL term is there with rl.kl_ratio_correction (the default, as TRL's)
and the step's loss (S completions, T completion tokens in the whole step, over micro-batches and processes):
  grpo     sum_i (sum_t loss_t / n_i) / S          dapo  sum_t loss_t / T
  dr_grpo  sum_t loss_t / (S x max_completion_length)
  bnpo     mean over micro-batches of (sum over the micro-batch's tokens / its tokens): TRL's, which depends on
           how the step is split."""
from __future__ import annotations

import math

import torch

from tuneforge.data.tokenize import IGNORE
from tuneforge.errors import first_line
from tuneforge.models.head import split_head
from tuneforge.models.preference import HeadLogProbs

# the metric sums a micro-batch adds up, in this order (token sums unless said)
SUMS = ("loss", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "tokens")


def is_rl_batch(batch: dict) -> bool:
    return "temperature" in batch


def completion_mask(batch: dict) -> torch.Tensor:
    """(rows, positions) True at the completion tokens completion_logps returns, in its (row-major) order."""
    labels = batch["labels"] if "prompt_ids" in batch else batch["labels"][:, 1:]
    return labels != IGNORE


def completion_logps(model, batch: dict[str, torch.Tensor], full_forward: bool = False,
                     chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) of every completion token of an RL batch, flat in row-major order, both (tokens,).

    Two layouts: whole rows (prompt + completion, labels on the completion), or a shared prefix (`prompt_ids`: each
    distinct prompt once, left-padded; `group`: each row's prompt; `input_ids`: the completions alone, labels
    aligned with them). The shared prefix runs each prompt's forward once for its whole group and the completions on
    its KV cache: the same numbers (checked per model, `check_shared_prefix`) for a fraction of the compute, since a
    prompt is usually many times longer than a completion. Gradients flow through the cache into the prompt's
    forward, as they would through the prompt positions of whole rows."""
    scale = 1.0 / float(batch["temperature"])
    split = None if full_forward else split_head(model)
    shared = "prompt_ids" in batch
    labels = batch["labels"] if shared else batch["labels"][:, 1:]  # whole rows: position t predicts token t + 1
    keep = completion_mask(batch)
    targets = labels[keep]
    plain_head = split is not None and type(split[1]) is torch.nn.Linear
    if split is not None:
        hidden = (_shared_prefix_hidden(split[0], batch) if shared else split[0](
            **_row_inputs(batch), use_cache=False).last_hidden_state[:, :-1])[keep]
        if plain_head:
            entropy = hidden.new_empty(hidden.size(0), dtype=torch.float32)
            logps = HeadLogProbs.apply(hidden, split[1].weight, split[1].bias, targets, chunk_tokens, scale, entropy)
            return logps, entropy
        logits = split[1](hidden).float() * scale  # an adapter or a quantized layer on the head: its own forward
    elif shared:
        logits = _shared_prefix_hidden(model, batch, logits=True)[keep].float() * scale
    else:
        logits = model(**_row_inputs(batch), use_cache=False).logits
        logits = logits[:, logits.size(1) - labels.size(1) - 1:-1][keep].float() * scale
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.detach().exp() * logp_all.detach()).sum(-1)
    return logp_all.gather(1, targets[:, None]).squeeze(1), entropy


def _row_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}


def _shared_prefix_hidden(module, batch: dict, logits: bool = False) -> torch.Tensor:
    """(rows, completion tokens, hidden) states (or logits) whose position j predicts completion token j: the
    prompt's last state for j = 0, then the completion's own. `module` is the backbone (or the whole model for
    logits)."""
    prompt_mask, group = batch["prompt_mask"], batch["group"]
    prompt_pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = module(input_ids=batch["prompt_ids"], attention_mask=prompt_mask, position_ids=prompt_pos, use_cache=True)
    cache = out.past_key_values
    cache.batch_select_indices(group)  # each row's prompt: an index, so gradients add up over the group
    completion = batch["input_ids"]
    positions = prompt_mask.sum(-1)[group][:, None] + torch.arange(completion.size(1), device=completion.device)
    mask = torch.cat([prompt_mask[group], batch["attention_mask"]], dim=1)
    rest = module(input_ids=completion, attention_mask=mask, position_ids=positions, past_key_values=cache,
                  use_cache=True)
    states = (out.logits, rest.logits) if logits else (out.last_hidden_state, rest.last_hidden_state)
    return torch.cat([states[0][:, -1:][group], states[1][:, :-1]], dim=1)


@torch.no_grad()
def check_shared_prefix(forward, vocab: int, pad_id: int, device) -> str | None:
    """None where the shared-prefix layout gives whole rows' log-probs for this model, else why not (one clause).
    `forward(batch)` is the training module's (eval mode, fp32: the caller's), run on the same short prompts and
    completions in both layouts."""
    def token(i: int) -> int:
        return int(i * 7919 % max(vocab - 3, 1) + 3)

    prompts = [[token(i) for i in range(7)], [token(i) for i in range(20, 24)]]
    completions = [[token(i) for i in range(40, 45)], [token(i) for i in range(50, 52)]] * 2
    group = [0, 0, 1, 1]
    whole = _row_batch([prompts[g] + c for g, c in zip(group, completions)], [len(prompts[g]) for g in group],
                       pad_id, device)
    try:
        want, got = forward(whole)[0], forward(_shared_batch(prompts, group, completions, pad_id, device))[0]
    except Exception as e:  # noqa: BLE001 - any failure means: whole rows
        return f"its forward on a shared KV cache failed ({first_line(e)})"
    gap = float((want - got).abs().max()) if want.shape == got.shape else math.inf
    if gap > 1e-4:
        return f"completions on the shared prompt cache differ from whole rows (max log-prob gap {gap:.2g})"
    return None


def _row_batch(rows: list[list[int]], prompt_lens: list[int], pad_id: int, device) -> dict:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, n) in enumerate(zip(rows, prompt_lens)):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, n:len(row)] = ids[i, n:len(row)]
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device),
            "temperature": torch.tensor(1.0)}


def _shared_batch(prompts: list[list[int]], group: list[int], completions: list[list[int]], pad_id: int,
                  device) -> dict:
    p_width, c_width = max(len(p) for p in prompts), max(max(len(c) for c in completions), 1)
    prompt_ids = torch.full((len(prompts), p_width), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), p_width), dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every prompt ends in the last column
        prompt_ids[i, p_width - len(p):] = torch.tensor(p)
        prompt_mask[i, p_width - len(p):] = 1
    ids = torch.full((len(completions), c_width), pad_id, dtype=torch.long)
    labels = torch.full((len(completions), c_width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(completions), c_width), dtype=torch.long)
    for i, c in enumerate(completions):
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        labels[i, :len(c)] = ids[i, :len(c)]
        mask[i, :len(c)] = 1
    return {"prompt_ids": prompt_ids.to(device), "prompt_mask": prompt_mask.to(device),
            "group": torch.tensor(group, device=device), "input_ids": ids.to(device),
            "attention_mask": mask.to(device), "labels": labels.to(device), "temperature": torch.tensor(1.0)}


def token_losses(logps: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, reference: torch.Tensor | None,
                 epsilon: float, epsilon_high: float, beta: float,
                 kl_ratio_correction: bool = True) -> tuple[torch.Tensor, dict]:
    """Per-token loss (tokens,) and the per-token values its metrics average (kl, clipped flags)."""
    coef = torch.exp(logps - old)
    clipped = torch.clamp(coef, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(coef * advantages, clipped * advantages)
    parts = {}
    if reference is not None and beta != 0:
        kl = torch.exp(reference - logps) - (reference - logps) - 1
        # x ratio: the unbiased reverse-KL gradient (DeepSeek-V3.2; TRL's use_bias_correction_kl); the metric is
        # the KL estimate itself
        loss = loss + beta * (kl * coef if kl_ratio_correction else kl)
        parts["kl"] = kl.detach()
    with torch.no_grad():
        low = (coef < 1 - epsilon) & (advantages < 0)
        high = (coef > 1 + epsilon_high) & (advantages > 0)
        parts.update(low=low.float(), high=high.float(), region=(low | high).float())
    return loss, parts


def micro_batch_loss(loss_type: str, losses: torch.Tensor, seq: torch.Tensor, rows: int, step_completions: int,
                     step_tokens: int, micro_tokens: int, micro_batches: int, max_completion_length: int,
                     world_size: int) -> torch.Tensor:
    """This micro-batch's share of the step's loss (summed over micro-batches and processes it is the step's loss),
    from its per-token losses `losses` and each token's row `seq`. `rows` = the micro-batch's completions."""
    if loss_type == "grpo":
        counts = torch.zeros(rows, dtype=losses.dtype, device=losses.device).index_add_(0, seq,
                                                                                       torch.ones_like(losses))
        per_seq = torch.zeros(rows, dtype=losses.dtype, device=losses.device).index_add(0, seq, losses)
        return (per_seq / counts.clamp(min=1)).sum() / step_completions
    if loss_type == "dapo":
        return losses.sum() / max(step_tokens, 1)
    if loss_type == "dr_grpo":
        return losses.sum() / (step_completions * max_completion_length)
    if loss_type == "bnpo":
        return losses.sum() / max(micro_tokens, 1) / (micro_batches * world_size)
    raise ValueError(f"unknown rl.loss_type {loss_type}")
