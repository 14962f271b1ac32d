"""A LoRA forward that adds the low-rank update into the base layer's output in place.

peft's `lora.Linear.forward` computes `result + lora_B(lora_A(x)) * scaling`: two temporaries the size of the
layer's output (B's product, then its scaled copy) and a third for the sum, in each of the 7 adapted layers of every
decoder layer. On CPU those temporaries, freed between the activations that backward keeps, fragment glibc's heap:
with SmolLM2-135M (micro batch 4 x 512, fp32) the heap grew to 7.3 GB for 3.6 GB of live tensors. Here the update is
one `addmm_` into the base output (which autograd does not keep: a linear saves its input, not its output), so
there are no output-sized temporaries: peak RSS 5.9 GB, same speed (benchmarks/RESULTS.md, "Memory"). The values
are peft's up to rounding: the sum is rounded once instead of three times.

Three more savings (benchmarks/RESULTS.md, "LoRA forward: one cast, one down-projection per shared input"):
- an fp32 input under autocast is cast to the autocast dtype once, for the base product and lora_A both; autocast
  would cast it for each, and cast each one's gradient back;
- the layers one parent calls with one input tensor (q, k and v; gate and up) share that cast and get their
  down-projections from one product with their lora_A weights stacked (see _Siblings): one product of 3r columns
  instead of three of r, and in backward one product for their input's gradient and one for the stacked lora_A
  gradient. The input's gradient then sums over those layers in the autocast dtype, as each layer's base and
  adapter parts did already. With SmolLM2 under bf16 the activation-sized casts of a decoder layer go from 10
  forward and 10 backward to 2 and 2. Not with LoRA dropout (each layer draws its own mask) nor under torch.compile;
- the products run on the input flattened to 2-d, so the in-place update is on the base output itself, not on a
  view of it: an in-place update of a view costs autograd three output-sized copies in backward (CopySlices).

It replaces the forward of plain vanilla LoRA layers only (nn.Linear base, one active adapter, no DoRA or other
variant, no LoRA bias); everything else, and any call peft's forward handles specially (adapters disabled, merged,
per-example adapter names), goes through peft's own forward. Weights, names and saved adapters are peft's."""
from __future__ import annotations

import types

import torch


