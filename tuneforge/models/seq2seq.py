"""Encoder-decoder (T5 / BART family) models: the loss, the peft task type and the recipe checks.

The loss runs the model's own forward and takes its logits: T5 scales the decoder output by d_model**-0.5 before a
tied LM head, so the causal path's head-on-labelled-positions-only split (loss.py) would need model-specific
knowledge. Targets are the answer tokens only (a few per example), so the (batch, target, vocab) logits are small
and train.loss_chunk_tokens / train.head_on_labels_only do not apply."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tuneforge.config.schema import Config
from tuneforge.data.tokenize import IGNORE
from tuneforge.errors import UserError
from tuneforge.models.layers import transformers_model

# peft methods that run on an encoder-decoder model; llama_adapter is Llama-only and tuneforge's bottleneck
# adapters hook decoder-only layer stacks.
SEQ2SEQ_PEFT = ("lora", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning")
_MODEL_INPUTS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


def model_config(model):
    return getattr(transformers_model(model), "config", None)


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model_config(model), "is_encoder_decoder", False))


def is_seq2seq_batch(batch: dict) -> bool:
    """Seq2seq batches carry the decoder inputs; their labels line up with them (no shift by one)."""
    return "decoder_input_ids" in batch


def seq2seq_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum (not mean) of the decoder's token losses over labelled positions; the caller divides by the step's
    label tokens, as for a causal LM."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k in _MODEL_INPUTS}, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE,
                           reduction="sum")


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


def check_seq2seq_model(name_or_path: str, config) -> None:
    """The checkpoint names an architecture AutoModelForSeq2SeqLM can build."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING

    if type(config) not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
        raise UserError(f"model.kind: seq2seq, but '{name_or_path}' is a {config.model_type!r} model that "
                        "AutoModelForSeq2SeqLM cannot load")


def check_seq2seq_recipe(cfg: Config) -> None:
    """What a causal-LM recipe may ask for that has no meaning, or no implementation, for an encoder-decoder."""
    from tuneforge.data.prepare import as_sources
    from tuneforge.peft.validate import peft_parts

    if cfg.data.batching == "packing":
        raise UserError("data.batching: packing applies to causal LMs; a seq2seq model pads (use pad_longest or "
                        "group_by_length)")
    if cfg.data.train_on_inputs:
        raise UserError("data.train_on_inputs: a seq2seq model reads the prompt in its encoder and has no loss on "
                        "it; set it to false")
    for source in as_sources(cfg.data.train) + as_sources(cfg.data.validation):
        if source.format == "text":
            raise UserError(f"{source.path}: format text has no prompt for a seq2seq model's encoder; use a format "
                            "with inputs and outputs (input_output, alpaca, squad, chat)")
    if cfg.peft is None and cfg.train.trainable is not None and cfg.train.trainable.top_layers:
        raise UserError("train.trainable.top_layers: counts the layers of a decoder-only stack; for a seq2seq model "
                        r"name what trains with train.trainable.patterns (e.g. ['^decoder\.block\.[45]\.'])")
    for part in peft_parts(cfg.peft):
        if part.method not in SEQ2SEQ_PEFT:
            raise UserError(f"peft.method: {part.method} does not apply to seq2seq models; use one of "
                            f"{', '.join(SEQ2SEQ_PEFT)}")
