"""Every PEFT method through the real command line: the loss falls, the saved adapter reloads (plain peft for peft's
methods, tuneforge's loader for bottleneck adapters) with the trainer's own logits, and mergeable adapters merge
into a plain transformers model with the same logits. fp32, the same 8 shipped questions (128 tokens) every step."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import STORIES, run_cli, tiny_overrides, train_losses
from tests.e2e.test_finetune_cli import probe_ids

STEPS = 4
# method -> (recipe overrides, learning rate); adapters are made big enough (and trained enough) to move the logits
METHODS = {
    "lora": (["peft={method: lora, lora_rank: 4, lora_alpha: 8, use_dora: true, use_rslora: true, "
              "target_modules: '.*\\.(q_proj|v_proj|down_proj)'}"], 0.03),
    "ia3": (["peft={method: ia3}"], 0.03),
    "prompt_tuning": (["peft={method: prompt_tuning, num_virtual_tokens: 8, prompt_init_text: 'Answer the question'}"],
                      0.1),
    "p_tuning": (["peft={method: p_tuning, num_virtual_tokens: 8, encoder_hidden_size: 32}"], 0.003),
    "prefix_tuning": (["peft={method: prefix_tuning, num_virtual_tokens: 8}"], 0.03),
    "llama_adapter": (["peft={method: llama_adapter, adapter_len: 4, adapter_layers: 3}"], 0.1),
    "adapter": (["peft={method: adapter, bottleneck_size: 8}"], 0.03),
}
MERGEABLE = {"lora", "ia3"}


def finetune(recipe, tmp_path, name, *extra, check=True):
    return run_cli("finetune", "-c", str(recipe),
                   *tiny_overrides(tmp_path, name, "data.train.limit=8", "data.seq_length=128",
                                   f"train.max_steps={STEPS}",
                                   "train.lr_scheduler.warmup_steps=0", f"checkpoint.every_steps={STEPS}", *extra),
                   check=check)


def base_model():
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


def trainer_model(run_dir, peft_cfg):
    """The trainer's state at its last step, rebuilt through tuneforge's own code path from the checkpoint."""
    from tuneforge.config import load_config
    from tuneforge.peft import apply_peft

    cfg = load_config(run_dir / "config.yaml", check_paths=False)
    model = apply_peft(base_model(), peft_cfg if peft_cfg is not None else cfg.peft)
    trained = load_file(run_dir / f"checkpoints/step_{STEPS}/trainable.safetensors")
    params = dict(model.named_parameters())
    assert set(trained) == {n for n, p in params.items() if p.requires_grad}
    with torch.no_grad():
        for k, v in trained.items():
            params[k].copy_(v)
    return model.eval()


def logits_of(model, enc):
    with torch.no_grad():
        out = model(**enc).logits
    return out[:, -enc["input_ids"].shape[1]:]  # prompt_tuning / p_tuning also return their virtual positions


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_saves_reloads_and_merges(tiny_recipe, tmp_path, method):
    from peft import PeftModel

    from tuneforge.peft import check_mergeable
    from tuneforge.peft.bottleneck import load_bottleneck
    from tuneforge.run.model import load_run_model
    from tuneforge.run.merge import merge_run  # the CLI's `merge` runs in test_qlora_and_partial and below

    overrides, lr = METHODS[method]
    out = finetune(tiny_recipe, tmp_path, method, *overrides, f"train.optimizer.lr={lr}")
    assert f"adapter {method}: " in out.stdout  # the start-of-run summary names the method and its parameters
    losses = train_losses(tmp_path / method)
    assert len(losses) == STEPS and losses[-1] < losses[0] * 0.99, losses

    final = tmp_path / method / "final"
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt")) and (final / "tokenizer.json").is_file()
    enc = probe_ids()
    want = logits_of(trainer_model(tmp_path / method, None), enc)
    if method == "adapter":
        assert json.loads((final / "bottleneck_adapter_config.json").read_text())["format"] == "tuneforge-bottleneck"
        reloaded = base_model()
        load_bottleneck(reloaded, final)
    else:
        assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
        reloaded = PeftModel.from_pretrained(base_model(), final)
    got = logits_of(reloaded.eval(), enc)
    assert torch.allclose(got, want, atol=1e-6)
    before = logits_of(base_model(), enc)
    assert (got - before).abs().max() > 1e-3  # the adapter changed the model, so the comparisons can fail

    generating, _, _ = load_run_model(tmp_path / method)  # what `tuneforge generate` / eval use
    assert torch.allclose(logits_of(generating, enc), want, atol=1e-6)

    if method in MERGEABLE:
        merged_dir = tmp_path / f"{method}-merged"
        merge_run(tmp_path / method, merged_dir)
        assert_merged_matches_unmerged(merged_dir, final, enc)
    else:
        from tuneforge.errors import UserError

        with pytest.raises(UserError, match=f"peft.method {method} cannot be merged"):
            check_mergeable(final)


def assert_merged_matches_unmerged(merged_dir, final, enc):
    """Evaluated in float64, so the only difference left is the fp32 rounding of the saved merged weights (the
    fp32 forward passes of the two differ by ~2e-5 on these logits from summation order alone)."""
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float64).eval()
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())
    assert (merged_dir / "tokenizer.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval()
    unmerged = logits_of(PeftModel.from_pretrained(base, final).eval(), enc)
    assert torch.allclose(logits_of(merged, enc), unmerged, rtol=0, atol=1e-5)
    before = logits_of(AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float64).eval(), enc)
    assert (unmerged - before).abs().max() > 1e-3


def test_lora_plus_prompt_tuning_trains_saves_and_reloads_with_plain_peft(tiny_recipe, tmp_path):
    from peft import PeftModel

    from tuneforge.run.model import load_run_model

    out = finetune(tiny_recipe, tmp_path, "combo", "train.optimizer.lr=0.03",
                   "peft=[{method: lora, lora_rank: 4, lora_alpha: 8}, {method: prompt_tuning, num_virtual_tokens: 8}]")
    assert "adapter lora: " in out.stdout and "adapter prompt_tuning: " in out.stdout
    losses = train_losses(tmp_path / "combo")
    assert losses[-1] < losses[0] * 0.99, losses
    final = tmp_path / "combo" / "final"
    manifest = json.loads((final / "tuneforge_adapters.json").read_text())
    assert [a["method"] for a in manifest["adapters"]] == ["lora", "prompt_tuning"]
    trained = load_file(tmp_path / f"combo/checkpoints/step_{STEPS}/trainable.safetensors")
    assert any("lora_A" in k for k in trained) and any("prompt_encoder" in k for k in trained)  # both trained

    enc = probe_ids()
    want = logits_of(trainer_model(tmp_path / "combo", None), enc)
    plain = PeftModel.from_pretrained(base_model(), final / "lora")  # each part is a plain peft adapter dir
    plain = PeftModel.from_pretrained(plain.get_base_model(), final / "prompt_tuning")
    got = logits_of(plain.eval(), enc)
    assert torch.allclose(got, want, atol=1e-6)
    lora_only = logits_of(PeftModel.from_pretrained(base_model(), final / "lora").eval(), enc)
    assert (got - lora_only).abs().max() > 1e-3 and (lora_only - logits_of(base_model(), enc)).abs().max() > 1e-3
    generating, _, _ = load_run_model(tmp_path / "combo")
    assert torch.allclose(logits_of(generating, enc), want, atol=1e-6)

    proc = run_cli("merge", "--run", str(tmp_path / "combo"), "--out", str(tmp_path / "m"), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr  # the prompt part cannot be merged: one line, exit 2
    assert lines[0].startswith("tuneforge: error: peft.method prompt_tuning cannot be merged")
    assert not (tmp_path / "m").exists()
