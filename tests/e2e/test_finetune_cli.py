"""The real command line, in subprocesses, on small fp32 runs of the shipped model and data."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import SQUAD_DEV, STORIES, cli_in_process, read_metrics, run_cli, tiny_overrides, train_losses


def finetune(recipe, tmp_path, name, *extra, check=True):
    return run_cli("finetune", "-c", str(recipe), *tiny_overrides(tmp_path, name, *extra), check=check)


def probe_ids():
    tok = AutoTokenizer.from_pretrained(STORIES)
    tok.pad_token = tok.unk_token
    return tok(["Context: Paris is in France. Question: Where is Paris? Answer:",
                "Once upon a time"], return_tensors="pt", padding=True)


@pytest.mark.precision
def test_accumulation_gives_the_bigger_batch_curve(tiny_recipe, tmp_path):
    finetune(tiny_recipe, tmp_path, "big", "train.micro_batch_size=8")
    finetune(tiny_recipe, tmp_path, "accum", "train.micro_batch_size=4")
    big, accum = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "accum")
    assert len(big) == len(accum) == 4
    for a, b in zip(big, accum):
        assert a["label_tokens"] == b["label_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert train_losses(tmp_path / "big")[-1] < train_losses(tmp_path / "big")[0]


@pytest.mark.precision
def test_resume_continues_the_uninterrupted_curve_exactly(tiny_recipe, tmp_path):
    steps = ["train.max_steps=6", "checkpoint.every_steps=2", f"data.validation.path={SQUAD_DEV}",
             "data.validation.format=squad", "data.validation.limit=8", "train.val_every_steps=3"]
    finetune(tiny_recipe, tmp_path, "whole", *steps)
    out = finetune(tiny_recipe, tmp_path, "parts", *steps, "train.stop_at_step=3")
    assert "stopped after step 3 of 6" in out.stdout
    assert not (tmp_path / "parts" / "final").exists()
    out = finetune(tiny_recipe, tmp_path, "parts", *steps)
    assert "resuming after step 3" in out.stdout
    assert_same_numbers(read_metrics(tmp_path / "parts"), read_metrics(tmp_path / "whole"))
    a = load_file(tmp_path / "whole/final/adapter_model.safetensors")
    b = load_file(tmp_path / "parts/final/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_same_numbers(got, want):
    """Bit-identical training numbers (loss, grad norm, lr, val loss); timing fields naturally differ."""
    timing = {"tokens_per_s", "step_seconds", "peak_rss_mb"}
    assert len(got) == len(want) == 7  # the step-0 validation, then one line per step
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in timing} == {k: v for k, v in w.items() if k not in timing}


def test_adapter_loads_in_plain_peft_with_the_trained_logits(tiny_recipe, tmp_path):
    from peft import PeftModel

    from tuneforge.config.schema import PeftConfig
    from tuneforge.peft import apply_peft

    finetune(tiny_recipe, tmp_path, "lora", "checkpoint.every_steps=4", "peft.lora_rank=4", "peft.lora_alpha=8")
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file()
    assert not list(final.glob("*.bin")) and not list(final.glob("*.pt"))
    enc = probe_ids()

    # the trainer's own state at the last step, applied to the base model through tuneforge's code path
    ours = apply_peft(AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32),
                      PeftConfig(lora_rank=4, lora_alpha=8))
    trained = load_file(tmp_path / "lora/checkpoints/step_4/trainable.safetensors")
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for k, v in trained.items():
            params[k].copy_(v)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32), final)
    base = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    with torch.no_grad():
        want, got, before = ours.eval()(**enc).logits, plain.eval()(**enc).logits, base(**enc).logits
    assert torch.allclose(got, want, atol=1e-6)
    assert (got - before).abs().max() > 1e-3  # the adapter changed the model, so the comparison can fail


def test_full_finetune_final_is_a_plain_transformers_model(tiny_recipe, tmp_path):
    finetune(tiny_recipe, tmp_path, "full", "peft=null", "train.optimizer.lr=0.0005", "checkpoint.every_steps=4")
    final = tmp_path / "full" / "final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    trained = load_file(tmp_path / "full/checkpoints/step_4/trainable.safetensors")
    state = loaded.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name
    base = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32)
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, loaded.model.layers[0].mlp.up_proj.weight)
    assert AutoTokenizer.from_pretrained(final).pad_token is not None


def test_generate_prints_the_models_greedy_continuation(tiny_recipe, tmp_path):
    from tuneforge.eval.generate import generate
    from tuneforge.run.model import load_run_model

    finetune(tiny_recipe, tmp_path, "gen", "train.max_steps=2")
    prompt = "Context: Lily has a red ball. Question: What color is the ball? Answer:"
    out = run_cli("generate", "--run", str(tmp_path / "gen"), "--prompt", prompt, "--max-new-tokens", "12")
    model, tok, _ = load_run_model(tmp_path / "gen")
    assert out.stdout.strip() == generate(model, tok, [prompt], 12)[0].strip()
    base = cli_in_process("generate", "--run", str(tmp_path / "gen"), "--prompt", "Once upon a time", "--base",
                          "--max-new-tokens", "8")
    assert base.startswith(", there was a little")  # the pretrained model's own greedy story
    shown = cli_in_process("generate", "--run", str(tmp_path / "gen"), "--examples", "2", "--max-new-tokens", "4")
    assert shown.count("Q: ") == 2 and "reference:" in shown


def test_existing_run_is_not_overwritten(tiny_recipe, tmp_path):
    finetune(tiny_recipe, tmp_path, "once", "train.max_steps=1")
    before = (tmp_path / "once/metrics.jsonl").read_text()
    again = finetune(tiny_recipe, tmp_path, "once", "train.max_steps=1", check=False)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert (tmp_path / "once/metrics.jsonl").read_text() == before
    finetune(tiny_recipe, tmp_path, "once", "train.max_steps=1", "--overwrite")


@pytest.mark.parametrize("override, message", [
    ("data.seq_lenght=128", "data.seq_lenght: unknown key; did you mean data.seq_length?"),
    ("train.micro_batch_size=many", "train.micro_batch_size: expected an integer, got 'many'"),
    ("train.global_batch_size=12", "train.global_batch_size (12) is not divisible by micro_batch_size (8)"),
])
def test_config_errors_exit_2_with_one_line(tiny_recipe, tmp_path, override, message):
    proc = finetune(tiny_recipe, tmp_path, "bad", override, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuneforge: error: ") and message in lines[0], proc.stderr
    assert not (tmp_path / "bad").exists()
