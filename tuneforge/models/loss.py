"""The training loss of every model kind: `training_loss` picks causal LM, seq2seq or classifier; each sums (never
averages) over its labelled positions, and `count_label_tokens` counts the same positions for the division.

For a causal LM the LM head is applied only where a label is.

Prompt and padding positions need no logits. Running the backbone, then the output layer on the labelled
positions only, never materialises the (batch, seq, vocab) fp32 logits that a plain forward builds: for SQuAD
the answer is ~3% of the tokens, so the head and the softmax cost ~30x less. The labelled positions then go through
the head and the cross-entropy in chunks whose gradient is formed at once (see HeadCrossEntropy), so even a run
with a loss on every token (train_on_inputs, pretraining-style data) holds one chunk of fp32 logits at a time.
The split is checked for each model (models/head.py): where the head is more than the output layer, the loss uses the
model's full forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.pairs import is_pair_batch
from tuneforge.data.tokenize import IGNORE
from tuneforge.models.classify import is_classifier
from tuneforge.models.head import split_head
from tuneforge.models.policy import completion_logps, is_rl_batch
from tuneforge.models.preference import sequence_logps
from tuneforge.models.seq2seq import is_seq2seq_batch

_SEQ2SEQ_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


def training_loss(model, batch: dict[str, torch.Tensor], full_forward: bool = False, chunk_tokens: int = 1024,
                  with_logits: bool = False):
    """The summed (not averaged) loss of one batch, whatever the model: the one place that decides which loss a
    batch gets. The caller divides by count_label_tokens summed over the whole step (all micro-batches and ranks),
    which counts the same positions this sums over. `with_logits` (classifiers, for validation) also returns the
    counted rows' logits and label ids."""
    if is_seq2seq_batch(batch):
        return seq2seq_loss(model, batch)
    if is_pair_batch(batch):  # preference pairs: per-sequence log-probs, for the preference loss of the step
        return sequence_logps(model, batch, full_forward=full_forward, chunk_tokens=chunk_tokens)
    if is_rl_batch(batch):  # sampled completions: per-token log-probs and entropies, for the RL loss of the step
        return completion_logps(model, batch, full_forward=full_forward, chunk_tokens=chunk_tokens)
    if is_classifier(model):  # one label per sequence
        return classification_loss(model, batch, with_logits)
    return causal_lm_loss(model, batch, full_forward=full_forward, chunk_tokens=chunk_tokens)


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The positions training_loss sums over: what a step's loss is divided by."""
    if is_seq2seq_batch(batch):  # decoder labels line up with the decoder inputs: every one is a target
        return int((batch["labels"] != IGNORE).sum())
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class HeadCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)) over chunks of rows.

    Each chunk's logits live only inside forward: the gradient of the summed loss with respect to the logits,
    softmax - onehot, is known there, so forward also forms the chunk's gradients of hidden, weight and bias and
    drops the logits; backward only scales them by the incoming gradient. Autograd through a plain
    linear + cross_entropy would keep every chunk's logits (and their softmax) alive until backward. The matmuls
    follow the caller's autocast like the layer would; the softmax is fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        step = chunk if chunk > 0 else max(1, hidden.size(0))
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        matrix = weight.to(dtype)  # once for every chunk and both products (a vocab x hidden copy under autocast)
        for start in range(0, hidden.size(0), step):
            h, t = hidden[start:start + step], targets[start:start + step]
            logits = F.linear(h.to(dtype), matrix, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(t.numel(), device=t.device), t] -= 1
            grad = grad.to(dtype)
            grad_hidden[start:start + step] = grad @ matrix
            if grad_weight is not None:
                grad_weight += (grad.t() @ h.to(grad.dtype)).float()
            if grad_bias is not None:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(weight_dtype),
                None if grad_bias is None else (grad_bias * grad_total).to(bias_dtype), None, None)


def causal_lm_loss(model, batch: dict[str, torch.Tensor], full_forward: bool = False,
                   chunk_tokens: int = 1024) -> torch.Tensor:
    """Sum (not mean) of next-token losses over labelled positions; the caller divides by the step's tokens."""
    labels = batch["labels"][:, 1:]  # (rows, seq - 1): position t predicts token t + 1
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    split = None if full_forward else split_head(model)
    if split is None:
        logits = model(**inputs, use_cache=False).logits
        # prompt_tuning / p_tuning return logits for their virtual tokens too: (batch, virtual + seq, vocab)
        logits = logits[:, logits.size(1) - labels.size(1) - 1:-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    backbone, head = split
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]  # (rows, seq - 1, hidden): the last
    keep = labels != IGNORE  # position predicts nothing; hidden[keep] is (label tokens, hidden), the head's input
    if type(head) is torch.nn.Linear:
        return HeadCrossEntropy.apply(hidden[keep], head.weight, head.bias, labels[keep], chunk_tokens)
    # an adapter or a quantized layer on the head: its own forward, on the labelled positions only
    return F.cross_entropy(head(hidden[keep]).float(), labels[keep], reduction="sum")


def seq2seq_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of the decoder's token losses over labelled positions; the caller divides by the step's
    label tokens, as for a causal LM."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k in _SEQ2SEQ_INPUTS}, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


def classification_loss(model, batch: dict[str, torch.Tensor], with_logits: bool = False):
    """Summed cross-entropy over the batch's examples (rows whose labels are all -100, e.g. a rank's filler batch,
    count for nothing); with_logits also returns (logits, label ids) of the counted rows."""
    labels = batch["labels"][:, 1:].max(dim=1).values  # the one label id of each row, -100 for a filler row
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    keep = labels != IGNORE
    loss = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
    return (loss, logits[keep].detach(), labels[keep]) if with_logits else loss
