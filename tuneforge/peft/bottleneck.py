"""Bottleneck adapters (Houlsby et al. 2019), tuneforge's own method: peft has no such tuner.

After the attention block and after the MLP block of every decoder layer, the block's output h becomes
h + up(act(down(h))), with down: hidden -> bottleneck_size and up: bottleneck_size -> hidden. `up` starts at zero,
so a fresh adapter leaves the model exactly as it was. Each adapter is registered as a child named `bottleneck` of
the block it follows (model.layers.3.mlp.bottleneck.down.weight) and runs from a forward hook, so no module of
the base model is replaced and peft adapters on the same model keep their parameter names.

On disk (a directory, e.g. final/ or final/adapter/):
  bottleneck_adapter_config.json   {"format": "tuneforge-bottleneck", "version": 1, "bottleneck_size": 16,
                                    "activation": "relu", "hidden_size": 64, "sites": ["model.layers.0.self_attn",
                                    "model.layers.0.mlp", ...], "base_model_name_or_path": "..."}
  bottleneck_adapter.safetensors   for each site s: s.bottleneck.down.{weight,bias}, s.bottleneck.up.{weight,bias}
                                   (fp32; names relative to the transformers model)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tuneforge.errors import UserError
from tuneforge.models.layers import ATTENTION_NAMES, MLP_NAMES, find_child, find_decoder_layers

CONFIG_NAME = "bottleneck_adapter_config.json"
WEIGHTS_NAME = "bottleneck_adapter.safetensors"
FORMAT = "tuneforge-bottleneck"
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """Residual bottleneck: (..., hidden) -> (..., size) -> (..., hidden), added to its input by the hook."""

    def __init__(self, hidden: int, size: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _add_after(module: nn.Module, output):
    # Attention blocks return (hidden, attn_weights, ...); MLP blocks return the hidden tensor.
    if isinstance(output, tuple):
        return (module.bottleneck(output[0]),) + output[1:]
    return module.bottleneck(output)


def find_sites(model) -> list[str]:
    """Qualified names of each decoder layer's attention block and MLP block, bottom to top."""
    prefix, layers = find_decoder_layers(model)
    sites = []
    for i, layer in enumerate(layers):
        for names, what in ((ATTENTION_NAMES, "attention"), (MLP_NAMES, "MLP")):
            child, _ = find_child(layer, names, what)
            sites.append(f"{prefix}.{i}.{child}")
    return sites


def hidden_size_of(model) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def apply_bottleneck(model, size: int, activation: str, sites: list[str] | None = None) -> list[str]:
    """Add adapters in place to a transformers model; only they are trainable afterwards. Returns the sites."""
    sites = sites or find_sites(model)
    hidden = hidden_size_of(model)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    for site in sites:
        if site not in modules:
            raise UserError(f"bottleneck adapter: this model has no module {site}")
        block = modules[site]
        block.bottleneck = Bottleneck(hidden, size, activation).to(device)
        block.register_forward_hook(lambda module, args, output: _add_after(module, output))
    return sites


def bottleneck_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().contiguous().cpu() for n, p in model.named_parameters() if ".bottleneck." in n}


def has_bottleneck(model) -> bool:
    return any(isinstance(m, Bottleneck) for m in model.modules())


def save_bottleneck(model, out: Path, base_model_name_or_path: str) -> None:
    """Write the documented format: a json config and one safetensors file (no pickle)."""
    out.mkdir(parents=True, exist_ok=True)
    sites = [name[: -len(".bottleneck")] for name, m in model.named_modules() if isinstance(m, Bottleneck)]
    first = next(m for m in model.modules() if isinstance(m, Bottleneck))
    act = next(k for k, v in _ACTIVATIONS.items() if isinstance(first.act, v))
    config = {"format": FORMAT, "version": 1, "bottleneck_size": first.down.out_features, "activation": act,
              "hidden_size": first.down.in_features, "sites": sites, "base_model_name_or_path": base_model_name_or_path}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=1) + "\n")
    save_file(bottleneck_state(model), out / WEIGHTS_NAME, metadata={"format": FORMAT})


def load_bottleneck(model, directory: Path) -> None:
    """Attach the adapters saved in `directory` to a transformers model (in place) with their trained weights."""
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{directory}: cannot read {CONFIG_NAME} ({e})") from None
    if config.get("format") != FORMAT or config.get("version") != 1:
        raise UserError(f"{directory / CONFIG_NAME}: not a {FORMAT} v1 adapter config")
    if config["hidden_size"] != hidden_size_of(model):
        raise UserError(f"{directory}: adapter hidden size {config['hidden_size']} does not match the model's "
                        f"{hidden_size_of(model)}")
    apply_bottleneck(model, config["bottleneck_size"], config["activation"], config["sites"])
    weights = load_file(directory / WEIGHTS_NAME)
    expected = set(bottleneck_state(model))
    if set(weights) != expected:
        missing = sorted(expected - set(weights)) or sorted(set(weights) - expected)
        raise UserError(f"{directory / WEIGHTS_NAME}: tensors do not match the config (e.g. {missing[0]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
