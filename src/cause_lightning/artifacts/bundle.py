"""The segmenter file: writing a Segmenter's payload and reading it back, and rebuilding the
backbone a file names.

The reader returns the constructor arguments of
:class:`~cause_lightning.segmenter.Segmenter` (this module never imports it, so the class stays
the only place that writes the bundle). The model itself is rebuilt from the typed specs of
:mod:`cause_lightning.core.specs`: the backbone with ``build_backbone`` from a :class:`BackboneRef`,
the head with ``build_head`` from a :class:`HeadSpec`.

Bundle layout (``kind="segmenter"``): ``spec`` (a :class:`ModelSpec`), ``backbone_state`` (only
for backbones without a weights file), ``head_state``, ``centroids``, ``clusterbook``,
``class_names``, ``palette``, ``flip``, ``crf``, ``alpha``, ``assignment``, ``config``, ``meta``.
Bundles written before the spec existed (``backbone`` / ``head`` dicts) still load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cause_lightning.artifacts.io import load_artifact
from cause_lightning.core.specs import (
    BACKBONE_FACTORY,
    LEGACY_HEAD_DROPOUT,
    BackboneRef,
    ModelSpec,
    Resolution,
    SpecError,
    builtin_head_spec,
)
from cause_lightning.models.backbones import (
    ARCH_OVERRIDES,
    build_backbone,
    get_backbone_spec,
    is_hub_tag,
)
from cause_lightning.models.contract import build_head
from cause_lightning.models.frozen import FrozenBackbone
from cause_lightning.models.imports import import_class
from cause_lightning.models.timm_backbone import TIMM_FACTORY, build_timm_backbone

__all__ = [
    "SEGMENTER_KIND",
    "segmenter_payload",
    "derive_backbone_kwargs",
    "check_backbone",
    "read_segmenter_file",
    "rebuild_backbone",
    "to_loadable",
    "weights_reference",
]

#: ``kind`` field of a saved segmenter file.
SEGMENTER_KIND = "segmenter"


def to_loadable(obj: Any) -> Any:
    """Convert a nested structure to tensors / primitives that ``weights_only`` loading accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):  # the resolved Hydra config
        return to_loadable(OmegaConf.to_container(obj, resolve=True))
    if isinstance(obj, Mapping):
        return {str(k): to_loadable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_loadable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_loadable(v) for v in obj)
    return str(obj)


def weights_reference(backbone: nn.Module, weights: str | os.PathLike[str] | None) -> str | None:
    """Weights reference to store: the given one or the backbone's, existing files made absolute."""
    ref = weights if weights is not None else getattr(backbone, "weights", None)
    if ref is None:
        return None
    ref = os.fspath(ref)
    local = Path(ref).expanduser()
    # Absolute, so that the file still resolves when the bundle is loaded from another directory.
    return str(local.resolve()) if local.is_file() else ref


def derive_backbone_kwargs(backbone: nn.Module) -> dict[str, Any]:
    """Architecture overrides of a registry ViT (e.g. the 12-head ViT-S), best effort.

    A rebuilt backbone must have the same architecture as the one the head was trained on; the
    12-head DINO ViT-S has the same parameter shapes as the 6-head one, so a strict state-dict
    load would not notice the difference.
    """
    recorded = getattr(backbone, "build_kwargs", None)
    if recorded:  # built by a factory, which recorded its keywords
        return dict(recorded)
    arch = getattr(backbone, "arch", None)
    name = getattr(backbone, "name", None)
    if not isinstance(arch, Mapping) or not name:
        return {}
    try:
        spec = get_backbone_spec(name)
    except ValueError:
        return {}
    kw = {k: arch[k] for k in ARCH_OVERRIDES if k in arch and arch[k] != spec.arch.get(k)}
    scheme = getattr(backbone, "pos_embed_scheme", None)
    if scheme is not None and scheme != spec.pos_embed:
        kw["pos_embed_interpolation"] = scheme
    return kw


