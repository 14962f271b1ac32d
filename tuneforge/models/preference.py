"""Preference losses (DPO and its family) and the log-probabilities they compare.

`sequence_logps` runs one forward over both sides of every pair (the layout of data/pairs.py) and sums each
sequence's completion-token log-probabilities. `pair_losses` turns the policy's (and the reference's) sums into one
loss per pair, and the rewards TRL users read; it sums nothing, so the caller divides by the pairs of the whole
step (all micro-batches, all ranks), as SFT divides by the step's label tokens.

With h = (log pi(chosen) - log pi(rejected)) - (log ref(chosen) - log ref(rejected)) and beta, per pair:
  sigmoid  -(1 - e) log s(beta h) - e log s(-beta h)              (DPO; e = label_smoothing, conservative DPO)
  robust   (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e)  (unbiased under a flip rate e)
  hinge    max(0, 1 - beta h)                                      (SLiC)
  ipo      (h_token - 1 / (2 beta))^2, h_token from per-token log-ratios (IPO)
  simpo    -log s(beta (avg pi(chosen) - avg pi(rejected)) - gamma) (no reference; avg = per completion token)
  orpo     -beta log s(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p), p = exp(avg log pi(y)),
           plus the SFT loss on chosen (weight 1)
rewards/chosen is beta (log pi(chosen) - log ref(chosen)) on summed log-probs (ipo too, as TRL logs it); simpo and orpo
report beta x the policy's own length-averaged log-prob."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.tokenize import IGNORE
from tuneforge.models.head import split_head

WITH_SFT = ("orpo",)  # losses with an SFT term on the chosen completion of their own


class HeadLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[targets] per row, over chunks of rows, without keeping any logits.

    A plain linear + log_softmax + gather keeps every chunk's (rows, vocab) fp32 logits and their softmax for
    backward. Here forward keeps only the rows' log-sum-exp; backward recomputes each chunk's logits once and forms
    the gradient g (onehot - softmax) at once. One more head matmul per chunk, ~2 x rows x vocab x 4 bytes less
    memory (0.4 GB for 8 sequences of 250 completion tokens and a 49k vocabulary). Matmuls follow the caller's
    autocast (recorded at forward), the softmax is fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                 else hidden.dtype)
        step = chunk if chunk > 0 else max(1, hidden.size(0))
        out, lses = hidden.new_empty(hidden.size(0), dtype=torch.float32), []
        for start in range(0, hidden.size(0), step):
            logits = _logits(hidden[start:start + step], weight, bias, dtype)
            lse = torch.logsumexp(logits, dim=-1)
            out[start:start + step] = logits.gather(1, targets[start:start + step, None]).squeeze(1) - lse
            lses.append(lse)
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(lses) if lses else out)
        ctx.dtype, ctx.step = dtype, step
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, step = ctx.dtype, ctx.step
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (torch.zeros_like(bias, dtype=torch.float32)
                     if bias is not None and ctx.needs_input_grad[2] else None)
        for start in range(0, hidden.size(0), step):
            h, t, g = hidden[start:start + step], targets[start:start + step], grad_out[start:start + step]
            logits = _logits(h, weight, bias, dtype)
            grad = logits.sub_(lse[start:start + step, None]).exp_().mul_(-g[:, None])  # -g softmax
            grad[torch.arange(t.numel(), device=t.device), t] += g
            grad = grad.to(dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + step] = (grad @ weight.to(dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ h.to(dtype)).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def _logits(h, weight, bias, dtype) -> torch.Tensor:
    return F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()


def sequence_logps(model, batch: dict[str, torch.Tensor], full_forward: bool = False,
                   chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-probabilities, completion tokens) of every sequence of a pair batch, each (2n,):
    pair j's chosen sequence at j, its rejected one at n + j."""
    labels, segments = batch["labels"][:, 1:], batch["segments"][:, 1:]  # position t predicts token t + 1
    keep = labels != IGNORE
    n_seq = 2 * batch["pair_index"].numel()
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    split = None if full_forward else split_head(model)
    if split is None:
        logits = model(**inputs, use_cache=False).logits
        logits = logits[:, logits.size(1) - labels.size(1) - 1:-1][keep].float()
        token_logps = logits.log_softmax(-1).gather(1, labels[keep][:, None]).squeeze(1)
    else:
        backbone, head = split
        hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]
        if type(head) is torch.nn.Linear:
            token_logps = HeadLogProbs.apply(hidden, head.weight, head.bias, labels[keep], chunk_tokens)
        else:  # an adapter or a quantized layer on the head: its own forward
            token_logps = head(hidden).float().log_softmax(-1).gather(1, labels[keep][:, None]).squeeze(1)
    seq = segments[keep]
    sums = token_logps.new_zeros(n_seq).index_add(0, seq, token_logps)
    counts = torch.zeros(n_seq, dtype=torch.long, device=seq.device).index_add(0, seq, torch.ones_like(seq))
    return sums, counts


def pair_losses(loss_type: str, beta: float, policy: torch.Tensor, tokens: torch.Tensor,
                reference: torch.Tensor | None, label_smoothing: float = 0.0,
                simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward, the log-probs the loss used) per pair. `policy`, `tokens` and
    `reference` are (n, 2) tensors: column 0 chosen, column 1 rejected, summed over completion tokens."""
    if loss_type in ("simpo", "orpo"):
        policy = policy / tokens.clamp(min=1)
        chosen, rejected = policy[:, 0], policy[:, 1]
        if loss_type == "simpo":
            loss = -F.logsigmoid(beta * (chosen - rejected) - simpo_gamma)
        else:  # log odds(y) = log p - log(1 - p), with p = exp(average log-prob) < 1
            log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
            loss = -beta * F.logsigmoid(log_odds)
        return loss, beta * chosen.detach(), beta * rejected.detach(), policy
    ratios = policy - reference  # (n, 2): log pi - log ref, per side
    h = ratios[:, 0] - ratios[:, 1]
    if loss_type == "ipo":  # the loss on per-token ratios; the rewards (below) on the summed ones, as TRL logs them
        per_token = ratios / tokens.clamp(min=1)
        h = per_token[:, 0] - per_token[:, 1]
    e = label_smoothing
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * h) * (1 - e) - F.logsigmoid(-beta * h) * e
    elif loss_type == "robust":
        loss = (-F.logsigmoid(beta * h) * (1 - e) + F.logsigmoid(-beta * h) * e) / (1 - 2 * e)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss_type {loss_type}")
    rewards = beta * ratios.detach()
    return loss, rewards[:, 0], rewards[:, 1], policy
