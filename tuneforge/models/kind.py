"""What kind of model a checkpoint holds (causal LM, seq2seq, sequence classifier), the Auto class that loads it,
and the Hub options every transformers `from_pretrained` of the recipe's model takes."""
from __future__ import annotations

import logging

import transformers
from transformers import AutoConfig

from tuneforge.config.schema import ModelConfig
from tuneforge.errors import UserError, first_line

log = logging.getLogger("tuneforge")


def hub_kwargs(cfg: ModelConfig) -> dict:
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.trust_remote_code:
        log.warning("trust_remote_code is on: model code from %s will run", cfg.name_or_path)
    return kwargs


def load_error(cfg: ModelConfig, what: str, e: Exception) -> UserError:
    return UserError(f"model.name_or_path: cannot load {what} from '{cfg.name_or_path}' ({first_line(e)})")


MODEL_KINDS = {"causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
               "sequence_classification": "AutoModelForSequenceClassification"}


def kind_of(config) -> str:
    """The model kind a checkpoint's config names: its architectures' suffix, else is_encoder_decoder."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence_classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal_lm"


def resolve_kind(cfg: ModelConfig, config=None) -> str:
    """model.kind, with auto resolved from the checkpoint's config (read without weights when not given)."""
    if cfg.kind != "auto":
        return cfg.kind
    if config is None:
        try:
            config = AutoConfig.from_pretrained(cfg.name_or_path, **hub_kwargs(cfg))
        except (OSError, ValueError, KeyError) as e:
            raise load_error(cfg, "a model config", e) from None
    return kind_of(config)


def auto_class(kind: str):
    """The transformers Auto class that loads a model of this kind."""
    return getattr(transformers, MODEL_KINDS[kind])
