"""Import the reference release files (docs/method.md §10, docs/api.md ``cause_lightning.interop``).

The release ships, per result row, ``segment_{mlp,tr}.pth`` (student/teacher heads, projection
heads, linear probe), ``cluster_{mlp,tr}.pth`` (``codebook`` + ``cluster_probe``) and
``modular.npy`` (the clusterbook). :func:`import_official` reads them on CPU, checks that they fit
together, and loads the **teacher** head (``head_ema.*``) strictly into this project's
:class:`~cause_lightning.models.heads.MLPHead` / :class:`~cause_lightning.models.heads.TRHead`.
Because the heads use the reference's parameter names, the load is a prefix strip.
:meth:`OfficialBundle.save` writes the result as this project's stage artifacts (``clusterbook.pt``,
``head.pt``, ``probe.pt`` in labelled directories, :mod:`cause_lightning.artifacts.store`), so
``stage=eval`` / ``stage=predict`` use them; ``stage=import``
(:func:`cause_lightning.stages.release.import_release`) runs it on the configured run.

The backbone is not part of the release: the caller names it (docs/method.md §10.4 step 5).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cause_lightning.artifacts.io import describe_load_error
from cause_lightning.artifacts.store import ArtifactStore
from cause_lightning.core.constants import REFERENCE_NUM_CONCEPTS
from cause_lightning.core.errors import UnreadableFileError
from cause_lightning.core.logs import get_logger
from cause_lightning.core.specs import (
    BACKBONE_FACTORY,
    BackboneRef,
    ModelSpec,
    Resolution,
    tr_grid_error,
)
from cause_lightning.models.contract import head_spec
from cause_lightning.models.heads import LinearProbe, MLPHead, TRHead

__all__ = [
    "OfficialBundle",
    "RELEASE_TAG",
    "import_official",
    "REFERENCE_NUM_CONCEPTS",
]

log = get_logger(__name__)

#: Train resolution of the reference MLP heads (docs/method.md §2.6); TR trains at the test
#: resolution.
REFERENCE_MLP_TRAIN_RES = 224

#: The label of imported release artifacts when a run gives none (``artifact_tag``).
RELEASE_TAG = "release"

_TEACHER = "head_ema."
_LINEAR = "linear.f."


@dataclass
class OfficialBundle:
    """What :func:`import_official` returns.

    Attributes:
        head: ``MLPHead`` or ``TRHead`` with the release's teacher weights, in eval mode.
        centroids: Class centroids ``[C, R]`` (the release's ``cluster_probe``; un-normalised).
        clusterbook: Raw clusterbook ``[K, D]`` float32 (``modular.npy``).
        linear: Linear probe R -> C loaded from ``linear.f.*``, in eval mode (diagnostic only).
        head_type: ``"mlp"`` or ``"tr"``.
        dim: Backbone width D.
        num_classes: C.
        num_queries: Q for TR (tokens per image at the train resolution); ``None`` for MLP.
        reduced_dim: Head output width R (90).
        source: Paths of the files read, keyed ``segment`` / ``cluster`` / ``clusterbook``.
    """

    head: MLPHead | TRHead
    centroids: Tensor
    clusterbook: Tensor
    linear: LinearProbe
    head_type: str
    dim: int
    num_classes: int
    num_queries: int | None
    reduced_dim: int = 90
    source: dict[str, Path] = field(default_factory=dict)

    @property
    def num_concepts(self) -> int:
        """K, the number of clusterbook rows."""
        return int(self.clusterbook.shape[0])

    def save(
        self,
        artifact_root: str | os.PathLike,
        *,
        backbone: str,
        backbone_weights: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_target: str = BACKBONE_FACTORY,
        resolution: int = 320,
        class_names: list[str] | None = None,
        head_name: str | None = None,
        train_resolution: int | None = None,
        patch_size: int | None = None,
        tag: str = RELEASE_TAG,
        requirements: dict[str, Any] | None = None,
    ) -> dict[str, Path]:
        """Write the bundle as this project's stage artifacts.

        Args:
            artifact_root: ``<artifact_dir>/<data>/<backbone>``: the artifacts go to labelled
                directories there, one inside the other, as trained ones do (docs/release.md).
            backbone: Backbone name for ``build_backbone`` (the release does not record it).
            backbone_weights: Path of the upstream backbone weights, recorded for later stages.
            backbone_kwargs: Extra ``build_backbone`` arguments, e.g. ``{"num_heads": 12}`` for the
                bug-compatible DINO ViT-S (docs/method.md §2.5).
            backbone_target: Import path of the backbone factory (``build_backbone`` by default).
            resolution: Test resolution (320; 322 for DINOv2). For TR it is also the train
                resolution.
            class_names: Optional names of the C classes.
            head_name: Sub-directory of the head artifacts; defaults to the head type (``mlp`` /
                ``tr``).
            train_resolution: Train resolution recorded in the metadata; defaults to ``resolution``
                for TR and 224 for MLP (the reference recipe).
            patch_size: Backbone patch size. When given, a TR ``resolution`` must give exactly
                ``num_queries`` tokens (``(resolution / patch_size) ** 2``).
            tag: The label of the imported artifacts (``artifact_tag`` of the stages that use
                them, ``release`` by default).
            requirements: Settings a run must have to use the import (flat ``key: value``: the
                backbone's options, the dataset), recorded with it and checked when it is used.

        Returns:
            ``{"clusterbook": path, "head": path, "probe": path}`` (the ``.pt`` files).

        Raises:
            ValueError: On class names of the wrong length, or a TR resolution that does not fit the
                query grid.
        """
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(class_names)} entries but the release has "
                f"{self.num_classes} classes"
            )
        if self.head_type == "tr":
            self._check_tr_resolution(resolution, train_resolution, patch_size)
            train_res = resolution if train_resolution is None else int(train_resolution)
        else:
            train_res = (
                REFERENCE_MLP_TRAIN_RES if train_resolution is None else int(train_resolution)
            )
        root = Path(artifact_root)
        name = head_name or self.head_type
        spec = ModelSpec(
            backbone=BackboneRef(
                name=backbone,
                weights=None if backbone_weights is None else str(backbone_weights),
                kwargs=dict(backbone_kwargs or {}),
                dim=self.dim,
                patch_size=int(patch_size or 0),
                target=backbone_target,
            ),
            num_classes=self.num_classes,
            num_concepts=self.num_concepts,
            resolution=Resolution(train=train_res, test=int(resolution)),
            head=head_spec(self.head),
        )
        meta: dict[str, Any] = {
            "spec": spec.to_dict(),
            "class_names": None if class_names is None else [str(c) for c in class_names],
            "config": {
                "stage": "import",
                "head": self.head_type,
                "head_name": name,
                "backbone": backbone,
            },
            "imported_from": {k: str(v) for k, v in self.source.items()},
            "reference_release": True,
            # The released heads were fine-tuned with the stage-3 label leak (method.md §6.3):
            # every number measured with them inherits it, so reports label them accordingly.
            "reference_leak": True,
        }
        # The release's files are its settings: an import is found by its label, not by them.
        settings = {
            "imported_from": {k: _sha256(v) for k, v in sorted(self.source.items())},
            **dict(requirements or {}),
        }
        paths = self._write_chain(ArtifactStore(root), settings, meta, name, tag)
        log.info("wrote release artifacts: %s", ", ".join(str(p) for p in paths.values()))
        return paths

    def _write_chain(
        self,
        store: ArtifactStore,
        settings: dict[str, Any],
        meta: dict[str, Any],
        head_name: str,
        tag: str,
    ) -> dict[str, Path]:
        """Save the clusterbook, head and probe artifacts, each inside the one before."""
        linear_state = {k: v.detach().clone() for k, v in self.linear.state_dict().items()}
        payloads = {
            "clusterbook": {"clusterbook": self.clusterbook.detach().float().clone()},
            "head": {
                "head_state": {k: v.detach().clone() for k, v in self.head.state_dict().items()},
                "linear_state": linear_state,
            },
            "probe": {
                "centroids": self.centroids.detach().float().clone(),
                "linear_state": linear_state,
            },
        }
        labels = {"clusterbook": "clusterbook", "head": head_name, "probe": "probe"}
        parent = None
        paths = {}
        for kind, payload in payloads.items():
            directory = store.directory(kind, parent, settings, labels[kind], tag)
            inputs = {} if parent is None else {parent.kind: parent.content}
            parent = store.save(
                kind,
                directory,
                {**payload, "meta": dict(meta)},
                settings=settings,
                inputs=inputs,
                label=labels[kind],
                tag=tag,
                imported=True,
            )
            paths[kind] = parent.file
        return paths

    def _check_tr_resolution(
        self, resolution: int, train_resolution: int | None, patch_size: int | None = None
    ) -> None:
        if train_resolution is not None and int(train_resolution) != int(resolution):
            raise ValueError(
                "TR heads need train resolution == test resolution, got "
                f"{train_resolution} and {resolution}"
            )
        q = int(self.num_queries or 0)
        side = math.isqrt(q)
        if side * side != q:
            log.warning("TR head has %d queries, not a square grid; resolution not checked", q)
            return
        if resolution % side != 0:
            raise ValueError(
                f"the TR head has {q} queries ({side}x{side} tokens) but resolution {resolution} "
                f"is not a multiple of {side}; use the release's train resolution (e.g. "
                f"{side * 8} for patch 8, {side * 16} for patch 16, {side * 14} for patch 14)"
            )
        error = None if patch_size is None else tr_grid_error(q, resolution, patch_size)
        if error:
            raise ValueError(error)


def import_official(
    segment: str | os.PathLike,
    cluster: str | os.PathLike,
    clusterbook: str | os.PathLike,
    head: str = "tr",
) -> OfficialBundle:
    """Read a reference release (``segment_*.pth``, ``cluster_*.pth``, ``modular.npy``).

    Args:
        segment: ``segment_tr.pth`` or ``segment_mlp.pth``.
        cluster: ``cluster_tr.pth`` or ``cluster_mlp.pth``.
        clusterbook: ``modular.npy``.
        head: ``"tr"`` or ``"mlp"``; must match the segment file.

    Returns:
        An :class:`OfficialBundle` whose head holds the teacher weights, in eval mode.

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file is unreadable / truncated / of the wrong kind, the head type does not
            match, or the shapes of the three files disagree.
    """
    head_type = str(head).lower()
    if head_type not in ("tr", "mlp"):
        raise ValueError(f"head must be 'tr' or 'mlp', got {head!r}")
    segment, cluster, clusterbook = Path(segment), Path(cluster), Path(clusterbook)
    seg = _read_pth(segment, "a reference segment_{mlp,tr}.pth state dict")
    clu = _read_pth(
        cluster, "a reference cluster_{mlp,tr}.pth dict with 'codebook' and 'cluster_probe'"
    )
    book = _read_npy(clusterbook)

    teacher = _teacher_state(seg, segment, head_type)
    f1_key = "tr.f1.weight" if head_type == "tr" else "f1.weight"
    if f1_key not in teacher or teacher[f1_key].ndim != 4:
        raise ValueError(
            f"{segment} lacks '{_TEACHER}{f1_key}' [R, D, 1, 1]; the file is incomplete"
        )
    reduced_dim, dim = int(teacher[f1_key].shape[0]), int(teacher[f1_key].shape[1])
    num_queries = int(teacher["query_pos"].shape[0]) if head_type == "tr" else None

    centroids, lin_w, lin_b = _release_probes(clu, seg, cluster, segment, reduced_dim)
    num_classes = int(centroids.shape[0])

    book_t = _release_clusterbook(book, dim, clu, cluster, clusterbook, segment)

    if head_type == "tr":
        module: MLPHead | TRHead = TRHead(
            dim, reduced_dim, num_queries=num_queries, num_concepts=REFERENCE_NUM_CONCEPTS
        )
        state = {**teacher, "clusterbook": book_t}
    else:
        module = MLPHead(dim, reduced_dim)
        state = dict(teacher)
    _load_strict(module, state, segment, f"the {head_type.upper()} teacher head ({_TEACHER}*)")
    linear = LinearProbe(reduced_dim, num_classes)
    _load_strict(
        linear, {"f.weight": lin_w, "f.bias": lin_b}, segment, f"the linear probe ({_LINEAR}*)"
    )
    module.eval()
    linear.eval()
    log.info(
        "imported %s head: D=%d, R=%d, C=%d%s from %s",
        head_type.upper(),
        dim,
        reduced_dim,
        num_classes,
        f", Q={num_queries}" if num_queries else "",
        segment,
    )
    return OfficialBundle(
        head=module,
        centroids=centroids,
        clusterbook=book_t,
        linear=linear,
        head_type=head_type,
        dim=dim,
        num_classes=num_classes,
        num_queries=num_queries,
        reduced_dim=reduced_dim,
        source={"segment": segment, "cluster": cluster, "clusterbook": clusterbook},
    )


def _teacher_state(seg: dict[str, Tensor], segment: Path, head_type: str) -> dict[str, Tensor]:
    """The teacher head's entries of a segment file, checked to be of ``head_type``."""
    teacher = {k[len(_TEACHER) :]: v for k, v in seg.items() if k.startswith(_TEACHER)}
    if not teacher:
        raise ValueError(
            f"{segment} has no '{_TEACHER}*' keys, so it is not a reference segment_*.pth file "
            f"(first keys: {list(seg)[:5]}); expected segment_tr.pth or segment_mlp.pth"
        )
    found = "tr" if "query_pos" in teacher else "mlp"
    if found != head_type:
        what = (
            "a TR segment file (segment_tr.pth: has head_ema.query_pos)"
            if found == "tr"
            else "an MLP segment file (segment_mlp.pth: no head_ema.query_pos)"
        )
        raise ValueError(
            f"{segment} is {what}, but head={head_type!r} was requested; pass head={found!r} "
            f"or the segment_{head_type}.pth file"
        )
    return teacher


def _release_probes(
    clu: dict[str, Tensor],
    seg: dict[str, Tensor],
    cluster: Path,
    segment: Path,
    reduced_dim: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The cluster centroids ``[C, R]`` and the linear probe's weight and bias, checked to agree
    with the head and with each other."""
    if "cluster_probe" not in clu:
        raise ValueError(
            f"{cluster} has no 'cluster_probe' (keys: {list(clu)[:5]}); expected the reference "
            "cluster_{mlp,tr}.pth with 'codebook' [2048, D] and 'cluster_probe' [C, 90]"
        )
    centroids = clu["cluster_probe"].detach().float().clone()
    if centroids.ndim != 2 or centroids.shape[1] != reduced_dim:
        raise ValueError(
            f"{cluster}: cluster_probe has shape {list(centroids.shape)}, expected "
            f"[C, {reduced_dim}] to match the head in {segment}"
        )
    num_classes = int(centroids.shape[0])
    lin_w = seg.get(_LINEAR + "weight")
    lin_b = seg.get(_LINEAR + "bias")
    if lin_w is None or lin_b is None:
        raise ValueError(
            f"{segment} lacks the linear probe keys '{_LINEAR}weight' / '{_LINEAR}bias'"
        )
    if lin_w.shape[0] != num_classes:
        raise ValueError(
            f"class count mismatch: {cluster} has cluster_probe for C={num_classes} classes but "
            f"{segment} has a linear probe for {lin_w.shape[0]}; the files come from different "
            "releases (COCO-81 vs COCO-171 share a folder: pick the cluster file by "
            "cluster_probe.shape[0])"
        )
    return centroids, lin_w, lin_b


def _release_clusterbook(
    book: np.ndarray,
    dim: int,
    clu: dict[str, Tensor],
    cluster: Path,
    clusterbook: Path,
    segment: Path,
) -> Tensor:
    """The release clusterbook ``[2048, D]``, checked against the head and the cluster file."""
    expected_book = (REFERENCE_NUM_CONCEPTS, dim)
    if tuple(book.shape) != expected_book:
        why = (
            "it belongs to another backbone width"
            if book.ndim != 2 or book.shape[1] != dim
            else f"the release clusterbook has {REFERENCE_NUM_CONCEPTS} concept rows; use the "
            "modular.npy downloaded with this head, not a clusterbook trained here"
        )
        raise ValueError(
            f"{clusterbook} has shape {list(book.shape)}, expected {list(expected_book)} "
            f"[2048 concepts, D={dim} as in {segment}]; {why}"
        )
    book_t = torch.from_numpy(np.ascontiguousarray(book, dtype=np.float32))
    _compare_codebook(clu.get("codebook"), book_t, cluster, clusterbook)
    return book_t


def _read_pth(path: Path, expected: str) -> dict[str, Tensor]:
    """Load a release ``.pth`` on CPU with ``weights_only=True`` as a flat dict of tensors."""
    if not path.is_file():
        raise FileNotFoundError(f"release file not found: {path} (expected {expected})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for damaged or foreign files
        raise UnreadableFileError(
            f"cannot read {path} as {expected} ({describe_load_error(err, path)}); re-download "
            "it, or check which file the setting names"
        ) from None
    if not isinstance(obj, Mapping):
        raise UnreadableFileError(f"{path} holds a {type(obj).__name__}, expected {expected}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise UnreadableFileError(
            f"{path} is not a flat dict of tensors (entries {bad[:5]}); expected {expected}"
        )
    bad = [k for k, v in obj.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise UnreadableFileError(f"{path} contains NaN or Inf values (entries {bad[:5]})")
    return dict(obj)


def _read_npy(path: Path) -> np.ndarray:
    """Load ``modular.npy`` as a 2-D floating array."""
    expected = "the reference modular.npy (float32 [2048, D])"
    if not path.is_file():
        raise FileNotFoundError(f"release file not found: {path} (expected {expected})")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as err:  # truncated arrays raise ValueError / EOFError, other formats more
        raise UnreadableFileError(
            f"cannot read {path} as {expected} ({type(err).__name__}: {err}); the file is "
            "truncated, corrupted or of another kind; re-download it"
        ) from None
    if not isinstance(arr, np.ndarray):
        # np.load opens zip archives (torch.save files, .npz) lazily; close before reporting.
        desc = type(arr).__name__
        if hasattr(arr, "close"):
            arr.close()
        raise UnreadableFileError(f"{path} holds {desc} (a zip archive), expected {expected}")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        desc = f"{arr.dtype} {list(arr.shape)}"
        raise UnreadableFileError(f"{path} holds {desc}, expected {expected}")
    if not np.isfinite(arr).all():
        raise UnreadableFileError(f"{path} contains NaN or Inf values")
    return arr


def _compare_codebook(
    codebook: Tensor | None, book: Tensor, cluster: Path, clusterbook: Path
) -> None:
    """Warn when ``cluster_*.pth['codebook']`` differs from ``modular.npy`` (should be equal)."""
    if codebook is None:
        warnings.warn(
            f"{cluster} has no 'codebook' entry to check against {clusterbook}",
            UserWarning,
            stacklevel=3,
        )
        return
    if tuple(codebook.shape) != tuple(book.shape) or not torch.allclose(
        codebook.detach().float(), book, rtol=1e-5, atol=1e-6
    ):
        warnings.warn(
            f"{cluster}['codebook'] {list(codebook.shape)} differs from {clusterbook} "
            f"{list(book.shape)}; the clusterbook may come from another run. Using modular.npy",
            UserWarning,
            stacklevel=3,
        )


def _load_strict(module: nn.Module, state: dict[str, Tensor], path: Path, what: str) -> None:
    """``load_state_dict(strict=True)`` that reports failures as ``ValueError`` naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: cannot load {what} strictly: {err}") from err


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
