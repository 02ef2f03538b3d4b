"""One-file inference bundle: backbone reference + teacher head + cluster centroids (docs/api.md).

Implements the evaluation pipeline of docs/method.md §7 (protocol variants of docs/protocol.md §4)
for arbitrary inputs:

    teacher head features on the patch grid (eval mode)
      -> optional horizontal-flip average on the grid (un-normalised R-dim features)
      -> bilinear upsampling (align_corners=False) to the input size
      -> per-pixel L2 normalisation -> cosine with the L2-normalised centroids
      -> argmax                                   (crf=False)
      -> log_softmax(alpha * cos) -> DenseCRF -> argmax   (crf=True, pydensecrf installed)

Each step is a function of :mod:`cause_lightning.inference.dense`, the path ``stage=eval`` takes
too, so the segmenter labels a batch as the evaluation scored it.

:class:`Segmenter` holds the frozen backbone, the teacher head, the centroids ``[C, R]``, the
clusterbook ``[K, D]``, class names, palette, the working resolution (docs/method.md §2.6) and the
resolved config. :meth:`Segmenter.save` writes one ``torch.load(weights_only=True)``-safe file;
the backbone is stored as a *reference* (registry name + weights path + kwargs) and rebuilt with
``build_backbone`` at load time, except for backbones without a weights file (``tiny_vit``, random
ViTs, ``filterbank``), whose state is embedded so that a reloaded bundle predicts identically.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cause_lightning.artifacts.bundle import (
    SEGMENTER_KIND,
    derive_backbone_kwargs,
    read_segmenter_file,
    segmenter_payload,
    to_loadable,
    weights_reference,
)
from cause_lightning.artifacts.io import MissingArtifactError, save_artifact
from cause_lightning.core.logs import get_logger
from cause_lightning.core.specs import BACKBONE_FACTORY, tr_grid_error
from cause_lightning.inference.crf import CRFRunner, crf_available
from cause_lightning.inference.dense import (
    cosine_logits,
    crf_labels,
    crf_pixels,
    crf_unaries,
    grid_features,
    log_probabilities,
)
from cause_lightning.inference.imaging import (
    image_tensor,
    nearest_resize_labels,
    sliding_logits,
    to_pil_rgb,
    working_size,
)
from cause_lightning.metrics import check_assignment, remap_with_ignore
from cause_lightning.models.contract import head_spec, head_traits
from cause_lightning.visualize import colorize as _colorize
from cause_lightning.visualize import default_palette

__all__ = ["SEGMENTER_KIND", "Segmenter"]

log = get_logger(__name__)

_crf_warned = False


class Segmenter(nn.Module):
    """Frozen backbone + teacher head + cluster centroids, ready for inference.

    The module is inference-only: it always stays in eval mode (``train()`` is a no-op), holds no
    trainable parameters, and every public method runs under ``torch.inference_mode()``. Move it
    with ``.to(device)``; inputs are moved to the module's device.

    Calling it on a normalised batch ``[B, 3, H, W]`` returns cluster ids ``[B, H, W]`` (H, W must
    be multiples of the patch size; for TR heads ``(H / p) * (W / p)`` must equal the head's query
    count). :meth:`predict_image` handles single images of any size and mode.

    Cluster ids vs class ids: the C centroids are unlabelled clusters. When an ``assignment``
    (cluster -> class, from the Hungarian matching of ``stage=eval``; -1 = unmatched) is stored,
    :meth:`remap` and ``predict_image(..., to_classes=True)`` return class ids, with unmatched
    clusters mapped to 255 (ignore).

    Args:
        backbone: frozen feature extractor (``build_backbone``), ``forward(images) -> [B, D, h, w]``
            with attributes ``embed_dim`` and ``patch_size``.
        head: teacher head (``MLPHead`` / ``TRHead``), ``[B, D, h, w] -> [B, R, h, w]``.
        centroids: cluster centroids ``[C, R]``.
        backbone_name: registry name used to rebuild the backbone (default ``backbone.name``).
        backbone_weights: weights reference passed to ``build_backbone`` at load time (a local
            file path, stored absolute, or a hub tag). Default: ``backbone.weights`` if the
            backbone has that attribute, else ``None`` (``filterbank`` / ``tiny_vit``).
        backbone_kwargs: extra keyword arguments of the backbone factory (e.g. ``num_heads=12``).
            Default: those the backbone was built with (``build_kwargs``), or the architecture
            overrides read from a registry ViT's ``arch``.
        clusterbook: stage-1 clusterbook ``[K, D]``. A TR head keeps its own copy as a buffer;
            an unfilled TR head is filled from this one, and for TR heads the default is the
            head's copy.
        class_names: names of the C classes of the dataset (default ``class_0 ...``).
        palette: ``uint8 [C, 3]`` colours (default
            :func:`~cause_lightning.visualize.default_palette`).
        resolution: working resolution (test resolution of docs/method.md §2.6): TR input side,
            MLP short side, sliding-window size.
        flip: average the head features of the image and its horizontal flip on the grid.
        crf: refine with DenseCRF (falls back to argmax with a warning if pydensecrf is missing).
        alpha: CRF logit scale, ``log_softmax(alpha * cos)``.
        assignment: optional cluster -> class table (length C, -1 = unmatched).
        config: resolved run config (plain dict; OmegaConf containers are converted).
        meta: free-form metadata (primitives / tensors).
        embed_backbone: store the backbone state in :meth:`save`. ``None`` (default) embeds it only
            when there is no ``backbone_weights`` reference to rebuild it from.
        backbone_target: import path of the backbone factory (default: the backbone's
            ``build_target``, ``build_backbone`` for registered names).

    Raises:
        ValueError: on inconsistent shapes, a resolution that is not a multiple of the patch, or a
            TR head whose query count does not match ``resolution``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        centroids: Tensor,
        *,
        backbone_name: str | None = None,
        backbone_weights: str | os.PathLike[str] | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
        clusterbook: Tensor | None = None,
        class_names: Sequence[str] | None = None,
        palette: np.ndarray | Tensor | None = None,
        resolution: int = 320,
        flip: bool = True,
        crf: bool = False,
        alpha: float = 3.0,
        assignment: Sequence[int] | None = None,
        config: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        embed_backbone: bool | None = None,
        backbone_target: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_name = str(backbone_name or getattr(backbone, "name", "") or "")
        if not self.backbone_name:
            raise ValueError(
                "Segmenter needs the backbone's registry name to rebuild it at load time: pass "
                "backbone_name= (the backbone module has no `name` attribute)"
            )
        self.backbone_weights = weights_reference(backbone, backbone_weights)
        self.backbone_target = str(
            backbone_target or getattr(backbone, "build_target", None) or BACKBONE_FACTORY
        )
        if backbone_kwargs is None:
            backbone_kwargs = derive_backbone_kwargs(backbone)
        self.backbone_kwargs = dict(to_loadable(dict(backbone_kwargs)))
        try:
            self.head_spec = head_spec(head)
        except TypeError as err:
            raise ValueError(f"cannot save this segmenter's head: {err}") from err
        self.traits = head_traits(head)

        centroids = torch.as_tensor(centroids).detach().float()
        if centroids.ndim != 2:
            raise ValueError(f"centroids must be [C, R], got shape {tuple(centroids.shape)}")
        reduced = int(head.reduced_dim)
        if centroids.shape[1] != reduced:
            raise ValueError(
                f"centroids have R={centroids.shape[1]} columns but the head outputs {reduced} "
                "channels; use the probe.pt written for this head"
            )
        dim = int(self.head_spec.kwargs.get("dim", getattr(backbone, "embed_dim", 0)))
        if dim != int(getattr(backbone, "embed_dim", dim)):
            raise ValueError(
                f"the head was built for D={dim} but the {self.backbone_name} backbone gives "
                f"D={backbone.embed_dim}; use the backbone the head was trained on"
            )
        self.register_buffer("centroids", centroids.clone())
        cb = None if clusterbook is None else torch.as_tensor(clusterbook).detach().float().clone()
        if self.traits.needs_clusterbook:
            if cb is not None and not getattr(head, "clusterbook_set", True):
                head.set_clusterbook(cb)  # a TR head cannot run with an empty clusterbook
            elif cb is None and isinstance(getattr(head, "clusterbook", None), Tensor):
                cb = head.clusterbook.detach().float().clone()
        self.register_buffer("clusterbook", cb)

        num_classes = centroids.shape[0]
        names = list(class_names) if class_names is not None else []
        if not names:
            names = [f"class_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"{len(names)} class names for {num_classes} centroids")
        self.class_names = [str(n) for n in names]
        pal = default_palette(num_classes) if palette is None else np.asarray(palette)
        pal = np.asarray(pal, dtype=np.uint8)
        if pal.ndim != 2 or pal.shape[1] != 3 or len(pal) < num_classes:
            raise ValueError(f"palette must be uint8 [>= {num_classes}, 3], got {pal.shape}")
        self.palette = pal
        self.assignment: list[int] | None = None
        if assignment is not None:
            self.set_assignment(assignment)

        self.patch_size = int(backbone.patch_size)
        resolution = int(resolution)
        if resolution <= 0 or resolution % self.patch_size:
            raise ValueError(
                f"resolution={resolution} must be a positive multiple of the patch size "
                f"{self.patch_size} (e.g. 320 for /8 and /16, 322 for /14)"
            )
        if self.traits.fixed_grid:
            error = tr_grid_error(int(head.num_queries), resolution, self.patch_size)
            if error:
                raise ValueError(error)
        self.resolution = resolution
        self.flip = bool(flip)
        self.crf = bool(crf)
        self.alpha = float(alpha)
        self.config = to_loadable(config) if config is not None else {}
        self.meta = to_loadable(meta) if meta is not None else {}
        if not isinstance(self.config, dict) or not isinstance(self.meta, dict):
            raise ValueError("config and meta must be mappings (dict / DictConfig)")
        self.embed_backbone = embed_backbone
        self.requires_grad_(False)
        super().train(False)

    # ------------------------------------------------------------------ properties / state
    @property
    def device(self) -> torch.device:
        """Device of the centroids (and of the whole module after ``.to``)."""
        return self.centroids.device

    @property
    def num_classes(self) -> int:
        """Number of clusters C."""
        return int(self.centroids.shape[0])

    def train(self, mode: bool = True) -> Segmenter:
        """Keep eval mode: the segmenter is inference-only (head dropout must stay off).

        Args:
            mode: ignored.

        Returns:
            self.
        """
        return super().train(False)

    def set_assignment(self, assignment: Sequence[int] | Tensor | np.ndarray) -> None:
        """Store the cluster -> class table used by :meth:`remap`.

        Args:
            assignment: length-C integer table (``UnsupervisedSegmentationMetrics`` ``assignment``);
                -1 marks an unmatched cluster.

        Raises:
            ValueError: on a wrong length or values outside ``[-1, 255)``.
        """
        table = check_assignment(assignment, self.num_classes)
        self.assignment = table

    def _require_assignment(self) -> None:
        if self.assignment is None:
            raise RuntimeError(
                "no cluster -> class assignment stored: run stage=eval (which writes segmenter.pt "
                "with it) or call set_assignment(metrics['assignment'])"
            )

    def remap(self, cluster_ids: np.ndarray | Tensor) -> np.ndarray | Tensor:
        """Map cluster ids to class ids with the stored assignment.

        Args:
            cluster_ids: integer array / tensor of cluster ids in ``[0, C)`` (255 passes through).

        Returns:
            Same type and shape; class ids, 255 where the cluster is unmatched or ignored.

        Raises:
            RuntimeError: if no assignment is stored.
        """
        self._require_assignment()
        assert self.assignment is not None
        return remap_with_ignore(cluster_ids, self.assignment)

    # ------------------------------------------------------------------ tensor API
    def _prepare(self, images: Tensor) -> Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected normalised images [B, 3, H, W], got {tuple(images.shape)}; use "
                "predict_image() for a single PIL image"
            )
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {p}; resize it, or use "
                "predict_image() which handles any size"
            )
        if self.traits.fixed_grid and (h // p) * (w // p) != int(self.head.num_queries):
            raise ValueError(
                f"{self.head_spec.name} needs a {self.resolution}x{self.resolution} input (its "
                f"query count is fixed), got {h}x{w}; use predict_image() to squash-resize any "
                "image"
            )
        return images.to(self.device, dtype=self.centroids.dtype)

    @torch.inference_mode()
    def features(self, images: Tensor) -> Tensor:
        """Teacher head features on the patch grid, flip-averaged when ``flip`` is set.

        Args:
            images: normalised ``[B, 3, H, W]``.

        Returns:
            ``[B, R, H / p, W / p]`` un-normalised head features.
        """
        return grid_features(self._encode, self._prepare(images), self.flip)  # B R h w

    def _encode(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))  # B R h w

    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        """Cosine logits at input resolution (docs/method.md §7, before the argmax / CRF).

        Head features (flip-averaged if ``flip``) are upsampled bilinearly (align_corners=False)
        to ``H x W``, normalised per pixel and compared with the normalised centroids, in
        float32 (as in ``stage=eval``).

        Args:
            images: normalised ``[B, 3, H, W]``.

        Returns:
            ``[B, C, H, W]`` cosine similarities in ``[-1, 1]``.
        """
        return cosine_logits(self.features(images), self.centroids, tuple(images.shape[-2:]))

    @torch.inference_mode()
    def log_probs(self, images: Tensor) -> Tensor:
        """Cluster log-probabilities ``log_softmax(alpha * cos)`` (the CRF's input).

        Args:
            images: normalised ``[B, 3, H, W]``.

        Returns:
            ``[B, C, H, W]``.
        """
        return log_probabilities(self.logits(images), self.alpha)

    def _use_crf(self) -> bool:
        global _crf_warned
        if not self.crf:
            return False
        if crf_available():
            return True
        if not _crf_warned:
            log.warning(
                "Segmenter.crf is set but pydensecrf is not installed (pip install pydensecrf2); "
                "falling back to argmax without CRF"
            )
            _crf_warned = True
        return False

    def _decide(self, cos: Tensor, images_uint8: Sequence[np.ndarray] | None) -> Tensor:
        """Cluster ids ``[B, H, W]`` from cosine logits ``[B, C, H, W]`` (argmax or CRF)."""
        if images_uint8 is None or not self._use_crf():
            return cos.argmax(dim=1)
        unaries = crf_unaries(cos, self.alpha)  # B C H W, as the evaluation hands them over
        maps = CRFRunner()(list(images_uint8), list(unaries), argmax=True)  # in this process
        return crf_labels(maps, cos.device)

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        """Cluster ids for a normalised batch.

        Args:
            images: normalised ``[B, 3, H, W]`` (sizes as in the class docstring), or uint8
                pixels as the data loaders give them.

        Returns:
            LongTensor ``[B, H, W]`` with values in ``[0, C)``, on the module's device.
        """
        if images.dtype == torch.uint8:  # a batch straight from the data loaders
            from cause_lightning.ops.pixels import normalize_uint8

            images = normalize_uint8(images.to(self.centroids.device))
        cos = self.logits(images)  # B C H W
        pixels = crf_pixels(images) if self._use_crf() else None
        return self._decide(cos, pixels).long()

    # ------------------------------------------------------------------ single images
    def working_size(
        self, width: int, height: int, sliding_window: bool = False
    ) -> tuple[int, int]:
        """Size ``(W, H)`` an image of ``width x height`` is resized to before prediction (the
        rules of :meth:`predict_image`: a square for fixed-grid heads, else the shorter side to
        ``resolution`` and each side to a multiple of the patch; no snapping when sliding)."""
        square = self.traits.fixed_grid
        return working_size(width, height, self.resolution, self.patch_size, square, sliding_window)

    @torch.inference_mode()
    def predict_image(
        self,
        image: Image.Image | np.ndarray | str | os.PathLike[str],
        *,
        sliding_window: bool = False,
        to_classes: bool = False,
        batch_size: int = 8,
    ) -> np.ndarray:
        """Predict one image of any size and mode; the mask has the image's original size.

        Size handling (nearest resizing, as in the data protocol, docs/protocol.md §2):

        * TR head: its position queries fix the token count, so the image is squashed to
          ``resolution x resolution``, predicted, and the prediction resized back (nearest).
        * MLP head: the shorter side is resized to ``resolution`` and both sides are rounded to
          the nearest multiple of the patch size (:meth:`working_size`); the prediction is
          resized back (nearest).
        * ``sliding_window=True`` (both heads, for large or elongated images): the shorter side is
          resized to ``resolution`` (aspect kept), ``resolution x resolution`` windows with stride
          ``resolution // 2`` cover the image (the last one flush with the border), their cosine
          logits are averaged where they overlap, then argmax / CRF, and the result is resized
          back.

        Transparent areas of RGBA / LA / P images are composited on black (as the datasets and the
        predict stage load them); grayscale is replicated to RGB. No EXIF rotation is applied, so
        the mask matches ``image.size``.

        Args:
            image: PIL image, ``uint8`` array ``[H, W]`` / ``[H, W, 3|4]``, or an image path.
            sliding_window: use the sliding-window mode.
            to_classes: return class ids via the stored ``assignment`` (see :meth:`remap`)
                instead of cluster ids.
            batch_size: windows per forward pass in the sliding-window mode.

        Returns:
            ``np.int64`` array ``[H, W]``: cluster ids in ``[0, C)``, or class ids (255 =
            unmatched) when ``to_classes``.

        Raises:
            RuntimeError: if ``to_classes`` is set and no assignment is stored.
        """
        if to_classes:
            self._require_assignment()
        pil = to_pil_rgb(image)
        width, height = pil.size
        size = self.working_size(width, height, sliding_window)
        work = pil if pil.size == size else pil.resize(size, Image.Resampling.NEAREST)
        x = image_tensor(work).to(self.device, dtype=self.centroids.dtype)  # 1 3 h w
        if sliding_window:
            cos = sliding_logits(self.logits, x, self.resolution, max(1, int(batch_size)))
        else:
            cos = self.logits(x)  # 1 C h w
        pixels = [np.ascontiguousarray(np.asarray(work, dtype=np.uint8))] if self.crf else None
        labels = self._decide(cos, pixels)[0].cpu().numpy().astype(np.int64)  # h w
        if to_classes:  # per pixel, so at the working size: the full-size map is made once
            labels = self.remap(labels)
        labels = nearest_resize_labels(labels, height, width)  # H W
        return np.ascontiguousarray(labels)

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """Colour a cluster-id map with the stored palette (255 -> black).

        Args:
            labels: integer ``[H, W]``.

        Returns:
            ``uint8 [H, W, 3]``.
        """
        return _colorize(labels, self.palette)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle to one file (atomic; ``torch.load(weights_only=True)``-safe).

        The file holds ``format_version``, ``kind="segmenter"``, the model spec (backbone
        reference, head kind and constructor arguments, class and concept counts, resolution),
        the backbone state when embedded, the head state dict (the TR clusterbook buffer
        included), centroids, clusterbook, class names, palette, flip / crf / alpha, assignment,
        config and meta.

        Args:
            path: destination file (e.g. ``<artifact_dir>/.../<head>/segmenter.pt``).

        Returns:
            The written path.
        """
        return save_artifact(path, SEGMENTER_KIND, segmenter_payload(self))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        map_location: str | torch.device = "cpu",
        weights: str | os.PathLike[str] | None = None,
        *,
        backbone: nn.Module | None = None,
    ) -> Segmenter:
        """Load a file written by :meth:`save` (``torch.load(weights_only=True)``).

        The backbone is rebuilt from the stored reference (an embedded state is loaded into
        it unless ``weights=`` is given); files written before the model spec load too.

        Args:
            path: the segmenter file.
            map_location: device to put the module on.
            weights: new location of the backbone weights (when the stored path moved).
            backbone: an already-built backbone to use instead of rebuilding one.

        Returns:
            The segmenter, in eval mode, on ``map_location``.

        Raises:
            MissingArtifactError: if ``path`` does not exist.
            ArtifactError: if it is not a segmenter file of a known format version.
            SpecError: if its model spec is of a version this code cannot read.
            FileNotFoundError: if the stored backbone weights file no longer exists (the message
                names it and says to pass ``weights=``).
        """
        return cls(**read_segmenter_file(path, weights, backbone)).to(map_location)

    @classmethod
    def from_artifacts(
        cls,
        directory: str | os.PathLike[str],
        backbone: nn.Module | None = None,
        *,
        weights: str | os.PathLike[str] | None = None,
        resolution: int | None = None,
        flip: bool = True,
        crf: bool = False,
        alpha: float = 3.0,
        class_names: Sequence[str] | None = None,
        palette: np.ndarray | None = None,
        assignment: Sequence[int] | None = None,
        map_location: str | torch.device = "cpu",
    ) -> Segmenter:
        """Assemble a segmenter from the stage artifacts (docs/architecture.md §4).

        ``directory`` is a probe artifact's directory (``.../probe-<digest>/``, holding
        ``probe.pt``), or an evaluation's inside it; the head and clusterbook are those it was
        made from (the directories around it). The head is the one the evaluation scores: with
        ``method.probe.reference_leak`` the head stage 3 trained.

        Args:
            directory: The probe (or evaluation) artifact directory.
            backbone: an already-built backbone (e.g. the eval stage's); rebuilt from the head's
                model spec when ``None``.
            weights: override of the backbone weights reference.
            resolution: working resolution (default: the spec's test resolution).
            flip: flip averaging.
            crf: DenseCRF refinement.
            alpha: CRF logit scale.
            class_names: override of the class names stored in the meta.
            palette: ``uint8 [C, 3]`` colours (default :func:`default_palette`).
            assignment: optional cluster -> class table.
            map_location: device for the result.

        Returns:
            The segmenter, in eval mode.

        Raises:
            MissingArtifactError: naming the missing file and the stage that writes it.
            ArtifactError: on a damaged file, or one made from an earlier version of its input.
        """
        from cause_lightning.artifacts.store import ArtifactStore

        path = Path(directory)
        store = ArtifactStore(path)
        entry = store.entry(path)
        if entry is None or entry.kind not in ("probe", "eval"):
            raise MissingArtifactError(
                f"{path} is not a probe (or evaluation) artifact directory: it holds no "
                "artifact.json of one; pass the directory of a probe.pt"
            )
        kwargs = store.segmenter_arguments(entry, backbone, weights)
        if resolution is not None:
            kwargs["resolution"] = int(resolution)
        if class_names:
            kwargs["class_names"] = class_names
        kwargs.update(flip=flip, crf=crf, alpha=alpha, palette=palette, assignment=assignment)
        return cls(**kwargs).to(map_location)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name!r}, head={self.head_spec.name}, "
            f"classes={self.num_classes}, "
            f"resolution={self.resolution}, flip={self.flip}, crf={self.crf}"
        )
