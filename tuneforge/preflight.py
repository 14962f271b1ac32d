"""The pre-flight: the checks that need more than the recipe (the checkpoint's config.json, the disk, an installed
package), run once before any heavy work, each failing with one line that says what to fix.

`preflight` is the one entry point: a training process runs it before it joins the process group, and the torchrun
launcher runs it in its own process first, so a refused recipe is one line, not one per rank. The pure recipe rules
are config/rules' (load_config runs them); the pre-flight calls back into them for what depends on the process count
and on the model kind config.json resolves."""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tuneforge.config.rules import check_world
from tuneforge.config.rules.kind import check_kind
from tuneforge.config.schema import Config, DataConfig, LoggingConfig, ModelConfig, RunConfig
from tuneforge.errors import UserError, first_line
from tuneforge.models.backend import AttentionChoice, choose_attention
from tuneforge.models.kind import resolve_kind

log = logging.getLogger("tuneforge")


@dataclass(frozen=True)
class Preflight:
    """What the pre-flight learned, which the run then goes by."""
    strategy: str  # single | ddp | fsdp2, for the process count it was run for
    kind: str  # causal_lm | seq2seq | sequence_classification (model.kind, auto resolved from config.json)
    attention: AttentionChoice | None = None  # model.attn_implementation resolved for this architecture


def preflight(cfg: Config, world_size: int = 1, warn: bool = True) -> Preflight:
    """Refuse a recipe this machine cannot start, before any weights or data load. `warn=False` leaves the warnings
    to the training processes (the launcher's own pre-flight), which print them as a one-process run does."""
    strategy = check_world(cfg, world_size)  # a Config may reach here loaded for another process count
    check_wandb(cfg.logging)
    check_output_dir(cfg.run)
    config = read_model_config(cfg.model)
    kind = resolve_kind(cfg.model, config)
    check_architecture(cfg.model, config, kind)
    check_kind(cfg, kind)
    attention = choose_attention(cfg.model, config, kind)  # an explicit backend the architecture lacks: refused here
    if warn:
        check_seq_length(cfg.data, config)
    return Preflight(strategy, kind, attention)


def check_wandb(logging_cfg: LoggingConfig) -> None:
    if logging_cfg.wandb is not None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("logging.wandb is set but wandb is not installed: pip install 'tuneforge[wandb]'") from None


def check_output_dir(run: RunConfig) -> None:
    """The run directory's parent exists or can be made, and a file can be written there."""
    parent = Path(run.output_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".tuneforge-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"run.output_dir: cannot write to '{parent}' ({e.strerror or e})") from None


def read_model_config(m: ModelConfig):
    """The model's config.json (from its directory, or the Hub cache or the Hub), without weights."""
    from transformers import AutoConfig

    kwargs = {"trust_remote_code": m.trust_remote_code, **({"revision": m.revision} if m.revision else {})}
    try:
        return AutoConfig.from_pretrained(m.name_or_path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        if "trust_remote_code" in str(e) and not m.trust_remote_code:
            raise UserError(f"model.trust_remote_code: '{m.name_or_path}' ships its own model code, which tuneforge "
                            "does not run unless asked; set model.trust_remote_code=true if you trust its source "
                            "(the code then runs in this process)") from None
        if hub_offline() and not Path(m.name_or_path).expanduser().exists():
            raise UserError(f"model.name_or_path: '{m.name_or_path}' is no local directory and is not in the Hub "
                            "cache, and HF_HUB_OFFLINE=1 forbids downloading it; download it first (hf download) "
                            "or give a local path") from None
        raise UserError(f"model.name_or_path: '{m.name_or_path}' has no usable config.json ({first_line(e)})") from None


def check_architecture(m: ModelConfig, config, kind: str) -> None:
    """The config names an architecture the kind's Auto class can build: AutoModelForSeq2SeqLM for seq2seq,
    AutoModelForCausalLM otherwise (a sequence classifier is built on a causal LM's backbone)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING)

    name = m.name_or_path
    if kind == "seq2seq":
        if type(config) not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING and not getattr(config, "auto_map", None):
            raise UserError(f"model.kind: seq2seq, but '{name}' is a {config.model_type!r} model that "
                            "AutoModelForSeq2SeqLM cannot load")
        return
    remote = bool(getattr(config, "auto_map", {}) or {}) and m.trust_remote_code
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING and not remote:
        raise UserError(f"model.name_or_path: '{name}' is a {config.model_type!r} model without a causal-LM "
                        "head (AutoModelForCausalLM cannot load it)")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def check_seq_length(data: DataConfig, config) -> None:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and data.seq_length > limit:
        log.warning("data.seq_length %d exceeds the model's %d positions (max_position_embeddings); positions past "
                    "%d are outside what it was trained on", data.seq_length, limit, limit)


def check_checkpoint_room(run_dir: Path, trainable: int, cfg: Config) -> None:
    """A checkpoint holds the trainable weights and two Adam moments in fp32 (~12 bytes a parameter), written
    beside the previous one before that is deleted: ask for room for two. Needs the trainable count, so the run
    calls it once the model is built."""
    if not cfg.checkpoint.every_steps:
        return
    need = 2 * 12 * trainable
    where = run_dir if run_dir.exists() else Path(cfg.run.output_dir)  # a new run's directory is made later
    free = shutil.disk_usage(where).free
    if free < need:
        raise UserError(f"checkpoint.every_steps: {run_dir} has {free / 2**30:.1f} GiB free; a checkpoint of "
                        f"{trainable:,} trainable parameters needs about {need / 2**30:.1f} GiB (two while saving)")
