"""Stage artifacts: where they live and how they are written and read.

Each stage hands its result to the next through a small file in a deterministic directory
(``<artifact_dir>/<data>/<backbone>[-<tag>]``), never through Lightning checkpoints:

* ``clusterbook.pt``  — stage ``mediator`` (shared by the MLP and TR heads);
* ``<head>/head.pt``  — stage ``head`` (teacher head + linear probe);
* ``<head>/probe.pt`` — stage ``probe`` (class centroids + linear probe);
* ``<head>/segmenter.pt`` and ``<head>/metrics.json`` — stage ``eval``.

Files hold tensors and primitives only, so ``torch.load(weights_only=True)`` reads them, and they
are written to a temporary name and renamed so no reader ever sees half a file. Every artifact
carries a SHA-256 checksum of its payload, checked when it is read, so a file damaged after it was
written is refused by name instead of failing later as a strange loss. Written files get the
ordinary mode of a new file (``0666`` less the umask), so a shared results folder stays readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "MissingArtifactError",
    "artifact_root",
    "head_dir",
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


class ArtifactError(RuntimeError):
    """An artifact exists but is of the wrong kind, version or shape."""


class MissingArtifactError(FileNotFoundError):
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


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Write a file through a temporary sibling and an atomic rename.

    Args:
        path: Destination file.
        write: Callable receiving the temporary path and writing the content there.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; the result gets the mode any new file of this process would get.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ensure_writable(directory: str | os.PathLike, setting: str) -> Path:
    """Create ``directory`` if needed and prove that a file can be written there.

    Called before a stage does any work, so a read-only or misplaced results folder is found in a
    second rather than after hours of training.

    Args:
        directory: The folder a stage will write to.
        setting: The config setting that chooses it, named in the error.

    Returns:
        The directory.

    Raises:
        PermissionError: The folder cannot be created or written.
    """
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PermissionError(
            f"cannot write to {directory} ({type(err).__name__}: {err.strerror or err}): nothing "
            f"was run; make the folder writable or point {setting} at a writable folder"
        ) from err
    return directory


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


def describe_load_error(err: BaseException) -> str:
    """A short reason why ``torch.load(weights_only=True)`` refused a file.

    Torch's own message for a file holding pickled objects recommends loading it again with
    ``weights_only=False``, which would run code from the file; that advice is never passed on.
    """
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err):
        return (
            f"{type(err).__name__}: it holds Python objects other than tensors and plain values, "
            "which are never loaded because loading them could run code"
        )
    return f"{type(err).__name__}: {text[:300]}"


def save_artifact(path: str | os.PathLike, kind: str, payload: dict[str, Any]) -> Path:
    """Save a stage artifact atomically.

    Args:
        path: Destination file (``.pt``).
        kind: Artifact kind, e.g. ``"clusterbook"``, ``"head"``, ``"probe"``.
        payload: Tensors, primitives and nested dicts/lists of them. Tensors are moved to CPU.

    Returns:
        The destination path.
    """
    record = {"format_version": FORMAT_VERSION, "kind": kind, **_to_cpu(payload)}
    record["checksum"] = payload_checksum(record)
    return atomic_write(path, lambda tmp: torch.save(record, tmp))


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
            f"cannot read {path} ({describe_load_error(err)}); the file is damaged or not a "
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
