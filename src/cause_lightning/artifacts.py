"""Stage artifacts: where they live and how they are written and read.

Each stage hands its result to the next through a small file in a deterministic directory
(``<artifact_dir>/<data>/<backbone>[-<tag>]``), never through Lightning checkpoints:

* ``clusterbook.pt``  — stage ``mediator`` (shared by the MLP and TR heads);
* ``<head>/head.pt``  — stage ``head`` (teacher head + linear probe);
* ``<head>/probe.pt`` — stage ``probe`` (class centroids + linear probe);
* ``<head>/segmenter.pt`` and ``<head>/metrics.json`` — stage ``eval``.

Files hold tensors and primitives only, so ``torch.load(weights_only=True)`` reads them, and they
are written to a temporary name and renamed so no reader ever sees half a file.
"""

from __future__ import annotations

import json
import os
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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
        ArtifactError: The file is unreadable, of another kind or of an unknown format version.
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
            f"cannot read {path} ({type(err).__name__}: {err}); the file is truncated or not a "
            f"cause_lightning artifact: re-run `stage={produced_by}`"
        ) from err
    if not isinstance(record, dict) or record.get("kind") != kind:
        found = record.get("kind") if isinstance(record, dict) else type(record).__name__
        raise ArtifactError(f"{path} holds a {found!r} artifact, expected {kind!r}")
    if record.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format_version {record.get('format_version')}, this version reads "
            f"{FORMAT_VERSION}: re-run `stage={produced_by}`"
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
