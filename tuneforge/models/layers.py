"""Unwrapping a model down to its transformers model, and where its layer stacks, and the attention and MLP blocks
inside its decoder layers, sit."""
from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from tuneforge.errors import UserError

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")


def transformers_model(model) -> nn.Module:
    """The innermost transformers PreTrainedModel under any stack of wrappers: DDP, tuneforge's TrainModule and
    PeftModels, in any order and depth. Unwrapping stops at the first PreTrainedModel: a causal LM holds its own
    backbone as `.model`, like the TrainModule that wraps it. A module that is neither comes back as it is."""
    while not isinstance(model, PreTrainedModel):
        inner = _wrapped(model)
        if inner is None:
            return model
        model = inner
    return model


def _wrapped(module) -> nn.Module | None:
    """The module one wrapper holds, by duck typing: the TrainModule's class lives in the distributed layer, above
    this one, and FSDP2 swaps it for a generated subclass anyway."""
    if hasattr(module, "get_base_model"):  # a PeftModel: the transformers model its adapters sit in (or on)
        return module.get_base_model()
    for name in ("module", "model"):  # DistributedDataParallel's `.module`, TrainModule's `.model`
        inner = getattr(module, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def layer_stacks(model) -> list[tuple[str, nn.ModuleList]]:
    """(qualified name in `model`, ModuleList) of each stack of repeated layers, in module order: the ModuleLists
    of the classes the transformers model declares unsplittable (`_no_split_modules`, its own decoder / encoder
    layer classes), e.g. model.layers of a Llama, transformer.h of a GPT-2, encoder.block and decoder.block of a
    T5. A model that declares none: the first ModuleList as long as its config says it is deep."""
    inner = transformers_model(model)
    declared = set(getattr(inner, "_no_split_modules", None) or ())
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    stacks = [(name, m) for name, m in lists if all(_is_declared(layer, declared) for layer in m)]
    if stacks:
        return stacks
    depth = _depth(inner)
    return [(name, m) for name, m in lists if len(m) == depth][:1]


def _is_declared(layer: nn.Module, declared: set[str]) -> bool:
    # by the class's ancestry, not its own name: FSDP2's fully_shard swaps a layer's class for FSDP<name>
    return any(cls.__name__ in declared for cls in type(layer).__mro__)


def _depth(model) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)


def decoder_layers(model) -> list[nn.Module]:
    """Every repeated layer, bottom to top and encoder before decoder: what FSDP2 shards and torch.compile
    compiles one by one, and what the memory plan counts."""
    return [layer for _, stack in layer_stacks(model) for layer in stack]


def find_decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of a decoder-only model's one stack of layers: partial freezing counts its top
    layers, bottleneck adapters hook each of its layers. An encoder-decoder has two stacks: the recipe rules refuse
    both uses for it (models/seq2seq.py), and this refuses too rather than pick one of them."""
    stacks = layer_stacks(model)
    if len(stacks) == 1:
        return stacks[0]
    if stacks:
        raise UserError(f"this {type(model).__name__} has {len(stacks)} layer stacks "
                        f"({', '.join(name for name, _ in stacks)}), not one stack of decoder layers")
    raise UserError(f"cannot find the {_depth(transformers_model(model))} decoder layers of this "
                    f"{type(model).__name__}")


def find_child(layer: nn.Module, names: tuple[str, ...], what: str) -> tuple[str, nn.Module]:
    for name in names:
        child = getattr(layer, name, None)
        if isinstance(child, nn.Module):
            return name, child
    raise UserError(f"cannot find the {what} block in {type(layer).__name__} (looked for {', '.join(names)})")

