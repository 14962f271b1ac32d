"""ARCHITECTURE.md's "Where things are" table names real places: every path exists, and every name given with it in
backticks is defined there (a function, class, method or module-level name; `make X` a Makefile target)."""
import re

from tests.conftest import REPO

ROW = re.compile(r"^\| (?P<what>[^|]+) \| (?P<where>.+) \|$")
# `path` optionally followed by (...) holding `name`s; a path is a .py file or a folder under tuneforge/ or the repo
PLACE = re.compile(r"`(?P<path>[\w./-]+(?:\.py|/))`(?:\s*\((?P<names>[^)]*)\))?")


def table_rows() -> list[tuple[str, str]]:
    text = (REPO / "ARCHITECTURE.md").read_text()
    table = text.split("## Where things are", 1)[1]
    rows = [ROW.match(line) for line in table.splitlines()]
    return [(m["what"], m["where"]) for m in rows if m and not m["what"].startswith(("to change", "---"))]


def resolve(path: str):
    for root in (REPO / "tuneforge", REPO):
        if (root / path).exists():
            return root / path
    return None


def defines(place, name: str) -> bool:
    files = sorted(place.rglob("*.py")) if place.is_dir() else [place]
    source = "\n".join(f.read_text() for f in files)
    *owner, last = name.split(".")
    if owner and not re.search(rf"^class {re.escape(owner[0])}\b", source, re.M):
        return False
    return bool(re.search(rf"^\s*(def|class) {re.escape(last)}\b|^{re.escape(last)}\s*[:=]", source, re.M))


def test_every_place_in_the_table_exists_and_defines_what_it_names():
    rows = table_rows()
    assert len(rows) >= 20
    makefile = (REPO / "Makefile").read_text()
    missing = []
    for what, where in rows:
        places = list(PLACE.finditer(where))
        assert places, f"row '{what}' names no file or folder"
        for m in places:
            place = resolve(m["path"])
            if place is None:
                missing.append(f"{what}: {m['path']} does not exist")
                continue
            for name in re.findall(r"`([^`]+)`", m["names"] or ""):
                if name.startswith("make "):
                    if not re.search(rf"^{re.escape(name[5:])}:", makefile, re.M):
                        missing.append(f"{what}: no Makefile target {name[5:]}")
                elif not defines(place, name):
                    missing.append(f"{what}: {m['path']} does not define {name}")
    assert missing == []
