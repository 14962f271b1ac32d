"""The in-place LoRA forward (tuneforge/peft/lora_forward.py) computes peft's values and gradients."""
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from tuneforge.peft.lora_forward import use_in_place_lora_forward


def two_layer_lora(**lora):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    # init_lora_weights=False: B is random too, so the gradient of A is not zero and is compared as well
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False,
                                           **lora))


def grads_of(model, x, module=None):
    out = model(x)
    out.square().sum().backward()
    module = module or model
    return out.detach(), {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def test_in_place_forward_gives_peft_outputs_and_gradients():
    peft_model = two_layer_lora(lora_dropout=0.0)
    ours = copy.deepcopy(peft_model)
    assert use_in_place_lora_forward(ours) == 2
    x = torch.randn(3, 5, 8)
    (want, want_grads), (got, got_grads) = grads_of(peft_model, x), grads_of(ours, x)
    # one fused multiply-add instead of a product, a scaling and a sum: equal to fp32 rounding
    assert torch.allclose(want, got, rtol=1e-6, atol=1e-6) and not torch.allclose(want, got * 1.0001, rtol=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 4
    for name in want_grads:
        assert torch.allclose(want_grads[name], got_grads[name], rtol=1e-5, atol=1e-6), name


def test_disabled_adapters_and_bf16_autocast_follow_peft():
    peft_model = two_layer_lora()
    ours = copy.deepcopy(peft_model)
    use_in_place_lora_forward(ours)
    x = torch.randn(4, 8)
    with torch.no_grad(), ours.disable_adapter(), peft_model.disable_adapter():
        assert torch.equal(ours(x), peft_model(x))  # the base model alone (peft's own forward path)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = peft_model(x), ours(x)
    # one rounding of base + scaled update instead of three: equal to bf16 precision, not bit for bit
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_bf16_input_under_autocast_reaches_lora_a_uncast_with_peft_gradients():
    """Under bf16 autocast the second layer's input is already bf16: it goes to lora_A as it is (peft casts it to the
    adapter's fp32, and autocast straight back), with peft's gradients to bf16 precision."""
    peft_model = two_layer_lora()
    ours = copy.deepcopy(peft_model)
    use_in_place_lora_forward(ours)
    x = torch.randn(6, 8)
    seen, runs = [], []
    for model in (peft_model, ours):
        hook = model.base_model.model[2].lora_A["default"].register_forward_pre_hook(
            lambda module, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs.append(grads_of(model, x))
        hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    (want, want_grads), (got, got_grads) = runs
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 4
    for name in want_grads:
        assert torch.allclose(want_grads[name], got_grads[name], rtol=3e-2, atol=3e-2 * want_grads[name].abs().max())


@pytest.mark.parametrize("lora", [{"use_dora": True}, {"lora_bias": True}])
def test_lora_variants_keep_peft_forward(lora):
    model = two_layer_lora(**lora)
    assert use_in_place_lora_forward(model) == (0 if lora.get("lora_bias") else 2)
    x = torch.randn(4, 8)
    with torch.no_grad():
        reference = copy.deepcopy(model)
        for m in reference.modules():
            m.__dict__.pop("forward", None)  # peft's own forward again
        assert torch.equal(model(x), reference(x))


def graph_nodes(tensor) -> set[str]:
    seen, todo, names = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_fp32_input_under_autocast_is_cast_once_and_updated_without_a_view():
    """The first layer's fp32 input is cast to bf16 once, for the base product and lora_A alike (autocast would cast
    it for each), and the update lands in the base output itself, not in a view of it: autograd's backward then
    needs no CopySlices (three output-sized copies). Outputs and gradients are peft's to bf16 precision."""
    peft_model = two_layer_lora()
    ours = copy.deepcopy(peft_model)
    use_in_place_lora_forward(ours)
    layer = ours.base_model.model[0]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
             for m in (layer.base_layer, layer.lora_A["default"])]
    x = torch.randn(3, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (want, want_grads), (got, got_grads) = grads_of(peft_model, x), grads_of(ours, x)
        out = ours(x)
    for hook in hooks:
        hook.remove()
    assert inputs[0] is inputs[1] and inputs[0].dtype == torch.bfloat16 and inputs[0].shape == (15, 8)
    assert got.shape == want.shape == (3, 5, 4) and torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert "CopySlices" not in graph_nodes(out) and "AddmmBackward0" in graph_nodes(out)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 4
    for name in want_grads:
        assert torch.allclose(want_grads[name], got_grads[name], rtol=3e-2, atol=3e-2 * want_grads[name].abs().max())


class Attention(torch.nn.Module):
    """q, k and v read one input, o another one of the same width, as in a decoder layer's attention block."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(8, n, bias=False) for n in (4, 2, 2, 8))

    def forward(self, x, k_input=None, scale_after_q=False):
        q = self.q(x)
        if scale_after_q:
            x.mul_(1.5)  # the same tensor object, changed in place (its version counter tells)
        h = torch.cat([q, self.k(x if k_input is None else k_input), self.v(x)], dim=-1)
        return self.o(torch.tanh(h))


def attention_lora():
    torch.manual_seed(0)
    return get_peft_model(torch.nn.Sequential(Attention()), LoraConfig(
        r=2, lora_alpha=6, target_modules=["q", "k", "v", "o"], init_lora_weights=False))


def lora_a_calls(model) -> list[str]:
    """The names of the lora_A modules called on their own, in order, from now on."""
    calls = []
    for name in "qkvo":
        module = getattr(model.base_model.model[0], name).lora_A["default"]
        module.register_forward_pre_hook(lambda module, args, name=name: calls.append(name))
    return calls


def test_layers_called_with_one_input_share_one_down_projection():
    """q's call makes the down-projections of q, k, v and o in one product: k and v take theirs, o reads another
    tensor and computes its own (the only lora_A module called). Values and gradients are peft's, also when k is fed
    another tensor or the input is changed in place after q's call (k and v then compute theirs again)."""
    peft_model = attention_lora()
    ours = copy.deepcopy(peft_model)
    assert use_in_place_lora_forward(ours) == 4
    calls = lora_a_calls(ours)
    x = torch.randn(3, 5, 8)
    (want, want_grads), (got, got_grads) = grads_of(peft_model, x), grads_of(ours, x)
    assert calls == ["o"]
    assert torch.allclose(want, got, rtol=1e-5, atol=1e-6)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 8
    for name in want_grads:
        assert torch.allclose(want_grads[name], got_grads[name], rtol=1e-4, atol=1e-6), name
    block, reference = ours.base_model.model[0], peft_model.base_model.model[0]
    with torch.no_grad():
        for kwargs in ({"k_input": x.flip(0)}, {"scale_after_q": True}):
            x_ours = x.clone()
            want, got = reference(x, **kwargs), block(x_ours, **kwargs)
            assert torch.allclose(want, got, rtol=1e-5, atol=1e-6), kwargs
            assert block.q._tuneforge_siblings.pending is None


def test_shared_input_is_cast_once_under_autocast_and_nothing_is_kept_after_the_call():
    peft_model = attention_lora()
    ours = copy.deepcopy(peft_model)
    use_in_place_lora_forward(ours)
    block = ours.base_model.model[0]
    inputs = []
    for name in "qkv":
        getattr(block, name).base_layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    x = torch.randn(3, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (want, want_grads), (got, got_grads) = grads_of(peft_model, x), grads_of(ours, x)
    assert len(inputs) == 3 and inputs[0].dtype == torch.bfloat16 and inputs[0] is inputs[1] is inputs[2]
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for name in want_grads:
        assert torch.allclose(want_grads[name], got_grads[name], rtol=3e-2, atol=3e-2 * want_grads[name].abs().max())
    siblings = block.q._tuneforge_siblings
    assert siblings is block.o._tuneforge_siblings and siblings.pending is None


def test_bf16_base_without_autocast_feeds_the_fp32_adapters_an_fp32_input():
    """A bf16 base with fp32 adapters and no autocast (peft casts lora_A's input to the adapter's dtype): the shared
    product does the same, and the output is peft's to bf16 precision (one rounding of the sum instead of three)."""
    peft_model = attention_lora()
    for name in "qkvo":
        getattr(peft_model.base_model.model[0], name).base_layer.to(torch.bfloat16)
    ours = copy.deepcopy(peft_model)
    use_in_place_lora_forward(ours)
    x = torch.randn(3, 5, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        want, got = peft_model(x), ours(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2 * want.float().abs().max())


def _finetuned(lora_forward: str):
    """stories260K through the recipe's own apply_finetuning, LoRA on every linear layer."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import STORIES
    from tuneforge.config import load_config
    from tuneforge.peft import apply_finetuning

    cfg = load_config({"model": {"name_or_path": str(STORIES)}, "peft": {"method": "lora", "lora_rank": 4},
                       "data": {"train": {"path": "x.json", "format": "squad"}},
                       "train": {"lora_forward": lora_forward}}, check_paths=False)
    torch.manual_seed(0)
    return apply_finetuning(AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32), cfg)


def _switched(model) -> int:
    return sum(hasattr(m, "_tuneforge_siblings") for m in model.modules())


def test_train_lora_forward_peft_keeps_peft_forward_with_the_same_values():
    ours, theirs = _finetuned("tuneforge"), _finetuned("peft")
    assert _switched(ours) == 35 and _switched(theirs) == 0  # 7 linear layers in each of 5 decoder layers
    for p, q in zip(ours.parameters(), theirs.parameters()):
        if p.requires_grad:  # lora_B != 0, so the update shows
            torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(p.numel()), std=0.05)
            q.data.copy_(p.data)
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    (want, want_grads), (got, got_grads) = (grads_of(lambda x, m=m: m(input_ids=x).logits, ids, m)
                                            for m in (theirs, ours))
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) == 70
    for name in want_grads:  # fp32 rounding relative to the largest gradient of each tensor
        assert (got_grads[name] - want_grads[name]).abs().max() <= 1e-5 * want_grads[name].abs().max(), name


def test_a_peft_release_it_is_not_tested_with_keeps_peft_forward_and_says_so(monkeypatch, caplog):
    import peft

    monkeypatch.setattr(peft, "__version__", "0.99.0")
    with caplog.at_level("WARNING", logger="tuneforge"):
        model = _finetuned("tuneforge")
    assert _switched(model) == 0
    assert "peft 0.99.0 is not a release tuneforge's LoRA forward is tested with (0.21.x)" in caplog.text
