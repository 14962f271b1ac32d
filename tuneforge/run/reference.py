"""A preference run's precomputed reference log-probs, stored with the run (reference_logps.safetensors): one
(pairs, 2) table per set ("train", "val/<name>"), tied to the pairs' token ids by a sha256, written atomically."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from tuneforge.data.pairs import PairSet
from tuneforge.errors import UserError
from tuneforge.files import write_atomic

REFERENCE_FILE = "reference_logps.safetensors"


def pairs_fingerprint(sets: dict[str, PairSet]) -> str:
    """sha256 of every pair's token ids, per set in order: what the stored log-probs belong to."""
    h = hashlib.sha256()
    for name, pairs in sets.items():
        h.update(name.encode())
        for p in pairs.pairs:
            h.update(repr((p.prompt, p.chosen, p.rejected)).encode())
    return h.hexdigest()


def load_reference(run_dir: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    path = run_dir / REFERENCE_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        stored = (f.metadata() or {}).get("pairs_sha256")
    if stored != fingerprint:
        raise UserError(f"{path}: the stored reference log-probs belong to other pairs than this run's data "
                        "(the data, tokenizer or seq_length changed); start again with --overwrite")
    return load_file(str(path))


def save_reference(run_dir: Path, tables: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Written whole or not at all (files.write_atomic)."""
    write_atomic(run_dir / REFERENCE_FILE, save({k: v.contiguous() for k, v in tables.items()},
                                                metadata={"pairs_sha256": fingerprint}))
