"""Fetching raw dataset files: resumable downloads and safe archive extraction.

Downloads resume from ``<dest>.part`` and never hang on a dead network (a short probe in a thread
decides first); archives are unpacked member by member, atomically, refusing paths that would
leave the target directory.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import threading
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from cause_lightning.core.logs import get_logger
from cause_lightning.data.progress import make_progress

__all__ = ["download_file", "extract_archive", "probe"]

log = get_logger(__name__)


# ------------------------------------------------------------------------------------------ network
def probe(url: str, timeout: float) -> bool:
    """Whether ``url``'s host answers within ``timeout`` s (in a thread, so DNS cannot stall us)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            req = urllib.request.Request(
                url, method="HEAD", headers={"User-Agent": "cause-lightning"}
            )
            with urllib.request.urlopen(req, timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:
            result.append(True)  # the server answered, even if HEAD is refused
        except (OSError, ValueError):
            result.append(False)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    return bool(result and result[0])


def download_file(url: str, dest: Path, *, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resuming a previous ``dest.part``.

    Args:
        url: source URL.
        dest: target file; the data arrives in ``<dest>.part`` and is renamed when complete.
        timeout: socket timeout per connect / read, seconds (a stalled transfer fails instead of
            hanging).
        progress: show a progress bar.

    Returns:
        ``dest``.

    Raises:
        OSError: on network errors (the partial file is kept for the next attempt).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "cause-lightning"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # range beyond the end: the part file is already complete
            os.replace(part, dest)
            return dest
        raise
    with resp:
        if have and resp.status != 206:
            log.info("%s: the server ignored the resume request; starting over", url)
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length else None
        log.info(
            "downloading %s -> %s%s", url, dest, f" (resuming at {have:,} bytes)" if have else ""
        )
        with (
            open(part, "ab" if have else "wb") as out,
            make_progress("MB", enabled=progress) as bar,
        ):
            task = bar.add_task(
                dest.name, total=None if total is None else total / 2**20, completed=have / 2**20
            )
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                out.write(chunk)
                bar.advance(task, len(chunk) / 2**20)
    if total is not None and part.stat().st_size != total:
        raise OSError(
            f"download of {url} ended at {part.stat().st_size:,} of {total:,} bytes; run again "
            "to resume"
        )
    os.replace(part, dest)
    return dest


# ----------------------------------------------------------------------------------------- archives
def _safe_target(dest: Path, member: str) -> Path | None:
    """Target path of an archive member inside ``dest``, or ``None`` for unsafe names."""
    pure = PurePosixPath(member)
    if pure.is_absolute() or ".." in pure.parts:
        return None
    return dest.joinpath(*pure.parts)


def _copy_atomic(src: IO[bytes], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _members(archive: Path) -> Iterator[tuple[str, int, Any]]:
    """``(name, size, opener)`` of every regular file in a zip or tar archive."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, info.file_size, lambda info=info, zf=zf: zf.open(info)
        return
    with tarfile.open(archive) as tf:
        for member in tf:
            if member.isfile():
                yield member.name, member.size, lambda member=member, tf=tf: tf.extractfile(member)


def extract_archive(
    archive: Path, dest: Path, *, skip: tuple[str, ...] = (), progress: bool = True
) -> dict[str, int]:
    """Unpack a zip or tar archive, resumably: files already present with the right size are kept.

    Args:
        archive: ``.zip`` or ``.tar`` (optionally compressed) file.
        dest: target folder.
        skip: member-path fragments to leave out.
        progress: show a progress bar.

    Returns:
        ``{"extracted": n, "kept": n, "skipped": n}``.

    Raises:
        tarfile.TarError / zipfile.BadZipFile: on a damaged archive (delete it and download again).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    counts = {"extracted": 0, "kept": 0, "skipped": 0}
    log.info("unpacking %s into %s", archive, dest)
    with make_progress("files", enabled=progress) as bar:
        task = bar.add_task(f"unpack {Path(archive).name}", total=None)
        for name, size, opener in _members(Path(archive)):
            target = _safe_target(dest, name)
            if target is None or any(fragment in name for fragment in skip):
                counts["skipped"] += 1
                continue
            if target.is_file() and target.stat().st_size == size:
                counts["kept"] += 1
            else:
                with opener() as src:
                    _copy_atomic(src, target)
                counts["extracted"] += 1
            bar.advance(task)
    log.info("unpacked %s: %s", Path(archive).name, counts)
    return counts
