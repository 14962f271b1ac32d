"""Model loading, precision and the training loss."""
from tuneforge.models.load import (count_parameters, load_model, load_model_skeleton, load_tokenizer, resolve_precision,
                                   store_frozen_linears)
from tuneforge.models.loss import causal_lm_loss, count_label_tokens

__all__ = ["causal_lm_loss", "count_label_tokens", "count_parameters", "load_model", "load_model_skeleton",
           "load_tokenizer", "resolve_precision", "store_frozen_linears"]
