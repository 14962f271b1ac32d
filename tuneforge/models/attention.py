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
position_ids come with the layer's inputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

PER_EXAMPLE = "tuneforge_per_example_sdpa"


def example_blocks(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    """[(start, end), ...] of each row: a block opens wherever the position restarts at 0."""
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
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for r, blocks in enumerate(example_blocks(position_ids, query.size(0))):
        q, k, v = query[r:r + 1], key[r:r + 1], value[r:r + 1]
        rows.append(torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                              dropout_p=dropout, scale=scaling, is_causal=True)
                               for s, e in blocks], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def _per_example_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, local_size=None, **kwargs):
    """No mask where per_example_attention can read the blocks from position_ids; sdpa's mask otherwise."""
    if (attention_mask is None and local_size is None and q_offset == 0 and kv_offset == 0
            and q_length == kv_length and not getattr(kwargs.get("config"), "sliding_window", None)):
        return None
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function or causal_mask_function,
                     attention_mask, local_size, **kwargs)


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
