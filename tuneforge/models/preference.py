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
  bco_pair -log s(beta r(chosen)) - log s(-beta r(rejected)), r = log pi - log ref (TRL's bco_pair)
  simpo    -log s(beta (avg pi(chosen) - avg pi(rejected)) - gamma) (no reference; avg = per completion token)
  orpo     -beta log s(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p), p = exp(avg log pi(y)),
           plus the SFT loss on chosen (weight 1)
rewards/chosen is beta (log pi(chosen) - log ref(chosen)) on summed log-probs (ipo too, as TRL logs it); simpo and orpo
report beta x the policy's own length-averaged log-prob.

Which losses exist, and what is true of each (reference-free, an SFT term of its own, the fields that apply), is
config/preference_losses.py; each entry names its function here (`LOSS_FUNCTIONS`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from tuneforge.config.preference_losses import BY_NAME, LOSSES
from tuneforge.data.tokenize import IGNORE
from tuneforge.models.head import split_head


class HeadLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[targets] per row, over chunks of rows, without keeping any logits.

    A plain linear + log_softmax + gather keeps every chunk's (rows, vocab) fp32 logits and their softmax for
    backward. Here forward keeps only the rows' log-sum-exp; backward recomputes each chunk's logits once and forms
    the gradient g (onehot - softmax) at once. One more head matmul per chunk, ~2 x rows x vocab x 4 bytes less
    memory (0.4 GB for 8 sequences of 250 completion tokens and a 49k vocabulary). Matmuls follow the caller's
    autocast (recorded at forward), the softmax is fp32. `scale` multiplies the logits (online RL: 1 / temperature);
    `entropy`, a (rows,) fp32 tensor, is filled with each row's entropy of that distribution (a metric, no gradient)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, scale: float = 1.0, entropy=None):
        dtype = (torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type)
                 else hidden.dtype)
        step = chunk if chunk > 0 else max(1, hidden.size(0))
        out, lses = hidden.new_empty(hidden.size(0), dtype=torch.float32), []
        for start in range(0, hidden.size(0), step):
            logits = _logits(hidden[start:start + step], weight, bias, dtype, scale)
            lse = torch.logsumexp(logits, dim=-1)
            out[start:start + step] = logits.gather(1, targets[start:start + step, None]).squeeze(1) - lse
            if entropy is not None:  # H = lse - sum(p * logits), filled in place: a metric, no gradient
                entropy[start:start + step] = lse - (logits.sub(lse[:, None]).exp_() * logits).sum(-1)
            lses.append(lse)
        ctx.save_for_backward(hidden, weight, bias, targets, torch.cat(lses) if lses else out)
        ctx.dtype, ctx.step, ctx.scale = dtype, step, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, step, scale = ctx.dtype, ctx.step, ctx.scale
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = (torch.zeros_like(bias, dtype=torch.float32)
                     if bias is not None and ctx.needs_input_grad[2] else None)
        for start in range(0, hidden.size(0), step):
            h, t, g = hidden[start:start + step], targets[start:start + step], grad_out[start:start + step]
            logits = _logits(h, weight, bias, dtype, scale)
            grad = logits.sub_(lse[start:start + step, None]).exp_().mul_(-g[:, None])  # -g softmax
            grad[torch.arange(t.numel(), device=t.device), t] += g
            grad = (grad * scale if scale != 1.0 else grad).to(dtype)  # logits / temperature: the chain rule's factor
            if grad_hidden is not None:
                grad_hidden[start:start + step] = (grad @ weight.to(dtype)).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (grad.t() @ h.to(dtype)).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


def _logits(h, weight, bias, dtype, scale: float = 1.0) -> torch.Tensor:
    logits = F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    return logits.mul_(scale) if scale != 1.0 else logits


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


@dataclass(frozen=True)
class PairLogps:
    """What a loss function reads of n pairs: (n, 2) tensors, column 0 chosen, column 1 rejected, and the settings."""
    policy: torch.Tensor  # the policy's log-probs: per completion token for a reference-free loss, else summed
    ratios: torch.Tensor | None  # log pi - log ref, summed over completion tokens; None for a reference-free loss
    tokens: torch.Tensor  # completion tokens
    beta: float
    label_smoothing: float
    simpo_gamma: float

    @property
    def margin(self) -> torch.Tensor:
        """h = (log pi - log ref)(chosen) - (log pi - log ref)(rejected), per pair."""
        return self.ratios[:, 0] - self.ratios[:, 1]


def sigmoid_loss(x: PairLogps) -> torch.Tensor:
    h, e = x.margin, x.label_smoothing
    return -F.logsigmoid(x.beta * h) * (1 - e) - F.logsigmoid(-x.beta * h) * e


def robust_loss(x: PairLogps) -> torch.Tensor:
    h, e = x.margin, x.label_smoothing
    return (-F.logsigmoid(x.beta * h) * (1 - e) + F.logsigmoid(-x.beta * h) * e) / (1 - 2 * e)


def hinge_loss(x: PairLogps) -> torch.Tensor:
    return torch.relu(1 - x.beta * x.margin)


def ipo_loss(x: PairLogps) -> torch.Tensor:
    per_token = x.ratios / x.tokens.clamp(min=1)  # the loss on per-token ratios; the rewards on the summed ones
    h = per_token[:, 0] - per_token[:, 1]
    return (h - 1 / (2 * x.beta)) ** 2


def bco_pair_loss(x: PairLogps) -> torch.Tensor:
    # a binary classifier per side: chosen's reward beta (log pi - log ref) pushed above 0, rejected's below 0
    return -F.logsigmoid(x.beta * x.ratios[:, 0]) - F.logsigmoid(-(x.beta * x.ratios[:, 1]))


def simpo_loss(x: PairLogps) -> torch.Tensor:
    chosen, rejected = x.policy[:, 0], x.policy[:, 1]
    return -F.logsigmoid(x.beta * (chosen - rejected) - x.simpo_gamma)


def orpo_loss(x: PairLogps) -> torch.Tensor:
    chosen, rejected = x.policy[:, 0], x.policy[:, 1]
    # log odds(y) = log p - log(1 - p), with p = exp(average log-prob) < 1
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return -x.beta * F.logsigmoid(log_odds)


def _loss_functions() -> dict[str, Callable[[PairLogps], torch.Tensor]]:
    """{loss_type: its function}, one per entry of config/preference_losses.py, found by the name the entry gives."""
    here = globals()
    missing = [f"{loss.name} ({loss.function})" for loss in LOSSES if not callable(here.get(loss.function))]
    if missing:
        raise ImportError(f"models/preference.py has no function for preference loss {', '.join(missing)}")
    return {loss.name: here[loss.function] for loss in LOSSES}


LOSS_FUNCTIONS = _loss_functions()


def pair_losses(loss_type: str, beta: float, policy: torch.Tensor, tokens: torch.Tensor,
                reference: torch.Tensor | None, label_smoothing: float = 0.0,
                simpo_gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward, the log-probs the loss used) per pair. `policy`, `tokens` and
    `reference` are (n, 2) tensors: column 0 chosen, column 1 rejected, summed over completion tokens."""
    if loss_type not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown preference loss_type {loss_type}")
    if BY_NAME[loss_type].reference_free:
        policy = policy / tokens.clamp(min=1)
        loss = LOSS_FUNCTIONS[loss_type](PairLogps(policy, None, tokens, beta, label_smoothing, simpo_gamma))
        return loss, beta * policy[:, 0].detach(), beta * policy[:, 1].detach(), policy
    ratios = policy - reference  # (n, 2): log pi - log ref, per side
    loss = LOSS_FUNCTIONS[loss_type](PairLogps(policy, ratios, tokens, beta, label_smoothing, simpo_gamma))
    rewards = beta * ratios.detach()
    return loss, rewards[:, 0], rewards[:, 1], policy
