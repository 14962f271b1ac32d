"""Whether packing is exact for a model: checked on the model itself, not assumed from its name.

A packed row holds several examples, each with position_ids restarting at 0 and no attention mask; the attention
reads the example blocks from the positions (per-example attention, transformers' packed-sequence mask, or
flash-attention's varlen kernel). That is only the padded run's computation where nothing but attention mixes
positions and the model takes its positions from the position_ids it is given. Recurrent, state-space and
linear-attention layers carry state from one example into the next; RoBERTa-style models compute positions from the
input ids; ALiBi and older attention code build their own full causal mask. No list of names keeps up with the next
architecture, so two forwards of three short rows ask the model, packed as data.batching=packing packs them and
padded as pad_longest pads them:

  packed: A B | A' B | B A     (position_ids restarting at each example, no attention mask)
  padded: A   | A'   | B       (right padding, attention mask, no position_ids: the model's own positions)

B's outputs must not depend on what precedes it (rows 0 and 1: the same shapes, so the same numbers up to the
kernels' rounding), and every example's packed outputs must be its padded ones (the same total shape again)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.errors import first_line
from tuneforge.models.attention import use_block_mask_attention, use_model_attention
from tuneforge.models.layers import transformers_model

_A, _B = 6, 5  # tokens of the two probe examples
# The largest relative gap that counts as rounding. Exact packing gives the same numbers up to the kernels' rounding
# (~1e-7 in fp32); a layer that carries state gives gaps of 1e-4 and more even in a tiny random model. Weights that
# compute in bf16 (a 4-bit base) round each layer's output to 8 bits, and are given 1e-2.
_FP32_GAP, _REDUCED_GAP = 1e-5, 1e-2
CARRIES_STATE = ("an example's outputs change with the example packed before it (a layer carries state along the "
                 "sequence: recurrent, state-space or linear attention, or attention reaches across examples)")
DIFFERS_FROM_PADDED = ("an example's outputs in a packed row differ from its outputs padded (the model does not take "
                       "its positions from the position_ids that restart at each example, or masks its own way)")


@torch.no_grad()
def check_packing(model, pad_id: int | None = None) -> str | None:
    """None where packed rows give each example the outputs it has padded, else why not (one clause). Runs in eval
    mode (no dropout) and fp32 compute (no autocast), on the device the model is on; its training mode is restored.
    A model whose attention is flash-attention on CPU is probed with sdpa (flash-attention's varlen kernel reads the
    blocks from the same position_ids)."""
    inner = transformers_model(model)
    params = [p for p in inner.parameters() if p.device.type != "meta"]
    device = params[0].device if params else torch.device("cpu")
    vocab = inner.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    a, a2, b = (torch.randint(3, max(vocab, 4), (n,), generator=g) for n in (_A, _A, _B))
    width = _A + _B
    packed = torch.stack([torch.cat([a, b]), torch.cat([a2, b]), torch.cat([b, a])]).to(device)
    ab, ba = torch.cat([torch.arange(_A), torch.arange(_B)]), torch.cat([torch.arange(_B), torch.arange(_A)])
    positions = torch.stack([ab, ab, ba]).to(device)
    pad = pad_id if pad_id is not None else (getattr(inner.config, "pad_token_id", None) or 0)
    padded = torch.full((3, width), pad, dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for row, example in enumerate((a, a2, b)):
        padded[row, :len(example)], mask[row, :len(example)] = example, 1
    restore = _cpu_attention(inner, device)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            out = model(input_ids=packed, position_ids=positions, use_cache=False).logits[:, -width:].float()
            alone = model(input_ids=padded.to(device), attention_mask=mask.to(device),
                          use_cache=False).logits[:, -width:].float()
    except Exception as e:  # noqa: BLE001 - a model that cannot run packed rows is not packed
        return f"a forward of packed rows (position_ids, no attention mask) failed ({first_line(e)})"
    finally:
        model.train(was_training)
        restore()
    reduced = _quantized(inner) or any(p.dtype not in (torch.float32, torch.float64) for p in params)
    limit = _REDUCED_GAP if reduced else _FP32_GAP
    if _gap(out[0, _A:], out[1, _A:]) > limit:
        return CARRIES_STATE
    pairs = [(out[0, :_A], alone[0, :_A]), (out[1, :_A], alone[1, :_A]), (out[0, _A:], alone[2, :_B]),
             (out[2, :_B], alone[2, :_B]), (out[2, _B:], alone[0, :_A])]
    if max(_gap(x, y) for x, y in pairs) > limit:
        return DIFFERS_FROM_PADDED
    return None


def _gap(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / x.abs().max().clamp(min=1.0))


def _quantized(model) -> bool:
    return getattr(model, "is_quantized", False) or bool(getattr(model.config, "quantization_config", None))


def _cpu_attention(model, device: torch.device):
    """flash-attention runs on CUDA only: on a CPU model, probe with sdpa (or eager) and give the setting back."""
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or ""
    if device.type == "cuda" or "flash" not in impl:
        return lambda: None
    config._attn_implementation = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
    return lambda: setattr(config, "_attn_implementation", impl)


@dataclass(frozen=True)
class PackedAttention:
    """How packed rows attend for one model, and why not faster: `path` is per_example (tuneforge's attention per
    example block), model (transformers' own attention and its packed-sequence mask) or block_mask (the model's own
    attention function under a block mask from the position_ids); `not_exact` is why none of them is exact."""
    path: str
    dropped: tuple[str, ...] = ()   # (path, why) of each faster path that was not exact, in the order tried
    not_exact: str | None = None


def choose_packed_attention(model, per_example: bool, pad_id: int | None = None) -> PackedAttention:
    """The first exact path for packed rows, tried from the fastest: per-example attention (where switched on), then
    transformers' own attention with its packed-sequence mask, then the model's own attention function under a block
    mask built from the position_ids. The model is left switched to the path chosen (or to its own, when none is)."""
    tried = []
    if per_example:
        reason = check_packing(model, pad_id)
        if reason is None:
            return PackedAttention("per_example")
        tried.append(("per-example attention", reason))
        use_model_attention(model)
    reason = check_packing(model, pad_id)
    if reason is None:
        return PackedAttention("model", tuple(f"{path}: {why}" for path, why in tried))
    tried.append(("transformers' own attention", reason))
    if use_block_mask_attention(model):
        reason = check_packing(model, pad_id)
        if reason is None:
            return PackedAttention("block_mask", tuple(f"{path}: {why}" for path, why in tried))
        use_model_attention(model)
        tried.append(("its attention under a block mask", reason))
    whys = {why for _, why in tried}
    not_exact = tried[-1][1] if len(whys) == 1 else "; ".join(f"with {path} {why}" for path, why in tried)
    return PackedAttention("model", tuple(f"{path}: {why}" for path, why in tried), not_exact)
