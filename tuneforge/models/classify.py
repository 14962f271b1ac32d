"""Sequence classification (model.kind: sequence_classification): the label config that sizes the head and the
optional MLP head. The loss is loss.py's classification_loss; the rules that keep a recipe from mixing
classification with what cannot apply are in config/rules/kind.py.

The model is transformers' own AutoModelForSequenceClassification: it pools the hidden state of each row's last
non-padding token (found from config.pad_token_id, so left and right padding both work) and maps it to the labels.
A batch carries each example's label id at its last token (every other label is -100), so the training loop's
"sum of losses / labelled positions of the whole step" is the per-example mean over micro-batches and ranks."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from tuneforge.config.rules.kind import SEQUENCE_CLASSIFICATION as KIND
from tuneforge.errors import UserError
from tuneforge.models import mlp_head
from tuneforge.models.kind import hub_kwargs, kind_of
from tuneforge.models.layers import transformers_model
from tuneforge.models.mlp_head import with_mlp_head

HEAD_NAMES = ("score", "classifier")  # transformers' attribute for the classifier (decoder LMs / encoders)
HEAD_CODE = "tuneforge_head.py"


def is_classifier(model) -> bool:
    return type(transformers_model(model)).__name__.endswith("ForSequenceClassification")


def classifier_head(model) -> tuple[str, torch.nn.Module]:
    """(attribute name, module) of a classification model's head."""
    inner = transformers_model(model)
    for name in HEAD_NAMES:
        module = getattr(inner, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise UserError(f"{type(inner).__name__} has no classification head named {' or '.join(HEAD_NAMES)}")


def build_classifier_config(model_cfg, names: list[str], tokenizer):
    """The checkpoint's config with the data's labels, the tokenizer's pad id (which the pooling needs; Llama has
    none by default) and the MLP head's shape, so they are saved in config.json and the model reloads as trained."""
    from transformers import AutoConfig


    config = AutoConfig.from_pretrained(model_cfg.name_or_path, **hub_kwargs(model_cfg))
    old = [name for _, name in sorted((getattr(config, "id2label", None) or {}).items())]
    if kind_of(config) == KIND and len(old) != len(names):
        raise UserError(f"model.name_or_path: '{model_cfg.name_or_path}' classifies into {len(old)} labels, the "
                        f"data has {len(names)} ({', '.join(names)}); start from its base model instead")
    if kind_of(config) == KIND and set(old) == set(names) and old != names:
        # the head's rows are in the checkpoint's order: renumbering the labels would swap its predictions
        raise UserError(f"data.labels: '{model_cfg.name_or_path}' numbers its labels {old}; set data.labels to "
                        "that order to keep its head")
    config.id2label = {i: name for i, name in enumerate(names)}
    config.label2id = {name: i for i, name in enumerate(names)}
    config.num_labels = len(names)
    config.problem_type = "single_label_classification"
    config.pad_token_id = tokenizer.pad_token_id
    if model_cfg.head is not None:
        config.tuneforge_head = {"hidden_layers": list(model_cfg.head.hidden_layers),
                                 "dropout": float(model_cfg.head.dropout), "activation": model_cfg.head.activation}
    return config


def classifier_class(config):
    """The class that loads this config: transformers' own, or it with the MLP head when the config names one."""
    from transformers import AutoModelForSequenceClassification


    mapping = AutoModelForSequenceClassification._model_mapping
    if type(config) not in mapping:
        raise UserError(f"model: transformers has no sequence-classification class for {type(config).__name__}")
    base = mapping[type(config)]
    if getattr(config, "tuneforge_head", None) is None:
        return base
    return with_mlp_head(base)


def save_classifier_extras(model, out: Path, adapter: bool) -> None:
    """What a classifier's output needs beyond the weights: for an adapter, the classifier's config.json (labels,
    pad id, head) that the base model must be loaded with; for a full model with an MLP head, the head's code."""
    if adapter:
        inner = transformers_model(model)
        inner.config.architectures = [type(inner).__name__]  # still the base checkpoint's (a causal LM's) until now
        inner.config.save_pretrained(out)
    else:
        save_head_code(model, out)


def save_head_code(model, out: Path) -> None:
    """With an MLP head: write its code beside config.json and point auto_map at it, so plain transformers loads
    the directory with trust_remote_code=True. A linear head needs nothing (transformers' own class)."""

    inner = transformers_model(model)
    if getattr(inner.config, "tuneforge_head", None) is None or not (out / "config.json").is_file():
        return
    base = type(inner).__mro__[1]
    source = Path(mlp_head.__file__).read_text()
    name = f"MLPHead{base.__name__}"
    (out / HEAD_CODE).write_text(source + f"\n\nimport transformers  # noqa: E402\n\n{name} = with_mlp_head("
                                 f"transformers.{base.__name__})\n")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": f"{HEAD_CODE[:-3]}.{name}"}
    config["architectures"] = [name]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def saved_model_config(final: Path):
    """An adapter run of a classifier saves the classifier's config.json beside the adapter: the base model must
    be loaded with it (labels, pad id, head) before the adapter fits. None for anything else."""
    from transformers import AutoConfig


    if not (final / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(str(final))
    return config if kind_of(config) == KIND else None


def head_target_modules(part, model):
    """LoRA / IA3 'all-linear' on a classifier: every linear layer outside the head (peft leaves a linear head
    out, but not the layers of an MLP head, which modules_to_save trains in full)."""
    from torch import nn

    targets = part.target_modules
    if not (isinstance(targets, str) and targets.lower() == "all-linear"):
        return targets
    head, _ = classifier_head(model)
    return sorted({name.rsplit(".", 1)[-1] for name, m in transformers_model(model).named_modules()
                   if isinstance(m, nn.Linear) and name != head and not name.startswith(head + ".")})
