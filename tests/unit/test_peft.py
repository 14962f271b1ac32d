"""PEFT recipe rules, adapter stacks saved and reloaded in-process, bottleneck adapters, activation checkpointing."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import SQUAD_TRAIN, STORIES
from tuneforge.config import dump_config, load_config
from tuneforge.errors import UserError

BASE = {"model": {"name_or_path": str(STORIES)}, "data": {"train": {"path": str(SQUAD_TRAIN), "format": "squad"}}}


def config(**sections):
    return load_config({**BASE, **sections})


def test_peft_list_parses_and_round_trips(tmp_path):
    cfg = config(peft=[{"method": "lora", "use_dora": True}, {"method": "prompt_tuning", "num_virtual_tokens": 7}])
    assert [p.method for p in cfg.peft] == ["lora", "prompt_tuning"] and cfg.peft[0].use_dora
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml").peft == cfg.peft  # num_virtual_tokens is a number, not a secret


@pytest.mark.parametrize("section, message", [
    ({"peft": {"method": "ia3", "lora_rank": 4}},
     "peft.lora_rank: applies to method lora, not ia3; remove it or leave it at its default (8)"),
    ({"peft": {"method": "lora", "num_virtual_tokens": 4}},
     "peft.num_virtual_tokens: applies to method prompt_tuning / p_tuning / prefix_tuning, not lora"),
    ({"peft": [{"method": "lora"}, {"method": "adapter", "adapter_len": 3}]},
     "peft[1].adapter_len: applies to method llama_adapter, not adapter"),
    ({"peft": {"method": "prompt_tuning", "num_virtual_tokens": 0}}, "peft.num_virtual_tokens: must be >= 1, got 0"),
    ({"peft": {"method": "lora", "lora_dropout": 1.5}}, "peft.lora_dropout: must be in [0, 1), got 1.5"),
    ({"peft": {"method": "lorra"}}, "peft.method: expected one of lora|ia3|prompt_tuning|p_tuning|prefix_tuning|"
                                    "llama_adapter|adapter, got 'lorra'; did you mean lora?"),
    ({"peft": [{"method": "lora"}, {"method": "lora"}]}, "peft[1].method: lora is listed twice"),
    ({"peft": [{"method": "lora"}, {"method": "ia3"}]}, "peft: at most one of the weight adapters (lora, ia3) per run"),
    ({"peft": [{"method": "p_tuning"}, {"method": "prompt_tuning"}]}, "peft: at most one of the prompt methods"),
    ({"peft": [{"method": "lora"}, {"method": "llama_adapter"}]}, "peft[1].method: llama_adapter replaces"),
    ({"peft": []}, "peft: an empty list"),
    ({"peft": None, "model": {"name_or_path": str(STORIES), "quantization": {"bits": 4}}},
     "model.quantization: quantized weights cannot be trained"),
    ({"model": {"name_or_path": str(STORIES), "quantization": {"bits": 8, "quant_type": "fp4"}}, "peft": {}},
     "model.quantization.quant_type: applies to bits: 4 only"),
    ({"model": {"name_or_path": str(STORIES), "quantization": {"bits": 3}}, "peft": {}},
     "model.quantization.bits: expected one of 4|8, got 3"),
    ({"peft": {}, "train": {"trainable": {"top_layers": 1}}}, "train.trainable: partial fine-tuning is for peft: null"),
    ({"train": {"trainable": {}}}, "train.trainable: selects no parameters"),
    ({"train": {"trainable": {"patterns": ["(("]}}}, "train.trainable.patterns[0]: invalid regex '(('"),
])
def test_bad_peft_recipes_name_the_field(section, message):
    with pytest.raises(UserError) as e:
        config(**section)
    assert message in str(e.value) and "\n" not in str(e.value)


def stories():
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def ids():
    torch.manual_seed(1)
    return {"input_ids": torch.randint(3, 512, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}


def logits(model, batch):
    with torch.no_grad():
        out = model(**batch).logits
    return out[:, -batch["input_ids"].shape[1]:]


def test_fresh_bottleneck_adapter_is_exactly_the_identity():
    from tuneforge.peft import apply_peft
    from tuneforge.config.schema import PeftConfig

    batch = ids()
    model = apply_peft(stories(), PeftConfig(method="adapter", bottleneck_size=4))
    assert torch.equal(logits(model, batch), logits(stories(), batch))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 5 * 2 * 4 and all(".bottleneck." in n for n in trainable)  # 5 layers x (attn, mlp)


def test_stack_of_ia3_bottleneck_and_p_tuning_saves_and_reloads(tmp_path):
    from tuneforge.peft import apply_peft, describe_adapters, load_adapters, save_adapters

    cfg = config(peft=[{"method": "p_tuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16},
                       {"method": "adapter", "bottleneck_size": 4}, {"method": "ia3"}])
    model = apply_peft(stories(), cfg.peft)
    torch.manual_seed(0)
    with torch.no_grad():  # make every adapter non-trivial so the comparison can fail
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    lines = describe_adapters(model)
    assert [line.split(":")[0] for line in lines] == ["adapter ia3", "adapter adapter", "adapter p_tuning"]
    save_adapters(model.eval(), tmp_path, str(STORIES))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "ia3", "p_tuning", "tuneforge_adapters.json"]
    batch = ids()
    reloaded = load_adapters(stories(), tmp_path).eval()
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    assert (logits(reloaded, batch) - logits(stories(), batch)).abs().max() > 1e-2


def test_bottleneck_loader_rejects_a_foreign_config(tmp_path):
    from tuneforge.peft.bottleneck import CONFIG_NAME, load_bottleneck

    (tmp_path / CONFIG_NAME).write_text('{"format": "something-else", "version": 1}')
    with pytest.raises(UserError, match="not a tuneforge-bottleneck v1 adapter config"):
        load_bottleneck(stories(), tmp_path)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(method):
    from tuneforge.models.loss import causal_lm_loss
    from tuneforge.peft import apply_finetuning

    batch = {**ids(), "labels": ids()["input_ids"]}
    results = []
    for on in (False, True):
        cfg = config(peft={"method": method}, distributed={"activation_checkpointing": on})
        torch.manual_seed(0)
        model = apply_finetuning(stories(), cfg).train()
        assert model.base_model.is_gradient_checkpointing == on if method == "lora" else \
            model.is_gradient_checkpointing == on
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)  # zero-initialised halves (lora_B, bottleneck up) would hide gradient paths
        loss = causal_lm_loss(model, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-7), n


def test_activation_checkpointing_is_non_reentrant_and_only_when_asked():
    from tuneforge.models.load import apply_activation_checkpointing

    assert not apply_activation_checkpointing(stories(), False).is_gradient_checkpointing
    model = apply_activation_checkpointing(stories(), True)
    wrapped = [m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert model.is_gradient_checkpointing and wrapped
    assert all(f.keywords == {"use_reentrant": False} for f in wrapped)  # frozen inputs need no input grads


def test_overrides_address_items_of_a_peft_list():
    recipe = {**BASE, "peft": [{"method": "lora"}, {"method": "prompt_tuning"}]}
    cfg = load_config(recipe, ["peft.0.lora_rank=4", "peft.1.num_virtual_tokens=5"])
    assert (cfg.peft[0].lora_rank, cfg.peft[1].num_virtual_tokens) == (4, 5)
    with pytest.raises(UserError, match=r"peft is a list of 2; address an item as peft\.N\.<key>"):
        load_config(recipe, ["peft.lora_rank=4"])


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2"])
def test_bottleneck_adapters_sit_after_attention_and_mlp_of_other_architectures(tiny_models, arch, tmp_path):
    from tuneforge.config.schema import PeftConfig
    from tuneforge.peft import apply_peft, load_adapters, save_adapters

    path = tiny_models(arch)
    model = apply_peft(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                       PeftConfig(method="adapter", bottleneck_size=4)).eval()
    sites = {n.rsplit(".bottleneck.", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert len(sites) == 2 * 2 and {s.rsplit(".", 1)[-1] for s in sites} == ({"attn", "mlp"} if arch == "gpt2"
                                                                            else {"self_attn", "mlp"})
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapters(model, tmp_path, str(path))
    fresh = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = ids()
    base = logits(fresh, batch)
    reloaded = load_adapters(fresh, tmp_path)
    assert torch.equal(logits(reloaded, batch), logits(model, batch))
    assert (logits(reloaded, batch) - base).abs().max() > 1e-3


def test_8bit_base_trains_lora():
    from tuneforge.models.load import load_model
    from tuneforge.models.loss import causal_lm_loss
    from tuneforge.peft import apply_finetuning

    cfg = config(model={"name_or_path": str(STORIES), "quantization": {"bits": 8}}, peft={"method": "lora"})
    model = apply_finetuning(load_model(cfg.model), cfg).train()
    assert any(type(m).__name__ == "Linear8bitLt" for m in model.modules())
    batch = {**ids(), "labels": ids()["input_ids"]}
    causal_lm_loss(model, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())


def test_method_label_reads_single_methods_lists_and_full_runs():
    from tuneforge.config.rules.peft import method_label

    assert method_label(None) == "full fine-tuning"
    assert method_label({"method": "lora", "lora_rank": 16, "lora_alpha": 32}) == "lora (rank 16, alpha 32)"
    assert method_label([{"method": "lora", "lora_rank": 4, "lora_alpha": 8}, {"method": "prompt_tuning"}]) == \
        "lora (rank 4, alpha 8) + prompt_tuning"
