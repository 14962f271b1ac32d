"""Which precision `model.dtype` resolves to, and why, agrees with the kernels the CPU will really run."""
import pytest
import torch

from tests.conftest import run_cli, tiny_overrides
from tuneforge.models.load import cpu_bf16_unsupported_reason, resolve_precision

AMX = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}
AVX512_ONLY = {"avx2", "avx512f", "avx512bw"}  # Skylake-X: oneDNN would emulate bf16 with AVX-512
AVX2_ONLY = {"avx", "avx2", "fma"}
AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


@pytest.mark.parametrize("flags, environ, expect", [
    (AVX2_ONLY, {}, "this CPU has no bf16 matmul instructions"),
    (AVX512_ONLY, {}, "this CPU has no bf16 matmul instructions"),
    (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, "ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN without bf16"),
    (AMX, {"ONEDNN_MAX_CPU_ISA": "avx512_core"}, "ONEDNN_MAX_CPU_ISA=AVX512_CORE leaves oneDNN without bf16"),
    (AVX512_BF16, {"ATEN_CPU_CAPABILITY": "avx2"}, "ATEN_CPU_CAPABILITY=avx2 limits ATen to avx2 kernels"),
    (AVX512_BF16, {"ATEN_CPU_CAPABILITY": "default"}, "ATEN_CPU_CAPABILITY=default"),
], ids=["avx2-cpu", "avx512-no-bf16", "onednn-avx2", "onednn-avx512-core", "aten-avx2", "aten-default"])
def test_no_bf16_where_the_kernels_have_none(flags, environ, expect):
    assert expect in cpu_bf16_unsupported_reason(environ, flags)


@pytest.mark.parametrize("flags, environ", [(AMX, {}), (AVX512_BF16, {}), (AMX, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}),
                                            (AVX512_BF16, {"ATEN_CPU_CAPABILITY": "avx512"})])
def test_bf16_where_the_cpu_and_the_settings_have_it(flags, environ, monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert cpu_bf16_unsupported_reason(environ, flags) is None


def test_auto_follows_the_settings_and_bf16_asked_for_is_emulated(monkeypatch):
    for name, value in AVX2_ENV.items():
        monkeypatch.setenv(name, value)
    auto = resolve_precision("auto", "cpu")
    assert auto.autocast is None and auto.describe().startswith("fp32 on cpu (model.dtype=auto: ONEDNN_MAX_CPU_ISA")
    asked = resolve_precision("bfloat16", "cpu")
    assert asked.autocast == torch.bfloat16 and asked.emulated
    assert not resolve_precision("float32", "cpu").emulated


@pytest.mark.parametrize("dtype, first, warned", [
    ("auto", "precision: fp32 on cpu (model.dtype=auto: ONEDNN_MAX_CPU_ISA=AVX2 leaves oneDNN without bf16", False),
    ("bfloat16", "precision: bf16 autocast on cpu (model.dtype=bfloat16, but ONEDNN_MAX_CPU_ISA=AVX2", True),
])
def test_finetune_states_its_precision_first(tiny_recipe, tmp_path, dtype, first, warned):
    proc = run_cli("finetune", "-c", str(tiny_recipe),
                   *tiny_overrides(tmp_path, "p", f"model.dtype={dtype}", "train.max_steps=1", "data.train.limit=8"),
                   env=AVX2_ENV)
    assert proc.stdout.splitlines()[0].startswith(first), proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if "emulated" in line]
    assert len(warnings) == (1 if warned else 0), proc.stderr
    assert (tmp_path / "p/final/adapter_model.safetensors").exists()
