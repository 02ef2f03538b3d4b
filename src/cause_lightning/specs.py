"""Typed, versioned descriptions of what an artifact needs to rebuild its model.

A stage artifact (``clusterbook.pt``, ``head.pt``, ``probe.pt``) and a ``segmenter.pt`` bundle store
a :class:`ModelSpec` under ``meta["spec"]`` as plain values (``to_dict``); every reader rebuilds the
model from it (``from_dict``) and from nothing else, so a constructor argument added to a head is
written and read in exactly one place. Provenance (config, git hash, class names) stays in the
free-form part of ``meta``.

Files written before the spec existed carry the same facts as flat ``meta`` keys (``head_type``,
``dim``, ``reduced_dim``, ...); :meth:`ModelSpec.from_meta` reads those too. Their heads were
always built with the head's default dropout, which is what the legacy reader assumes.

This module depends on the standard library only, so that models, data-free readers and tests can
all import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cause_lightning.errors import ExpectedError

__all__ = [
    "LEGACY_HEAD_DROPOUT",
    "SPEC_VERSION",
    "BackboneRef",
    "HeadSpec",
    "ModelSpec",
    "Resolution",
    "SpecError",
    "tr_grid_error",
]

#: Version of the :class:`ModelSpec` layout written by this code.
SPEC_VERSION = 1
#: Head dropout of every head built before the spec recorded it (the head's default).
LEGACY_HEAD_DROPOUT = 0.1
HEAD_KINDS = ("mlp", "tr")


class SpecError(ExpectedError, ValueError):
    """A stored spec is missing, malformed or of a version this code cannot read."""


def tr_grid_error(num_queries: int, resolution: int, patch_size: int) -> str | None:
    """Why a TR head cannot run at a resolution, or ``None`` when it can.

    A TR head has one position query per training token, so the test grid must have exactly
    ``num_queries`` tokens.

    Args:
        num_queries: Q, the head's query count.
        resolution: Square input side in pixels.
        patch_size: Backbone patch size.

    Returns:
        The message naming the resolution to use, or ``None``.
    """
    tokens = (int(resolution) // int(patch_size)) ** 2
    if int(resolution) % int(patch_size) == 0 and tokens == int(num_queries):
        return None
    side = round(int(num_queries) ** 0.5)
    hint = (
        f"use resolution={side * int(patch_size)}"
        if side * side == int(num_queries)
        else "the query count is not a square grid: check that the head belongs to this backbone"
    )
    return (
        f"the TR head has {num_queries} position queries (one per training token) but "
        f"resolution {resolution} with patch {patch_size} gives {tokens} tokens; {hint}"
    )


@dataclass(frozen=True)
class HeadSpec:
    """Every constructor argument of a segmentation head.

    Args:
        kind: ``"mlp"`` or ``"tr"``.
        dim: Backbone width D.
        reduced_dim: Output width R.
        dropout: Head dropout probability (TR: also the decoder's dropouts).
        num_queries: TR only: Q, tokens per image at the train resolution.
        num_concepts: TR only: K, rows of the clusterbook buffer.
    """

    kind: str
    dim: int
    reduced_dim: int
    dropout: float
    num_queries: int | None = None
    num_concepts: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise SpecError(f"head kind {self.kind!r} is not one of {HEAD_KINDS}")
        if self.kind == "tr" and (not self.num_queries or not self.num_concepts):
            raise SpecError(
                f"a TR head spec needs num_queries and num_concepts, got {self.num_queries!r} "
                f"and {self.num_concepts!r}"
            )

    def kwargs(self) -> dict[str, Any]:
        """Constructor keywords of the head class besides ``dim``."""
        kw: dict[str, Any] = {"reduced_dim": self.reduced_dim, "dropout": self.dropout}
        if self.kind == "tr":
            kw.update(num_queries=self.num_queries, num_concepts=self.num_concepts)
        return kw

    def to_dict(self) -> dict[str, Any]:
        """Plain values (``torch.load(weights_only=True)``-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            SpecError: On missing or unknown fields.
        """
        return _construct(cls, data, "head spec")


@dataclass(frozen=True)
class BackboneRef:
    """How to rebuild a frozen backbone with ``build_backbone``.

    Args:
        name: Registry name.
        weights: Weights reference (a local file or a hub tag); ``None`` for weight-free backbones.
        kwargs: Further ``build_backbone`` keywords that change the architecture.
        dim: Feature width D.
        patch_size: Patch size p.
    """

    name: str
    weights: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)
    dim: int = 0
    patch_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain values."""
        return {**dataclasses.asdict(self), "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneRef:
        """Inverse of :meth:`to_dict`.

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
        """Inverse of :meth:`to_dict`.

        Raises:
            SpecError: On an unknown version or missing fields.
        """
        version = data.get("version")
        if version != SPEC_VERSION:
            raise SpecError(
                f"model spec version {version!r} is not readable by this code (it reads version "
                f"{SPEC_VERSION}); re-create the file with this version"
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
        head = HeadSpec(
            kind=kind,
            dim=int(meta["dim"]),
            reduced_dim=int(meta["reduced_dim"]),
            dropout=LEGACY_HEAD_DROPOUT,
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
