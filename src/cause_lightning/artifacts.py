"""Stage artifacts: where they live and how they are written and read.

Each stage hands its result to the next through a small file in a deterministic directory
(``<artifact_dir>/<data>/<backbone>[-<tag>]``), never through Lightning checkpoints:

* ``clusterbook.pt``  — stage ``mediator`` (shared by the MLP and TR heads);
* ``<head>/head.pt``  — stage ``head`` (teacher head + linear probe);
* ``<head>/probe.pt`` — stage ``probe`` (class centroids + linear probe);
* ``<head>/segmenter.pt`` and ``<head>/metrics.json`` — stage ``eval``.

Files hold tensors and primitives only, so ``torch.load(weights_only=True)`` reads them, and every
file of the project is written by :func:`atomic_write` (a unique temporary name, flushed, renamed)
so no reader ever sees half a file and a full disk is reported as such. Every artifact carries a
SHA-256 checksum of its payload, checked when it is read, so a file damaged after it was written
is refused by name instead of failing later as a strange loss; an artifact with non-finite values
is never written. Written files get the ordinary mode of a new file (``0666`` less the umask), so a
shared results folder stays readable.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cause_lightning.errors import DiskFullError, ExpectedError

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "MissingArtifactError",
    "artifact_root",
    "head_dir",
    "PRODUCER",
    "save_artifact",
    "load_artifact",
    "write_json_atomic",
    "atomic_write",
    "payload_checksum",
    "ensure_writable",
    "describe_load_error",
    "current_umask",
]

FORMAT_VERSION = 1


class ArtifactError(ExpectedError, RuntimeError):
    """An artifact exists but is of the wrong kind, version or shape, or is not fit to be
    written (non-finite values)."""


class MissingArtifactError(ExpectedError, FileNotFoundError):
    """A stage needs an artifact that an earlier stage has not written yet."""


def artifact_root(
    artifact_dir: str | os.PathLike, data_name: str, backbone_name: str, tag: str = ""
) -> Path:
    """Directory shared by every stage run on one dataset and backbone.

    Args:
        artifact_dir: Root of all artifacts (``paths.artifact_dir``).
        data_name: Dataset key (``data.name``).
        backbone_name: Backbone key (``backbone.name``).
        tag: Optional suffix separating seeds or variants (``artifact_tag``).

    Returns:
        ``<artifact_dir>/<data_name>/<backbone_name>[-<tag>]``.
    """
    leaf = f"{backbone_name}-{tag}" if tag else backbone_name
    return Path(artifact_dir) / data_name / leaf


def head_dir(root: str | os.PathLike, head_name: str) -> Path:
    """Per-head sub-directory of an artifact root (``root/<head_name>``)."""
    return Path(root) / head_name


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
            raise DiskFullError(_no_space_message(f"writing {path}", path.parent, need)) from err
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
    return need is not None and _free_bytes(folder) < need


def _no_space_message(
    action: str, folder: str | os.PathLike, need: int | None, advice: str = "write elsewhere"
) -> str:
    """``no space left on device ...`` with the rough need and the free space of ``folder``."""
    needs = f"needs about {_mb(need)} MB, " if need is not None else ""
    return (
        f"no space left on device {action} ({needs}{_mb(_free_bytes(folder))} MB free in "
        f"{folder}): free some space there or {advice}"
    )


def _free_bytes(folder: str | os.PathLike) -> int:
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
    if need is not None and _free_bytes(directory) < need:
        raise DiskFullError(_refused_for_space(directory, setting, need))
    return directory


def _refused_for_space(directory: Path, setting: str, need: int | None) -> str:
    advice = f"point {setting} at another disk; nothing was run"
    return _no_space_message(f"in {setting}={directory}", directory, need, advice)


def payload_checksum(record: dict[str, Any]) -> str:
    """SHA-256 of an artifact's content (every key but ``checksum``), independent of pickling.

    Keys are visited in sorted order; a tensor contributes its dtype, shape and raw bytes, other
    values their ``repr``, so the same content always gives the same digest.
    """
    digest = hashlib.sha256()
    _hash_into(digest, {k: v for k, v in record.items() if k != "checksum"})
    return digest.hexdigest()


def _hash_into(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor:{obj.dtype}:{tuple(obj.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        digest.update(f"dict:{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            digest.update(f"{key!r}=".encode())
            _hash_into(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{type(obj).__name__}:{len(obj)}:".encode())
        for item in obj:
            _hash_into(digest, item)
    else:
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format
_NPY_MAGIC = b"\x93NUMPY"


def describe_load_error(err: BaseException, path: str | os.PathLike) -> str:
    """A short reason why ``torch.load(weights_only=True)`` refused a file.

    Three cases are told apart, from torch's message and the file's first bytes: a file holding
    pickled Python objects (never loaded: loading them could run code), a file cut short, and a
    file that ``torch.save`` did not write at all. Torch's advice to load again with
    ``weights_only=False``, which would run code from the file, is never passed on.

    Args:
        err: The exception ``torch.load`` raised.
        path: The file it read.
    """
    if "Unsupported global" in str(err):  # the weights-only unpickler met an object type
        return (
            "it holds Python objects other than tensors and plain values, which are never "
            "loaded because loading them could run code"
        )
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as os_err:
        return f"{type(os_err).__name__}: {os_err.strerror or os_err}"
    if size == 0:
        return "the file is empty"
    cut_short = isinstance(err, EOFError) or "unexpected EOF" in str(err)
    if cut_short or (head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path)):
        return f"the file is cut short ({size} bytes): a copy or a write did not finish"
    if head.startswith(_NPY_MAGIC):
        found = "a NumPy array file"
    elif head.startswith(_ZIP_MAGIC):
        found = "a zip archive of other content"
    elif head.startswith(b"\x80"):
        found = "a pickle that torch.save did not write"
    else:
        found = "unrecognised content"
    return f"it is not a file written by torch.save ({found})"


def save_artifact(path: str | os.PathLike, kind: str, payload: dict[str, Any]) -> Path:
    """Save a stage artifact atomically, once its values are proven fit for the next stage.

    Args:
        path: Destination file (``.pt``).
        kind: Artifact kind, e.g. ``"clusterbook"``, ``"head"``, ``"probe"``.
        payload: Tensors, primitives and nested dicts/lists of them. Tensors are moved to CPU.

    Returns:
        The destination path.

    Raises:
        ArtifactError: A tensor holds NaN or infinite values, or rows whose float32 norm
            overflows (a diverged stage); no file is written.
        DiskFullError: The disk has no room for the file.
    """
    record = {"format_version": FORMAT_VERSION, "kind": kind, **_to_cpu(payload)}
    for name, tensor in _tensors(record):
        problem = _unfit(tensor)
        if problem is not None:
            cause = (
                _divergence_advice(PRODUCER[kind])
                if kind in PRODUCER
                else "the model it was made from diverged or is damaged"
            )
            raise ArtifactError(f"not writing {path}: {kind} tensor {name!r} {problem}, so {cause}")
    record["checksum"] = payload_checksum(record)
    need = sum(t.nbytes for _, t in _tensors(record))
    return atomic_write(path, lambda tmp: torch.save(record, tmp), need=need)


#: The stage that writes each artifact the training stages hand on.
PRODUCER = {"clusterbook": "mediator", "head": "head", "probe": "probe"}


def _divergence_advice(stage: str) -> str:
    """What a diverged stage's artifact is refused with: the stage and the settings that tame it
    (its learning rates and gradient clipping, as the method's schema has them)."""
    from cause_lightning.config import MethodConfig

    section = getattr(MethodConfig(), stage)
    rates = " / ".join(f"method.{stage}.{k}" for k in ("lr", "cluster_lr") if hasattr(section, k))
    clip = f" or set method.{stage}.clip (gradient clipping)" if hasattr(section, "clip") else ""
    return (
        f"the result of stage={stage} is unusable (it diverged); lower {rates}{clip}, then run "
        f"stage={stage} again"
    )


def _tensors(obj: Any, name: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor of a nested payload with its key path (``head_state.proj.weight``)."""
    if isinstance(obj, torch.Tensor):
        return [(name, obj)]
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in _tensors(v, f"{name}.{k}" if name else str(k))]
    if isinstance(obj, (list, tuple)):
        return [t for i, v in enumerate(obj) for t in _tensors(v, f"{name}[{i}]")]
    return []


def _unfit(tensor: torch.Tensor) -> str | None:
    """Why a floating tensor cannot be handed on (non-finite values, overflowing row norms)."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        return f"holds {bad} NaN or infinite values of {tensor.numel()}"
    # Rows are normalised downstream (cosine similarities): a norm that overflows float32 makes
    # them zero or NaN there.
    norms = torch.linalg.vector_norm(tensor.float(), dim=-1)  # rows
    if not bool(torch.isfinite(norms).all()):
        return (
            f"has rows whose norm overflows float32 (largest value {float(tensor.abs().max()):.3g})"
        )
    return None


def load_artifact(path: str | os.PathLike, kind: str, produced_by: str) -> dict[str, Any]:
    """Load a stage artifact and check its kind and format version.

    Args:
        path: Artifact file.
        kind: Expected kind.
        produced_by: The stage that writes this artifact, named in the error when it is missing.

    Returns:
        The stored dict (tensors on CPU).

    Raises:
        MissingArtifactError: The file does not exist; the message names the stage to run first.
        ArtifactError: The file is unreadable, of another kind or of an unknown format version,
            or its content does not match its checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingArtifactError(
            f"missing {kind} artifact {path}: run `python -m cause_lightning stage={produced_by}` "
            "first with the same data/backbone/head/artifact_tag settings"
        )
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ArtifactError(
            f"cannot read {path} ({describe_load_error(err, path)}); the file is damaged or not a "
            f"cause_lightning {kind} artifact: re-run `stage={produced_by}`"
        ) from None
    if not isinstance(record, dict) or record.get("kind") != kind:
        found = record.get("kind") if isinstance(record, dict) else type(record).__name__
        raise ArtifactError(f"{path} holds a {found!r} artifact, expected {kind!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {record.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}: re-run `stage={produced_by}`"
        )
    stored = record.get("checksum")
    if stored is None:
        raise ArtifactError(
            f"{path} carries no checksum (written by an older cause_lightning), so its content "
            f"cannot be trusted: re-run `stage={produced_by}`"
        )
    if stored != payload_checksum(record):
        raise ArtifactError(
            f"{path} is damaged: its content does not match the checksum written with it; "
            f"re-run `stage={produced_by}` to write it again"
        )
    return record


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)

    def write(tmp: str) -> None:
        Path(tmp).write_text(text + "\n")

    return atomic_write(path, write)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
