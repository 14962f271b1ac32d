"""Does a run's saved adapter fit the base model it is about to be loaded onto?

Checked on the model's skeleton (meta device: the structure from config.json, no weights) and the adapter files'
headers, before any weights load: a base model of another architecture, size or module naming gives one line that
names the adapter file and what the base model expects, instead of a shape error from deep inside peft after
minutes of loading."""
from __future__ import annotations

import json
from pathlib import Path

from tuneforge.config.peft_methods import PROMPT_LEARNING
from tuneforge.config.schema import ModelConfig
from tuneforge.errors import UserError, first_line
from tuneforge.models.classify import saved_model_config
from tuneforge.models.load import load_model_skeleton
from tuneforge.models.tensors import header_shapes, shape_mismatch
from tuneforge.peft import saved_adapters
from tuneforge.peft.bottleneck import CONFIG_NAME, WEIGHTS_NAME, apply_bottleneck, hidden_size_of

PEFT_WEIGHTS = "adapter_model.safetensors"
PROMPT_SIZES = ("token_dim", "num_layers", "num_attention_heads")  # what prompt methods take from the base config


def check_adapters_fit(model_cfg: ModelConfig, final: Path) -> None:
    """Every adapter saved in `final` (innermost first) against the skeleton of model.name_or_path."""
    inner = load_model_skeleton(model_cfg, saved_model_config(final))  # a classifier's labels and head
    for method, directory in saved_adapters(final):
        if method == "adapter":
            _check_bottleneck(inner, directory, model_cfg.name_or_path)
        elif method in PROMPT_LEARNING:
            _check_prompt_sizes(inner.config, directory, model_cfg.name_or_path)
        else:
            inner = _check_weight_adapter(inner, directory, model_cfg.name_or_path)


def _check_weight_adapter(inner, directory: Path, base: str):
    """lora / ia3 / llama_adapter: put the adapter's layers on the skeleton and compare their shapes with the file.
    Returns the skeleton under the adapter, for the next adapter of a stack."""
    import peft
    from peft import get_peft_model_state_dict

    config_file = directory / "adapter_config.json"
    try:
        config = peft.PeftConfig.from_pretrained(str(directory))
        outer = peft.get_peft_model(inner, config)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise UserError(f"{config_file}: does not fit the base model '{base}': {first_line(e)}"
                        f"{_trained_for(config_file, base)}") from None
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(outer).items()}
    _compare_shapes(directory / PEFT_WEIGHTS, expected, base, _trained_for(config_file, base))
    return outer.get_base_model()


def _check_prompt_sizes(base_config, directory: Path, base: str) -> None:
    """Prompt methods record the sizes peft derived from their base config; derive them again from this one."""
    import copy

    import peft
    from peft.utils.other import _prepare_prompt_learning_config  # peft's own derivation (GQA and all)

    config_file = directory / "adapter_config.json"
    try:
        saved = peft.PeftConfig.from_pretrained(str(directory))
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"{config_file}: unreadable ({e})") from None
    fresh = copy.copy(saved)
    for field in PROMPT_SIZES:
        setattr(fresh, field, None)
    try:
        wanted = _prepare_prompt_learning_config(fresh, base_config)
    except (ValueError, KeyError, ZeroDivisionError) as e:
        raise UserError(f"{config_file}: does not fit the base model '{base}' ({e})") from None
    # virtual tokens are token embeddings; only prefix tuning's per-layer keys and values depend on the rest
    sizes = PROMPT_SIZES if saved.peft_type == "PREFIX_TUNING" else ("token_dim",)
    for field in sizes:
        if getattr(saved, field) is not None and getattr(saved, field) != getattr(wanted, field):
            raise UserError(f"{config_file}: {field} is {getattr(saved, field)}, the base model '{base}' needs "
                            f"{getattr(wanted, field)}{_trained_for(config_file, base)}")


def _check_bottleneck(inner, directory: Path, base: str) -> None:
    config_file = directory / CONFIG_NAME
    config = _read_json(config_file)
    if config.get("hidden_size") != hidden_size_of(inner):
        raise UserError(f"{config_file}: hidden size {config.get('hidden_size')}, the base model '{base}' has "
                        f"{hidden_size_of(inner)}{_trained_for(config_file, base)}")
    try:
        apply_bottleneck(inner, config["bottleneck_size"], config["activation"], config["sites"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{config_file}: unreadable ({e.__class__.__name__}: {e})") from None
    except UserError as e:
        raise UserError(f"{config_file}: does not fit the base model '{base}' ({e})") from None
    expected = {n: tuple(p.shape) for n, p in inner.named_parameters() if ".bottleneck." in n}
    _compare_shapes(directory / WEIGHTS_NAME, expected, base, _trained_for(config_file, base))


def _compare_shapes(weights: Path, expected: dict[str, tuple], base: str, trained_for: str) -> None:
    """The file's tensor names and shapes (read from its header only) against what the base model needs."""
    from safetensors import SafetensorError

    try:
        found = header_shapes(weights)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{weights}: unreadable adapter weights ({e})") from None
    problem = shape_mismatch(found, expected, f"the base model '{base}'")
    if problem:
        raise UserError(f"{weights}: {problem}{trained_for}")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _trained_for(config_file: Path, base: str) -> str:
    """' (the adapter was trained for X)' when the adapter records another base model than `base`."""
    try:
        recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return ""
    return f" (the adapter was trained for '{recorded}')" if recorded and recorded != base else ""
