"""One-file inference bundle: backbone reference + teacher head + cluster centroids (docs/api.md).

Implements the evaluation pipeline of docs/method.md §7 (protocol variants of docs/protocol.md §4)
for arbitrary inputs:

    teacher head features on the patch grid (eval mode)
      -> optional horizontal-flip average on the grid (un-normalised R-dim features)
      -> bilinear upsampling (align_corners=False) to the input size
      -> per-pixel L2 normalisation -> cosine with the L2-normalised centroids
      -> argmax                                   (crf=False)
      -> log_softmax(alpha * cos) -> DenseCRF -> argmax   (crf=True, pydensecrf installed)

:class:`Segmenter` holds the frozen backbone, the teacher head, the centroids ``[C, R]``, the
clusterbook ``[K, D]``, class names, palette, the working resolution (docs/method.md §2.6) and the
resolved config. :meth:`Segmenter.save` writes one ``torch.load(weights_only=True)``-safe file;
the backbone is stored as a *reference* (registry name + weights path + kwargs) and rebuilt with
``build_backbone`` at load time, except for backbones without a weights file (``tiny_vit``, random
ViTs, ``filterbank``), whose state is embedded so that a reloaded bundle predicts identically.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cause_lightning.artifacts import load_artifact, save_artifact
from cause_lightning.crf import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    crf_available,
    denormalize_to_uint8,
    dense_crf,
)
from cause_lightning.visualize import colorize as _colorize
from cause_lightning.visualize import default_palette, to_rgb_uint8

__all__ = ["SEGMENTER_KIND", "Segmenter"]

log = logging.getLogger(__name__)

#: ``kind`` field of a saved segmenter file.
SEGMENTER_KIND = "segmenter"
IGNORE_INDEX = 255

_WEIGHT_SUFFIXES = {".pth", ".pt", ".tar", ".safetensors", ".bin", ".ckpt", ".npz", ".pkl"}
# Same rule as build_backbone: "owner/repo" (optionally "hf-hub:"-prefixed) names a hub repo.
_HUB_TAG = re.compile(r"^(hf-hub:|hf_hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
# build_backbone keywords that change the architecture (compared with the registry defaults).
_ARCH_KEYS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "reg_tokens")
_crf_warned = False


def _plain(obj: Any) -> Any:
    """Convert a nested structure to tensors / primitives that ``weights_only`` loading accepts."""
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    try:  # OmegaConf containers (the resolved Hydra config)
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return _plain(OmegaConf.to_container(obj, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(_plain(v) for v in obj)
    return str(obj)


def _looks_like_path(ref: str) -> bool:
    """Whether a backbone ``weights`` reference names a local file (rather than a hub tag)."""
    if Path(ref).suffix.lower() in _WEIGHT_SUFFIXES:
        return True
    return not _HUB_TAG.match(ref)


def _weights_reference(backbone: nn.Module, weights: str | os.PathLike[str] | None) -> str | None:
    """Weights reference to store: the given one or the backbone's, existing files made absolute."""
    ref = weights if weights is not None else getattr(backbone, "weights", None)
    if ref is None:
        return None
    ref = os.fspath(ref)
    local = Path(ref).expanduser()
    # Absolute, so that the file still resolves when the bundle is loaded from another directory.
    return str(local.resolve()) if local.is_file() else ref


def _derive_backbone_kwargs(backbone: nn.Module) -> dict[str, Any]:
    """Architecture overrides of a registry ViT (e.g. the 12-head ViT-S), best effort.

    A rebuilt backbone must have the same architecture as the one the head was trained on; the
    12-head DINO ViT-S has the same parameter shapes as the 6-head one, so a strict state-dict
    load would not notice the difference.
    """
    arch = getattr(backbone, "arch", None)
    name = getattr(backbone, "name", None)
    if not isinstance(arch, Mapping) or not name:
        return {}
    try:
        from cause_lightning.models.backbones import get_backbone_spec

        spec = get_backbone_spec(name)
    except (ImportError, ValueError):
        return {}
    kw = {k: arch[k] for k in _ARCH_KEYS if k in arch and arch[k] != spec.arch.get(k)}
    scheme = getattr(backbone, "pos_embed_scheme", None)
    if scheme is not None and scheme != spec.pos_embed:
        kw["pos_embed_interpolation"] = scheme
    return kw


