"""Reading a file the user named, and atomic writes.

Atomic writes: a reader (or the next run after a crash) sees the old content or the new, never half of one.

A file is written to a temporary sibling, flushed and fsynced, renamed over the target (os.replace is atomic
within one file system), and then its directory is fsynced so the rename itself survives a power cut. A directory
is built in a temporary sibling, every file in it is fsynced, and it is swapped in: the old one is renamed aside,
the new one renamed in, and only then is the old one deleted. The temporary names start with a dot (out of
sight) and carry the process id and a random token, so concurrent writers never share one.

Standard library only (layer 1): everything that writes output the user keeps comes here."""
from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tuneforge.errors import UserError


def read_user_text(path: str | Path, label: str, what: str = "file", detail: bool = False) -> str:
    """The UTF-8 text of a file the user named; a missing or unreadable one is one line, '<label>: no such <what>'
    or '<label>: cannot read <what> (<why>)', with the exception's message too when `detail`."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{label}: no such {what}") from None
    except (OSError, UnicodeDecodeError) as e:
        why = f"{e.__class__.__name__}: {e}" if detail else e.__class__.__name__
        raise UserError(f"{label}: cannot read {what} ({why})") from None


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the directory's entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under `root`, then every directory (deepest first, `root` last)."""
    for here, _, names in os.walk(root, topdown=False):
        for name in names:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(here)


def _temp_sibling(target: Path, role: str = "tmp") -> Path:
    """A hidden name beside `target` that no other writer (process or thread) picks."""
    return target.with_name(f".{target.name}.{role}-{os.getpid()}-{secrets.token_hex(4)}")


def write_atomic(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> None:
    """Replace the file at `path` with `data` (text is encoded with `encoding`). On any failure, the old file is
    left as it was and the temporary file is removed."""
    path = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    tmp = _temp_sibling(path)
    try:
        # 0o666 and the umask, as a plain open() gives a new file (mkstemp would make it private, 0o600)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, or Ctrl-C mid-write: no debris beside the untouched old file
        _remove(tmp)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target` for a writer that opens files by name; when the block ends normally
    the file is synced and replaces `target` in one rename. When it raises, `target` is untouched and the
    temporary file is removed."""
    target = Path(target)
    tmp = _temp_sibling(target)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        _remove(tmp)
    fsync_dir(target.parent)


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Swap the complete directory `new` (a sibling of `target`, on the same file system) into `target`'s place.

    Its files are fsynced first; then the old `target` is renamed aside, `new` is renamed in, and the old one is
    deleted last. If the swap fails, the old `target` is put back (and `new` is left for the caller). A crash
    between the two renames leaves both whole: the old one under its hidden `.old-` name, the new under its own."""
    new, target = Path(new), Path(target)
    fsync_tree(new)
    aside = _temp_sibling(target, "old") if target.exists() or target.is_symlink() else None
    if aside is not None:
        os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        if aside is not None:
            os.replace(aside, target)
        raise
    fsync_dir(target.parent)
    if aside is not None:
        _remove(aside)


def publish_dir_if_absent(new: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Rename the complete directory `new` to `target` unless `target` already holds something (a concurrent
    writer of the same content finished first: its result is kept, and may be in use). True when `new` went in."""
    new, target = Path(new), Path(target)
    fsync_tree(new)
    try:
        os.rename(new, target)  # POSIX: onto a missing or empty directory only
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and target.is_dir():
            return False
        raise
    fsync_dir(target.parent)
    return True


@contextmanager
def atomic_dir(target: str | os.PathLike, *, if_absent: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target` to build the new output in; when the block ends
    normally it replaces `target` (replace_dir), or with `if_absent` goes in only where `target` does not exist
    yet (publish_dir_if_absent). When the block raises, `target` is untouched and the temporary directory is
    removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    try:
        yield tmp
        if if_absent:
            publish_dir_if_absent(tmp, target)
        else:
            replace_dir(tmp, target)
    finally:
        _remove(tmp)  # gone already once published; otherwise a half-built output nobody will read


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
