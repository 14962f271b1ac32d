"""A LoRA forward that adds the low-rank update into the base layer's output in place.

peft's `lora.Linear.forward` computes `result + lora_B(lora_A(x)) * scaling`: two temporaries the size of the
layer's output (B's product, then its scaled copy) and a third for the sum, in each of the 7 adapted layers of every
decoder layer. On CPU those temporaries, freed between the activations that backward keeps, fragment glibc's heap:
with SmolLM2-135M (micro batch 4 x 512, fp32) the heap grew to 7.3 GB for 3.6 GB of live tensors. Here the update is
one `addmm_` into the base output (which autograd does not keep: a linear saves its input, not its output), so
there are no output-sized temporaries: peak RSS 5.9 GB, same speed (benchmarks/RESULTS.md, "Memory"). The values
are peft's up to rounding: the sum is rounded once instead of three times.

Under autocast, two more copies go (benchmarks/RESULTS.md, "LoRA forward: one cast"):
- an fp32 input is cast to the autocast dtype once, for the base product and lora_A both; autocast would cast it for
  each, and cast each one's gradient back (with SmolLM2 under bf16, 10 activation-sized casts a decoder layer
  forward and 10 backward become 5 and 5);
- the product runs on the input flattened to 2-d, so the in-place update is on the base output itself, not on a
  view of it: an in-place update of a view costs autograd three output-sized copies in backward (CopySlices).

It replaces the forward of plain vanilla LoRA layers only (nn.Linear base, one active adapter, no DoRA or other
variant, no LoRA bias); everything else, and any call peft's forward handles specially (adapters disabled, merged,
per-example adapter names), goes through peft's own forward. Weights, names and saved adapters are peft's."""
from __future__ import annotations

import types

import torch


def _in_place_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    from peft.tuners.lora.layer import Linear

    active = [name for name in self.active_adapters if name in self.lora_A]
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant:
        return Linear.forward(self, x, *args, **kwargs)
    name = active[0]
    device = x.device.type
    autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if autocast is not None and x.dtype == torch.float32:
        x = x.to(autocast)  # once for the base product and lora_A: autocast would cast x for each of them
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    result = self.base_layer(x)  # 2-d: updated in place below, it is no view (a view's in-place update costs
    # autograd three copies of the output in backward: CopySlices)
    if x.dtype != autocast:
        x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
    # else x is already what autocast gives lora_A: peft's cast to the adapter's fp32 would be undone at once
    # (two copies of x each way, for the same values and gradients)
    down = self.lora_A[name](self.lora_dropout[name](x))
    result.addmm_(down.to(result.dtype), self.lora_B[name].weight.t().to(result.dtype), alpha=self.scaling[name])
    return result.view(*shape[:-1], result.size(-1))


def use_in_place_lora_forward(model) -> int:
    """Give every vanilla LoRA linear layer of `model` the in-place forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if (type(module) is Linear and type(module.base_layer) is torch.nn.Linear
                and all(b.bias is None for b in module.lora_B.values())):
            module.forward = types.MethodType(_in_place_forward, module)
            count += 1
    return count
