"""Encoder-decoder (T5 / BART family) models: recognising them and their batches, and the peft task type. Their loss
is in loss.py (seq2seq_loss), the recipe rules for them in config/rules/kind.py, the check that a checkpoint is one
in preflight.py.

Their loss runs the model's own forward and takes its logits: T5 scales the decoder output by d_model**-0.5 before a
tied LM head, so the causal path's head-on-labelled-positions-only split (loss.py) would need model-specific
knowledge. Targets are the answer tokens only (a few per example), so the (batch, target, vocab) logits are small
and train.loss_chunk_tokens / train.head_on_labels_only do not apply."""
from __future__ import annotations

import json
from pathlib import Path


from tuneforge.models.layers import transformers_model



def model_config(model):
    return getattr(transformers_model(model), "config", None)


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model_config(model), "is_encoder_decoder", False))


def is_seq2seq_batch(batch: dict) -> bool:
    """Seq2seq batches carry the decoder inputs; their labels line up with them (no shift by one)."""
    return "decoder_input_ids" in batch


def peft_task_type(model) -> str:
    return "SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM"


def is_seq2seq_output(final: Path) -> bool:
    """Whether a run's final/ holds an encoder-decoder: a full model's config, or a peft adapter's task type."""
    for name, key, value in (("config.json", "is_encoder_decoder", True),
                             ("adapter_config.json", "task_type", "SEQ_2_SEQ_LM")):
        try:
            if json.loads((final / name).read_text()).get(key) == value:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return False
