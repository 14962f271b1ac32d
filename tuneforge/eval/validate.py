"""Validation during training (and `tuneforge eval`'s loss): the training loss, summed over the whole validation
set on every rank, divided by its label tokens. Token-weighted, so the score of a set does not depend on how it is
batched, packed or split across ranks."""
from __future__ import annotations

import math

import torch

from tuneforge.distributed import DistEnv, all_reduce_sum, evaluating, inner_model
from tuneforge.eval.classify import validate_classifier
from tuneforge.models.classify import is_classifier
from tuneforge.models.loss import count_label_tokens


@torch.no_grad()
def validate(module, batches, precision, env: DistEnv) -> dict:
    """Token-weighted mean loss over the whole validation set (all ranks' shares), and its perplexity. With
    several named sets ({name: batches}) also val_loss/<name> per set; val_loss is then over all their tokens.
    `module` is the TrainModule (wrapped or not) that trains, so validation runs the training loss."""
    if is_classifier(inner_model(module)):
        return validate_classifier(module, batches, precision, env)
    named = batches if isinstance(batches, dict) else {"": batches}
    sums = {}
    with evaluating(module):
        for name, set_batches in named.items():
            total, tokens = 0.0, 0
            for batch in set_batches:
                with precision.context():
                    total += float(module({k: v.to(env.device) for k, v in batch.items()}))
                tokens += count_label_tokens(batch)
            sums[name] = (all_reduce_sum(total, env), all_reduce_sum(tokens, env))
    loss = sum(t for t, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1)
    out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    if len(named) > 1:
        out.update({f"val_loss/{name}": t / max(n, 1) for name, (t, n) in sums.items()})
    return out
