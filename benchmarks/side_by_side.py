"""What every side-by-side benchmark here does at its end: keep its markdown with its numbers, write them all as
JSON to --out (default WORK/results.json), and print the markdown."""
from __future__ import annotations

import json
from pathlib import Path


def publish(results: dict, text: str, out: str | None, work: Path, holds: str) -> Path:
    """Write `results` (with `text` as its "markdown") and print `text`; `holds` says what the JSON has beyond it."""
    results["markdown"] = text
    path = Path(out) if out else work / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print("\n" + text)
    print(f"everything ({holds}): {path}")
    return path
