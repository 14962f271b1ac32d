"""The model a finished run makes: the base with the run's adapter(s), or the full fine-tuned model."""
from __future__ import annotations

from pathlib import Path

from tuneforge.models.classify import saved_model_config
from tuneforge.models.layers import transformers_model
from tuneforge.models.load import load_model, load_tokenizer
from tuneforge.peft import load_adapters, saved_adapters
from tuneforge.peft.fit import check_adapters_fit
from tuneforge.run.load import load_run


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
