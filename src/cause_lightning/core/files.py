"""Writing files so that no reader ever sees half of one, folders proven writable before work, and
one process at a time making the same artifact.

Every file of the project (artifacts, checkpoints, JSON reports, images, the evaluation's hand-off)
is written by :func:`atomic_write`: a temporary file of a unique name beside the destination,
flushed to the disk, renamed over the destination, the folder flushed after the rename. A kill
leaves the old file or the whole new one, and a full disk is reported as such with what was
needed and what is free. Standard library only, so that every layer can write files.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cause_lightning.core.errors import DiskFullError

__all__ = [
    "PROBE_BYTES",
    "atomic_write",
    "current_umask",
    "ensure_writable",
    "exclusive",
    "free_bytes",
    "no_space_message",
    "write_json_atomic",
]


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], Any], need: int | None = None
) -> Path:
    """Write a file through a temporary sibling and an atomic rename: the one way files are
    written.

    The temporary name is unique (two runs writing into one folder never share it) and is
    removed whatever stops the write. The content is flushed to the disk (``fsync``) before the
    rename and the rename before returning, so after a crash the file is either the previous one
    or the complete new one.

    Args:
        path: Destination file.
        write: Callable receiving the temporary path and writing the content there.
        need: Bytes the file will take, about (``None``: unknown); named when the disk is full.

    Returns:
        The destination path.

    Raises:
        DiskFullError: The disk has no room for the file (nothing is left behind).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        # mkstemp creates 0600; the result gets the mode any new file of this process would get.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and _out_of_space(err, path.parent, need):
            raise DiskFullError(no_space_message(f"writing {path}", path.parent, need)) from err
        raise
    return path


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _out_of_space(err: BaseException, folder: str | os.PathLike, need: int | None) -> bool:
    """Whether a failed write ran out of disk space.

    ``ENOSPC`` / ``EDQUOT`` say so; torch's own file writer only says ``enforce fail at
    inline_container.cc`` (``unexpected pos``), so a write whose known size exceeds the free space
    counts as well.
    """
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return need is not None and free_bytes(folder) < need


def no_space_message(
    action: str, folder: str | os.PathLike, need: int | None, advice: str = "write elsewhere"
) -> str:
    """``no space left on device ...`` with the rough need and the free space of ``folder``."""
    needs = f"needs about {_mb(need)} MB, " if need is not None else ""
    return (
        f"no space left on device {action} ({needs}{_mb(free_bytes(folder))} MB free in "
        f"{folder}): free some space there or {advice}"
    )


def free_bytes(folder: str | os.PathLike) -> int:
    return shutil.disk_usage(folder).free


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f}"


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Bytes the writability check writes (and flushes): enough that a full disk refuses them.
PROBE_BYTES = 1 << 16


def ensure_writable(directory: str | os.PathLike, setting: str, need: int | None = None) -> Path:
    """Create ``directory`` if needed and prove that a file can be written there.

    Called before a stage does any work, so a read-only, misplaced or full results folder is found
    in a second rather than after hours of training. A few kilobytes are written and flushed (an
    empty file can still be created on a full disk).

    Args:
        directory: The folder a stage will write to.
        setting: The config setting that chooses it, named in the error.
        need: Bytes the stage will write there, roughly, when known: less free space is refused.

    Returns:
        The directory.

    Raises:
        PermissionError: The folder cannot be created or written.
        DiskFullError: The disk has no room for the probe, or less than ``need`` free.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(bytes(PROBE_BYTES))
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            os.unlink(probe)
    except OSError as err:
        if _out_of_space(err, directory, None):
            raise DiskFullError(_refused_for_space(directory, setting, need)) from err
        raise PermissionError(
            f"cannot write to {directory} ({type(err).__name__}: {err.strerror or err}): nothing "
            f"was run; make the folder writable or point {setting} at a writable folder"
        ) from err
    if need is not None and free_bytes(directory) < need:
        raise DiskFullError(_refused_for_space(directory, setting, need))
    return directory


def _refused_for_space(directory: Path, setting: str, need: int | None) -> str:
    advice = f"point {setting} at another disk; nothing was run"
    return no_space_message(f"in {setting}={directory}", directory, need, advice)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)

    def write(tmp: str) -> None:
        Path(tmp).write_text(text + "\n")

    return atomic_write(path, write)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):  # tensors and numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def exclusive(
    lock_file: str | os.PathLike, waiting: Callable[[], None] | None = None
) -> Iterator[None]:
    """Hold an exclusive lock (``flock``) on ``lock_file`` for the body: a second process asking
    for the same file waits until the first is done, or killed (the kernel drops the lock of a
    dead process, so a crash never leaves it held).

    Args:
        lock_file: The lock's file (created empty; never removed, as a process may be waiting on
            it).
        waiting: Called once when the lock is held by another process, before waiting for it.
    """
    try:
        import fcntl
    except ImportError:  # no flock on this system: one process at a time is not enforced
        yield
        return
    path = Path(lock_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
