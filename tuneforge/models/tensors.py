"""Do saved tensors fit a model? Names and shapes from a safetensors header, against what a model needs: one
telling line (a wrong shape first) instead of a shape error from deep inside a load."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from tuneforge.errors import UserError


def header_shapes(path: Path) -> dict[str, tuple]:
    """{tensor name: shape} from a safetensors file's header alone (no tensor data is read)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def shape_mismatch(found: dict[str, tuple], expected: dict[str, tuple], whose: str) -> str | None:
    """How saved tensors ({name: shape}) first differ from what `whose` ('this model') needs, a wrong shape first
    (the most telling); None when they agree."""
    wrong = [n for n in sorted(set(found) & set(expected)) if tuple(found[n]) != tuple(expected[n])]
    unknown, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
    if wrong:
        return f"tensor {wrong[0]} has shape {list(found[wrong[0]])}, {whose} needs {list(expected[wrong[0]])}"
    if unknown:
        return f"it has tensor {unknown[0]}, for which {whose} has no place"
    return f"it lacks tensor {missing[0]}, which {whose} needs" if missing else None


def check_tensors_fit(path: Path, found: dict[str, tuple], expected: dict[str, tuple], whose: str) -> None:
    """Saved tensors ({name: shape}) are exactly the ones `whose` trains, shape for shape."""
    problem = shape_mismatch(found, expected, whose)
    if problem:
        raise UserError(f"{path}: written for another model or adapter: {problem}; resume with the run's original "
                        "model.name_or_path and peft settings, or start over with --overwrite")