class _Siblings:
    """The vanilla LoRA layers one parent module (a decoder layer's attention or MLP block) holds, in the order it
    registered them. A layer called with an input that no earlier sibling's call has already worked on computes the
    cast input and the down-projections of itself and of every later sibling of the same input width in one
    product, their lora_A weights stacked; a later sibling called with that same tensor (the same object, unchanged
    since: its version counter, under the same autocast dtype and grad mode) takes its own from there, anything
    else computes again. For a Llama attention block q's call computes q, k, v and o: k and v take theirs, o reads
    another tensor and computes its own (one wasted rank-r slice of q's product). Which layers share is decided by
    each call alone, never by earlier calls, so a step computes the same whatever ran before it (a resumed run, a
    checkpointed layer's recomputation)."""

    def __init__(self, layers: list):
        self.layers = layers
        self.pending = None  # (input, version, key, flat cast input, {id(layer): its down-projection})

    def inputs(self, layer, x: torch.Tensor, autocast) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(`x` flattened to 2-d and cast as the base product takes it, `layer`'s down-projection if already made)."""
        key = (autocast, torch.is_grad_enabled())
        hit = self.pending
        if hit is not None and hit[0] is x and hit[1] == x._version and hit[2] == key and id(layer) in hit[4]:
            flat, down = hit[3], hit[4].pop(id(layer))
            if not hit[4]:
                self.pending = None
            return flat, down
        flat = _flat_input(x, autocast)
        if not _shares_down(layer, flat):
            return flat, None
        members = [layer] + [m for m in self.layers[self.layers.index(layer) + 1:] if _shares_down(m, flat)]
        if len(members) == 1:
            return flat, None
        weights = [m.lora_A[_adapter(m)].weight for m in members]
        downs = torch.nn.functional.linear(_lora_input(layer, flat, autocast, weights[0].dtype), torch.cat(weights))
        downs = downs.split([w.size(0) for w in weights], dim=1)
        self.pending = (x, x._version, key, flat, {id(m): d for m, d in zip(members[1:], downs[1:])})
        return flat, downs[0]

    def clear(self, *_) -> None:
        """After the parent's call: nothing is kept past it."""
        self.pending = None


def _flat_input(x: torch.Tensor, autocast) -> torch.Tensor:
    if autocast is not None and x.dtype == torch.float32:
        x = x.to(autocast)  # once for the base product and lora_A: autocast would cast x for each of them
    return x.reshape(-1, x.size(-1))


def _lora_input(layer, flat: torch.Tensor, autocast, dtype: torch.dtype) -> torch.Tensor:
    # an input already in the autocast dtype goes to lora_A as it is: peft's cast to the adapter's fp32 would be
    # undone at once (two copies of x each way, for the same values and gradients)
    return flat if flat.dtype == autocast else layer._cast_input_dtype(flat, dtype)


def _adapter(layer) -> str | None:
    """The one active adapter's name, if `layer` takes the in-place path at all."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if layer.disable_adapters or layer.merged or len(active) != 1 or active[0] in layer.lora_variant:
        return None
    return active[0]


def _shares_down(layer, flat: torch.Tensor) -> bool:
    """Whether `layer`'s down-projection can come from a product shared with its siblings: the in-place path, no
    dropout (each layer would draw its own mask), lora_A in x's width."""
    name = _adapter(layer)
    return (name is not None and isinstance(layer.lora_dropout[name], torch.nn.Identity)
            and layer.lora_A[name].in_features == flat.size(-1))


def _in_place_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from peft.tuners.lora.layer import Linear

    name = _adapter(self)
    if args or kwargs or name is None:
        return Linear.forward(self, x, *args, **kwargs)
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    siblings = getattr(self, "_tuneforge_siblings", None)
    if siblings is None or torch.compiler.is_compiling():  # compiled: inductor fuses what sharing would save
        flat, down = _flat_input(x, autocast), None
    else:
        flat, down = siblings.inputs(self, x, autocast)
    result = self.base_layer(flat)  # 2-d: updated in place below, it is no view (a view's in-place update costs
    # autograd three copies of the output in backward: CopySlices)
    if down is None:
        lora_x = _lora_input(self, flat, autocast, self.lora_A[name].weight.dtype)
        down = self.lora_A[name](self.lora_dropout[name](lora_x))
    result.addmm_(down.to(result.dtype), self.lora_B[name].weight.t().to(result.dtype), alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.size(-1))


# The peft releases this forward is tested with (major.minor): it reads peft's internals (_cast_input_dtype,
# lora_variant, active_adapters, merged, disable_adapters, scaling, lora_dropout, lora_A / lora_B), which another
# release may change. Outside them LoRA layers keep peft's own forward.
TESTED_PEFT = ("0.21",)


def peft_release_tested(version: str | None = None) -> bool:
    import peft

    return ".".join((version or peft.__version__).split(".")[:2]) in TESTED_PEFT


def use_in_place_lora_forward(model) -> int:
    """Give every vanilla LoRA linear layer of `model` the in-place forward, and let the ones under one parent module
    share their input's cast and down-projection where the parent calls them with one input; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for parent in model.modules():
        layers = [m for m in parent.children() if type(m) is Linear and type(m.base_layer) is torch.nn.Linear
                  and all(b.bias is None for b in m.lora_B.values())]
        if not layers:
            continue
        siblings = _Siblings(layers)
        parent.register_forward_hook(siblings.clear)
        for layer in layers:
            layer.forward = types.MethodType(_in_place_forward, layer)
            layer._tuneforge_siblings = siblings
        count += len(layers)
    return count
