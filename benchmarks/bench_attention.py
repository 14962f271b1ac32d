"""Attention inside packed rows on CPU, forward + backward, on the quickstart's real rows: the ways tuneforge runs it.

    make setup
    python benchmarks/bench_attention.py [--micro-batches 12]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_attention.py   # a CPU without bf16

The rows: recipes/quickstart.yaml's training set (the 2,000 shipped SQuAD questions through SmolLM2's chat template)
packed into rows of 512 as its training run packs them, 2 rows a micro-batch. One layer of SmolLM2-135M's attention
on them: 9 query heads, 3 key/value heads, head size 64, q, k and v laid out as the model's projections leave them.

The ways, each timed on the same micro-batches (best of 3 passes over them):
  block_mask   transformers' sdpa with the (rows, 1, 512, 512) block-diagonal mask (model.packed_attention=block_mask)
  per_block    one causal sdpa call per example block, with slices and concatenations (per_example in fp32)
  packed       PackedCausalAttention, every block through the CPU flash kernel
  packed+mm    PackedCausalAttention as tuneforge runs it in bf16: blocks up to MATMUL_MAX_TOKENS through matmuls
and a sweep of block lengths (4 equal blocks a row) for the flash kernel against the matmul path, which sets
MATMUL_MAX_TOKENS. Precisions: bf16 where the CPU has bf16 matmuls (tuneforge's own test decides), and fp32."""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from bench_sft import machine_has_bf16  # noqa: E402  (this script's directory is on sys.path)
from tuneforge.models.attention import MATMUL_MAX_TOKENS, PackedCausalAttention, example_blocks  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, ROW, MICRO = 9, 3, 64, 512, 2
RECIPE = REPO / "recipes" / "quickstart.yaml"


def quickstart_rows(micro_batches: int) -> list[list[list[tuple[int, int]]]]:
    """The example blocks of the quickstart's first micro-batches, packed as its training run packs them."""
    from tuneforge.config import load_config
    from tuneforge.data.loader import pack_rows
    from tuneforge.data.prepare import prepare_data
    from tuneforge.models.gguf import resolve_model_source
    from tuneforge.models.load import load_tokenizer

    os.chdir(REPO)  # the recipe's paths are relative to the repository
    cfg = resolve_model_source(load_config(RECIPE))
    train, _ = prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.run.seed, progress=False)
    lengths = train.examples.lengths
    rows = pack_rows(range(len(lengths)), lengths, ROW)
    every = max(1, len(rows) // (micro_batches * MICRO))  # spread over the epoch: its rows go from long to short
    rows = rows[::every][:micro_batches * MICRO]
    batches = []
    for b in range(micro_batches):
        positions = torch.zeros(MICRO, ROW, dtype=torch.long)
        for r, row in enumerate(rows[b * MICRO:(b + 1) * MICRO]):
            at = 0
            for i in row:
                positions[r, at:at + int(lengths[i])] = torch.arange(int(lengths[i]))
                at += int(lengths[i])
            positions[r, at:] = torch.arange(ROW - at)  # the padding tail: a block of its own
        batches.append(example_blocks(positions, MICRO))
    return batches


def block_mask(blocks) -> torch.Tensor:
    """The (rows, 1, L, L) boolean mask transformers' sdpa path builds from restarting position_ids."""
    mask = torch.zeros(len(blocks), 1, ROW, ROW, dtype=torch.bool)
    for r, row in enumerate(blocks):
        for s, e in row:
            mask[r, 0, s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
    return mask


def ways(limit: int):
    groups = HEADS // KV_HEADS

    def with_mask(q, k, v, blocks, mask):
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                             attn_mask=mask, scale=HEAD_DIM ** -0.5)
        return out.transpose(1, 2).contiguous()

    def per_block(q, k, v, blocks, mask):
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        rows = [torch.cat([F.scaled_dot_product_attention(q[r:r + 1, :, s:e], k[r:r + 1, :, s:e], v[r:r + 1, :, s:e],
                                                          is_causal=True, scale=HEAD_DIM ** -0.5) for s, e in row], 2)
                for r, row in enumerate(blocks)]
        return torch.cat(rows, 0).transpose(1, 2).contiguous()

    return {"block_mask": with_mask, "per_block": per_block,
            "packed": lambda q, k, v, blocks, mask: PackedCausalAttention.apply(q, k, v, blocks, HEAD_DIM ** -0.5, 0),
            "packed+mm": lambda q, k, v, blocks, mask: PackedCausalAttention.apply(q, k, v, blocks,
                                                                                 HEAD_DIM ** -0.5, limit)}


def inputs(rows: int, length: int, dtype: torch.dtype, seed: int):
    """q, k, v as the projections leave them: (rows, L, heads, d) memory seen as (rows, heads, L, d)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(rows, length, heads, HEAD_DIM, generator=g).to(dtype).transpose(1, 2).requires_grad_()
               for heads in (HEADS, KV_HEADS, KV_HEADS))
    return q, k, v, torch.randn(rows, length, HEADS, HEAD_DIM, generator=g).to(dtype)


def timed(fn, cases) -> float:
    """Best of 3 passes of forward + backward over every case, in ms per case."""
    best = float("inf")
    for _ in range(4):  # the first pass warms up
        started = time.perf_counter()
        for q, k, v, grad, blocks, mask in cases:
            fn(q, k, v, blocks, mask).backward(grad)
        best = min(best, (time.perf_counter() - started) / len(cases))
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batches", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    batches = quickstart_rows(args.micro_batches)
    sizes = [e - s for b in batches for row in b for s, e in row]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', 'native')}; {len(batches)} micro-batches "
          f"of {MICRO} x {ROW}, {len(sizes)} blocks, median {sorted(sizes)[len(sizes) // 2]} tokens, longest "
          f"{max(sizes)}; MATMUL_MAX_TOKENS={MATMUL_MAX_TOKENS}")
    dtypes = [torch.bfloat16, torch.float32] if machine_has_bf16() else [torch.float32]
    for dtype in dtypes:
        cases = [(*inputs(MICRO, ROW, dtype, i), blocks, block_mask(blocks)) for i, blocks in enumerate(batches)]
        limit = MATMUL_MAX_TOKENS if dtype != torch.float32 else 0
        results = {name: timed(fn, cases) for name, fn in ways(limit).items()}
        base = results["per_block"]
        print(f"\n{str(dtype).removeprefix('torch.')}: ms per micro-batch (forward + backward), and per_block's time "
              "over each")
        print("| way | ms | per_block / way |\n|---|---|---|")
        for name, ms in results.items():
            print(f"| {name} | {ms:.2f} | {base / ms:.2f}x |")
    for dtype in dtypes:
        print(f"\n{str(dtype).removeprefix('torch.')}, block-length sweep (4 blocks of n a row, 1 row): flash kernel "
              "against the matmul path\n| n | flash ms | matmul ms | flash / matmul |\n|---|---|---|---|")
        for n in (96, 128, 192, 256, 384, 512, 768):
            q, k, v, grad = inputs(1, 4 * n, dtype, n)
            blocks = [[(i * n, (i + 1) * n) for i in range(4)]]
            case = [(q, k, v, grad, blocks, None)]
            flash = timed(lambda *a: PackedCausalAttention.apply(*a[:4], HEAD_DIM ** -0.5, 0), case)
            matmul = timed(lambda *a: PackedCausalAttention.apply(*a[:4], HEAD_DIM ** -0.5, 10 ** 6), case)
            print(f"| {n} | {flash:.2f} | {matmul:.2f} | {flash / matmul:.2f}x |")


if __name__ == "__main__":
    main()
