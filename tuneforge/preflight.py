"""Checks that run before any heavy work, each failing with one line that says what to fix."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from tuneforge.config.schema import Config
from tuneforge.errors import UserError, first_line

log = logging.getLogger("tuneforge")


def check_output_dir(cfg: Config) -> None:
    """The run directory's parent exists or can be made, and a file can be written there."""
    parent = Path(cfg.run.output_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".tuneforge-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"run.output_dir: cannot write to '{parent}' ({e.strerror or e})") from None


def check_model_config(cfg: Config):
    """The model's config loads and names an architecture AutoModelForCausalLM (or for model.kind seq2seq,
    AutoModelForSeq2SeqLM) can build, and the recipe fits that kind; returns the config."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from tuneforge.models.load import resolve_kind

    m = cfg.model
    kwargs = {"trust_remote_code": m.trust_remote_code, **({"revision": m.revision} if m.revision else {})}
    try:
        config = AutoConfig.from_pretrained(m.name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        if hub_offline() and not Path(m.name_or_path).expanduser().exists():
            raise UserError(f"model.name_or_path: '{m.name_or_path}' is no local directory and is not in the Hub "
                            "cache, and HF_HUB_OFFLINE=1 forbids downloading it; download it first (hf download) "
                            "or give a local path") from None
        raise UserError(f"model.name_or_path: '{m.name_or_path}' has no usable config.json ({first_line(e)})") from None
    if resolve_kind(m, config) == "seq2seq":
        from tuneforge.models.seq2seq import check_seq2seq_model, check_seq2seq_recipe

        check_seq2seq_model(m.name_or_path, config)
        check_seq2seq_recipe(cfg)
        return config
    remote = bool(getattr(config, "auto_map", {}) or {}) and m.trust_remote_code
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:
        raise UserError(f"model.name_or_path: '{m.name_or_path}' is a {config.model_type!r} model without a causal-LM "
                        "head (AutoModelForCausalLM cannot load it)")
    return config


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_seq_length(cfg: Config, config) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and cfg.data.seq_length > limit:
        log.warning("data.seq_length %d exceeds the model's %d positions (max_position_embeddings); positions past "
                    "%d are outside what it was trained on", cfg.data.seq_length, limit, limit)


def check_checkpoint_room(run_dir: Path, trainable: int, cfg: Config) -> None:
    """A checkpoint holds the trainable weights and two Adam moments in fp32 (~12 bytes a parameter), written
    beside the previous one before that is deleted: ask for room for two."""
    if not cfg.checkpoint.every_steps:
        return
    need = 2 * 12 * trainable
    where = run_dir if run_dir.exists() else Path(cfg.run.output_dir)  # a new run's directory is made later
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"checkpoint.every_steps: {run_dir} has {free / 2**30:.1f} GiB free; a checkpoint of "
                        f"{trainable:,} trainable parameters needs about {need / 2**30:.1f} GiB (two while saving)")

