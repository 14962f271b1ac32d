"""The real pretrained model `make setup` brings in through pip: SmolLM2-135M-Instruct as a GGUF file (Q4_1).

One short run per session, through the shipped recipe: the GGUF file is dequantized into the cached base, a few
LoRA steps train on it, and the adapter loads in plain peft on that base with tuneforge's own logits."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, read_metrics, run_cli

SMOLLM2 = REPO / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
RECIPE = REPO / "recipes/smollm2_squad_lora.yaml"
SHORT = ["train.max_steps=3", "data.train.limit=12", "data.seq_length=128", "train.micro_batch_size=2",
         "train.global_batch_size=2", "data.validation=null", "eval.squad=null", "checkpoint.every_steps=null",
         "logging.tensorboard=false", "logging.progress=false"]


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    assert SMOLLM2.is_file(), f"{SMOLLM2} is missing: `make setup` installs it (requirements-models.txt)"
    out = tmp_path_factory.mktemp("smollm2")
    proc = run_cli("finetune", "-c", str(RECIPE), f"run.output_dir={out}", *SHORT, timeout=900)
    return out / "smollm2-squad-lora", proc


def test_the_gguf_model_trains_as_the_pretrained_model_it_is(smollm2_run):
    run, proc = smollm2_run
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    # A 49,152-token vocabulary guessed at random costs ln(49152) = 10.8 nats a token; the pretrained model reads
    # SQuAD far better than that from the first step, which a mis-read (e.g. unpermuted q/k) file would not.
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses) and losses[0] < 6.0, losses
    assert "in 30 layers" in proc.stdout, proc.stdout  # the adapter line: LoRA on every layer of the 30


def test_the_adapter_loads_in_plain_peft_on_the_cached_base(smollm2_run):
    from peft import PeftModel

    from tuneforge.eval import load_run_model

    run, _ = smollm2_run
    base = Path(json.loads((run / "final/adapter_config.json").read_text())["base_model_name_or_path"])
    tokenizer = AutoTokenizer.from_pretrained(base)
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in (tokenizer.chat_template or "")
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    enc = tokenizer("Context: The Broncos won Super Bowl 50. Question: Who won? Answer:", return_tensors="pt")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      run / "final").eval()
    ours = load_run_model(run)[0].eval()
    with torch.no_grad():
        assert torch.allclose(plain(**enc).logits, ours(**enc).logits, atol=1e-4)
