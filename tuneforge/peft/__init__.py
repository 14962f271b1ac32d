"""Parameter-efficient and partial fine-tuning: HF peft as the engine, plus tuneforge's bottleneck adapters.

A run's adapters form a stack, applied innermost first: a weight adapter (lora / ia3) or llama_adapter rewrites
layers of the transformers model; bottleneck adapters hook the attention and MLP outputs; a prompt method
(prompt_tuning / p_tuning / prefix_tuning) wraps the result and feeds it virtual tokens. Each peft part is a
plain `PeftModel`, so each saves and loads with plain peft.

final/ layout:
  one peft method       final/adapter_config.json + adapter_model.safetensors (plain peft)
  one `adapter`         final/bottleneck_adapter_config.json + bottleneck_adapter.safetensors (see bottleneck.py)
  a list                final/<method>/ for each part in the layout above, and final/tuneforge_adapters.json
                        naming them innermost first, e.g. lora then prompt_tuning. Plain peft loads the list as
                        m = PeftModel.from_pretrained(base, "final/lora");
                        m = PeftModel.from_pretrained(m.get_base_model(), "final/prompt_tuning")
The tokenizer always sits in final/ itself."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Union

from tuneforge.config.peft_methods import (BOTTLENECK, BY_NAME, MARKERS, MERGEABLE, PEFT_TYPES, PROMPT, PROMPT_LEARNING,
                                           WEIGHTS)
from tuneforge.config.rules.peft import peft_parts
from tuneforge.config.schema import Config, PeftConfig
from tuneforge.errors import UserError, first_line
from tuneforge.models.classify import is_classifier
from tuneforge.models.layers import transformers_model
from tuneforge.models.load import apply_activation_checkpointing, checkpointing_kwargs
from tuneforge.models.quantize import is_quantized, quiet_bitsandbytes
from tuneforge.peft.bottleneck import CONFIG_NAME, apply_bottleneck, has_bottleneck, load_bottleneck, save_bottleneck
from tuneforge.peft.freeze import apply_trainable, select_trainable
from tuneforge.peft.lora_forward import TESTED_PEFT, peft_release_tested, use_in_place_lora_forward
from tuneforge.peft.methods import build_peft_config

MANIFEST = "tuneforge_adapters.json"
log = logging.getLogger("tuneforge")
quiet_bitsandbytes()  # before anything imports peft (which imports bitsandbytes)
# generate() passes position ids, which prompt methods rebuild themselves to cover their virtual tokens
warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")


def _import_peft():
    quiet_bitsandbytes()
    import peft

    return peft


def apply_finetuning(model, cfg: Config):
    """Everything between loading the weights and training them: QLoRA preparation, activation checkpointing,
    then the adapters (only their parameters stay trainable) or partial freezing."""
    if is_quantized(model):
        # Freezes the base, upcasts the non-quantized weights (norms, embeddings) to fp32 for stable updates.
        model = _import_peft().prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.distributed.activation_checkpointing,
            gradient_checkpointing_kwargs=checkpointing_kwargs())
    else:
        apply_activation_checkpointing(model, cfg.distributed.activation_checkpointing)
    if cfg.peft is not None:
        model = apply_peft(model, cfg.peft)
        if cfg.train.lora_forward == "tuneforge":
            apply_lora_forward(model)
        return model
    if cfg.train.trainable is not None:
        apply_trainable(model, cfg.train.trainable)
    return model


def apply_lora_forward(model) -> int:
    """train.lora_forward=tuneforge: the in-place LoRA forward (same values, no output-sized temporaries, shared
    down-projections: see lora_forward.py) where the installed peft is a release it is tested with; peft's own forward,
    said once, elsewhere. Returns the layers switched."""
    if not peft_release_tested():
        import peft

        log.warning("peft %s is not a release tuneforge's LoRA forward is tested with (%s): LoRA layers run peft's own "
                    "forward (train.lora_forward=peft says so without this line)", peft.__version__,
                    ", ".join(f"{v}.x" for v in TESTED_PEFT))
        return 0
    return use_in_place_lora_forward(model)


def apply_peft(model, cfg: Union[PeftConfig, list[PeftConfig]]):
    """Wrap the model with the configured adapter(s); only adapter parameters stay trainable. Returns the
    outermost model (a PeftModel, or the transformers model itself for bottleneck adapters alone)."""
    outer = inner = model
    keep: list = []  # trainable parameters of the stages applied so far (a later peft wrapper freezes them)
    stack = []
    for part in sorted(peft_parts(cfg), key=lambda p: BY_NAME[p.method].stage):
        if part.method == "adapter":
            apply_bottleneck(inner, part.bottleneck_size, part.bottleneck_activation)
            stack.append(("adapter", inner))
        else:
            outer = _get_peft_model(inner, part)
            inner = outer.get_base_model()
            stack.append((part.method, outer))
        for p in keep:
            p.requires_grad_(True)
        keep = [p for p in outer.parameters() if p.requires_grad]
    return _record_stack(outer, stack)


def _record_stack(outer, stack: list):
    # A prompt method's PeftModel wraps the transformers model, not the PeftModel of a weight adapter under it,
    # so the stack cannot be found by unwrapping: the outermost model remembers it (a plain attribute).
    object.__setattr__(outer, "tuneforge_adapters", stack)
    return outer


def _get_peft_model(model, part: PeftConfig):
    peft = _import_peft()
    try:
        return peft.get_peft_model(model, build_peft_config(part, model))
    except (ValueError, TypeError, NotImplementedError, KeyError) as e:
        first = first_line(e)
        if "target_modules" in BY_NAME[part.method].fields:
            raise UserError(f"peft.target_modules: {part.target_modules!r} does not fit this model ({first})") from None
        raise UserError(f"peft.method: {part.method} does not fit this {type(model).__name__} ({first})") from None


def adapter_chain(model) -> list[tuple[str, object]]:
    """(method, object) for each adapter of a model, innermost first; the object is the PeftModel, or for
    bottleneck adapters the transformers model that carries them."""
    from peft import PeftModel

    if "tuneforge_adapters" in vars(model):
        return list(vars(model)["tuneforge_adapters"])
    chain, m = [], model
    while isinstance(m, PeftModel):
        chain.append((PEFT_TYPES[str(m.active_peft_config.peft_type.value)], m))
        m = m.get_base_model()
    chain.reverse()
    if has_bottleneck(m):
        at = sum(1 for method, _ in chain if method not in PROMPT_LEARNING)
        chain.insert(at, ("adapter", m))
    return chain


def adapter_summary(model) -> str:
    """Where the trainable parameters sit, by module leaf name (e.g. 'lora_A, lora_B on q_proj, v_proj')."""
    hosts, kinds, layers = set(), set(), set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            kind = next((x for x in parts if x.startswith(MARKERS)), None)
            layers.update(int(x) for x in parts if x.isdigit())
            if kind and kind != "prompt_encoder":
                kinds.add(kind)
                hosts.add(parts[parts.index(kind) - 1])
            elif kind:
                hosts.add("virtual-token " + ".".join(parts[parts.index(kind) + 2:-1] or parts[-1:]))
            else:
                hosts.add(parts[-2] if len(parts) > 1 else parts[0])
    where = (", ".join(sorted(kinds)) + " on " if kinds else "") + ", ".join(sorted(hosts))
    return where + (f" in {len(layers)} layers" if layers and len(layers) < 1000 else "")


def describe_adapters(model) -> list[str]:
    """Start-of-run lines: per adapter, its trainable parameters and where they sit."""
    lines = []
    for method, obj in adapter_chain(model):
        own = _own_parameters(method, obj)
        count = sum(p.numel() for _, p in own)
        if method in PROMPT_LEARNING:
            encoder = type(obj.prompt_encoder[obj.active_adapter]).__name__
            where = f"{obj.active_peft_config.num_virtual_tokens} virtual tokens from a {encoder}"
            if method == "prefix_tuning":
                where += f", as keys/values in all {obj.active_peft_config.num_layers} layers"
        else:
            where = adapter_summary(_Named(own))
        lines.append(f"adapter {method}: {count:,} trainable parameters; {where}")
    return lines


class _Named:
    def __init__(self, named):
        self.named = named

    def named_parameters(self):
        return iter(self.named)


def _stage(method: str) -> int:
    """A method's stage; an adapter that plain peft saved with a type tuneforge has no entry for counts as a weight
    adapter (its parameters sit in the base model's layers)."""
    return BY_NAME[method].stage if method in BY_NAME else WEIGHTS


def _own_parameters(method: str, obj) -> list:
    """The trainable parameters that belong to one adapter of the stack."""
    stage = _stage(method)
    if stage == BOTTLENECK:
        return [(n, p) for n, p in obj.named_parameters() if ".bottleneck." in n]
    if stage == PROMPT:
        return [(n, p) for n, p in obj.named_parameters() if n.startswith("prompt_encoder.")]
    return [(n, p) for n, p in obj.get_base_model().named_parameters() if p.requires_grad and ".bottleneck." not in n]


def save_adapters(model, out: Path, base_model_name_or_path: str, state_dict: dict | None = None) -> None:
    """Write the run's adapter(s) into `out` in the layout described at the top of this module. `state_dict`
    holds the gathered weights of a sharded (FSDP2) model, whose own parameters are only this rank's shards."""
    chain = adapter_chain(model)
    if state_dict is not None:
        if len(chain) != 1 or chain[0][0] == "adapter":
            raise UserError("fsdp2 export supports one peft method; train adapter lists and bottleneck adapters "
                            "with distributed.strategy=ddp")
        for pc in chain[0][1].peft_config.values():
            pc.base_model_name_or_path = base_model_name_or_path
        chain[0][1].save_pretrained(out, safe_serialization=True, state_dict=state_dict)
        return
    for method, obj in chain:
        if method != "adapter":
            for pc in obj.peft_config.values():
                pc.base_model_name_or_path = base_model_name_or_path
    for method, obj in chain:
        where = out if len(chain) == 1 else out / method
        if method == "adapter":
            save_bottleneck(obj, where, base_model_name_or_path)
        else:
            obj.save_pretrained(where, safe_serialization=True)
    if len(chain) > 1:
        entries = [{"method": method, "path": method} for method, _ in chain]
        manifest = {"format": "tuneforge-adapters", "version": 1, "load_order": "innermost first", "adapters": entries}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def saved_adapters(final: Path) -> list[tuple[str, Path]]:
    """(method, directory) of each adapter saved in a run's final/, innermost first; [] for a full model."""
    if (final / MANIFEST).is_file():
        try:
            entries = json.loads((final / MANIFEST).read_text())["adapters"]
            return [(e["method"], final / e["path"]) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{final / MANIFEST}: unreadable ({e})") from None
    if (final / "adapter_config.json").is_file():
        peft_type = json.loads((final / "adapter_config.json").read_text()).get("peft_type", "")
        return [(PEFT_TYPES.get(peft_type, peft_type.lower()), final)]
    if (final / CONFIG_NAME).is_file():
        return [("adapter", final)]
    return []


def load_adapters(model, final: Path, trainable: bool = False):
    """Put the adapters saved in `final` on a freshly loaded base model; returns the outermost model."""
    peft = _import_peft()
    outer = inner = model
    stack = []
    for method, directory in saved_adapters(final):
        if method == "adapter":
            load_bottleneck(inner, directory)
            stack.append(("adapter", inner))
        else:
            outer = peft.PeftModel.from_pretrained(inner, str(directory), is_trainable=trainable)
            inner = outer.get_base_model()
            stack.append((method, outer))
    return _record_stack(outer, stack)


def check_mergeable(final: Path) -> list[tuple[str, Path]]:
    adapters = saved_adapters(final)
    if not adapters:
        raise UserError(f"{final}: nothing to merge, the run saved a full model (load it with "
                        "AutoModelForCausalLM.from_pretrained)")
    for method, _ in adapters:
        if method not in MERGEABLE:
            why = ("its virtual tokens are extra inputs, not a change of weights" if method in PROMPT_LEARNING
                   else "it adds computation that no weight change reproduces")
            how = "tuneforge generate" if method == "adapter" else "peft or tuneforge generate"
            raise UserError(f"peft.method {method} cannot be merged into the base weights ({why}); "
                            f"use the adapter in {final} with {how} instead")
    return adapters


def describe_finetuning(model, cfg: Config) -> list[str]:
    """Start-of-run lines after the parameter count: adapters and where they sit, frozen parts, quantization."""
    lines = []
    if is_classifier(model):
        labels = transformers_model(model).config.id2label
        lines.append(f"labels: {', '.join(f'{i}={labels[i]}' for i in sorted(labels))}")
    q = cfg.model.quantization
    if q is not None:
        kind = "8-bit LLM.int8"
        if q.bits == 4:
            kind = (f"4-bit {q.quant_type}" + (" + double quant" if q.double_quant else "")
                    + f", {q.compute_dtype} matmuls")
        lines.append(f"base weights: {kind} (frozen)")
    if cfg.peft is not None:
        lines.extend(describe_adapters(model))
    elif cfg.train.trainable is not None:
        lines.append("trainable: " + ", ".join(select_trainable(model, cfg.train.trainable)[1]) + "; the rest frozen")
    if cfg.distributed.activation_checkpointing:
        lines.append("activation checkpointing: on (non-reentrant), decoder layers recomputed in backward")
    return lines