def _resolve_weights(
    ref: BackboneRef, override: str | os.PathLike[str] | None, source: Path
) -> str | None:
    if override is not None:
        path = os.fspath(override)
        if not is_hub_tag(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"backbone weights file {path} (passed as weights=) not found")
        return path
    stored = ref.weights
    if stored is not None and not is_hub_tag(stored) and not Path(stored).expanduser().exists():
        raise FileNotFoundError(
            f"{source} references the {ref.name} backbone weights file {stored}, which no "
            f"longer exists; pass its new location: Segmenter.load({str(source)!r}, "
            "weights='/path/to/weights')"
        )
    return stored


#: The factories a file may name to rebuild its backbone (a file never names code to run).
_BACKBONE_FACTORIES = {BACKBONE_FACTORY: build_backbone, TIMM_FACTORY: build_timm_backbone}


def _backbone_factory(target: str) -> Any:
    """The factory a :class:`BackboneRef` names: a known factory or a ``FrozenBackbone`` class."""
    if target in _BACKBONE_FACTORIES:
        return _BACKBONE_FACTORIES[target]
    try:
        return import_class(target, FrozenBackbone, "backbone class")
    except (ImportError, TypeError) as err:
        raise SpecError(f"cannot rebuild the backbone: {err}") from err


def rebuild_backbone(
    ref: BackboneRef,
    source: Path,
    weights: str | os.PathLike[str] | None = None,
    state: Mapping[str, Tensor] | None = None,
) -> nn.Module:
    """The backbone a file's :class:`BackboneRef` names, with its weights (or an embedded state).

    Args:
        ref: The stored reference.
        source: The file that holds it (named in errors).
        weights: A new location of the weights file (when the stored one moved).
        state: An embedded backbone state (weight-free backbones), loaded strictly.

    Raises:
        FileNotFoundError: The weights file no longer exists (the message says how to pass it).
        SpecError: The reference names no known backbone factory or class.
    """
    resolved = None if state else _resolve_weights(ref, weights, source)
    return _rebuild_backbone(ref, resolved, state)


def _rebuild_backbone(
    ref: BackboneRef, weights: str | None, state: Mapping[str, Tensor] | None
) -> nn.Module:
    factory = _backbone_factory(ref.target)
    backbone = factory(name=ref.name, weights=weights, **dict(ref.kwargs))
    if state:
        backbone.load_state_dict(dict(state), strict=True)
    return backbone


def check_backbone(backbone: nn.Module, ref: BackboneRef, source: Path) -> None:
    """Refuse a backbone whose width or patch differs from what a file was made with."""
    for attr, want in (("embed_dim", ref.dim), ("patch_size", ref.patch_size)):
        got = getattr(backbone, attr, None)
        if want and got != want:
            raise ValueError(
                f"{source} was saved with a {ref.name} backbone of {attr}={want}, but the "
                f"backbone to use has {attr}={got}; pass the matching backbone / weights"
            )


def _legacy_bundle(record: Mapping[str, Any]) -> tuple[ModelSpec, Any, Any]:
    """Spec and states of a bundle written before the spec (``backbone`` / ``head`` dicts)."""
    bb, hd = record["backbone"], record["head"]
    kwargs = {"dropout": LEGACY_HEAD_DROPOUT, **hd["kwargs"]}
    head = builtin_head_spec(str(hd["type"]), **kwargs)
    clusterbook = record.get("clusterbook")
    centroids = record["centroids"]
    spec = ModelSpec(
        backbone=BackboneRef(
            name=bb["name"],
            weights=bb.get("weights"),
            kwargs=dict(bb.get("kwargs") or {}),
            dim=int(bb.get("embed_dim") or 0),
            patch_size=int(bb.get("patch_size") or 0),
        ),
        num_classes=int(centroids.shape[0]),
        num_concepts=0 if clusterbook is None else int(clusterbook.shape[0]),
        resolution=Resolution(int(record["resolution"]), int(record["resolution"])),
        head=head,
    )
    return spec, bb.get("state"), hd["state"]


