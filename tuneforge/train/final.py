"""The run's HF-native output in final/: a PEFT adapter dir or a full model, plus the tokenizer."""
from __future__ import annotations

from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.files import atomic_dir
from tuneforge.models.classify import is_classifier, save_classifier_extras
from tuneforge.models.layers import transformers_model
from tuneforge.models.load import is_local
from tuneforge.peft import save_adapters


def consolidated_state(module, env, trainable_only: bool) -> dict | None:
    """The full (unsharded) weights gathered to rank 0's CPU memory for export; only the trainable ones for an
    adapter run, so the frozen base model is never gathered. Every rank must call it (it is a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(module, options=options)
    return {k.removeprefix("model."): v for k, v in state.items()} if env.is_main else None


def save_final(model, tokenizer, cfg: Config, out: Path, state_dict: dict | None = None) -> None:
    """Built beside `out` and swapped into place (files.atomic_dir), so final/ is either the old or the new output,
    never half. `state_dict` carries gathered weights when the model itself is sharded."""
    base = cfg.model.name_or_path
    # Local bases are recorded as absolute paths so plain peft finds them from any working directory.
    base = str(Path(base).resolve()) if is_local(base) else base
    transformers_model(model).config.use_cache = True  # training turned the KV cache off; users want it on
    with atomic_dir(out) as tmp:
        if cfg.peft is not None:
            save_adapters(model, tmp, base, state_dict)
        else:
            model.save_pretrained(tmp, safe_serialization=True,
                                  **({"state_dict": state_dict} if state_dict is not None else {}))
        if is_classifier(model):
            save_classifier_extras(model, tmp, adapter=cfg.peft is not None)
        tokenizer.save_pretrained(tmp)
