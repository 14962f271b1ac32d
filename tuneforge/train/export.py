"""The run's HF-native output in final/: a PEFT adapter dir or a full model, plus the tokenizer."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.models.load import is_local
from tuneforge.peft import save_adapters, transformers_model


def save_final(model, tokenizer, cfg: Config, out: Path) -> None:
    """Written beside `out` and renamed into place, so final/ is either the old or the new output, never half."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base = cfg.model.name_or_path
    # Local bases are recorded as absolute paths so plain peft finds them from any working directory.
    base = str(Path(base).resolve()) if is_local(base) else base
    transformers_model(model).config.use_cache = True  # training turned the KV cache off; users want it on
    if cfg.peft is not None:
        save_adapters(model, tmp, base)
    else:
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
