"""Attention per example inside packed rows, for sdpa (CPU, or CUDA without flash-attn).

A packed row carries several examples, each a run of position_ids restarting at 0. transformers' sdpa path turns
those runs into one (rows, 1, L, L) block-diagonal mask and attends over the whole row: every token's scores cover
all L positions, and a masked sdpa cannot use the causal kernel's skipping. `PER_EXAMPLE` instead runs causal sdpa on
each example's own block (a 131-token example costs 131 x 131 scores, not 512 x 512). Same values to fp32 rounding;
`model.packed_attention` switches it (benchmarks/RESULTS.md has the measured rows).

It is a drop-in for sdpa everywhere else: the mask function returns no mask only where the input has no padding mask,
no cache offset and no sliding window, and the attention then reads the example blocks from position_ids (one block
when they do not restart, i.e. plain causal attention); every other call (generation with a cache, padded batches)
goes to transformers' own sdpa with its own mask. Activation checkpointing recomputes the same way, since the
position_ids come with the layer's inputs.

On CPU in bf16 (or fp16) every example block of a micro-batch goes through one autograd node,
PackedCausalAttention, rather than one sdpa call per block with slices and concatenations around it. It is our own
code because it measures faster (benchmarks/bench_attention.py, RESULTS.md): each block's gradients are written
straight into the batch's gradient tensors, with no per-block slice and cat nodes to undo, and blocks up to
MATMUL_MAX_TOKENS tokens go through batched matmuls, without repeating the grouped key/value heads: one score matmul
that carries the causal mask and the scale, CPU softmax (fp32 inside, rounded once, as eager attention's fp32 softmax
and cast back), and softmax's own backward kernel. At those lengths the CPU flash kernel's bf16 backward is slow;
longer blocks go to that kernel. fp32 keeps one sdpa call per block."""
from __future__ import annotations

import functools
import sys
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import (ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, causal_mask_function,
                                        sdpa_mask)

PER_EXAMPLE = "tuneforge_per_example_sdpa"
# the model's own attention function (eager or sdpa, named after the prefix) under a block mask from position_ids;
# the name carries the base, so nothing else is set on the config (and nothing reaches a saved config.json)
BLOCK_MASK = "tuneforge_block_mask_"


