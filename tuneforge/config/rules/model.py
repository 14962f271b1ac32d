"""The model section: a model to start from (on disk, where the recipe names a local one), the classifier's MLP
head, and initialisation from an earlier run."""
from __future__ import annotations

from tuneforge.config.rules.common import check, exists
from tuneforge.config.schema import Config


def check_model(cfg: Config, origin: str | None, check_paths: bool) -> None:
    m = cfg.model
    check(bool(m.name_or_path), origin, "model.name_or_path: required (a Hub id or a local model directory)")
    if m.head is not None:
        check(bool(m.head.hidden_layers) and all(w >= 1 for w in m.head.hidden_layers), origin,
              f"model.head.hidden_layers: expected a list of widths >= 1, got {m.head.hidden_layers}")
        check(0 <= m.head.dropout < 1, origin, f"model.head.dropout: must be in [0, 1), got {m.head.dropout}")
    if m.init_from is not None:
        check(m.weights_only, origin, "model.weights_only: false is not supported; init_from "
              "loads weights only (checkpoint.resume continues a run's optimizer, schedule and step)")
        check(not check_paths or exists(m.init_from, "is_dir"), origin,
              f"model.init_from: expected a run, checkpoint or final/ directory, got '{m.init_from}'")
    if check_paths:
        check_model_source(cfg, origin)


def check_model_source(cfg: Config, origin: str | None) -> None:
    """A local model (a .gguf file, a directory) must be there; a Hub id is left to the pre-flight, which reads
    its config.json."""
    mp = cfg.model.name_or_path
    if mp.lower().endswith(".gguf") and not cfg.model.gguf_file:
        check(exists(mp, "is_file"), origin, f"model.name_or_path: no such GGUF file '{mp}'")
    elif looks_local(mp):
        check(exists(mp, "is_dir"), origin, f"model.name_or_path: no such model directory '{mp}'")


def looks_local(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else (or an existing path) is a local directory."""
    return exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
