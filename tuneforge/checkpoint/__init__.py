"""Resumable training state, written atomically.

checkpoints/step_N/ holds a TrainState (checkpoint/state.py): the trainable weights (safetensors), the optimizer,
scheduler, RNG and data-loader state (torch.save, loaded with weights_only=True) and a manifest of file sizes and
hashes. It is written to a temporary directory and renamed into place, then LATEST is replaced atomically, so a
crash at any moment leaves the newest complete checkpoint discoverable."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tuneforge.checkpoint.state import TrainState
from tuneforge.config.schema import Config
from tuneforge.distributed import DistEnv, barrier, inner_model
from tuneforge.errors import UserError
from tuneforge.files import file_sha256, replace_dir, write_atomic
from tuneforge.models.load import load_model_skeleton
from tuneforge.models.tensors import check_tensors_fit, header_shapes
from tuneforge.peft import apply_finetuning

log = logging.getLogger("tuneforge")

WEIGHTS, STATE, MANIFEST, LATEST = "trainable.safetensors", "state.pt", "manifest.json", "LATEST"
SHARDED = "dcp"  # torch.distributed.checkpoint directory of a multi-process run (model/adapter + optimizer shards)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(ckpt_root: Path, state: TrainState, meta: dict, keep_last: int | None,
                    env: DistEnv | None = None) -> Path | None:
    """Write `state` as checkpoints/step_N and point LATEST at it; returns its path (None on ranks other than 0).
    One process writes the trainable weights as safetensors and the rest with torch.save (tensors and plain data
    only); under torchrun every rank writes its shards (torch.distributed.checkpoint) and its own progress."""
    env = env or DistEnv()
    if env.initialized:
        return _save_sharded(ckpt_root, state, meta, keep_last, env)
    tmp = _fresh_tmp(ckpt_root, state.step)
    try:
        save_file(trainable_state(inner_model(state.module)), tmp / WEIGHTS)
        torch.save({"optimizer": state.optimizer.state_dict(), **state.progress()}, tmp / STATE)
        return _publish(ckpt_root, tmp, state.step, meta, keep_last)
    except BaseException:  # a second Ctrl-C or a full disk mid-write: leave no half checkpoint behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_sharded(ckpt_root: Path, state: TrainState, meta: dict, keep_last: int | None, env: DistEnv) -> Path | None:
    """Every rank writes its shards of the trainable weights and optimizer state and its own progress; rank 0 then
    hashes, publishes and points LATEST at it."""
    tmp = _fresh_tmp(ckpt_root, state.step, shared=True, env=env)
    model_sd, optim_sd = get_state_dict(state.module, state.optimizer,
                                        options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / SHARDED))
    torch.save(state.progress(), tmp / f"rank_{env.rank}.pt")
    barrier(env)
    final = (_publish(ckpt_root, tmp, state.step, {**meta, "world_size": env.world_size}, keep_last)
             if env.is_main else None)
    barrier(env)
    return final


def _fresh_tmp(ckpt_root: Path, step: int, shared: bool = False, env=None) -> Path:
    """A new temporary directory beside the checkpoints (one per save; shared by all ranks when `shared`)."""
    tmp = ckpt_root / (f".tmp-step_{step}" if shared else f".tmp-step_{step}-{os.getpid()}")
    if not shared or env.is_main:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if shared:
        barrier(env)
    return tmp


def _publish(ckpt_root: Path, tmp: Path, step: int, meta: dict, keep_last: int | None) -> Path:
    """Record sizes and hashes, swap the directory into place (every file fsynced first; a step written again
    replaces the old copy only once the new one is whole), then move LATEST: a crash at any point leaves either the
    previous or the new checkpoint complete and findable."""
    files = {str(path.relative_to(tmp)): {"size": path.stat().st_size, "sha256": file_sha256(path)}
             for path in sorted(p for p in tmp.rglob("*") if p.is_file())}
    write_atomic(tmp / MANIFEST, json.dumps({"step": step, "files": files, **meta}, indent=1))
    final = ckpt_root / f"step_{step}"
    replace_dir(tmp, final)
    write_atomic(ckpt_root / LATEST, final.name)
    _apply_retention(ckpt_root, keep_last, keep=final)
    for leftover in ckpt_root.glob(".tmp-*"):  # from a writer that was killed: never published, only taking room
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _retire(ckpt: Path) -> None:
    """Rename out of sight, then delete: a crash mid-delete leaves hidden debris, never a half checkpoint that
    still looks like one."""
    doomed = ckpt.with_name(f".tmp-removing-{ckpt.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed)


def _complete(ckpt_root: Path) -> list[Path]:
    dirs = [d for d in ckpt_root.glob("step_*") if d.is_dir() and (d / MANIFEST).is_file()]
    return sorted(dirs, key=lambda d: int(d.name.split("_")[1]))


def _apply_retention(ckpt_root: Path, keep_last: int | None, keep: Path) -> None:
    if keep_last is None:
        return
    for old in _complete(ckpt_root)[:-keep_last]:
        if old != keep:
            _retire(old)


def verify(ckpt: Path) -> str | None:
    """None when every file in the manifest is present with its size and hash, else what is wrong."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, info in manifest.get("files", {}).items():
        path = ckpt / name
        if not path.is_file() or path.stat().st_size != info["size"]:
            return f"{name} is missing or has the wrong size"
        if file_sha256(path) != info["sha256"]:
            return f"{name} does not match its hash"
    return None


