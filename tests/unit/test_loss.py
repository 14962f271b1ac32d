import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.checkpoint.state import TrainState
from tuneforge.config.schema import PeftConfig
from tuneforge.data import IGNORE
from tuneforge.distributed import DistEnv, TrainModule
from tuneforge.models.load import resolve_precision
from tuneforge.models.loss import causal_lm_loss
from tuneforge.peft import apply_peft
from tuneforge.train.objective import accumulate_gradients
from tuneforge.train.recipe import train_step

pytestmark = pytest.mark.precision  # run again under AVX2-only kernels in CI (.ci/run)


def batch(vocab=512, rows=3, width=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding on one row
    labels = ids.clone()
    labels[:, :8] = IGNORE  # prompt
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_head_on_labelled_positions_equals_full_forward(arch, tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32)
    b = batch()
    fast, full = causal_lm_loss(model, b), causal_lm_loss(model, b, full_forward=True)
    n = int((b["labels"][:, 1:] != IGNORE).sum())
    assert torch.allclose(fast, full, rtol=1e-6)
    hf_mean = model(**b).loss  # transformers' own causal-LM loss (mean over label tokens)
    assert torch.allclose(fast / n, hf_mean, rtol=1e-5)


def test_accumulation_equals_bigger_batch(tiny_models):
    """Two micro-batches through the recipe's own step, each divided by the step's total label tokens, give the
    big batch's loss and gradient; one optimizer step from either gives the same weights."""
    torch.manual_seed(0)
    model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32),
                       PeftConfig(lora_rank=4, lora_alpha=8))
    for p in model.parameters():  # make lora_B non-zero so every adapter weight gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    big = batch(rows=8, seed=1)
    big["labels"][3, 8:12] = IGNORE  # micro-batches with different token counts
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    module, env, fp32 = TrainModule(model), DistEnv(), resolve_precision("float32", "cpu")

    def grads(micro_batches):
        model.zero_grad()
        loss, tokens = accumulate_gradients(module, micro_batches, fp32, env)
        assert tokens == int((big["labels"][:, 1:] != IGNORE).sum())
        return loss, [p.grad.clone() for p in params]

    def stepped(micro_batches):
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        model.zero_grad()
        optimizer = torch.optim.SGD(params, lr=0.5)
        state = TrainState(module, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), None)
        result = train_step(state, micro_batches, fp32, env, params, grad_clip=None)
        assert result.healthy and state.step == 1
        return result.loss, [p.detach().clone() for p in params]

    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    loss_a, g_a = grads([big])
    loss_b, g_b = grads(halves)
    assert abs(loss_a - loss_b) < 1e-6
    for a, b_ in zip(g_a, g_b):
        assert torch.allclose(a, b_, atol=1e-7, rtol=1e-5)
    (loss_a, w_a), (loss_b, w_b) = stepped([big]), stepped(halves)
    assert abs(loss_a - loss_b) < 1e-6
    for a, b_, p0 in zip(w_a, w_b, start):
        assert not torch.equal(a, p0)  # the step moved every adapter weight
        assert torch.allclose(a, b_, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("chunk", [0, 1, 7, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_head_cross_entropy_equals_autograd(chunk, bias):
    """Loss and the gradients of hidden states, head weight and bias match linear + cross_entropy through autograd,
    whatever the chunking."""
    from tuneforge.models.loss import HeadCrossEntropy

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=bias).double()
    targets = torch.randint(0, 50, (23,), generator=g)

    ref = torch.nn.functional.cross_entropy(head(hidden), targets, reduction="sum")
    ref_grads = torch.autograd.grad(ref * 0.5, [hidden, *head.parameters()])
    ours = HeadCrossEntropy.apply(hidden, head.weight, head.bias, targets, chunk)
    our_grads = torch.autograd.grad(ours * 0.5, [hidden, *head.parameters()])
    assert torch.allclose(ours.double(), ref, rtol=1e-6)
    for a, b in zip(our_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # the softmax runs in fp32


def test_full_finetune_gradients_through_the_chunked_head(tiny_models):
    """Every weight's gradient (head and tied embeddings included) equals the plain full forward's, in fp32 and
    close to it under bf16 autocast."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32)
    b = batch()

    def grads(autocast: bool, **kw):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = causal_lm_loss(model, b, **kw)
        loss.backward()
        return float(loss), [p.grad.clone() for p in model.parameters()]

    for autocast, tol in ((False, 1e-5), (True, 2e-2)):
        loss_full, g_full = grads(autocast, full_forward=True)
        loss_ours, g_ours = grads(autocast, chunk_tokens=5)
        assert abs(loss_full - loss_ours) <= tol * abs(loss_full)
        for a, b_ in zip(g_ours, g_full):
            assert torch.allclose(a, b_, rtol=tol, atol=tol * float(b_.abs().max()))
