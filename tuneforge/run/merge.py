"""`tuneforge merge`: fold a run's LoRA-family or IA3 adapter into the base weights and write a full HF model.

QLoRA runs merge into a full-precision reload of the base (never into the 4-bit weights: dequantizing,
adding the delta and requantizing would lose the adapter's small update in the quantization error)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from tuneforge.errors import UserError
from tuneforge.files import atomic_dir
from tuneforge.models.classify import save_head_code, saved_model_config
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.peft import check_mergeable, load_adapters
from tuneforge.peft.fit import check_adapters_fit
from tuneforge.run.load import load_run

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def merge_run(run_dir: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write base + merged adapter (+ tokenizer) to `out`; AutoModelForCausalLM.from_pretrained loads it
    (AutoModelForSeq2SeqLM for an encoder-decoder)."""
    cfg, final = load_run(run_dir)
    check_mergeable(final)
    check_adapters_fit(cfg.model, final)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: directory exists and is not empty; pass --overwrite to replace it")
    merged = load_merged(cfg.model, final, dtype)
    with atomic_dir(out) as tmp:  # with --overwrite, the old `out` stays until the merged model is whole
        merged.save_pretrained(tmp, safe_serialization=True)
        save_head_code(merged, tmp)  # a classifier with an MLP head: its code, for trust_remote_code loading
        load_tokenizer(cfg.model, str(final)).save_pretrained(tmp)
    return out


def load_merged(model_cfg, final: Path, dtype: str = "float32"):
    """The run's base, reloaded in full precision, with its adapter merged in (the one merge path: also what
    `export --format vllm / gguf` writes)."""
    full_precision = dataclasses.replace(model_cfg, quantization=None)
    model = load_adapters(load_model(full_precision, config=saved_model_config(final)), final)
    merged = model.merge_and_unload()  # W' = W + scale * B @ A (lora) or W * l (ia3), adapter layers removed
    merged.config.use_cache = True
    return merged.to(DTYPES[dtype])
