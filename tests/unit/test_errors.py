"""first_line: the one line of an exception that a UserError quotes."""
import pytest

from tuneforge.errors import first_line


@pytest.mark.parametrize("exc, line", [
    (ValueError("bad shape"), "bad shape"),
    (ValueError("  first  \nsecond\nthird"), "first"),
    (OSError("\n\n   \nafter blank lines\nmore"), "after blank lines"),
    (ValueError(""), "ValueError"),
    (RuntimeError(" \n\t\n"), "RuntimeError"),
    (KeyError("gone"), "'gone'"),
    (KeyError(), "KeyError"),
])
def test_first_line_is_the_first_non_empty_line_or_the_class_name(exc, line):
    assert first_line(exc) == line
