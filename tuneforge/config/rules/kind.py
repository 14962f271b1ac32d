"""What a recipe may ask for given the kind of model it trains (model.kind, or what the checkpoint's config.json
resolves `auto` to): an encoder-decoder has no packing and no loss on its prompt, a classifier trains one label per
sequence. The kind is a plain value here: the recipe's own when it names one, the pre-flight's otherwise."""
from __future__ import annotations

from tuneforge.config.peft_methods import CLASSIFIER, SEQ2SEQ
from tuneforge.config.rules.common import fail
from tuneforge.config.rules.peft import peft_parts
from tuneforge.config.schema import Config
from tuneforge.config.sources import as_sources

SEQUENCE_CLASSIFICATION = "sequence_classification"


def check_kind(cfg: Config, kind: str, origin: str | None = None) -> None:
    """Every rule that depends on the model kind."""
    if cfg.preference is not None and kind != "causal_lm":
        fail(origin, f"preference: trains causal language models; this model is {kind}")
    if cfg.rl is not None and kind != "causal_lm":
        fail(origin, f"rl: trains causal language models (the policy samples its completions); this model is {kind}")
    if kind == "seq2seq":
        check_seq2seq_recipe(cfg, origin)
    check_classification_recipe(cfg, kind, origin)


def _sources(cfg: Config) -> list:
    return as_sources(cfg.data.train) + as_sources(cfg.data.validation)


def check_seq2seq_recipe(cfg: Config, origin: str | None = None) -> None:
    """What a causal-LM recipe may ask for that has no meaning, or no implementation, for an encoder-decoder."""
    if cfg.data.batching == "packing":
        fail(origin, "data.batching: packing applies to causal LMs; a seq2seq model pads (use pad_longest or "
                     "group_by_length)")
    if cfg.data.train_on_inputs:
        fail(origin, "data.train_on_inputs: a seq2seq model reads the prompt in its encoder and has no loss on "
                     "it; set it to false")
    for source in _sources(cfg):
        if source.format == "text":
            fail(origin, f"{source.path}: format text has no prompt for a seq2seq model's encoder; use a format "
                         "with inputs and outputs (input_output, alpaca, squad, chat)")
    if cfg.peft is None and cfg.train.trainable is not None and cfg.train.trainable.top_layers:
        fail(origin, "train.trainable.top_layers: counts the layers of a decoder-only stack; for a seq2seq model "
                     r"name what trains with train.trainable.patterns (e.g. ['^decoder\.block\.[45]\.'])")
    for part in peft_parts(cfg.peft):
        if part.method not in SEQ2SEQ:  # the registry says which methods run on an encoder-decoder, and why
            fail(origin, f"peft.method: {part.method} does not apply to seq2seq models; use one of "
                         f"{', '.join(SEQ2SEQ)}")


def check_classification_recipe(cfg: Config, kind: str, origin: str | None = None) -> None:
    """Classification data, heads and labels need a sequence classifier; a classifier needs classification data
    and none of what language modelling asks for."""
    if kind != SEQUENCE_CLASSIFICATION:
        check_no_classification(cfg, kind, origin)
        return
    bad = next((s for s in _sources(cfg) if s.format != "classification"), None)
    if bad is not None:
        fail(origin, f"data: {bad.path} has format {bad.format}; model.kind {SEQUENCE_CLASSIFICATION} trains on "
                     "format classification (a text and a label per row)")
    if cfg.data.batching == "packing":
        fail(origin, "data.batching: packing does not apply to sequence_classification (one label per "
                     "sequence); use pad_longest or group_by_length")
    if cfg.data.train_on_inputs:
        fail(origin, "data.train_on_inputs: applies to language modelling, not to sequence_classification")
    for part in peft_parts(cfg.peft):
        if part.method not in CLASSIFIER:  # methods whose peft config keeps the head trainable (modules_to_save)
            fail(origin, f"peft.method: {part.method} is not supported with sequence_classification (the "
                         f"head must train beside the adapter); use {' or '.join(CLASSIFIER)}")
    if cfg.eval.squad is not None:
        fail(origin, "eval.squad: generates answers; a sequence_classification run reports accuracy and F1")


def check_no_classification(cfg: Config, kind: str, origin: str | None = None) -> None:
    """A language model (causal or seq2seq) takes none of the classification settings."""
    if any(s.format == "classification" for s in _sources(cfg)):
        fail(origin, f"data format classification needs model.kind: {SEQUENCE_CLASSIFICATION} (the model resolves "
                     f"to {kind})")
    if cfg.model.head is not None:
        fail(origin, f"model.head: applies to model.kind: {SEQUENCE_CLASSIFICATION} only (this model is {kind})")
    if cfg.data.labels is not None:
        fail(origin, f"data.labels: applies to classification data (model.kind: {SEQUENCE_CLASSIFICATION}) only")
    if cfg.train.trainable is not None and cfg.train.trainable.head:
        fail(origin, f"train.trainable.head: applies to model.kind: {SEQUENCE_CLASSIFICATION} only (use lm_head "
                     f"for {kind})")
