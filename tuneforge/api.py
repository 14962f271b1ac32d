"""The Python API for notebooks and scripts: the same four steps as the command line, as functions.

    from tuneforge import finetune, evaluate, generate, load_config
    run = finetune("recipes/quickstart.yaml", ["train.max_steps=10"])
    scores = evaluate(run)
    answers = generate(run, ["Context: ... Question: ... Answer:"])
"""
from __future__ import annotations

import os
from pathlib import Path

from tuneforge.config import Config, load_config

ConfigSource = str | os.PathLike | dict | Config


def finetune(config: ConfigSource, overrides: list[str] | None = None, overwrite: bool = False) -> Path:
    """Train from a recipe (a YAML path, a dict shaped like one, or a Config) with `key.sub=value` overrides, in this
    process; returns the run directory. Like the command line, it resumes a run directory that has checkpoints."""
    from tuneforge.distributed import launched_world_size
    from tuneforge.train import finetune as run_recipe

    return run_recipe(load_config(config, overrides, world_size=launched_world_size()), overwrite=overwrite)


def evaluate(run_dir: str | os.PathLike, base: bool = False, limit: int | None = None, dataset: str | None = None,
             overrides: list[str] | None = None) -> dict:
    """Score a finished run as `tuneforge eval` does (val_loss, perplexity, squad_em, squad_f1: those that apply);
    also writes <run>/eval/scores.json."""
    from tuneforge.eval.evaluate import evaluate_run

    return evaluate_run(run_dir, base=base, limit=limit, dataset=dataset, overrides=overrides)


def generate(run_dir: str | os.PathLike, prompts: str | list[str], max_new_tokens: int = 32,
             temperature: float = 0.0, stop_at_newline: bool = False, base: bool = False) -> str | list[str]:
    """Continue each prompt with the run's model (greedy unless temperature > 0); one prompt gives one string, a
    list gives a list. Loads the model on every call: for many prompts pass them in one list."""
    from tuneforge.eval.generate import Sampling, generate as generate_batch
    from tuneforge.models.load import resolve_precision
    from tuneforge.run.model import load_run_model

    model, tokenizer, cfg = load_run_model(run_dir, base=base)
    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    outputs = generate_batch(model, tokenizer, batch, max_new_tokens,
                             precision=resolve_precision(cfg.model.dtype, model.device.type),
                             stop_at_newline=stop_at_newline, sampling=Sampling(temperature=temperature))
    return outputs[0] if isinstance(prompts, str) else outputs


__all__ = ["evaluate", "finetune", "generate", "load_config"]