def segmenter_payload(segmenter: nn.Module) -> dict[str, Any]:
    """What a segmenter file holds (tensors and primitives only), in the layout above.

    Args:
        segmenter: A ``Segmenter``.

    Returns:
        The payload (``save_artifact`` adds ``format_version`` and ``kind``).
    """
    seg: Any = segmenter
    embed = seg.embed_backbone
    if embed is None:  # embed only what cannot be rebuilt from a weights file
        embed = seg.backbone_weights is None
    state = seg.backbone.state_dict() if embed else None
    clusterbook = seg.clusterbook
    spec = ModelSpec(
        backbone=BackboneRef(
            name=seg.backbone_name,
            weights=seg.backbone_weights,
            kwargs=seg.backbone_kwargs,
            dim=int(getattr(seg.backbone, "embed_dim", 0)),
            patch_size=int(seg.patch_size),
            target=seg.backbone_target,
        ),
        num_classes=int(seg.num_classes),
        num_concepts=0 if clusterbook is None else int(clusterbook.shape[0]),
        # The bundle works at one resolution; only TR needs the train one, and it is the same.
        resolution=Resolution(int(seg.resolution), int(seg.resolution)),
        head=seg.head_spec,
    )
    return {
        "spec": spec.to_dict(),
        "backbone_state": _cpu_state(state) if state else None,
        "head_state": _cpu_state(seg.head.state_dict()),
        "centroids": seg.centroids.detach().cpu().clone(),
        "clusterbook": None if clusterbook is None else clusterbook.detach().cpu(),
        "class_names": list(seg.class_names),
        "palette": torch.from_numpy(seg.palette.copy()),
        "flip": seg.flip,
        "crf": seg.crf,
        "alpha": seg.alpha,
        "assignment": None if seg.assignment is None else list(seg.assignment),
        "config": seg.config,
        "meta": seg.meta,
    }


def _cpu_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def read_segmenter_file(
    path: str | os.PathLike[str],
    weights: str | os.PathLike[str] | None = None,
    backbone: nn.Module | None = None,
) -> dict[str, Any]:
    """Constructor arguments of the segmenter saved in ``path``.

    Args:
        path: The segmenter file.
        weights: New location of the backbone weights (when the stored path moved).
        backbone: An already-built backbone to use instead of rebuilding one.

    Returns:
        ``Segmenter`` keyword arguments (``backbone``, ``head``, ``centroids`` and the rest).

    Raises:
        MissingArtifactError: If ``path`` does not exist.
        ArtifactError: If it is not a segmenter file of a known format version.
        SpecError: If its spec is of an unknown version.
        FileNotFoundError: If the stored backbone weights file no longer exists.
    """
    path = Path(path)
    record = load_artifact(path, SEGMENTER_KIND, produced_by="eval")
    if "spec" in record:
        spec = ModelSpec.from_dict(record["spec"])
        backbone_state, head_state = record.get("backbone_state"), record["head_state"]
    elif "head" in record and "backbone" in record:
        spec, backbone_state, head_state = _legacy_bundle(record)
    else:
        raise SpecError(f"{path} holds neither a model spec nor the earlier backbone/head layout")
    assert spec.head is not None  # a segmenter always has a head
    ref = spec.backbone
    if backbone is None:
        state = None if weights is not None else backbone_state
        backbone = rebuild_backbone(ref, path, weights, state)
    check_backbone(backbone, ref, path)
    head = build_head(spec.head)
    head.load_state_dict(head_state, strict=True)
    palette = record.get("palette")
    return {
        "backbone": backbone,
        "head": head,
        "centroids": record["centroids"],
        "backbone_name": ref.name,
        "backbone_weights": ref.weights if weights is None else os.fspath(weights),
        "backbone_kwargs": ref.kwargs,
        "backbone_target": ref.target,
        "clusterbook": record.get("clusterbook"),
        "class_names": record.get("class_names"),
        "palette": None if palette is None else palette.numpy(),
        "resolution": int(spec.resolution.test),
        "flip": record.get("flip", True),
        "crf": record.get("crf", False),
        "alpha": record.get("alpha", 3.0),
        "assignment": record.get("assignment"),
        "config": record.get("config"),
        "meta": record.get("meta"),
    }
