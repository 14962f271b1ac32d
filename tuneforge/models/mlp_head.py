"""An MLP classification head for transformers sequence-classification models.

This file is self-contained (torch and transformers only) because it is also copied into a run's final/ as
`tuneforge_head.py`, where `AutoModelForSequenceClassification.from_pretrained(final, trust_remote_code=True)` finds
it through the config's `auto_map`. The head's shape lives in the config (`tuneforge_head`), so the same class
rebuilds it from config.json alone."""
from __future__ import annotations

from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


def build_mlp_head(hidden_size: int, num_labels: int, spec: dict) -> nn.Sequential:
    """[dropout, linear, activation] per hidden layer, then dropout and the linear map to the labels."""
    layers: list[nn.Module] = []
    width = hidden_size
    for size in spec["hidden_layers"]:
        layers += [nn.Dropout(spec["dropout"]), nn.Linear(width, size), ACTIVATIONS[spec["activation"]]()]
        width = size
    layers += [nn.Dropout(spec["dropout"]), nn.Linear(width, num_labels)]
    return nn.Sequential(*layers)


def with_mlp_head(base: type) -> type:
    """A subclass of a ...ForSequenceClassification class whose linear classifier (`score` in decoder models,
    `classifier` in encoders) is the MLP of config.tuneforge_head; forward (pooling, loss) is the base class's."""

    def __init__(self, config):
        base.__init__(self, config)
        attribute = next((n for n in ("score", "classifier") if isinstance(getattr(self, n, None), nn.Linear)), None)
        if attribute is None:
            raise ValueError(f"{base.__name__}: its classifier is not one linear layer; an MLP head cannot replace it")
        hidden = config.get_text_config().hidden_size
        setattr(self, attribute, build_mlp_head(hidden, config.num_labels, config.tuneforge_head))
        self.post_init()  # the model's own initialisation for the new layers (from_config; from_pretrained redoes it)

    return type(f"MLPHead{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})
