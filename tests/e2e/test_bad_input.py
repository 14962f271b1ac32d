"""Every row of the bad-input matrix (docs/bad-input.md): exit 2, one line, the documented message."""
import sys
from pathlib import Path

import pytest

from tests.bad_input_cases import CASES, materialize, render
from tests.conftest import REPO
from tuneforge import cli


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}-{c.what}" for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    argv = materialize(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    for name, value in case.env.items():
        if name == "TUNEFORGE_TEST_HIDE":
            monkeypatch.setitem(sys.modules, value, None)  # the optional package is not installed
        else:
            monkeypatch.setenv(name, value)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(cli.main(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == case.exit_code, err
    assert len(err) == 1 and err[0].startswith("tuneforge: error: "), err
    assert case.expect in err[0], err[0]
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert [p for p in before if p not in after] == []  # nothing already there was removed
    if "--out" in argv:  # and a refused export or merge leaves no output behind, not even an empty directory
        out = Path(argv[argv.index("--out") + 1])
        assert out.relative_to(tmp_path) in before or not out.exists(), out


def test_matrix_has_forty_cases_and_the_page_is_current():
    assert len(CASES) >= 40
    assert (REPO / "docs/bad-input.md").read_text() == render(), \
        "regenerate: python -m tests.bad_input_cases > docs/bad-input.md"
