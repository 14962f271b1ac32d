"""The training loss: summed token cross-entropy, with the LM head applied only where a label is.

Prompt and padding positions need no logits. Running the backbone, then the output layer on the labelled
positions only, never materialises the (batch, seq, vocab) fp32 logits that a plain forward builds: for SQuAD
the answer is ~3% of the tokens, so the head and the softmax cost ~30x less. Models whose head is not a plain
linear layer fall back to the full forward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.data.tokenize import IGNORE

_UNUSUAL_HEAD = ("logit_scale", "logits_scaling", "output_multiplier_scale", "final_logit_softcapping")


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def _unwrap(model):
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "module", inner)


def _split_head(model):
    """(backbone, head) of a causal LM when its logits are a plain linear map of the last hidden state."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None  # virtual tokens are prepended by PeftModel.forward itself
    inner = _unwrap(model)
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is inner:
        return None
    if any(getattr(inner.config, k, None) not in (None, 1, 1.0) for k in _UNUSUAL_HEAD):
        return None
    return backbone, head


def causal_lm_loss(model, batch: dict[str, torch.Tensor], full_forward: bool = False) -> torch.Tensor:
    """Sum (not mean) of next-token losses over labelled positions; the caller divides by the step's tokens."""
    labels = batch["labels"][:, 1:]
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    split = None if full_forward else _split_head(model)
    if split is None:
        logits = model(**inputs, use_cache=False).logits
        # prompt_tuning / p_tuning return logits for their virtual tokens too: (batch, virtual + seq, vocab)
        logits = logits[:, logits.size(1) - labels.size(1) - 1:-1]
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")
    backbone, head = split
    hidden = backbone(**inputs, use_cache=False).last_hidden_state[:, :-1]
    keep = labels != IGNORE
    logits = head(hidden[keep])  # (label tokens, vocab)
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum")
