"""The LM head split: a causal LM's logits as its backbone's last hidden state through its output embedding, so the
loss can run the head on the labelled positions only (models/loss.py, models/preference.py).

That is only the model's own forward where nothing stands between the two: BERT-style heads add a dense layer and a
norm before the output projection (ELECTRA's and RoFormer's change the width too), Gemma 2 soft-caps the logits,
Granite scales them. No list of config keys can know every architecture, so the split is verified: one short forward
of the model compares the head applied to the backbone's output with the model's own logits. The verdict is kept on
the transformers model, so every caller of one loaded model (training, validation, the preference head, eval of a
finished run) gets the same answer from one check."""
from __future__ import annotations

import torch
from torch import nn

from tuneforge.errors import first_line
from tuneforge.models.layers import transformers_model

# Config keys that say the logits are more than a linear map of the last hidden state: a shortcut to the full
# forward that skips the check, not the guard (the check is).
_UNUSUAL_HEAD = ("logit_scale", "logits_scaling", "output_multiplier_scale", "final_logit_softcapping")
_VERDICT = "_tuneforge_head_split"  # attribute on the transformers model: "" = the split is exact, else why not
_PROBE_TOKENS = 8


def split_parts(model) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, head) where the model has both as modules, unchecked; None where it has not (or its logits are known
    not to be a plain map of the last hidden state)."""
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        return None  # virtual tokens are prepended by PeftModel.forward itself
    inner = transformers_model(model)
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(backbone, nn.Module) or not isinstance(head, nn.Module) or backbone is inner:
        return None
    if _unusual_head(inner) is not None:
        return None
    return backbone, head


def _unusual_head(inner) -> str | None:
    return next((k for k in _UNUSUAL_HEAD if getattr(inner.config, k, None) not in (None, 1, 1.0)), None)


def split_head(model) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, head) of a causal LM whose logits are the head applied to the backbone's last hidden state, checked
    for this model (once, then remembered); None where the loss must use the model's full forward."""
    parts = split_parts(model)
    if parts is None:
        return None
    inner = transformers_model(model)
    if getattr(inner, _VERDICT, None) is None:
        set_split_verdict(model, check_split_head(model))
    return parts if getattr(inner, _VERDICT) == "" else None


def set_split_verdict(model, why_not: str | None) -> None:
    """Record the check's outcome (None or "" = exact): a rank that holds no weights (FSDP2's meta skeleton) takes
    rank 0's verdict instead of checking."""
    setattr(transformers_model(model), _VERDICT, why_not or "")


def split_verdict(model) -> str | None:
    """Why the loss uses the full forward for this model (None where the split is used or was never considered)."""
    verdict = getattr(transformers_model(model), _VERDICT, None)
    return verdict or None


@torch.no_grad()
def check_split_head(model) -> str | None:
    """None where the head on the backbone's last hidden state gives the model's own logits for a short input, else
    why not (one clause). The model runs in eval mode (no dropout) and fp32 compute (no autocast); its training mode
    is restored."""
    parts, inner = split_parts(model), transformers_model(model)
    if parts is None:
        peft_config = getattr(model, "active_peft_config", None)
        key = _unusual_head(inner)
        return ("peft's forward prepends the virtual tokens" if peft_config is not None and
                peft_config.is_prompt_learning else f"its config's {key} scales or caps the logits" if key else
                "the model has no separate backbone and output layer")
    backbone, head = parts
    captured = []
    hook = backbone.register_forward_hook(lambda module, args, output: captured.append(_last_hidden(output)))
    device = next((p.device for p in inner.parameters() if p.device.type != "meta"), torch.device("cpu"))
    vocab = inner.get_input_embeddings().num_embeddings
    ids = (torch.arange(_PROBE_TOKENS, device=device) * 7919 % max(vocab - 3, 1) + 3)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            if not captured or captured[0] is None:
                return "the backbone's output has no last hidden state"
            split = head(captured[0])
    except Exception as e:  # noqa: BLE001 - any failure of the split means: use the full forward
        return f"the split forward failed ({first_line(e)})"
    finally:
        hook.remove()
        model.train(was_training)
    logits = logits[:, logits.size(1) - ids.size(1):]  # prompt-learning methods never reach here; kept for safety
    if split.shape != logits.shape:
        return f"the head on the last hidden state gives {tuple(split.shape)} logits, the model {tuple(logits.shape)}"
    scale = logits.abs().max().clamp(min=1.0)
    gap = float((split.float() - logits.float()).abs().max() / scale)
    if gap > 1e-4:
        return f"the head on the last hidden state differs from the model's own logits (max relative gap {gap:.2g})"
    return None


def _last_hidden(output):
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        hidden = output[0]
    return hidden
