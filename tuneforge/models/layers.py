"""Where the decoder layers, and the attention and MLP blocks inside them, sit in a transformers causal LM."""
from __future__ import annotations

from torch import nn

from tuneforge.errors import UserError

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def find_decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the stack of decoder layers: the ModuleList as long as the model is deep."""
    config = model.config
    depth = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth and len(module) > 0:
            return name, module
    raise UserError(f"cannot find the {depth} decoder layers of this {type(model).__name__}")


def find_child(layer: nn.Module, names: tuple[str, ...], what: str) -> tuple[str, nn.Module]:
    for name in names:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return name, child
    raise UserError(f"cannot find the {what} block in {type(layer).__name__} (looked for {', '.join(names)})")
