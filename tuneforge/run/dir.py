"""The run directory: which run a command continues, and the rule that nothing in it changes before setup passed.

A run directory is the record of how its weights were made. `plan_run_dir` only reads: it decides whether the run
starts, resumes or is refused. `commit_run_dir` is the first write (deleting an old run for --overwrite, the new
config.yaml); the recipe calls it only once every check that can fail before training has passed (data, model,
adapter, checkpoint), so a rerun that fails on bad input leaves every file of the earlier run byte-identical."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tuneforge.checkpoint import find_latest
from tuneforge.config import Config, dump_config, to_dict
from tuneforge.config.schema import RunConfig
from tuneforge.errors import UserError

# Keys a resumed run may change: they steer logging, evaluation, checkpoint cadence and where the run stops, not
# what one training step computes. Everything else under model, data, peft, train and distributed (and run.seed)
# changes the weights a step produces, so a resume that changes it would mix two runs in one record.
SAFE_ON_RESUME = ("logging.", "eval.", "checkpoint.", "run.output_dir", "train.stop_at_step", "train.log_every_steps",
                  "train.val_every_steps", "train.max_bad_steps", "train.release_memory_every_steps",
                  "data.validation", "data.num_workers", "data.cache")
LONGER_ON_RESUME = ("train.max_steps", "train.num_epochs")  # may grow (the run goes on), never shrink


@dataclass
class RunDirPlan:
    run_dir: Path
    resume_from: Path | None
    replace: bool = False                                # --overwrite of an existing run: delete it at commit
    changed: list[str] = field(default_factory=list)     # safe keys that differ from the recorded config


def run_dir_of(run: RunConfig) -> Path:
    return Path(run.output_dir) / run.name


def plan_run_dir(cfg: Config, overwrite: bool) -> RunDirPlan:
    """The run directory and the checkpoint to resume from; reads only. An existing run is never silently replaced,
    and a resume whose recipe trains differently from the recorded one is refused."""
    run_dir = run_dir_of(cfg.run)
    explicit = None if cfg.checkpoint.resume in ("auto", "never") else Path(cfg.checkpoint.resume)
    if not run_dir.exists():
        return RunDirPlan(run_dir, explicit)
    if overwrite:
        return RunDirPlan(run_dir, None, replace=True)
    ckpt = find_latest(run_dir / "checkpoints") if cfg.checkpoint.resume == "auto" else explicit
    finished = (run_dir / "final").exists()
    # A finished run is never replaced silently. An interrupted one that had not checkpointed yet restarts (its
    # metrics lines are for steps that will run again, and are dropped).
    if ckpt is None and (finished or cfg.checkpoint.resume == "never"):
        raise UserError(f"run directory {run_dir} already holds a run with nothing to resume; "
                        "pass --overwrite to replace it or choose another run.name")
    changed = []
    if ckpt is not None or finished:
        changed = check_same_training(run_dir / "config.yaml", to_dict(cfg))
    return RunDirPlan(run_dir, ckpt, changed=changed)


def check_same_training(recorded_path: Path, now: dict) -> list[str]:
    """Refuse a resume whose config differs from the recorded one in a key that changes training; return the safe
    keys that changed (the log names them)."""
    try:
        recorded = yaml.safe_load(recorded_path.read_text())
    except FileNotFoundError:
        return []  # a run directory from before configs were recorded: nothing to compare with
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{recorded_path}: the recorded config cannot be read ({e.__class__.__name__}); pass "
                        "--overwrite to start the run again or choose another run.name") from None
    before, after = _flatten(recorded if isinstance(recorded, dict) else {}), _flatten(now)
    differing = [k for k in sorted(before.keys() | after.keys()) if before.get(k, _ABSENT) != after.get(k, _ABSENT)]
    unsafe = [k for k in differing if not _safe_change(k, before.get(k, _ABSENT), after.get(k, _ABSENT))]
    if unsafe:
        shown = "; ".join(f"{k}: recorded {_show(before.get(k, _ABSENT))}, now {_show(after.get(k, _ABSENT))}"
                          for k in unsafe[:3])
        more = f" (and {len(unsafe) - 3} more)" if len(unsafe) > 3 else ""
        raise UserError(f"{recorded_path.parent}: this run was recorded with a different recipe ({shown}{more}); "
                        "resuming would train it differently. Choose a new run.name to start a new run, or pass "
                        "--overwrite to replace this one")
    return [f"{k}: {_show(before.get(k, _ABSENT))} -> {_show(after.get(k, _ABSENT))}" for k in differing]


def commit_run_dir(plan: RunDirPlan, cfg: Config) -> None:
    """The run's first write: delete the run being replaced, make the directory, record the resolved config."""
    if plan.replace and plan.run_dir.exists():
        shutil.rmtree(plan.run_dir)
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, plan.run_dir / "config.yaml")


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def _flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _safe_change(key: str, before, after) -> bool:
    if key.startswith(SAFE_ON_RESUME):
        return True
    if key in LONGER_ON_RESUME:
        return before is None or (isinstance(after, (int, float)) and isinstance(before, (int, float))
                                  and after >= before)
    return False


def _show(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 160 else text[:157] + "..."
