"""Reading a finished run: its recorded config and final/ output, and the model they make (base + adapter, or the
full model). Generation, serving, export, merging, the hub and evaluation all start here."""
from __future__ import annotations

from pathlib import Path

from tuneforge.config import Config, load_config
from tuneforge.errors import UserError
from tuneforge.models import load_model, load_tokenizer
from tuneforge.models.classify import saved_model_config
from tuneforge.models.layers import transformers_model
from tuneforge.peft import load_adapters, saved_adapters
from tuneforge.peft.fit import check_adapters_fit


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


def load_run_model(run_dir: str | Path, base: bool = False, overrides: list[str] | None = None):
    """(model, tokenizer, config) of a finished run; `base` skips the adapter (for before/after comparisons)."""
    cfg, final = load_run(run_dir, overrides)
    if saved_adapters(final) and not base:
        check_adapters_fit(cfg.model, final)  # before the base weights load
    tokenizer = load_tokenizer(cfg.model, str(final))
    if saved_adapters(final):
        model = load_model(cfg.model, config=saved_model_config(final))  # None unless a classifier's labels
        if not base:
            model = load_adapters(model, final)  # peft's methods through peft, bottleneck adapters through ours
    elif base:
        model = load_model(cfg.model)
    else:
        model = load_model(cfg.model, str(final))
    transformers_model(model).config.use_cache = True
    return model.eval(), tokenizer, cfg