def find_latest(ckpt_root: Path) -> Path | None:
    """The newest intact checkpoint: LATEST's target, or an older one (with a warning) if that is damaged."""
    if not ckpt_root.is_dir():
        return None
    candidates = _complete(ckpt_root)
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        named = ckpt_root / pointer.read_text().strip()
        if named in candidates:
            candidates = [c for c in candidates if c != named] + [named]
    for ckpt in reversed(candidates):
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("checkpoint %s is damaged (%s); trying the previous one", ckpt, problem)
    return None


def check_checkpoint_fits(cfg: Config, ckpt: Path, model_config=None) -> None:
    """A single-process checkpoint's tensors against the recipe's model and fine-tuning built on the skeleton:
    resuming after model.name_or_path or the peft section changed fails here, before the base weights load.
    `model_config` replaces the checkpoint's config (a classifier's labels)."""
    try:
        found = header_shapes(ckpt / WEIGHTS)
    except (OSError, SafetensorError):
        return  # a multi-process or damaged checkpoint: loading it says what is wrong
    model = apply_finetuning(load_model_skeleton(cfg.model, model_config), cfg)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    check_tensors_fit(ckpt / WEIGHTS, found, expected, f"model '{cfg.model.name_or_path}' with this recipe's peft")


def load_checkpoint(ckpt: Path, state: TrainState, env: DistEnv | None = None) -> None:
    """Restore into `state` everything save_checkpoint wrote (state.step included). A checkpoint resumes with the
    number of processes that wrote it."""
    env = env or DistEnv()
    problem = verify(ckpt)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt}: {problem}")
    if env.initialized:
        _load_sharded(ckpt, state, env)
        return
    if not (ckpt / WEIGHTS).is_file():
        raise UserError(f"checkpoint {ckpt}: written by a multi-process run; resume it with the same number "
                        "of processes")
    weights = load_file(ckpt / WEIGHTS)
    params = dict(inner_model(state.module).named_parameters())
    # copy_ would broadcast a smaller tensor silently, and a missing one would keep its fresh initialisation
    expected = {n: tuple(p.shape) for n, p in params.items() if p.requires_grad or n in weights}
    check_tensors_fit(ckpt / WEIGHTS, {n: tuple(t.shape) for n, t in weights.items()}, expected, "this model")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    saved = torch.load(ckpt / STATE, weights_only=True)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.load_progress(saved)


def _load_sharded(ckpt: Path, state: TrainState, env: DistEnv) -> None:
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if not (ckpt / SHARDED).is_dir():
        raise UserError(f"checkpoint {ckpt}: written by a single process; resume it with one process "
                        "(or start a new run with model weights from it)")
    if manifest.get("world_size") != env.world_size:
        raise UserError(f"checkpoint {ckpt}: written by {manifest.get('world_size')} processes, "
                        f"resumed with {env.world_size}; resume with the same number of processes")
    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(state.module, state.optimizer, options=options)
    shards = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(shards, checkpoint_id=str(ckpt / SHARDED))
    # strict=False: frozen weights are not in the checkpoint (they come from the base model); every trainable one
    # is, or dcp.load above would have failed.
    set_state_dict(state.module, state.optimizer, model_state_dict=shards["model"],
                   optim_state_dict=shards["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    state.load_progress(torch.load(ckpt / f"rank_{env.rank}.pt", weights_only=True))
