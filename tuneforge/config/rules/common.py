"""How a recipe rule refuses: one line that names the recipe (when it is known) and the field, then what to do."""
from __future__ import annotations

from pathlib import Path

from tuneforge.errors import UserError


def fail(origin: str | None, message: str) -> None:
    """Refuse the recipe. `origin` is the recipe file (or <dict>, <config>) while it is being loaded; None once it
    is a Config whose file is no longer known (the pre-flight of a loaded recipe): the field then names the place."""
    raise UserError(f"{origin}: {message}" if origin else message)


def check(ok: bool, origin: str | None, message: str) -> None:
    if not ok:
        fail(origin, message)


def exists(path: str, kind: str = "exists") -> bool:
    """Path.is_file / is_dir / exists that answers False for names no filesystem accepts (too long, NUL bytes)."""
    try:
        return getattr(Path(path).expanduser(), kind)()
    except (OSError, ValueError):
        return False