def _infer_head_kwargs(head: nn.Module, head_type: str) -> dict[str, Any]:
    """Constructor arguments of a head, from its attributes (``build_head(head_type, **kw)``)."""
    kw: dict[str, Any] = {"dim": int(head.dim), "reduced_dim": int(head.reduced_dim)}
    drop = getattr(head, "head_dropout", None) or getattr(head, "dropout", None)
    if isinstance(drop, nn.Dropout):
        kw["dropout"] = float(drop.p)
    if head_type == "tr":
        kw["num_queries"] = int(head.num_queries)
        kw["num_concepts"] = int(head.num_concepts)
    return kw


def _to_pil_rgb(image: Image.Image | np.ndarray | str | os.PathLike[str]) -> Image.Image:
    """Open / convert any supported input to an RGB PIL image, as the datasets load images.

    Transparent areas are composited on black and grayscale is replicated (``ensure_rgb``), so
    an RGBA picture gives the same pixels here, in the predict stage and in evaluation.
    """
    # Lazy: the data package is only needed for this conversion.
    from cause_lightning.data.transforms import ensure_rgb

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            im.load()
            return ensure_rgb(im)
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 4:
            rgb, alpha = to_rgb_uint8(image), to_rgb_uint8(image[:, :, 3])[:, :, :1]
            return ensure_rgb(Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA"))
        return Image.fromarray(to_rgb_uint8(image))
    if isinstance(image, Image.Image):
        return ensure_rgb(image)
    raise TypeError(
        f"predict_image expects a PIL image, a numpy array [H, W(, 3|4)] or a path, got "
        f"{type(image).__name__}; for a normalised tensor batch call the segmenter directly"
    )


def _nearest_resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest resize of an integer label map with PIL (the protocol's "nearest", any id range)."""
    if labels.shape == (height, width):
        return labels
    # Mode "I" (int32) keeps ids above 255; PIL's nearest samples pixel centres (protocol.md §2.2).
    img = Image.fromarray(np.ascontiguousarray(labels.astype(np.int32)))  # mode I
    resized = img.resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=np.int32).astype(labels.dtype)


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window offsets covering ``[0, length)``; the last window is flush with the end."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


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
        backbone_kwargs: extra ``build_backbone`` keyword arguments (e.g. ``num_heads=12``).
            Default: the architecture overrides read from a registry ViT's ``arch``.
        head_kwargs: ``build_head`` keyword arguments including ``dim``; inferred from the head's
            attributes when ``None``.
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
        head_kwargs: Mapping[str, Any] | None = None,
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
        self.backbone_weights = _weights_reference(backbone, backbone_weights)
        if backbone_kwargs is None:
            backbone_kwargs = _derive_backbone_kwargs(backbone)
        self.backbone_kwargs = dict(_plain(dict(backbone_kwargs)))
        self.head_type = str(getattr(head, "head_type", "")).lower()
        if self.head_type not in ("mlp", "tr"):
            raise ValueError(
                f"unsupported head {type(head).__name__}: expected an MLPHead / TRHead"
            )
        self.head_kwargs = (
            dict(head_kwargs) if head_kwargs else _infer_head_kwargs(head, self.head_type)
        )

        centroids = torch.as_tensor(centroids).detach().float()
        if centroids.ndim != 2:
            raise ValueError(f"centroids must be [C, R], got shape {tuple(centroids.shape)}")
        reduced = int(self.head_kwargs.get("reduced_dim", centroids.shape[1]))
        if centroids.shape[1] != reduced:
            raise ValueError(
                f"centroids have R={centroids.shape[1]} columns but the head outputs {reduced} "
                "channels; use the probe.pt written for this head"
            )
        dim = int(self.head_kwargs.get("dim", getattr(backbone, "embed_dim", 0)))
        if dim != int(getattr(backbone, "embed_dim", dim)):
            raise ValueError(
                f"the head was built for D={dim} but the {self.backbone_name} backbone gives "
                f"D={backbone.embed_dim}; use the backbone the head was trained on"
            )
        self.register_buffer("centroids", centroids.clone())
        cb = None if clusterbook is None else torch.as_tensor(clusterbook).detach().float().clone()
        if self.head_type == "tr":
            if cb is not None and not getattr(head, "clusterbook_set", True):
                head.set_clusterbook(cb)  # a TR head cannot run with an empty clusterbook
            elif cb is None:
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
        if self.head_type == "tr":
            q = int(self.head_kwargs["num_queries"])
            side = math.isqrt(q)
            if (resolution // self.patch_size) ** 2 != q:
                raise ValueError(
                    f"the TR head has {q} position queries (trained at "
                    f"{side * self.patch_size}px with patch {self.patch_size}) but resolution="
                    f"{resolution} gives {(resolution // self.patch_size) ** 2} tokens; use "
                    f"resolution={side * self.patch_size}"
                )
        self.resolution = resolution
        self.flip = bool(flip)
        self.crf = bool(crf)
        self.alpha = float(alpha)
        self.config = _plain(config) if config is not None else {}
        self.meta = _plain(meta) if meta is not None else {}
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
        table = [int(v) for v in np.asarray(torch.as_tensor(assignment).cpu()).reshape(-1)]
        if len(table) != self.num_classes:
            raise ValueError(f"assignment has {len(table)} entries for {self.num_classes} clusters")
        if any(v < -1 or v >= IGNORE_INDEX for v in table):
            raise ValueError(f"assignment values must lie in [-1, {IGNORE_INDEX}), got {table}")
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
        lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
        lut[: self.num_classes] = [IGNORE_INDEX if v < 0 else v for v in self.assignment]
        if isinstance(cluster_ids, Tensor):
            table = torch.as_tensor(lut, device=cluster_ids.device)
            return table[cluster_ids.long().clamp(0, 255)]
        ids = np.asarray(cluster_ids).astype(np.int64)
        return lut[np.clip(ids, 0, 255)]

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
        if self.head_type == "tr" and (h // p) * (w // p) != self.head_kwargs["num_queries"]:
            raise ValueError(
                f"TR head needs a {self.resolution}x{self.resolution} input (its query count is "
                f"fixed), got {h}x{w}; use predict_image() to squash-resize any image"
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
        x = self._prepare(images)
        if not self.flip:
            return self.head(self.backbone(x))  # B R h w
        both = self.head(self.backbone(torch.cat([x, x.flip(-1)])))  # 2B R h w
        plain, flipped = both.chunk(2)
        return (plain + flipped.flip(-1)) / 2  # flipped back on the token grid

    def _cosine(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        up = F.interpolate(features, size=size, mode="bilinear", align_corners=False)  # B R H W
        feats = F.normalize(up, dim=1)
        cents = F.normalize(self.centroids, dim=1).to(feats.dtype)  # C R
        return torch.einsum("brhw,cr->bchw", feats, cents)  # B C H W

    @torch.inference_mode()
    def logits(self, images: Tensor) -> Tensor:
        """Cosine logits at input resolution (docs/method.md §7, before the argmax / CRF).

        Head features (flip-averaged if ``flip``) are upsampled bilinearly (align_corners=False)
        to ``H x W``, normalised per pixel and compared with the normalised centroids.

        Args:
            images: normalised ``[B, 3, H, W]``.

        Returns:
            ``[B, C, H, W]`` cosine similarities in ``[-1, 1]``.
        """
        return self._cosine(self.features(images), tuple(images.shape[-2:]))

    @torch.inference_mode()
    def log_probs(self, images: Tensor) -> Tensor:
        """Cluster log-probabilities ``log_softmax(alpha * cos)`` (the CRF's input).

        Args:
            images: normalised ``[B, 3, H, W]``.

        Returns:
            ``[B, C, H, W]``.
        """
        return F.log_softmax(self.alpha * self.logits(images), dim=1)

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
        logp = F.log_softmax(self.alpha * cos.float(), dim=1).cpu().numpy()  # B C H W
        out = [
            torch.from_numpy(dense_crf(img, lp).argmax(axis=0))
            for img, lp in zip(images_uint8, logp, strict=True)
        ]
        return torch.stack(out).to(cos.device)

    @torch.inference_mode()
    def forward(self, images: Tensor) -> Tensor:
        """Cluster ids for a normalised batch.

        Args:
            images: normalised ``[B, 3, H, W]`` (sizes as in the class docstring).

        Returns:
            LongTensor ``[B, H, W]`` with values in ``[0, C)``, on the module's device.
        """
        cos = self.logits(images)  # B C H W
        pixels = None
        if self._use_crf():
            pixels = [denormalize_to_uint8(img) for img in images]
        return self._decide(cos, pixels).long()

    # ------------------------------------------------------------------ single images
    def working_size(
        self, width: int, height: int, sliding_window: bool = False
    ) -> tuple[int, int]:
        """Size ``(W, H)`` an image of ``width x height`` is resized to before prediction.

        * TR heads (fixed query count): ``resolution x resolution`` (squash).
        * MLP heads: shorter side -> ``resolution``, longer side -> ``floor(res * L / s)``
          (docs/protocol.md §2.2), then each side rounded to the nearest multiple of the patch.
        * ``sliding_window``: shorter side -> ``resolution`` (no snapping; windows are
          ``resolution x resolution``).

        Args:
            width: original width.
            height: original height.
            sliding_window: size for the sliding-window mode.

        Returns:
            ``(W, H)``.
        """
        res, p = self.resolution, self.patch_size
        if self.head_type == "tr" and not sliding_window:
            return res, res
        s = min(width, height)
        w, h = (res, res * height // s) if width <= height else (res * width // s, res)
        if sliding_window:
            return max(w, res), max(h, res)
        return max(p, int(w / p + 0.5) * p), max(p, int(h / p + 0.5) * p)

    def _image_tensor(self, img: Image.Image) -> Tensor:
        arr = np.asarray(img, dtype=np.float32) / 255.0  # H W 3
        mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
        std = np.asarray(IMAGENET_STD, dtype=np.float32)
        x = torch.from_numpy((arr - mean) / std).permute(2, 0, 1)[None]  # 1 3 H W
        return x.to(self.device, dtype=self.centroids.dtype)

    @torch.inference_mode()
    def _sliding_logits(self, x: Tensor, batch_size: int) -> Tensor:
        """Average cosine logits of ``res x res`` windows (stride res // 2) over ``x [1,3,H,W]``."""
        res = self.resolution
        _, _, h, w = x.shape
        stride = max(1, res // 2)
        boxes = [
            (y, z) for y in _window_starts(h, res, stride) for z in _window_starts(w, res, stride)
        ]
        acc = torch.zeros(self.num_classes, h, w, device=x.device, dtype=x.dtype)  # C H W
        count = torch.zeros(1, h, w, device=x.device, dtype=x.dtype)
        for i in range(0, len(boxes), batch_size):
            chunk = boxes[i : i + batch_size]
            crops = torch.cat([x[..., y : y + res, z : z + res] for y, z in chunk])  # n 3 r r
            cos = self.logits(crops)  # n C r r
            for (y, z), c in zip(chunk, cos, strict=True):
                acc[:, y : y + res, z : z + res] += c
                count[:, y : y + res, z : z + res] += 1
        return (acc / count)[None]  # 1 C H W

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
        pil = _to_pil_rgb(image)
        width, height = pil.size
        size = self.working_size(width, height, sliding_window)
        work = pil if pil.size == size else pil.resize(size, Image.Resampling.NEAREST)
        x = self._image_tensor(work)  # 1 3 h w
        if sliding_window:
            cos = self._sliding_logits(x, max(1, int(batch_size)))
        else:
            cos = self.logits(x)  # 1 C h w
        pixels = [np.ascontiguousarray(np.asarray(work, dtype=np.uint8))] if self.crf else None
        labels = self._decide(cos, pixels)[0].cpu().numpy().astype(np.int64)  # h w
        labels = _nearest_resize_labels(labels, height, width)
        if to_classes:
            labels = self.remap(labels)
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
    def _backbone_state(self) -> dict[str, Tensor] | None:
        embed = self.embed_backbone
        if embed is None:
            embed = self.backbone_weights is None
        if not embed:
            return None
        state = self.backbone.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items()} if state else None

    def to_payload(self) -> dict[str, Any]:
        """The dict :meth:`save` writes (tensors and primitives only).

        Returns:
            The payload (without ``format_version`` / ``kind``, which ``save_artifact`` adds).
        """
        return {
            "backbone": {
                "name": self.backbone_name,
                "weights": self.backbone_weights,
                "kwargs": self.backbone_kwargs,
                "embed_dim": int(getattr(self.backbone, "embed_dim", 0)),
                "patch_size": self.patch_size,
                "state": self._backbone_state(),
            },
            "head": {
                "type": self.head_type,
                "kwargs": _plain(self.head_kwargs),
                "state": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            },
            "centroids": self.centroids.detach().cpu().clone(),
            "clusterbook": None if self.clusterbook is None else self.clusterbook.detach().cpu(),
            "class_names": list(self.class_names),
            "palette": torch.from_numpy(self.palette.copy()),
            "resolution": self.resolution,
            "flip": self.flip,
            "crf": self.crf,
            "alpha": self.alpha,
            "assignment": None if self.assignment is None else list(self.assignment),
            "config": self.config,
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle to one file (atomic; ``torch.load(weights_only=True)``-safe).

        The file holds ``format_version``, ``kind="segmenter"``, the backbone reference (and its
        state when embedded), the head type / kwargs / state dict (the TR clusterbook buffer
        included), centroids, clusterbook, class names, palette, resolution, flip / crf / alpha,
        assignment, config and meta.

        Args:
            path: destination file (e.g. ``<artifact_dir>/.../<head>/segmenter.pt``).

        Returns:
            The written path.
        """
        return save_artifact(path, SEGMENTER_KIND, self.to_payload())

    @staticmethod
    def _resolve_weights(
        name: str, stored: str | None, override: str | os.PathLike[str] | None, source: Path
    ) -> str | None:
        if override is not None:
            ref = os.fspath(override)
            if _looks_like_path(ref) and not Path(ref).expanduser().exists():
                raise FileNotFoundError(
                    f"backbone weights file {ref} (passed as weights=) not found"
                )
            return ref
        if stored is not None and _looks_like_path(stored):
            if not Path(stored).expanduser().exists():
                raise FileNotFoundError(
                    f"{source} references the {name} backbone weights file {stored}, which no "
                    f"longer exists; pass its new location: Segmenter.load({str(source)!r}, "
                    "weights='/path/to/weights')"
                )
        return stored

    @staticmethod
    def _build_backbone(
        name: str,
        weights: str | None,
        kwargs: Mapping[str, Any],
        state: Mapping[str, Tensor] | None,
    ) -> nn.Module:
        from cause_lightning.models.backbones import build_backbone

        backbone = build_backbone(name, weights=weights, **dict(kwargs))
        if state:
            backbone.load_state_dict(dict(state), strict=True)
        return backbone

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

        The backbone is rebuilt with ``build_backbone(name, weights, **kwargs)``. An embedded
        backbone state (no weights file) is loaded into it; ``weights=`` takes precedence over
        both the stored reference and an embedded state.

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
            FileNotFoundError: if the stored backbone weights file no longer exists (the message
                names it and says to pass ``weights=``).
        """
        from cause_lightning.models.heads import build_head

        path = Path(path)
        record = load_artifact(path, SEGMENTER_KIND, produced_by="eval")
        bb = record["backbone"]
        if backbone is None:
            state = None if weights is not None else bb.get("state")
            ref = None
            if not state:
                ref = cls._resolve_weights(bb["name"], bb.get("weights"), weights, path)
            backbone = cls._build_backbone(bb["name"], ref, bb.get("kwargs") or {}, state)
        for attr in ("embed_dim", "patch_size"):
            want, got = bb.get(attr), getattr(backbone, attr, None)
            if want and got != want:
                raise ValueError(
                    f"{path} was saved with a {bb['name']} backbone of {attr}={want}, but the "
                    f"backbone to use has {attr}={got}; pass the matching backbone / weights"
                )
        hd = record["head"]
        head_kwargs = dict(hd["kwargs"])
        dim = head_kwargs.pop("dim")
        head = build_head(hd["type"], dim, **head_kwargs)
        head.load_state_dict(hd["state"], strict=True)
        weights_ref = bb.get("weights") if weights is None else os.fspath(weights)
        seg = cls(
            backbone,
            head,
            record["centroids"],
            backbone_name=bb["name"],
            backbone_weights=weights_ref,
            backbone_kwargs=bb.get("kwargs") or {},
            head_kwargs=hd["kwargs"],
            clusterbook=record.get("clusterbook"),
            class_names=record.get("class_names"),
            palette=None if record.get("palette") is None else record["palette"].numpy(),
            resolution=record["resolution"],
            flip=record.get("flip", True),
            crf=record.get("crf", False),
            alpha=record.get("alpha", 3.0),
            assignment=record.get("assignment"),
            config=record.get("config"),
            meta=record.get("meta"),
        )
        return seg.to(map_location)

    @classmethod
    def from_artifacts(
        cls,
        root: str | os.PathLike[str],
        head_name: str,
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

        Reads ``root/clusterbook.pt`` (required for TR heads, optional for MLP),
        ``root/<head_name>/head.pt`` (teacher head state + meta) and
        ``root/<head_name>/probe.pt`` (centroids).

        Args:
            root: artifact root ``<artifact_dir>/<data>/<backbone>[-<tag>]``.
            head_name: head sub-folder (``mlp`` / ``tr``).
            backbone: an already-built backbone (e.g. the eval stage's); rebuilt from the head
                meta (``backbone``, ``backbone_weights``, ``backbone_kwargs``) when ``None``.
            weights: override of the backbone weights reference.
            resolution: working resolution (default: the head meta's test resolution).
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
            ArtifactError: on a wrong kind / format version.
            ValueError: if head and probe do not fit together.
        """
        from cause_lightning.models.heads import build_head

        root = Path(root)
        hdir = root / head_name
        head_rec = load_artifact(hdir / "head.pt", "head", produced_by="head")
        probe_rec = load_artifact(hdir / "probe.pt", "probe", produced_by="probe")
        hmeta = dict(head_rec.get("meta") or {})
        pmeta = dict(probe_rec.get("meta") or {})
        head_type = str(hmeta.get("head_type", head_name)).lower()
        cb_path = root / "clusterbook.pt"
        clusterbook = None
        if head_type == "tr" or cb_path.is_file():
            clusterbook = load_artifact(cb_path, "clusterbook", produced_by="mediator")[
                "clusterbook"
            ]

        state = head_rec["head_state"]
        dim = int(hmeta.get("dim") or _state_dim(state, head_type))
        head_kwargs: dict[str, Any] = {"dim": dim}
        if hmeta.get("reduced_dim") is not None:
            head_kwargs["reduced_dim"] = int(hmeta["reduced_dim"])
        if head_type == "tr":
            head_kwargs["num_queries"] = int(
                hmeta.get("num_queries") or state["query_pos"].shape[0]
            )
            k = hmeta.get("num_concepts") or (
                state["clusterbook"].shape[0] if "clusterbook" in state else clusterbook.shape[0]
            )
            head_kwargs["num_concepts"] = int(k)
        kw = {k: v for k, v in head_kwargs.items() if k != "dim"}
        head = build_head(head_type, dim, **kw)
        missing, unexpected = head.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "clusterbook"]:
            raise ValueError(
                f"{hdir / 'head.pt'} does not fit a {head_type} head of dim {dim}: missing "
                f"{missing}, unexpected {unexpected}"
            )
        if "clusterbook" in missing:
            head.set_clusterbook(clusterbook)

        if backbone is None:
            name = hmeta.get("backbone")
            if not name:
                raise ValueError(f"{hdir / 'head.pt'} meta has no backbone name; pass backbone=")
            ref = cls._resolve_weights(
                name, hmeta.get("backbone_weights"), weights, hdir / "head.pt"
            )
            backbone = cls._build_backbone(name, ref, hmeta.get("backbone_kwargs") or {}, None)
            bname, bweights = name, ref
        else:
            bname = hmeta.get("backbone") or getattr(backbone, "name", None)
            bweights = os.fspath(weights) if weights is not None else hmeta.get("backbone_weights")

        res_meta = hmeta.get("resolution")
        if resolution is None:
            resolution = res_meta.get("test") if isinstance(res_meta, Mapping) else res_meta
            if resolution is None:
                raise ValueError(
                    f"{hdir / 'head.pt'} meta has no test resolution; pass resolution="
                )
        names = class_names or pmeta.get("class_names") or hmeta.get("class_names")
        config = pmeta.get("config") or hmeta.get("config") or {}
        meta = {
            "artifact_root": str(root),
            "head_name": head_name,
            "head_meta": {k: v for k, v in hmeta.items() if k != "config"},
            "probe_meta": {k: v for k, v in pmeta.items() if k != "config"},
        }
        seg = cls(
            backbone,
            head,
            probe_rec["centroids"],
            backbone_name=bname,
            backbone_weights=bweights,
            backbone_kwargs=hmeta.get("backbone_kwargs") or {},
            head_kwargs=head_kwargs,
            clusterbook=clusterbook,
            class_names=names,
            palette=palette,
            resolution=int(resolution),
            flip=flip,
            crf=crf,
            alpha=alpha,
            assignment=assignment,
            config=config,
            meta=meta,
        )
        return seg.to(map_location)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone_name!r}, head={self.head_type}, classes={self.num_classes}, "
            f"resolution={self.resolution}, flip={self.flip}, crf={self.crf}"
        )


def _state_dim(state: Mapping[str, Tensor], head_type: str) -> int:
    """Backbone width D read from a head state dict (``f1`` conv input channels)."""
    key = "tr.f1.weight" if head_type == "tr" else "f1.weight"
    if key not in state:
        raise ValueError(f"head state dict has no {key!r}; is it a {head_type} head?")
    return int(state[key].shape[1])
