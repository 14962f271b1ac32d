"""Shared fixtures: paths to shipped assets, tiny models built from configs, and a CLI runner."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# One torch thread in every test process and every `tuneforge` subprocess (set before torch is first imported):
# the tiny models' matmuls are too small for a second thread to pay, and two pytest workers (`make test`) keep both
# cores busy instead. Measured on the quickstart's golden steps: 1 and 2 threads give bit-identical losses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
STORIES = REPO / "assets/models/stories260K"
SQUAD_TRAIN = REPO / "assets/data/squad/train.json"
SQUAD_DEV = REPO / "assets/data/squad/dev.json"


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, env: dict | None = None,
            timeout: int = 600, command: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `tuneforge` command line in a subprocess (this checkout's package, whatever is installed);
    `command` replaces `python -m tuneforge ARGS` (e.g. torchrun's own command line for the same run)."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    full_env.update(env or {})  # a test may override the defaults above (e.g. HF_HUB_OFFLINE=0)
    command = command or [sys.executable, "-m", "tuneforge", *args]
    proc = subprocess.run(command, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli_in_process(*argv: str) -> str:
    """The command line's stdout, run in this process (the model modules are loaded already: no start-up cost of a
    subprocess). For the commands that read a run; training keeps its own process (run_cli)."""
    from tuneforge import cli

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(list(argv)) == 0
    return printed.getvalue()


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir) if "loss" in row]


def tiny_overrides(tmp_path: Path, name: str, *extra: str) -> list[str]:
    """A fast, fp32 LoRA run of stories260K on 64 shipped SQuAD questions."""
    return [f"run.output_dir={tmp_path}", f"run.name={name}", f"model.name_or_path={STORIES}",
            "model.dtype=float32", f"data.train.path={SQUAD_TRAIN}", "data.train.limit=64",
            "data.validation=null", "data.seq_length=256", "train.micro_batch_size=8", "train.global_batch_size=8",
            "train.max_steps=4", "train.optimizer.lr=0.003", "train.lr_scheduler.name=cosine",
            "train.lr_scheduler.warmup_steps=1", "logging.tensorboard=false", "logging.progress=false",
            "checkpoint.every_steps=null", *extra]


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory) -> Path:
    """A recipe file that the tiny runs start from (every value is then overridden)."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.yaml"
    path.write_text(f"model: {{name_or_path: {STORIES}}}\npeft: {{method: lora, lora_rank: 4, lora_alpha: 8}}\n"
                    f"data: {{train: {{path: {SQUAD_TRAIN}, format: squad}}}}\n")
    return path


def build_tiny_model(arch: str, out: Path) -> Path:
    """Save a randomly initialised tiny model of an architecture family (with the stories260K tokenizer, vocab 512)."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GPT2Config, LlamaConfig,
                              MistralConfig, Qwen2Config, T5Config)

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
    configs = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "gpt2": lambda: GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                   bos_token_id=1, eos_token_id=2),
        # encoder-decoder; the stories260K tokenizer's unk (0) is tuneforge's pad and the decoder start token. No
        # dropout (T5's default is 0.1), like the decoder-only configs, so invariance tests compare exact numerics.
        "t5": lambda: T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                               num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                               dropout_rate=0.0),
    }
    torch.manual_seed(0)
    config = configs[arch]()
    model = (AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM).from_config(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    cache = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = build_tiny_model(arch, root / arch)
        return cache[arch]
    return get


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Tokenized-data and GGUF-model caches in temporary directories (inherited by run_cli), never ~/.cache."""
    names = {"TUNEFORGE_CACHE_DIR": "data-cache", "TUNEFORGE_GGUF_CACHE": "gguf-cache"}
    old = {name: os.environ.get(name) for name in names}
    for name, folder in names.items():
        os.environ[name] = str(tmp_path_factory.mktemp(folder))
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def tok():
    """The stories260K tokenizer with the pad token tuneforge picks for it (unk)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(STORIES)
    t.pad_token = t.unk_token
    return t
