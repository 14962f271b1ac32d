"""A run's eval/ directory: the scores and predictions `tuneforge eval` writes (eval/base/ for the base model), and
reading them back for the report and the model card. Plain files: no model, no torch."""
from __future__ import annotations

import json
import math
from pathlib import Path

from tuneforge.files import write_atomic


def eval_dir(run_dir: Path, base: bool) -> Path:
    return run_dir / "eval" / "base" if base else run_dir / "eval"


def write_eval(run_dir: Path, results: dict, predictions: dict[str, str] | None, base: bool) -> None:
    out = eval_dir(run_dir, base)
    out.mkdir(parents=True, exist_ok=True)
    if predictions is not None:
        write_atomic(out / "squad_predictions.json", json.dumps(predictions, indent=1, ensure_ascii=False) + "\n")
    # a second eval replaces the first one's scores: a crash mid-write keeps the old ones whole
    write_atomic(out / "scores.json", json.dumps(_finite(results), indent=1) + "\n")


def _finite(results: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in results.items()}


def read_scores(run_dir: Path, base: bool = False) -> dict | None:
    path = eval_dir(run_dir, base) / "scores.json"
    return json.loads(path.read_text()) if path.is_file() else None
