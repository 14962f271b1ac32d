import pytest
import torch
from transformers import AutoModelForCausalLM

from tuneforge.config.schema import PeftConfig
from tuneforge.data import IGNORE
from tuneforge.models import causal_lm_loss
from tuneforge.peft import apply_peft


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
    """Two micro-batches, each divided by the step's total label tokens, give the big batch's gradient."""
    torch.manual_seed(0)
    model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32),
                       PeftConfig(lora_rank=4, lora_alpha=8))
    for p in model.parameters():  # make lora_B non-zero so every adapter weight gets a gradient
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    big = batch(rows=8, seed=1)
    big["labels"][3, 8:12] = IGNORE  # micro-batches with different token counts
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(micro_batches):
        model.zero_grad()
        tokens = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)
        loss = 0.0
        for mb in micro_batches:
            part = causal_lm_loss(model, mb) / tokens
            part.backward()
            loss += float(part)
        return loss, [p.grad.clone() for p in params]

    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    loss_a, g_a = grads([big])
    loss_b, g_b = grads(halves)
    assert abs(loss_a - loss_b) < 1e-6
    for a, b_ in zip(g_a, g_b):
        assert torch.allclose(a, b_, atol=1e-7, rtol=1e-5)
