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
from tuneforge.config.commands import EvalOptions, GenerateOptions

ConfigSource = str | os.PathLike | dict | Config


def finetune(config: ConfigSource, overrides: list[str] | None = None, overwrite: bool = False) -> Path:
    """Train from a recipe (a YAML path, a dict shaped like one, or a Config) with `key.sub=value` overrides, in this
    process; returns the run directory. Like the command line, it resumes a run directory that has checkpoints."""
    from tuneforge.distributed import launched_world_size
    from tuneforge.train import finetune as run_recipe

    return run_recipe(load_config(config, overrides, world_size=launched_world_size()), overwrite=overwrite)


def evaluate(run_dir: str | os.PathLike, base: bool = False, limit: int | None = None, dataset: str | None = None,
             overrides: list[str] | None = None, **options) -> dict:
    """Score a finished run as `tuneforge eval` does (val_loss, perplexity, squad_em, squad_f1: those that apply);
    also writes <run>/eval/scores.json. `options` are the other flags of `tuneforge eval` by their field names in
    tuneforge.config.commands.EvalOptions (batch_size=..., harness=..., harness_args=[...])."""
    from tuneforge.eval.evaluate import evaluate_run

    return evaluate_run(EvalOptions(run=os.fspath(run_dir), base=base, limit=limit, dataset=dataset,
                                    overrides=list(overrides or []), **options))


def generate(run_dir: str | os.PathLike, prompts: str | list[str], max_new_tokens: int = 32,
             temperature: float = 0.0, stop_at_newline: bool = False, base: bool = False,
             **options) -> str | list[str]:
    """Continue each prompt with the run's model (greedy unless temperature > 0); one prompt gives one string, a
    list gives a list. Loads the model on every call: for many prompts pass them in one list. `options` are the
    other flags of `tuneforge generate` by their field names in tuneforge.config.commands.GenerateOptions
    (batch_size=..., top_p=..., top_k=..., seed=...)."""
    from tuneforge.eval.batch import answer_prompts

    batch = [prompts] if isinstance(prompts, str) else list(prompts)
    outputs = answer_prompts(GenerateOptions(run=os.fspath(run_dir), prompt=batch, max_new_tokens=max_new_tokens,
                                             temperature=temperature, stop_at_newline=stop_at_newline, base=base,
                                             **options))
    return outputs[0] if isinstance(prompts, str) else outputs


__all__ = ["evaluate", "finetune", "generate", "load_config"]
