"""One recipe `peft` entry -> the HF peft config that implements it (every method but `adapter`, which is ours).

What each method's config holds is its registry entry's (config/peft_methods.py); this module supplies what only
the model can tell: the facts its kwargs builder reads, the task type, and on a classifier the targets outside the
head."""
from __future__ import annotations

import dataclasses

from tuneforge.config.peft_methods import BY_NAME, ModelFacts
from tuneforge.config.schema import PeftConfig
from tuneforge.models.classify import head_target_modules, is_classifier
from tuneforge.models.seq2seq import peft_task_type


def build_peft_config(cfg: PeftConfig, model):
    """The peft config for a method peft implements: its registry entry's config class and kwargs, with the task
    type of `model` (and the facts the kwargs builder reads off it)."""
    import peft

    spec = BY_NAME[cfg.method]
    if not spec.peft_backed:
        raise ValueError(f"peft has no method {cfg.method}")
    common = {"task_type": peft_task_type(model)}
    if is_classifier(model):  # peft then trains and saves the head in full (modules_to_save: score / classifier)
        common = {"task_type": "SEQ_CLS"}
        cfg = dataclasses.replace(cfg, target_modules=head_target_modules(cfg, model))
    return getattr(peft, spec.config_class)(**common, **spec.kwargs(cfg, model_facts(model)))


def model_facts(model) -> ModelFacts:
    """What the registry's kwargs builders may know about `model` (they run without torch or peft)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD

    feedforward = FEEDFORWARD.get(model.config.model_type)
    return ModelFacts(name_or_path=model.name_or_path,
                      num_layers=getattr(model.config, "num_hidden_layers", None),
                      linear_leaves=tuple(linear_leaf_names(model)),
                      default_feedforward=None if feedforward is None else tuple(feedforward))


def linear_leaf_names(model) -> list[str]:
    """Leaf names of the linear layers inside the decoder ('all-linear' without the output layer)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, Conv1D)) and m is not head})
