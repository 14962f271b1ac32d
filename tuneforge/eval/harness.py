"""The lm-evaluation-harness bridge: lm-eval's own HF backend runs the run's base model with its adapter (peft=) or
the fully fine-tuned model, so the scores are the ones anyone gets from `lm_eval --model hf` on our outputs."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import yaml

from tuneforge.errors import UserError, first_line
from tuneforge.files import write_atomic
from tuneforge.peft.fit import check_adapters_fit
from tuneforge.run.load import is_adapter, load_run
from tuneforge.run.scores import eval_dir

INSTALL = "pip install 'tuneforge[eval]'"


def import_lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(f"--harness needs lm-evaluation-harness, which is not installed: {INSTALL}") from None
    return lm_eval, TaskManager


def parse_tasks(spec: str) -> tuple[list[str], list[str]]:
    """(task names, include paths): a comma-separated list of registered task names and task YAML files."""
    names, include = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.endswith((".yaml", ".yml")):
            path = Path(item)
            if not path.is_file():
                raise UserError(f"--harness: no such task file '{item}'")
            task = (yaml.safe_load(path.read_text()) or {}).get("task") if path.suffix else None
            if not isinstance(task, str):
                raise UserError(f"--harness {item}: a task YAML needs a top-level `task: <name>`")
            names.append(task)
            include.append(str(path.resolve().parent))
        else:
            names.append(item)
    if not names:
        raise UserError("--harness: expected comma-separated task names or task YAML files")
    return names, list(dict.fromkeys(include))


def parse_harness_args(items: list[str], simple_evaluate) -> dict:
    """`key=value` pairs for lm_eval.simple_evaluate; values are YAML (numbers, true/false, lists)."""
    allowed = set(inspect.signature(simple_evaluate).parameters) - {"model", "model_args", "tasks", "task_manager"}
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--harness-args '{item}': expected key=value")
        if key not in allowed:
            raise UserError(f"--harness-args: unknown argument '{key}' of lm_eval.simple_evaluate; expected one of: "
                            f"{', '.join(sorted(allowed))}")
        try:
            kwargs[key] = yaml.safe_load(value)
        except yaml.YAMLError:
            kwargs[key] = value
    return kwargs


def model_args(run_dir: Path, base: bool) -> dict:
    cfg, final = load_run(run_dir)
    import torch

    args = {"dtype": "float32", "device": "cuda" if torch.cuda.is_available() else "cpu",
            "tokenizer": str(final.resolve()), "trust_remote_code": cfg.model.trust_remote_code}
    if is_adapter(final) or base:
        args["pretrained"] = cfg.model.name_or_path
        if cfg.model.revision:
            args["revision"] = cfg.model.revision
        if is_adapter(final) and not base:
            check_adapters_fit(cfg.model, final)
            args["peft"] = str(final.resolve())
    else:
        args["pretrained"] = str(final.resolve())
    return args


def numeric_results(results: dict) -> dict:
    """{task: {metric,filter: value}} keeping only numbers (lm-eval mixes in aliases and 'N/A' strings)."""
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in results.get("results", {}).items()}


def run_harness(run_dir: str | Path, tasks: str, harness_args: list[str], base: bool = False,
                limit: int | None = None) -> dict:
    """Run the tasks and write eval/harness.json (eval/base/harness.json with --base); returns the scores."""
    run_dir = Path(run_dir)
    names, include = parse_tasks(tasks)
    lm_eval, TaskManager = import_lm_eval()
    kwargs = parse_harness_args(harness_args, lm_eval.simple_evaluate)
    if limit is not None:
        kwargs.setdefault("limit", limit)
    kwargs.setdefault("batch_size", 8)
    margs = model_args(run_dir, base)
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UserError(f"--harness: unknown lm-eval task(s) {', '.join(unknown)} (task YAML files can be passed "
                        "by path)")
    try:
        out = lm_eval.simple_evaluate(model="hf", model_args=margs, tasks=names, task_manager=manager, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--harness: lm-eval rejected the run ({first_line(e)})") from None
    scores = numeric_results(out or {})
    out_dir = eval_dir(run_dir, base)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "harness.json", json.dumps({"tasks": names, "model_args": margs, "args": kwargs,
                                                       "results": scores}, indent=1, default=str) + "\n")
    return scores
