"""The run's HF-native output in final/: a PEFT adapter dir or a full model, plus the tokenizer."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.models.load import is_local


def save_final(model, tokenizer, cfg: Config, out: Path) -> None:
    """Written beside `out` and renamed into place, so final/ is either the old or the new output, never half."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config"):
        base = cfg.model.name_or_path
        for pc in model.peft_config.values():
            # Local bases are recorded as absolute paths so plain peft finds them from any working directory.
            pc.base_model_name_or_path = str(Path(base).resolve()) if is_local(base) else base
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_model.config.use_cache = True  # training turned the KV cache off; users of the output want it on
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
