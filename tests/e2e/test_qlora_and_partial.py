"""QLoRA (4-bit base + LoRA) trains and merges on CPU; partial fine-tuning changes exactly the selected weights."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import STORIES, run_cli, tiny_overrides, train_losses
from tests.e2e.test_finetune_cli import probe_ids
from tests.e2e.test_peft_methods import assert_merged_matches_unmerged


def test_qlora_trains_with_checkpointing_and_merges_into_full_precision(tiny_recipe, tmp_path):
    from tuneforge.run.model import load_run_model

    out = run_cli("finetune", "-c", str(tiny_recipe), *tiny_overrides(
        tmp_path, "qlora", "data.train.limit=8", "data.seq_length=128", "train.max_steps=4",
        "train.lr_scheduler.warmup_steps=0",
        "train.optimizer.lr=0.03", "peft.lora_rank=4", "peft.lora_alpha=8", "distributed.activation_checkpointing=true",
        "model.quantization={bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16}"))
    assert "base weights: 4-bit nf4 + double quant, bfloat16 matmuls (frozen)" in out.stdout
    assert "activation checkpointing: on" in out.stdout
    assert "Failed to load" not in out.stdout + out.stderr  # bitsandbytes' optional-kernel notice is kept out
    losses = train_losses(tmp_path / "qlora")
    assert losses[-1] < losses[0] * 0.95, losses

    model, _, _ = load_run_model(tmp_path / "qlora")  # generation reloads the quantized base + adapter
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())

    merged = tmp_path / "merged"
    run_cli("merge", "--run", str(tmp_path / "qlora"), "--out", str(merged))
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert_merged_matches_unmerged(merged, tmp_path / "qlora" / "final", probe_ids())
    from tuneforge.export import export_vllm

    export_vllm(tmp_path / "qlora", tmp_path / "vllm")  # vLLM gets that same full-precision merge, not 4-bit weights
    exported, want = load_file(tmp_path / "vllm/model.safetensors"), load_file(merged / "model.safetensors")
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)
    from tuneforge.run.merge import merge_run

    merge_run(tmp_path / "qlora", tmp_path / "merged-bf16", "bfloat16")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged-bf16").dtype == torch.bfloat16


def test_partial_finetune_changes_exactly_the_selected_parameters(tiny_recipe, tmp_path):
    out = run_cli("finetune", "-c", str(tiny_recipe), *tiny_overrides(
        tmp_path, "partial", "peft=null", "data.seq_length=128", "train.max_steps=2", "train.optimizer.lr=0.001",
        "checkpoint.every_steps=2",
        "train.trainable={top_layers: 2, patterns: ['^model\\.norm\\.']}"))
    assert "trainable: top 2 of 5 decoder layers (model.layers.3-4), /^model\\.norm\\./ (1 tensors)" in out.stdout
    final = tmp_path / "partial" / "final"
    assert (final / "config.json").is_file() and not (final / "adapter_config.json").exists()
    base = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    selected = {n for n in base if n.startswith(("model.layers.3.", "model.layers.4.", "model.norm."))}
    assert len(selected) == 2 * 9 + 1
    for name in base:
        assert torch.equal(base[name], tuned[name]) == (name not in selected), name
    # only the selected tensors were trained, checkpointed and given optimizer state
    assert set(load_file(tmp_path / "partial/checkpoints/step_2/trainable.safetensors")) == selected
    state = torch.load(tmp_path / "partial/checkpoints/step_2/state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(selected)


def test_tied_head_alone_is_refused():
    from tuneforge.config.schema import TrainableConfig
    from tuneforge.errors import UserError
    from tuneforge.peft.freeze import apply_trainable

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    with pytest.raises(UserError, match="ties its LM head to the input embeddings"):
        apply_trainable(model, TrainableConfig(lm_head=True))
    apply_trainable(model, TrainableConfig(lm_head=True, embeddings=True))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_untied_lm_head_only_trains_the_head(tiny_models, arch):
    from tuneforge.config.schema import OptimizerConfig, TrainableConfig
    from tuneforge.peft.freeze import apply_trainable
    from tuneforge.train.optim import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models(arch), dtype=torch.float32, tie_word_embeddings=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_trainable(model, TrainableConfig(lm_head=True))
    head = "lm_head.weight"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [head]
    optimizer = build_optimizer(model, OptimizerConfig(lr=0.01))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 1
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n != head), n
