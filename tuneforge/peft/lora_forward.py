"""A LoRA forward that adds the low-rank update into the base layer's output in place.

peft's `lora.Linear.forward` computes `result + lora_B(lora_A(x)) * scaling`: two temporaries the size of the
layer's output (B's product, then its scaled copy) and a third for the sum, in each of the 7 adapted layers of every
decoder layer. On CPU those temporaries, freed between the activations that backward keeps, fragment glibc's heap:
with SmolLM2-135M (micro batch 4 x 512, fp32) the heap grew to 7.3 GB for 3.6 GB of live tensors. Here the update is
one `addmm_` into the base output (which autograd does not keep: a linear saves its input, not its output), so
there are no output-sized temporaries: peak RSS 5.9 GB, same speed (benchmarks/RESULTS.md, "Memory"). The values
are peft's up to rounding: the sum is rounded once instead of three times.

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
    result = self.base_layer(x)
    device = x.device.type
    if not (torch.is_autocast_enabled(device) and x.dtype == torch.get_autocast_dtype(device)):
        x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
    # else x is already what autocast gives lora_A: peft's cast to the adapter's fp32 would be undone at once
    # (two copies of x each way, for the same values and gradients)
    down = self.lora_A[name](self.lora_dropout[name](x))
    flat = result.view(-1, result.size(-1))
    flat.addmm_(down.reshape(-1, down.size(-1)).to(flat.dtype), self.lora_B[name].weight.t().to(flat.dtype),
                alpha=self.scaling[name])
    return result


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
