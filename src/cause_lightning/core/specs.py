"""Typed, versioned descriptions of what an artifact needs to rebuild its model.

A stage artifact (``clusterbook.pt``, ``head.pt``, ``probe.pt``) and a ``segmenter.pt`` bundle store
a :class:`ModelSpec` under ``meta["spec"]`` as plain values (``to_dict``); every reader rebuilds the
model from it (``from_dict``) and from nothing else. The head and the backbone are recorded as what
the configuration built them from: the importable ``target`` (a class or factory) and its keyword
arguments, so a head or backbone declared only in a YAML file (``_target_`` plus arguments) is
rebuilt exactly, whatever class it is. Provenance (config, git hash, class names) stays in the
free-form part of ``meta``.

Earlier layouts still load: version 1 specs named the head by kind (``"mlp"`` / ``"tr"``) with a
fixed set of fields, and files written before the spec existed carry the same facts as flat
``meta`` keys (``head_type``, ``dim``, ``reduced_dim``, ...); both are read into version 2 specs.
Their heads were always built with the head's default dropout where none was recorded.

This module depends on the standard library only, so that models, data-free readers and tests can
all import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cause_lightning.core.errors import ExpectedError

__all__ = [
    "BACKBONE_FACTORY",
    "LEGACY_HEAD_DROPOUT",
    "LEGACY_HEAD_TARGETS",
    "SPEC_VERSION",
    "BackboneRef",
    "HeadSpec",
    "ModelSpec",
    "Resolution",
    "SpecError",
    "is_plain",
    "builtin_head_spec",
    "grid_tokens",
    "tr_grid_error",
]

#: Version of the :class:`ModelSpec` layout written by this code.
SPEC_VERSION = 2
#: Versions this code reads (1: heads named by kind).
READABLE_VERSIONS = (1, 2)
#: Head dropout of every head built before the spec recorded it (the head's default).
LEGACY_HEAD_DROPOUT = 0.1
#: The classes behind the head kinds of version-1 specs and flat legacy metadata.
LEGACY_HEAD_TARGETS = {
    "mlp": "cause_lightning.models.heads.MLPHead",
    "tr": "cause_lightning.models.heads.TRHead",
}
#: The factory of the registered backbones (``build_backbone(name, weights, **kwargs)``).
BACKBONE_FACTORY = "cause_lightning.models.build_backbone"


class SpecError(ExpectedError, ValueError):
    """A stored spec is missing, malformed or of a version this code cannot read."""


def is_plain(value: Any) -> bool:
    """Whether ``value`` is made of ``None``, booleans, numbers, strings, lists and string-keyed
    dicts only: what a spec may hold (``torch.load(weights_only=True)`` reads it back)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def grid_tokens(resolution: int, patch_size: int) -> int:
    """Tokens of a square ``resolution`` input on the patch grid: a fixed-grid head's query count
    at its train resolution."""
    return (int(resolution) // int(patch_size)) ** 2


def tr_grid_error(num_queries: int, resolution: int, patch_size: int) -> str | None:
    """Why a fixed-grid head cannot run at a resolution, or ``None`` when it can.

    A fixed-grid head (the TR head) has one position query per training token, so the grid must
    have exactly ``num_queries`` tokens.

    Args:
        num_queries: Q, the head's query count.
        resolution: Square input side in pixels.
        patch_size: Backbone patch size.

    Returns:
        The message naming the resolution to use, or ``None``.
    """
    tokens = grid_tokens(resolution, patch_size)
    if int(resolution) % int(patch_size) == 0 and tokens == int(num_queries):
        return None
    side = round(int(num_queries) ** 0.5)
    hint = (
        f"use resolution={side * int(patch_size)}"
        if side * side == int(num_queries)
        else "the query count is not a square grid: check that the head belongs to this backbone"
    )
    return (
        f"the head has {num_queries} position queries (one per training token) but "
        f"resolution {resolution} with patch {patch_size} gives {tokens} tokens; {hint}"
    )


@dataclass(frozen=True)
class HeadSpec:
    """How to rebuild a segmentation head: ``target(**kwargs)``.

    Args:
        target: Import path of the head class (``"cause_lightning.models.TRHead"``, or any
            importable ``nn.Module`` class).
        kwargs: Its constructor arguments as plain values, ``dim`` (the backbone width) included.
            Tensors the pipeline hands a head at run time (the TR clusterbook) are not part of the
            spec: the head keeps them in its state dict.

    Raises:
        SpecError: On an empty target or arguments that are not plain values.
    """

    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.target, str) or not self.target.strip():
            raise SpecError(f"a head spec needs the head's import path, got {self.target!r}")
        if not isinstance(self.kwargs, Mapping) or not is_plain(dict(self.kwargs)):
            raise SpecError(
                f"head {self.target} arguments must be plain values (numbers, strings, lists, "
                f"dicts), got {self.kwargs!r}"
            )
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @property
    def name(self) -> str:
        """The class name (last part of the target)."""
        return self.target.rsplit(".", 1)[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain values (``torch.load(weights_only=True)``-safe)."""
        return {"target": self.target, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadSpec:
        """Inverse of :meth:`to_dict`; also reads a version-1 head (``kind``, ``dim``, ...).

        Raises:
            SpecError: On missing or unknown fields.
        """
        if "kind" in data:
            return _legacy_head(data)
        return _construct(cls, data, "head spec")


@dataclass(frozen=True)
class BackboneRef:
    """How to rebuild a frozen backbone: ``target(name=name, weights=weights, **kwargs)``.

    Args:
        name: The backbone's label (a registry name, or the timm model name of a
            ``backbone=timm`` run): what artifacts, logs and reports call it.
        weights: Weights reference (a local file or a hub tag); ``None`` for weight-free backbones.
        kwargs: Further keyword arguments of the factory (architecture overrides, the timm model).
        dim: Feature width D.
        patch_size: Patch size p.
        target: Import path of the factory (:data:`BACKBONE_FACTORY` for registered backbones).
    """

    name: str
    weights: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int = 0
    patch_size: int = 0
    target: str = BACKBONE_FACTORY

    def to_dict(self) -> dict[str, Any]:
        """Plain values."""
        return {**dataclasses.asdict(self), "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneRef:
        """Inverse of :meth:`to_dict` (a version-1 reference has no ``target``).

        Raises:
            SpecError: On missing or unknown fields.
        """
        return _construct(cls, {**data, "kwargs": dict(data.get("kwargs") or {})}, "backbone")


@dataclass(frozen=True)
class Resolution:
    """Train and test input sides in pixels (docs/method.md §2.6)."""

    train: int
    test: int


@dataclass(frozen=True)
class ModelSpec:
    """What an artifact needs to rebuild its model.

    Args:
        backbone: The backbone reference.
        num_classes: C, classes of the dataset (and cluster centroids).
        num_concepts: K, concepts of the clusterbook.
        resolution: Train and test resolution.
        head: The head spec; ``None`` for the stage-1 clusterbook.
        version: Layout version (:data:`SPEC_VERSION`).
    """

    backbone: BackboneRef
    num_classes: int
    num_concepts: int
    resolution: Resolution
    head: HeadSpec | None = None
    version: int = SPEC_VERSION

    def with_head(self, head: HeadSpec) -> ModelSpec:
        """A copy with ``head`` set."""
        return dataclasses.replace(self, head=head)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (``torch.load(weights_only=True)``-safe)."""
        return {
            "version": self.version,
            "backbone": self.backbone.to_dict(),
            "num_classes": self.num_classes,
            "num_concepts": self.num_concepts,
            "resolution": dataclasses.asdict(self.resolution),
            "head": None if self.head is None else self.head.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; version-1 specs are read into the current layout.

        Raises:
            SpecError: On an unknown version or missing fields.
        """
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise SpecError(
                f"model spec version {version!r} is not readable by this code (it reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} and writes {SPEC_VERSION}); re-create "
                "the file with this version"
            )
        head = data.get("head")
        return cls(
            backbone=BackboneRef.from_dict(data["backbone"]),
            num_classes=int(data["num_classes"]),
            num_concepts=int(data["num_concepts"]),
            resolution=_construct(Resolution, data["resolution"], "resolution"),
            head=None if head is None else HeadSpec.from_dict(head),
        )

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ModelSpec:
        """Read the spec of an artifact's ``meta``: ``meta["spec"]``, or the flat legacy keys.

        Args:
            meta: The artifact's ``meta`` dict.

        Raises:
            SpecError: When neither form is present, naming what is missing.
        """
        if "spec" in meta:
            return cls.from_dict(meta["spec"])
        return _from_legacy_meta(meta)


def _construct(cls: type, data: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"{what} has unknown fields {unknown}; known: {sorted(names)}")
    try:
        return cls(**dict(data))
    except TypeError as err:
        raise SpecError(f"{what} {dict(data)!r} is incomplete: {err}") from err


def builtin_head_spec(
    kind: str,
    dim: int,
    reduced_dim: int,
    dropout: float = LEGACY_HEAD_DROPOUT,
    num_queries: int | None = None,
    num_concepts: int | None = None,
) -> HeadSpec:
    """The spec of a built-in head by its kind (``mlp`` / ``tr``), as earlier layouts named them.

    Raises:
        SpecError: On another kind, or a TR head without its query and concept counts.
    """
    kind = str(kind).lower()
    if kind not in LEGACY_HEAD_TARGETS:
        raise SpecError(f"head kind {kind!r} is not one of {sorted(LEGACY_HEAD_TARGETS)}")
    kwargs: dict[str, Any] = {"dim": int(dim), "reduced_dim": int(reduced_dim)}
    kwargs["dropout"] = float(dropout)
    if kind == "tr":
        if not num_queries or not num_concepts:
            raise SpecError(
                f"a TR head spec needs num_queries and num_concepts, got {num_queries!r} and "
                f"{num_concepts!r}"
            )
        kwargs.update(num_queries=int(num_queries), num_concepts=int(num_concepts))
    return HeadSpec(LEGACY_HEAD_TARGETS[kind], kwargs)


def _legacy_head(data: Mapping[str, Any]) -> HeadSpec:
    """A version-1 head dict (``kind``, ``dim``, ``reduced_dim``, ``dropout``, TR counts)."""
    known = {"kind", "dim", "reduced_dim", "dropout", "num_queries", "num_concepts"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"head spec has unknown fields {unknown}; known: {sorted(known)}")
    missing = sorted({"kind", "dim", "reduced_dim", "dropout"} - set(data))
    if missing:
        raise SpecError(f"head spec {dict(data)!r} is incomplete: missing {missing}")
    return builtin_head_spec(**dict(data))


def _from_legacy_meta(meta: Mapping[str, Any]) -> ModelSpec:
    """The spec of a file written before ``meta["spec"]`` existed (flat keys, no dropout)."""
    required = ("backbone", "dim", "num_classes", "resolution")
    missing = [k for k in required if k not in meta]
    if missing:
        raise SpecError(
            f"artifact meta has neither a spec (version {SPEC_VERSION}) nor the keys {missing} of "
            "the earlier layout; re-run the stage that writes it"
        )
    resolution = meta["resolution"]
    if not isinstance(resolution, Mapping):
        resolution = {"train": resolution, "test": resolution}
    head = None
    if meta.get("head_type"):
        kind = str(meta["head_type"]).lower()
        head = builtin_head_spec(
            kind,
            dim=int(meta["dim"]),
            reduced_dim=int(meta["reduced_dim"]),
            num_queries=int(meta["num_queries"]) if kind == "tr" else None,
            num_concepts=int(meta["num_concepts"]) if kind == "tr" else None,
        )
    return ModelSpec(
        backbone=BackboneRef(
            name=str(meta["backbone"]),
            weights=meta.get("backbone_weights"),
            kwargs=dict(meta.get("backbone_kwargs") or {}),
            dim=int(meta["dim"]),
            patch_size=int(meta.get("patch_size") or 0),
        ),
        num_classes=int(meta["num_classes"]),
        num_concepts=int(meta.get("num_concepts") or 0),
        resolution=Resolution(int(resolution["train"]), int(resolution["test"])),
        head=head,
    )
