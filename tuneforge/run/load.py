"""Reading a finished run: its recorded config and its final/ output (run/model.py builds the model they make).
Generation, serving, export, merging, the hub and evaluation all start here; nothing here needs torch."""
from __future__ import annotations

from pathlib import Path

from tuneforge.config import Config, load_config
from tuneforge.errors import UserError


def is_adapter(final: Path) -> bool:
    """Whether a run's final/ holds one plain peft adapter (adapter_config.json), which vLLM and lm-eval load
    beside the base model."""
    return (final / "adapter_config.json").is_file()


def load_run(run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Config, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"--run {run_dir}: not a tuneforge run directory (no config.yaml)")
    if not (run_dir / "final").is_dir():
        raise UserError(f"--run {run_dir}: the run has no final/ output yet (did training finish?)")
    return load_config(run_dir / "config.yaml", overrides, check_paths=False), run_dir / "final"
