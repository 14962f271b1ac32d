"""Whether fusing the rank-16 LoRA down-projection into the base GEMM pays, on SmolLM2-135M's seven linear shapes
(hidden 576, kv 192, ffn 1536) at 2,048 tokens (micro batch 4 x 512), forward + backward, frozen base weight.

    python benchmarks/bench_lora_fusion.py [--dtype float32|bfloat16]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_lora_fusion.py   # a CPU without bf16

Three ways, each timed as the mean of --reps calls after 3 warm-up calls:
  base    the frozen linear alone (gradient of the input only): what the layer costs without an adapter
  lora    tuneforge's LoRA forward (peft/lora_forward.py): base GEMM, x @ A^T, then B's product added in place;
          autograd's backward (grad x through W and through A, grad A, grad B)
  fused   one GEMM of x with [W; A] (out + r rows) gives the base output and the down-projection together; backward
          is one GEMM of [g, s * g @ B] with [W; A] for the input's gradient, plus grad A and grad B. [W; A] is
          concatenated every call (A changes every step).
The figure that matters is each way's excess over `base`: what the adapter costs.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

TOKENS, RANK, SCALE = 2048, 16, 2.0
SHAPES = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # q k v o gate up down


class FusedLoRA(torch.autograd.Function):
    """y = x @ W^T + s * (x @ A^T) @ B^T with x @ A^T taken from the same GEMM as x @ W^T."""

    @staticmethod
    def forward(ctx, x, weight, a, b, scale):
        fused = torch.cat([weight, a])
        both = x @ fused.t()                               # (T, out + r)
        out = weight.size(0)
        down = both[:, out:]
        y = torch.addmm(both[:, :out], down, b.t(), alpha=scale)
        ctx.save_for_backward(x, fused, b, down)
        ctx.out, ctx.scale = out, scale
        return y

    @staticmethod
    def backward(ctx, grad):
        x, fused, b, down = ctx.saved_tensors
        grad_down = (grad @ b) * ctx.scale                 # (T, r)
        grad_b = ctx.scale * (grad.t() @ down)             # (out, r)
        grad_x = torch.cat([grad, grad_down], 1) @ fused   # one GEMM through W and A
        grad_a = grad_down.t() @ x                         # (r, in)
        return grad_x, None, grad_a, grad_b, None


def timed(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    totals = {"base": 0.0, "lora": 0.0, "fused": 0.0}
    print("| shape (in x out) | base ms | lora ms | fused ms |\n|---|---|---|---|")
    for n_in, n_out in SHAPES:
        weight = torch.randn(n_out, n_in, dtype=dtype) / n_in ** 0.5
        a = (torch.randn(RANK, n_in, dtype=dtype) / n_in ** 0.5).requires_grad_()
        b = (torch.randn(n_out, RANK, dtype=dtype) * 0.01).requires_grad_()
        x = torch.randn(TOKENS, n_in, dtype=dtype, requires_grad=True)
        grad = torch.randn(TOKENS, n_out, dtype=dtype)

        def base():
            torch.nn.functional.linear(x, weight).backward(grad)

        def lora():
            y = torch.nn.functional.linear(x, weight)
            y.addmm_(torch.nn.functional.linear(x, a), b.t(), alpha=SCALE)
            y.backward(grad)

        def fused():
            FusedLoRA.apply(x, weight, a, b, SCALE).backward(grad)

        # the fused layer computes what the in-place LoRA computes
        for p in (x, a, b):
            p.grad = None
        lora()
        want = [p.grad.clone() for p in (x, a, b)]
        for p in (x, a, b):
            p.grad = None
        fused()
        tol = 1e-3 if dtype == torch.float32 else 5e-2
        assert all(torch.allclose(p.grad, w, rtol=tol, atol=tol) for p, w in zip((x, a, b), want))
        row = {name: timed(fn, args.reps) for name, fn in (("base", base), ("lora", lora), ("fused", fused))}
        for k, v in row.items():
            totals[k] += v
        print(f"| {n_in} x {n_out} | {row['base']:.2f} | {row['lora']:.2f} | {row['fused']:.2f} |")
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
    print(f"\n{args.dtype}, CPU ISA {isa}, torch {torch.__version__}, {torch.get_num_threads()} threads: the seven "
          f"layers take {totals['base']:.1f} ms without an adapter; LoRA adds "
          f"{100 * (totals['lora'] / totals['base'] - 1):.1f}% in tuneforge's forward and "
          f"{100 * (totals['fused'] / totals['base'] - 1):.1f}% fused")


if __name__ == "__main__":
    main()
