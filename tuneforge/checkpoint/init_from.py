"""model.init_from: start a new run from an earlier run's weights only.

The source is a run directory (its final/, else its newest complete checkpoint), a checkpoints/step_N directory or
a final/ directory. Its tensors are copied by name into the freshly built model, after the fine-tuning setup
(adapters, freezing) and before the optimizer exists: optimizer, schedule, data position and step counter start
fresh (step 0), unlike checkpoint.resume, which continues all of them.

  final/ with an adapter    the new run must train the same adapter: its tensors are exactly the adapter's, shape
                            for shape (the peft section must match), loaded through peft's own naming
  final/ with a full model  every tensor the new model has a place for is copied (the rest, e.g. a causal LM's
                            lm_head when the new run is a classifier, is skipped and counted); weights it lacks keep
                            model.name_or_path's values (a classifier's new head keeps its initialisation)
  checkpoints/step_N        the earlier run's trainable tensors, under the names they had there

Names are matched exactly, else through the name without peft's wrapping (`base_model.model.` prefix,
`.base_layer`), so a LoRA run can start from a full run's weights."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tuneforge.checkpoint import MANIFEST, WEIGHTS, find_latest, verify
from tuneforge.errors import UserError
from tuneforge.peft import saved_adapters
from tuneforge.peft.fit import PEFT_WEIGHTS, _compare_shapes

_PEFT_WRAPPING = re.compile(r"^base_model\.model\.|\.base_layer(?=\.)|\.original_module(?=\.)")


def resolve_init_source(path: str) -> tuple[str, Path]:
    """('adapter' | 'model' | 'checkpoint', directory) that `path` names."""
    p = Path(path).expanduser()
    if (p / "config.yaml").is_file() and not (p / MANIFEST).is_file():  # a run directory
        if (p / "final").is_dir():
            p = p / "final"
        else:
            latest = find_latest(p / "checkpoints")
            if latest is None:
                raise UserError(f"model.init_from: run {p} has no final/ and no complete checkpoint")
            p = latest
    if (p / MANIFEST).is_file():
        problem = verify(p)
        if problem is not None:
            raise UserError(f"model.init_from: checkpoint {p}: {problem}")
        if not (p / WEIGHTS).is_file():
            raise UserError(f"model.init_from: checkpoint {p} was written by a multi-process run; start from its "
                            "run's final/ instead")
        return "checkpoint", p
    if not p.is_dir():
        raise UserError(f"model.init_from: no such directory '{path}'")
    adapters = saved_adapters(p)
    if adapters:
        if len(adapters) > 1 or adapters[0][0] == "adapter":
            held = "an adapter list" if len(adapters) > 1 else "bottleneck adapters"
            raise UserError(f"model.init_from: {p} holds {held}; init_from loads one peft adapter (lora, ia3, a "
                            "prompt method) or full weights")
        return "adapter", p
    if not _weight_files(p):
        raise UserError(f"model.init_from: {p} is not a run directory, a checkpoint or a final/ model "
                        "(no model.safetensors, adapter or manifest.json)")
    return "model", p


def _weight_files(p: Path) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            return sorted({p / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{index}: unreadable ({e})") from None
    return [p / "model.safetensors"] if (p / "model.safetensors").is_file() else []


def canonical(name: str) -> str:
    """A parameter's name without peft's wrapping (the name in the plain transformers model)."""
    return _PEFT_WRAPPING.sub("", name).replace(".modules_to_save.default.", ".")


def apply_init_from(model, cfg) -> list[str]:
    """Copy the source's weights into `model` (rank 0's real weights; a meta skeleton receives them when it is
    sharded). Returns the start-of-run line that says what was loaded."""
    if not cfg.model.weights_only:
        raise UserError("model.weights_only: false is not supported; init_from loads weights only "
                        "(use checkpoint.resume to continue a run's optimizer, schedule and step)")
    kind, source = resolve_init_source(cfg.model.init_from)
    if any(p.is_meta for p in model.parameters()):
        return []
    if kind == "adapter":
        return [_load_adapter(model, cfg, source)]
    if cfg.model.quantization is not None:
        raise UserError("model.init_from: full weights cannot be copied into quantized (QLoRA) layers; set "
                        f"model.name_or_path to {source} instead")
    if kind == "checkpoint":
        from safetensors.torch import load_file

        copied, skipped = copy_tensors(model, load_file(source / WEIGHTS).items(), source / WEIGHTS)
        if skipped:
            raise UserError(f"model.init_from: {source / WEIGHTS}: tensor {skipped[0]} has no place in this model "
                            "(another model or peft section than the earlier run's)")
    else:
        copied, skipped = 0, []
        for file in _weight_files(source):
            n, missed = copy_tensors(model, _tensors_of(file), file)
            copied, skipped = copied + n, skipped + missed
        if copied == 0:
            raise UserError(f"model.init_from: no tensor of {source} fits this model (another architecture)")
    _check_adapter_filled(model, cfg.peft, source)
    total = sum(1 for _ in model.named_parameters())
    note = f"; skipped {len(skipped)} it has no place for ({', '.join(skipped[:3])})" if skipped else ""
    return [f"init_from {source}: {copied} tensors loaded into the model's {total}{note}; optimizer, schedule and "
            "step start fresh"]


def _tensors_of(file: Path):
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def copy_tensors(model, tensors, where: Path) -> tuple[int, list[str]]:
    """Copy (name, tensor) pairs into the model's parameters by exact, else canonical, name; returns (tensors
    copied, names without a place). A shape that differs is an error: copy_ would broadcast it silently."""
    params = dict(model.named_parameters())
    by_canonical: dict[str, list] = {}
    for name, p in params.items():
        by_canonical.setdefault(canonical(name), []).append((name, p))
    copied, skipped = 0, []
    with torch.no_grad():
        for key, tensor in tensors:
            targets = [(key, params[key])] if key in params else by_canonical.get(canonical(key), [])
            if not targets:
                skipped.append(key)
                continue
            for name, p in targets:
                if tuple(p.shape) != tuple(tensor.shape):
                    raise UserError(f"model.init_from: {where}: tensor {key} has shape {list(tensor.shape)}, this "
                                    f"model's {name} needs {list(p.shape)} (another model size or peft rank)")
                p.copy_(tensor)
            copied += 1
    return copied, skipped


def _check_adapter_filled(model, peft, source: Path) -> None:
    """An adapter run started from a checkpoint of an adapter run gets every adapter tensor, or the peft sections
    differ (other target modules): a half-loaded adapter would pass silently for a fresh one."""
    from safetensors import safe_open

    if peft is None or not (source / WEIGHTS).is_file():
        return
    with safe_open(str(source / WEIGHTS), framework="pt") as f:
        found = set(f.keys())
    if not any(".lora_" in k or "ia3_" in k or "prompt_encoder" in k for k in found):
        return  # a full run's weights under a new adapter: the adapter starts fresh by design
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in found]
    if missing:
        raise UserError(f"model.init_from: {source / WEIGHTS} lacks {missing[0]}, which this recipe's peft "
                        "trains; use the earlier run's peft section")


def _load_adapter(model, cfg, source: Path) -> str:
    """The adapter's tensors through peft's own naming, after checking they are exactly this run's adapter."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    if cfg.peft is None or not isinstance(model, PeftModel):
        raise UserError(f"model.init_from: {source} holds a peft adapter; the new run must train the same adapter "
                        "(set its peft section), or start from a full model")
    saved = json.loads((source / "adapter_config.json").read_text())
    ours = model.active_peft_config.peft_type.value
    if saved.get("peft_type") != ours:
        raise UserError(f"model.init_from: {source} holds a {saved.get('peft_type')} adapter, this recipe trains "
                        f"{ours}; use the earlier run's peft section")
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    try:
        _compare_shapes(source / PEFT_WEIGHTS, expected, cfg.model.name_or_path, " (the peft section must match the "
                        "earlier run's)")
    except UserError as e:
        raise UserError(f"model.init_from: {e}") from None
    state = load_file(source / PEFT_WEIGHTS)
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"model.init_from: {source / PEFT_WEIGHTS}: tensor {unexpected[0]} has no place in this "
                        "adapter; use the earlier run's peft section")
    return (f"init_from {source}: adapter ({len(state)} tensors) loaded; optimizer, schedule and step start fresh")
