"""Quantized loading of the frozen base weights (QLoRA) through bitsandbytes, imported only when asked for."""
from __future__ import annotations

import logging
import warnings

import torch

from tuneforge.config.schema import QuantizationConfig
from tuneforge.errors import UserError

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def quiet_bitsandbytes() -> None:
    """bitsandbytes warns at import, on CPUs with AVX-512 BF16, that an optional downloadable kernel is missing;
    its own CPU kernels run instead, so the line says nothing a tuneforge user can act on."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # LLM.int8 announces on every matmul that it casts fp32 inputs to fp16 for its int8 kernel (by design)
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def require_bitsandbytes() -> None:
    quiet_bitsandbytes()
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("model.quantization needs bitsandbytes: pip install 'tuneforge[qlora]'") from None


def build_bnb_config(cfg: QuantizationConfig):
    """transformers' BitsAndBytesConfig: 4-bit blocks of 64 weights + one absmax each (nf4: ~4.5 bit/weight,
    ~4.1 with double_quant), dequantized per matmul to compute_dtype; or LLM.int8 rows for bits: 8."""
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    if cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=_DTYPES[cfg.compute_dtype])


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def avoid_unsupported_cpu_kernels(model) -> None:
    """bitsandbytes switches a 4-bit layer to its packed CPU kernel (AVX-512 BF16) the first time it runs in eval
    mode without gradients (validation, generation); that kernel packs output rows in blocks of 32 and reads whole
    quantization blocks per input row, and fails on other shapes (stories260K's MLP is 172 wide). Such layers keep
    the general 4-bit matmul, in every mode."""
    for module in model.modules():
        if not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        blocksize = getattr(getattr(module.weight, "quant_state", None), "blocksize", 64)
        if module.out_features % 32 or module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False
