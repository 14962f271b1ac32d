"""Atomic writes (tuneforge/files.py): the old output stays whole until the new one is complete, whatever fails."""
import hashlib
import os

import numpy as np
import pytest

from tuneforge import files
from tuneforge.data.prepare import _load_cached, _save_cached
from tuneforge.data.tables import TokenTable
from tuneforge.files import atomic_dir, file_sha256, fsync_tree, replace_dir, write_atomic
from tuneforge.train.metrics import truncate_metrics


def tree(root):
    """{relative path: bytes} of every file under root, and nothing hidden beside it."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def old_dir(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "weights.bin").write_bytes(b"old weights")
    (out / "sub" / "config.json").write_text("{}")
    return out, tree(out)


def fail_on_call(monkeypatch, module, name, n, exc=OSError("disk full")):
    """Make module.name raise on its n-th call (1-based); the calls before it go through."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise exc
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_write_atomic_writes_text_and_bytes_and_leaves_only_the_file(tmp_path):
    path = tmp_path / "scores.json"
    write_atomic(path, "é\n")
    assert path.read_bytes() == "é\n".encode()
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["scores.json"]


def test_write_atomic_gives_a_new_file_the_mode_a_plain_open_gives(tmp_path):
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "report.html", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "report.html").stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0o600


@pytest.mark.parametrize("step, exc", [("fsync", OSError("disk full")), ("replace", OSError("disk full")),
                                       ("fsync", KeyboardInterrupt())])
def test_write_atomic_failing_midway_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, step, exc):
    path = tmp_path / "metrics.jsonl"
    path.write_text("old line\n")
    fail_on_call(monkeypatch, os, step, 1, exc)
    with pytest.raises(type(exc)):
        write_atomic(path, "new line\n" * 1000)
    monkeypatch.undo()
    assert path.read_text() == "old line\n"
    assert os.listdir(tmp_path) == ["metrics.jsonl"]


def record_fsyncs(monkeypatch):
    """The real path of everything os.fsync is called on, in order."""
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    return synced


def test_write_atomic_fsyncs_the_file_and_then_its_directory(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    synced = record_fsyncs(monkeypatch)
    write_atomic(tmp_path / "LATEST", "step_3")
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / ".LATEST.")) and synced[1] == str(tmp_path)


def test_atomic_dir_replaces_the_old_directory_only_once_the_new_one_is_complete(tmp_path):
    out, before = old_dir(tmp_path)
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"new weights")
        assert tree(out) == before  # mid-write: readers still see the whole old output
        assert tmp.parent == out.parent and tmp.name.startswith(".out.")
    assert tree(out) == {"weights.bin": b"new weights"}
    assert os.listdir(tmp_path) == ["out"]  # neither the temporary nor the old directory is left


def test_atomic_dir_failing_midway_keeps_the_old_directory_and_leaves_no_temp(tmp_path):
    out, before = old_dir(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "weights.bin").write_bytes(b"half")
            raise RuntimeError("killed mid-save")
    assert tree(out) == before
    assert os.listdir(tmp_path) == ["out"]


def test_atomic_dir_makes_a_new_target_and_its_parent(tmp_path):
    out = tmp_path / "a" / "merged"
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"w")
    assert tree(out) == {"model.safetensors": b"w"} and os.listdir(tmp_path / "a") == ["merged"]


def test_replace_dir_puts_the_old_directory_back_when_the_new_one_cannot_go_in(tmp_path, monkeypatch):
    out, before = old_dir(tmp_path)
    new = tmp_path / ".out.new"
    new.mkdir()
    (new / "weights.bin").write_bytes(b"new")
    fail_on_call(monkeypatch, os, "replace", 2)  # 1: old -> aside, 2: new -> out
    with pytest.raises(OSError, match="disk full"):
        replace_dir(new, out)
    monkeypatch.undo()
    assert tree(out) == before
    assert sorted(os.listdir(tmp_path)) == [".out.new", "out"]  # `new` is the caller's to remove


def test_replace_dir_fsyncs_every_file_before_the_swap(tmp_path, monkeypatch):
    out, _ = old_dir(tmp_path)
    new = tmp_path / ".out.new"
    (new / "sub").mkdir(parents=True)
    (new / "a").write_bytes(b"1")
    (new / "sub" / "b").write_bytes(b"2")
    fail_on_call(monkeypatch, files, "fsync_tree", 1)
    with pytest.raises(OSError):
        replace_dir(new, out)  # an unsynced output is never swapped in
    monkeypatch.undo()
    assert (out / "weights.bin").read_bytes() == b"old weights"
    new = new.resolve()
    synced = record_fsyncs(monkeypatch)
    fsync_tree(new)
    assert set(synced) == {str(new / "a"), str(new / "sub" / "b"), str(new / "sub"), str(new)}
    assert synced[-1] == str(new)


def test_atomic_dir_if_absent_keeps_what_a_concurrent_writer_published(tmp_path):
    out, before = old_dir(tmp_path)
    with atomic_dir(out, if_absent=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"same content, second")
    assert tree(out) == before and os.listdir(tmp_path) == ["out"]
    fresh = tmp_path / "fresh"
    with atomic_dir(fresh, if_absent=True) as tmp:
        (tmp / "weights.bin").write_bytes(b"first")
    assert tree(fresh) == {"weights.bin": b"first"}


def test_file_sha256_is_the_content_hash(tmp_path):
    data = os.urandom(3 << 20)  # several read blocks
    (tmp_path / "f").write_bytes(data)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


# ---- the writers that use it ----------------------------------------------------------------------------------

def table(n):
    return TokenTable(np.arange(n, dtype=np.int32), np.ones(n, dtype=bool), np.array([0, n], dtype=np.int64))


def test_a_data_cache_entry_that_fails_midway_keeps_the_old_entry(tmp_path, monkeypatch, capsys):
    entry = tmp_path / "cache" / "abc"
    _save_cached(entry, table(4), {"v": 1})
    fail_on_call(monkeypatch, np, "save", 2)
    _save_cached(entry, table(9), {"v": 2})  # a full cache disk is a warning, not an error
    monkeypatch.undo()
    assert "cannot write data cache" in capsys.readouterr().err
    loaded, meta = _load_cached(entry)
    assert meta == {"v": 1} and np.array_equal(loaded.ids, np.arange(4))
    assert os.listdir(entry.parent) == ["abc"]
    fail_on_call(monkeypatch, os, "replace", 2)  # the swap itself: the new entry cannot be renamed in
    _save_cached(entry, table(9), {"v": 2})
    monkeypatch.undo()
    assert _load_cached(entry)[1] == {"v": 1} and os.listdir(entry.parent) == ["abc"]
    _save_cached(entry, table(9), {"v": 2})
    assert _load_cached(entry)[1] == {"v": 2} and os.listdir(entry.parent) == ["abc"]


def test_a_metrics_rewrite_that_fails_midway_keeps_every_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    lines = "".join(f'{{"step": {s}}}\n' for s in range(5))
    path.write_text(lines)
    fail_on_call(monkeypatch, os, "fsync", 1)
    with pytest.raises(OSError):
        truncate_metrics(path, after_step=2)
    monkeypatch.undo()
    assert path.read_text() == lines and os.listdir(tmp_path) == ["metrics.jsonl"]
    truncate_metrics(path, after_step=2)
    assert path.read_text() == "".join(f'{{"step": {s}}}\n' for s in range(3))
