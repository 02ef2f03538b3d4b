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

import hashlib
import os
import zipfile
from pathlib import Path
from typing import Any

import torch

from cause_lightning.core.errors import ExpectedError
from cause_lightning.core.files import atomic_write

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "MissingArtifactError",
    "artifact_root",
    "PRODUCER",
    "save_artifact",
    "load_artifact",
    "payload_checksum",
    "describe_load_error",
]

FORMAT_VERSION = 1


class ArtifactError(ExpectedError, RuntimeError):
    """An artifact exists but is of the wrong kind, version or shape, or is not fit to be
    written (non-finite values)."""


class MissingArtifactError(ExpectedError, FileNotFoundError):
    """A stage needs an artifact that an earlier stage has not written yet."""


def artifact_root(artifact_dir: str | os.PathLike, data_name: str, backbone_name: str) -> Path:
    """Directory of every artifact made on one dataset with one backbone (the store's root).

    Args:
        artifact_dir: Root of all artifacts (``paths.artifact_dir``).
        data_name: Dataset key (``data.name``).
        backbone_name: Backbone key (``backbone.name``).

    Returns:
        ``<artifact_dir>/<data_name>/<backbone_name>``.
    """
    return Path(artifact_dir) / data_name / backbone_name


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
    (its learning rates and gradient clipping, as the pipeline's schema has them)."""
    from cause_lightning.config.schema import SCHEMA

    section = SCHEMA["method"][stage]
    rates = " / ".join(f"method.{stage}.{k}" for k in ("lr", "cluster_lr") if k in section)
    clip = f" or set method.{stage}.clip (gradient clipping)" if "clip" in section else ""
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


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