def example_blocks(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    """[(start, end), ...] of each row: a block opens wherever the position restarts at 0. Every layer of a forward
    (and a checkpointed layer's recomputation) gets the same position_ids tensor: the blocks are found once for it, so
    a CUDA run pays one device-to-host copy per forward, not one per layer."""
    last = _last_blocks
    if last and last[0]() is position_ids and last[1] == (position_ids._version, rows):
        return last[2]
    blocks = _find_blocks(position_ids, rows)
    _last_blocks[:] = [weakref.ref(position_ids), (position_ids._version, rows), blocks]
    return blocks


_last_blocks: list = []  # [weak reference to the position_ids, (their version, rows), their blocks]


def _find_blocks(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    pos = position_ids.detach().cpu()
    length = pos.size(-1)
    blocks = []
    for row in pos.expand(rows, -1):
        starts = (row == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            starts = [0, *starts]
        blocks.append(list(zip(starts, starts[1:] + [length])))
    return blocks


@torch.compiler.disable  # python-level block boundaries: a compiled layer runs this between its two graphs
def per_example_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, **kwargs):
    """transformers' attention-function contract: query (b, heads, L, d), key/value (b, kv_heads, L, d) ->
    ((b, L, heads, d), None)."""
    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.size(2) != key.size(2) or query.size(2) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    blocks = example_blocks(position_ids, query.size(0))
    scale = scaling if scaling is not None else query.size(-1) ** -0.5
    low = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    if query.size(1) % key.size(1) or key.size(1) != value.size(1):
        raise ValueError(f"per-example attention: {query.size(1)} query heads for {key.size(1)} key and "
                         f"{value.size(1)} value heads")
    if (query.device.type == "cpu" and low in _REDUCED and not dropout
            and value.size(-1) == query.size(-1)):  # MLA's value heads are narrower: the per-block sdpa below
        # autocast would cast sdpa's inputs the same way (q and k leave rotary in fp32)
        query, key, value = (t.to(low) for t in (query, key, value))
        return PackedCausalAttention.apply(query, key, value, blocks, scale, MATMUL_MAX_TOKENS), None
    # the heads' grouping from the shapes, not the module: not every attention class names num_key_value_groups
    groups = query.size(1) // key.size(1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for r, row in enumerate(blocks):
        q, k, v = query[r:r + 1], key[r:r + 1], value[r:r + 1]
        rows.append(torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                              dropout_p=dropout, scale=scaling, is_causal=True)
                               for s, e in row], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


# bf16 / fp16 blocks up to this length take the matmul path: 2.2-3.3x the CPU flash kernel's forward + backward at
# 96-256 tokens, 1.7x at 512, still 1.3x at 768 (bench_attention.py's sweep). The limit bounds the probabilities it
# keeps for backward, heads x n^2 x 2 bytes a block: 4.5 MiB at 512 tokens and 9 heads. In fp32 the flash kernel is
# as fast or faster, and fp32 packed rows keep one sdpa call per block: PackedCausalAttention measured 2-5% slower
# end to end on the quickstart on AVX2 (with only its flash path, and with matmuls up to 192 tokens), though faster
# alone
MATMUL_MAX_TOKENS = 512
_REDUCED = (torch.bfloat16, torch.float16)
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@functools.lru_cache(maxsize=32)
def _causal_bias(n: int, groups: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(groups * n, n): 0 on and below the diagonal of each stacked (n, n) block, -inf above it. Cached: a
    micro-batch's block lengths (~16 for 4 rows of ~130-token examples) recur in every layer, forward."""
    return torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu_(1).repeat(groups, 1)


def _causal_probs(query, key, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) under a causal mask: query (kv_heads, groups * n, d) with each kv head's query heads
    stacked, key (kv_heads, n, d) -> (kv_heads, groups * n, n) in the query's dtype. The mask and scale ride on the
    score matmul (one baddbmm), and CPU softmax computes in fp32 inside and rounds once, as eager attention's
    fp32 softmax and cast back do."""
    n = key.size(1)
    bias = _causal_bias(n, query.size(1) // n, query.dtype, query.device)
    return torch.softmax(torch.baddbmm(bias, query, key.transpose(1, 2), alpha=scale), dim=-1)


class PackedCausalAttention(torch.autograd.Function):
    """Causal attention within each (start, end) block of each row, on CPU: query (b, heads, L, d), key / value
    (b, kv_heads, L, d), every position of a row inside one block -> (b, L, heads, d), the layout transformers'
    attention functions return. Per block: the matmul path (keeps the block's probabilities for backward) up to
    `matmul_max_tokens` tokens, else aten's CPU flash kernel (keeps its output and log-sum-exp)."""

    @staticmethod
    def forward(ctx, query, key, value, blocks, scale: float, matmul_max_tokens: int):
        heads, d = query.size(1), query.size(3)
        kv_heads = key.size(1)
        groups = heads // kv_heads
        out = query.new_empty(query.size(0), query.size(2), heads, d)
        saved = []
        for r, row in enumerate(blocks):
            for s, e in row:
                n = e - s
                if n <= matmul_max_tokens:
                    probs = _causal_probs(query[r, :, s:e].reshape(kv_heads, groups * n, d), key[r, :, s:e], scale)
                    out[r, s:e] = torch.bmm(probs, value[r, :, s:e]).view(heads, n, d).transpose(0, 1)
                    saved.append(probs)  # one tensor: the matmul path's block
                else:
                    k = key[r:r + 1, :, s:e].repeat_interleave(groups, dim=1)
                    v = value[r:r + 1, :, s:e].repeat_interleave(groups, dim=1)
                    o, lse = _flash_forward(query[r:r + 1, :, s:e], k, v, 0.0, True, scale=scale)
                    out[r, s:e] = o[0].transpose(0, 1)
                    saved += [o, lse]  # two: the flash kernel's block
        # through save_for_backward, not as ctx attributes: saved-tensor hooks see them, so activation checkpointing
        # drops them after forward and recomputes them (tensors kept on ctx would stay alive until backward)
        ctx.save_for_backward(query, key, value, *saved)
        ctx.blocks, ctx.scale, ctx.matmul_max_tokens = blocks, scale, matmul_max_tokens
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, *saved = ctx.saved_tensors
        heads, d = query.size(1), query.size(3)
        kv_heads = key.size(1)
        groups, scale = heads // kv_heads, ctx.scale
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        per_block = iter(saved)
        for r, row in enumerate(ctx.blocks):
            for s, e in row:
                n = e - s
                if n <= ctx.matmul_max_tokens:  # the matmul path: dS = P * (dP - rowsum(P * dP))
                    probs, k, v = next(per_block), key[r, :, s:e], value[r, :, s:e]
                    q = query[r, :, s:e].reshape(kv_heads, groups * n, d)
                    g = grad_out[r, s:e].transpose(0, 1).reshape(kv_heads, groups * n, d)
                    grad_v[r, :, s:e] = torch.bmm(probs.transpose(1, 2), g)
                    # softmax's own backward kernel: one pass, fp32 inside; the scale goes on the (n, d) products
                    ds = torch._softmax_backward_data(torch.bmm(g, v.transpose(1, 2)), probs, -1, probs.dtype)
                    grad_q[r, :, s:e] = torch.bmm(ds, k).mul_(scale).view(heads, n, d)
                    grad_k[r, :, s:e] = torch.bmm(ds.transpose(1, 2), q).mul_(scale)
                else:
                    o, lse = next(per_block), next(per_block)
                    k = key[r:r + 1, :, s:e].repeat_interleave(groups, dim=1)
                    v = value[r:r + 1, :, s:e].repeat_interleave(groups, dim=1)
                    gq, gk, gv = _flash_backward(grad_out[r:r + 1, s:e].transpose(1, 2), query[r:r + 1, :, s:e], k,
                                                 v, o, lse, 0.0, True, scale=scale)
                    grad_q[r, :, s:e] = gq[0]
                    grad_k[r, :, s:e] = gk[0].view(kv_heads, groups, n, d).sum(1)
                    grad_v[r, :, s:e] = gv[0].view(kv_heads, groups, n, d).sum(1)
        return grad_q, grad_k, grad_v, None, None, None


def _per_example_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, local_size=None, **kwargs):
    """No mask where per_example_attention can read the blocks from position_ids; sdpa's mask otherwise."""
    if (attention_mask is None and local_size is None and q_offset == 0 and kv_offset == 0
            and q_length == kv_length and not getattr(kwargs.get("config"), "sliding_window", None)):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function or causal_mask_function,
                     attention_mask, local_size, **kwargs)


def use_model_attention(model) -> None:
    """Undo use_per_example_attention or use_block_mask_attention: transformers' own attention, with its own mask."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == PER_EXAMPLE:
        config._attn_implementation = "sdpa"
    elif config is not None and (getattr(config, "_attn_implementation", None) or "").startswith(BLOCK_MASK):
        config._attn_implementation = config._attn_implementation.removeprefix(BLOCK_MASK)


def use_block_mask_attention(model) -> bool:
    """Switch a model whose eager or sdpa attention goes through transformers' attention interface to BLOCK_MASK: its
    own attention function (sinks, soft-capping, sliding windows and all) under the mask the model builds, narrowed to
    each example's block of position_ids. For models whose mask code never reads the position_ids (GPT-OSS, AFMoE):
    transformers' own packed-sequence mask never reaches them. False, unchanged, where the attention is another."""
    config = getattr(model, "config", None)
    base = getattr(config, "_attn_implementation", None) if config is not None else None
    if base not in ("eager", "sdpa"):
        return False
    AttentionInterface.register(BLOCK_MASK + base, block_mask_attention)
    AttentionMaskInterface.register(BLOCK_MASK + base, ALL_MASK_ATTENTION_FUNCTIONS[base])  # narrowed per call
    config._attn_implementation = BLOCK_MASK + base
    return True


def attention_name(model) -> str:
    """The transformers implementation a model's attention runs, under tuneforge's wrappers."""
    config = model.config
    implementation = getattr(config, "_attn_implementation", None) or "default"
    return "sdpa" if implementation == PER_EXAMPLE else implementation.removeprefix(BLOCK_MASK)


def block_mask_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' attention-function contract; the base implementation's function, with attention_mask narrowed to
    the example blocks where the call is a packed row's (position_ids given, no cache: q and k of one length)."""
    base = module.config._attn_implementation.removeprefix(BLOCK_MASK)
    if base == "eager":  # each model's eager function lives in its own modeling module (GPT-OSS's adds the sinks)
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise ValueError(f"{type(module).__name__}: no eager_attention_forward beside it to put a block mask under")
    else:
        function = AttentionInterface._global_mapping[base]
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and query.size(2) == key.size(2) > 1:
        attention_mask = _narrow_to_blocks(attention_mask, position_ids, query)
    return function(module, query, key, value, attention_mask, **kwargs)


def _narrow_to_blocks(mask, position_ids: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """The mask (bool: True = attend; float: additive) with every score across two examples of a row masked out; a
    causal block mask where the model passed none (sdpa's causal shortcut). Shapes (rows, 1, L, L)."""
    rows, length = query.size(0), query.size(2)
    example = (position_ids == 0).cumsum(-1).expand(rows, -1)
    same = example[:, None, :, None] == example[:, None, None, :]
    if mask is None:
        causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
        return same & causal
    mask = mask[..., :length, :length]
    if mask.dtype == torch.bool:
        return mask & same
    return torch.where(same, mask, torch.finfo(mask.dtype).min)


def use_per_example_attention(model) -> bool:
    """Switch a loaded transformers model (or a peft wrapper of one) from sdpa to PER_EXAMPLE; False, with the model
    unchanged, where its attention is not transformers' sdpa or it has sliding-window layers."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", PER_EXAMPLE):
        return False
    if getattr(config, "sliding_window", None) or "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return False
    AttentionInterface.register(PER_EXAMPLE, per_example_attention)
    AttentionMaskInterface.register(PER_EXAMPLE, _per_example_mask)
    config._attn_implementation = PER_EXAMPLE
    return True
