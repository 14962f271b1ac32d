"""Overrides that turn any shipped recipe into a seconds-long CPU run: a tiny local model of the recipe's
architecture family, the shipped data sample of each source's format, short sequences, 2 steps, one process, no W&B.
Used by the recipe smoke test and by the test that runs the commands of the README and docs."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO, SQUAD_DEV, SQUAD_TRAIN
from tuneforge.config import Config, load_config
from tuneforge.config.sources import validation_sets

# Hub model ids of the shipped recipes -> tiny_models() architecture; a recipe with a new family must be added here.
FAMILIES = {"meta-llama/": "llama", "huggyllama/": "llama", "openai-community/gpt2": "gpt2", "google/flan-t5": "t5",
            "models/SmolLM2-": "llama"}  # the GGUF file `make setup` links (tests/e2e/test_real_model.py trains it)
SAMPLES = {  # format -> (training sample, validation sample)
    "squad": (SQUAD_TRAIN, SQUAD_DEV),
    "alpaca": (REPO / "assets/data/alpaca/sample.json",) * 2,
    "dolly": (REPO / "assets/data/dolly/sample.jsonl",) * 2,
    "input_output": (REPO / "assets/data/squad_io/train.jsonl", REPO / "assets/data/squad_io/validation.jsonl"),
    "preference": (REPO / "assets/data/squad_pairs/train.jsonl", REPO / "assets/data/squad_pairs/dev.jsonl"),
}


def family(model: str) -> str | None:
    """The tiny architecture standing in for a Hub model; None for a local model (already small: kept)."""
    if (REPO / model).is_dir():
        return None
    for prefix, arch in FAMILIES.items():
        if model.startswith(prefix):
            return arch
    raise AssertionError(f"{model}: no tiny architecture for this model family; add it to FAMILIES")


def _source_overrides(key: str, sources, sample_index: int, limit: int) -> list[str]:
    if not isinstance(sources, list):
        return [f"{key}.path={SAMPLES[sources.format][sample_index]}", f"{key}.split=train", f"{key}.limit={limit}"]
    return [o for i, src in enumerate(sources) for o in _source_overrides(f"{key}.{i}", src, sample_index, limit)]


def tiny_run_overrides(recipe: Path, tiny_models, output_dir: Path | None = None) -> list[str]:
    """Overrides appended after a recipe's own (and after a command's): later overrides win."""
    cfg: Config = load_config(recipe, check_paths=False)
    arch = family(cfg.model.name_or_path)
    model = str(tiny_models(arch)) if arch else str(REPO / cfg.model.name_or_path)
    out = [f"model.name_or_path={model}", "model.dtype=float32", "data.seq_length=256", "train.micro_batch_size=2",
           "train.global_batch_size=4", "train.max_steps=2", "train.val_every_steps=null", "train.log_every_steps=1",
           "logging.wandb=null", "logging.tensorboard=false", "logging.progress=false", "checkpoint.every_steps=null",
           "distributed.strategy=single", "train.compile=false"]
    out += _source_overrides("data.train", cfg.data.train, 0, 8)
    if validation_sets(cfg.data):
        out += _source_overrides("data.validation", cfg.data.validation, 1, 4)
    if cfg.data.prompt_style == "chat" and not cfg.data.chat_template:
        # the tiny stand-in's tokenizer has no chat template; the recipe's own model is trained with it in
        # tests/e2e/test_real_model.py, and chat prompts are tested in tests/e2e/test_chat_prompts.py
        out += ["data.prompt_style=plain", "data.system_prompt=null"]
    if cfg.preference is not None:  # the SQuAD pairs' contexts are longer than 256 tokens of the tiny tokenizer
        out.append("preference.max_prompt_length=128")
    if cfg.rl is not None:  # the global batch of 4 counts completions: 2 prompts x 2, short ones
        out += ["rl.num_generations=2", "rl.max_completion_length=8"]
    if cfg.data.val_split is not None:
        out.append(f"data.val_split={2 if cfg.data.val_split >= 1 else cfg.data.val_split}")
    if cfg.eval.squad is not None:
        out += ["eval.squad.limit=2", "eval.squad.every_steps=null", "eval.squad.max_new_tokens=4"]
        if cfg.eval.squad.path:
            out.append(f"eval.squad.path={SQUAD_DEV}")
    if output_dir is not None:
        out.append(f"run.output_dir={output_dir}")
    return out


def skip_report_plots(monkeypatch) -> None:
    """The HTML report's plots cost a third of a tiny run and are tested on their own (`tuneforge report` still
    writes them)."""
    monkeypatch.setattr("tuneforge.train.recipe.write_report", lambda run_dir: run_dir / "report.html")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy machine threads that spin-wait for a
    core made these tests ~10x slower (measured on 2 shared cores). Restored afterwards for the other tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
