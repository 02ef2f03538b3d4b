"""Embedded default dataset ``data=mosaic``: labelled texture mosaics (docs/environment.md §4.2).

No labelled segmentation data can be downloaded on the project's machines, so the default dataset is
generated: real textures and photo regions that scikit-image ships in its wheel (``brick``,
    ``grass``,
``gravel`` tinted apart; wood from ``coffee``, fur from ``chelsea``, ``immunohistochemistry``
tissue, ``retina``, ``hubble_deep_field`` stars, ``moon``, handwriting from ``text``, ``coins``) are
composed into scenes whose every pixel's class is known exactly.

Per scene (all draws from one ``numpy`` generator seeded by ``(seed, split, index)``):

* 2-4 classes drawn uniformly without replacement (class frequencies balanced across the set);
* a region layout: warped Voronoi cells, blobs (arg-max of smooth noise fields), or wavy stripes;
* per class one texture instance: a random window of the class's source region, random flips and 90°
  rotation, scale jitter, then brightness / contrast / saturation / colour-cast jitter, so the mean
  colour of a class varies between images while its texture stays recognisable;
* a global colour cast and mild pixel noise.

The scenes are written once to ``<root>/mosaic-v1-<hash>/{train,val}/{img,label}/<i>.png`` with a
``manifest.json`` (generated into a temporary directory, then renamed, so readers never see half a
cache); the hash covers every generator parameter, so changing one writes a new cache and an
unchanged configuration reuses the old one. Training and evaluation then follow the protocol
transform (shorter-side nearest resize + centre crop, protocol.md §2).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cause_lightning.core.constants import IMAGENET_MEAN, IMAGENET_STD
from cause_lightning.core.logs import get_logger
from cause_lightning.data.base import SegDataModule
from cause_lightning.data.datasets import SegmentationDataset
from cause_lightning.data.transforms import SegTransform

__all__ = [
    "MOSAIC_TEXTURES",
    "MosaicDataModule",
    "TextureSpec",
    "calibration_batches",
    "default_mosaic_root",
    "generate_mosaic",
    "generate_scene",
    "mosaic_params",
]

log = get_logger(__name__)

# Bump when the generator's code changes the pixels, so stale caches are not reused.
FORMAT = "mosaic-v1"
_SPLIT_IDS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class TextureSpec:
    """One mosaic class: a region of a scikit-image picture, optionally tinted.

    Args:
        name: Class name.
        source: ``skimage.data`` function name.
        box: Region ``(y0, y1, x0, x1)`` as fractions of the picture's height/width.
        tint: RGB multipliers applied to a grey source (``None`` for colour sources).
        contrast: Contrast stretch around the region's mean (1 = unchanged).
        colour: Display colour (palette entry).
    """

    name: str
    source: str
    box: tuple[float, float, float, float]
    tint: tuple[float, float, float] | None
    contrast: float
    colour: tuple[int, int, int]


# Order matters: the first ``num_classes`` entries are used. The default six mix three tinted grey
# textures with three colour-photo textures, so that neither colour nor grey-level texture alone
# separates all classes.
MOSAIC_TEXTURES: tuple[TextureSpec, ...] = (
    TextureSpec("brick", "brick", (0.0, 1.0, 0.0, 1.0), (1.05, 0.62, 0.50), 1.0, (178, 34, 34)),
    TextureSpec("grass", "grass", (0.0, 1.0, 0.0, 1.0), (0.62, 0.98, 0.45), 1.0, (60, 180, 75)),
    TextureSpec("gravel", "gravel", (0.0, 1.0, 0.0, 1.0), (0.98, 0.90, 0.72), 1.0, (210, 190, 130)),
    TextureSpec("wood", "coffee", (0.02, 0.95, 0.80, 1.0), None, 1.0, (139, 90, 43)),
    TextureSpec("fur", "chelsea", (0.0, 0.28, 0.22, 0.72), None, 1.0, (240, 160, 60)),
    TextureSpec("tissue", "immunohistochemistry", (0.0, 1.0, 0.0, 1.0), None, 1.0, (145, 30, 180)),
    TextureSpec("retina", "retina", (0.30, 0.70, 0.30, 0.75), None, 1.3, (250, 90, 90)),
    TextureSpec("stars", "hubble_deep_field", (0.0, 1.0, 0.0, 1.0), None, 1.0, (20, 20, 90)),
    TextureSpec("moon", "moon", (0.0, 1.0, 0.0, 1.0), (0.80, 0.88, 1.05), 2.5, (128, 128, 160)),
    TextureSpec("text", "text", (0.0, 1.0, 0.0, 1.0), (1.0, 0.95, 0.82), 1.3, (255, 250, 200)),
    TextureSpec("coins", "coins", (0.03, 0.97, 0.05, 0.95), (1.0, 0.86, 0.52), 1.0, (255, 215, 0)),
)

# Jitter ranges (uniform); part of the cache hash.
_JITTER: dict[str, Any] = {
    "scale": (0.7, 1.4),
    "brightness": (0.75, 1.25),
    "contrast": (0.7, 1.3),
    "saturation": (0.7, 1.3),
    "channel_gain": (0.88, 1.12),
    "global_gain": (0.94, 1.06),
    "noise_std": 0.012,
    "classes_per_scene": (2, 4),
    "min_area_fraction": 0.04,
}


def default_mosaic_root() -> Path:
    """Default cache root: ``$XDG_CACHE_HOME/cause_lightning/mosaic`` (``~/.cache/...``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cause_lightning" / "mosaic"


def _skimage_version() -> str:
    import skimage

    return str(skimage.__version__)


def mosaic_params(
    num_train: int, num_val: int, image_size: int, num_classes: int, seed: int
) -> dict[str, Any]:
    """Every parameter that determines the generated pixels (the cache key).

    Args:
        num_train: Training scenes.
        num_val: Validation scenes.
        image_size: Scene side in pixels.
        num_classes: Number of texture classes (first entries of ``MOSAIC_TEXTURES``).
        seed: Generator seed.

    Returns:
        A JSON-serialisable dict.
    """
    return {
        "format": FORMAT,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "image_size": int(image_size),
        "num_classes": int(num_classes),
        "seed": int(seed),
        "textures": [asdict(t) for t in MOSAIC_TEXTURES[:num_classes]],
        "jitter": _JITTER,
        "skimage": _skimage_version(),
    }


def _params_hash(params: dict[str, Any]) -> str:
    blob = json.dumps(params, sort_keys=True, default=list).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# textures
def _load_texture(spec: TextureSpec, min_side: int) -> np.ndarray:
    """Source region of one class as uint8 ``[H,W,3]``, tinted, mirror-tiled to ``min_side``."""
    import skimage.data

    pic = np.asarray(getattr(skimage.data, spec.source)())
    h, w = pic.shape[:2]
    y0, y1, x0, x1 = spec.box
    region = pic[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)].astype(np.float32) / 255.0
    if region.ndim == 2:
        tint = np.asarray(spec.tint or (1.0, 1.0, 1.0), dtype=np.float32)
        region = region[..., None] * tint  # H W 3
    region = region[..., :3]
    if spec.contrast != 1.0:
        mean = region.mean(axis=(0, 1), keepdims=True)
        region = mean + spec.contrast * (region - mean)
    region = np.clip(region, 0.0, 1.0)
    # Mirror tiling keeps the texture continuous; "symmetric" padding adds at most one copy per
    # call.
    while region.shape[0] < min_side or region.shape[1] < min_side:
        ph = min(region.shape[0], max(0, min_side - region.shape[0]))
        pw = min(region.shape[1], max(0, min_side - region.shape[1]))
        region = np.pad(region, ((0, ph), (0, pw), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(np.round(region * 255.0), dtype=np.uint8)


def _texture_bank(num_classes: int, image_size: int) -> list[np.ndarray]:
    smallest_scale = _JITTER["scale"][0]
    need = int(np.ceil(image_size / smallest_scale)) + 2
    return [_load_texture(spec, need) for spec in MOSAIC_TEXTURES[:num_classes]]


def _texture_instance(source: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A jittered ``[size,size,3]`` float32 window (values around [0,1]) of one class texture."""
    scale = rng.uniform(*_JITTER["scale"])
    side = min(int(round(size / scale)), source.shape[0], source.shape[1])
    y = int(rng.integers(0, source.shape[0] - side + 1))
    x = int(rng.integers(0, source.shape[1] - side + 1))
    patch = source[y : y + side, x : x + side]  # side side 3
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    if rng.random() < 0.5:
        patch = patch[::-1]
    patch = np.rot90(patch, k=int(rng.integers(0, 4)))
    if side != size:
        patch = np.asarray(
            Image.fromarray(np.ascontiguousarray(patch), mode="RGB").resize(
                (size, size), Image.BILINEAR
            )
        )
    patch = np.asarray(patch, dtype=np.float32) * np.float32(1.0 / 255.0)  # size size 3
    grey = patch @ np.full((3, 1), 1.0 / 3.0, dtype=np.float32)  # size size 1
    patch = grey + rng.uniform(*_JITTER["saturation"]) * (patch - grey)
    # A strided estimate of the mean is enough for the contrast pivot and much cheaper.
    mean = patch[::3, ::3].reshape(-1, 3).mean(axis=0)  # 3
    patch = mean + rng.uniform(*_JITTER["contrast"]) * (patch - mean)
    gain = rng.uniform(*_JITTER["brightness"]) * rng.uniform(*_JITTER["channel_gain"], size=3)
    return patch * gain.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# layouts
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std smooth noise ``[size,size]`` (bicubic upsampling of a coarse grid)."""
    coarse = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    up = Image.fromarray(coarse, mode="F").resize(
        (size, size), Image.BICUBIC, box=(1.0, 1.0, cells + 2.0, cells + 2.0)
    )
    field = np.asarray(up, dtype=np.float32)
    return (field - field.mean()) / (field.std() + 1e-6)


def _layout_voronoi(rng: np.random.Generator, size: int, classes: np.ndarray) -> np.ndarray:
    k = int(rng.integers(len(classes), len(classes) + 4))
    seeds = rng.uniform(0, size, size=(k, 2)).astype(np.float32)  # k 2
    cell_class = np.concatenate([classes, rng.choice(classes, size=k - len(classes))])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amp = 0.08 * size
    yy = yy + amp * _smooth_noise(rng, size, 4)
    xx = xx + amp * _smooth_noise(rng, size, 4)
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    return cell_class[np.argmin(dist, axis=0)]  # size size


def _layout_blobs(rng: np.random.Generator, size: int, classes: np.ndarray) -> np.ndarray:
    cells = int(rng.integers(2, 6))
    fields = np.stack([_smooth_noise(rng, size, cells) for _ in classes])  # m size size
    return classes[np.argmax(fields, axis=0)]


def _layout_stripes(rng: np.random.Generator, size: int, classes: np.ndarray) -> np.ndarray:
    theta = rng.uniform(0, np.pi)
    width = rng.uniform(size / 6.0, size / 2.5)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    t = xx * np.cos(theta) + yy * np.sin(theta) + 0.06 * size * _smooth_noise(rng, size, 3)
    band = np.floor((t - t.min()) / width).astype(np.int64)
    order = rng.permutation(classes)
    return order[band % len(order)]


_LAYOUTS = (_layout_voronoi, _layout_blobs, _layout_stripes)


def _layout_ok(label: np.ndarray, min_fraction: float) -> bool:
    counts = np.bincount(label.ravel())
    present = counts[counts > 0]
    return len(present) >= 2 and present.min() >= min_fraction * label.size


def generate_scene(
    bank: list[np.ndarray], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one labelled scene.

    Args:
        bank: Class textures from ``_texture_bank`` (index = class id).
        size: Scene side in pixels.
        rng: Generator (consumed).

    Returns:
        ``(image uint8 [size,size,3], label uint8 [size,size])`` with every label in ``[0,
        len(bank))`` and at least two classes present.
    """
    num_classes = len(bank)
    lo, hi = _JITTER["classes_per_scene"]
    label: np.ndarray | None = None
    for _ in range(20):
        m = int(rng.integers(lo, min(hi, num_classes) + 1))
        classes = rng.choice(num_classes, size=m, replace=False)
        layout = _LAYOUTS[int(rng.integers(0, len(_LAYOUTS)))]
        candidate = layout(rng, size, classes)
        if _layout_ok(candidate, _JITTER["min_area_fraction"]):
            label = candidate
            break
    if label is None:
        # Practically unreachable; a vertical split keeps the two-class guarantee.
        classes = rng.choice(num_classes, size=2, replace=False)
        label = np.where(np.arange(size)[None, :] < size // 2, classes[0], classes[1])
        label = np.broadcast_to(label, (size, size))
    label = np.ascontiguousarray(label, dtype=np.uint8)
    image = np.zeros((size, size, 3), dtype=np.float32)
    for c in np.unique(label):
        mask = (label == c)[..., None]  # size size 1
        np.copyto(image, _texture_instance(bank[int(c)], size, rng), where=mask)
    image *= rng.uniform(*_JITTER["global_gain"], size=3).astype(np.float32)
    image += _JITTER["noise_std"] * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8), label


def generate_mosaic(out_dir: str | Path, params: dict[str, Any]) -> dict[str, Any]:
    """Write every scene of both splits under ``out_dir`` (no manifest; see MosaicDataModule).

    Args:
        out_dir: Empty target directory.
        params: Output of :func:`mosaic_params`.

    Returns:
        Statistics: per-split counts and per-class pixel counts.
    """
    out_dir = Path(out_dir)
    size = params["image_size"]
    bank = _texture_bank(params["num_classes"], size)
    stats: dict[str, Any] = {"counts": {}, "class_pixels": {}}
    for split, n in (("train", params["num_train"]), ("val", params["num_val"])):
        img_dir, lab_dir = out_dir / split / "img", out_dir / split / "label"
        img_dir.mkdir(parents=True, exist_ok=True)
        lab_dir.mkdir(parents=True, exist_ok=True)
        pixels = np.zeros(params["num_classes"], dtype=np.int64)
        for i in range(n):
            rng = np.random.default_rng([params["seed"], _SPLIT_IDS[split], i])
            image, label = generate_scene(bank, size, rng)
            Image.fromarray(image, mode="RGB").save(img_dir / f"{i}.png", compress_level=1)
            Image.fromarray(label, mode="L").save(lab_dir / f"{i}.png", compress_level=1)
            pixels += np.bincount(label.ravel(), minlength=params["num_classes"])
        stats["counts"][split] = n
        stats["class_pixels"][split] = pixels.tolist()
    return stats


# ----------------------------------------------------------------------------------------------
# module
class MosaicDataModule(SegDataModule):
    """Seeded texture-mosaic scenes with exact labels, generated once and cached (``data=mosaic``).

    Args:
        root: Cache root (default :func:`default_mosaic_root`); the scenes live in
            ``<root>/mosaic-v1-<hash>/``.
        num_train: Training scenes.
        num_val: Validation scenes (also the test split).
        image_size: Scene side in pixels.
        num_classes: Texture classes, 2 to ``len(MOSAIC_TEXTURES)`` (11).
        data_seed: Scene generator seed (train and val use different streams); kept apart from
            the run ``seed`` (which shuffles) so that runs with different seeds evaluate on the
            same scenes.
        train_res: Training side after the protocol transform (default ``image_size``).
        test_res: Evaluation side (default ``image_size``).
        **kwargs: The other arguments of :class:`SegDataModule` (batch sizes, workers,
            ``limit_train``, ``seed``, ``shuffle``).

    Raises:
        ValueError: On an unsupported ``num_classes`` or non-positive sizes.
    """

    name = "mosaic"
    layout = (
        "<root>/mosaic-v1-<hash>/\n"
        "    manifest.json\n"
        "    train/img/<i>.png   train/label/<i>.png\n"
        "    val/img/<i>.png     val/label/<i>.png\n"
        "(generated automatically from scikit-image's bundled pictures)"
    )

    def __init__(
        self,
        root: str | Path | None = None,
        num_train: int = 256,
        num_val: int = 48,
        image_size: int = 192,
        num_classes: int = 6,
        data_seed: int = 0,
        train_res: int | None = None,
        test_res: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not 2 <= int(num_classes) <= len(MOSAIC_TEXTURES):
            raise ValueError(
                f"mosaic num_classes must be between 2 and {len(MOSAIC_TEXTURES)} (available "
                f"textures: {', '.join(t.name for t in MOSAIC_TEXTURES)}), got {num_classes}."
            )
        if int(num_train) < 1 or int(num_val) < 1 or int(image_size) < 16:
            raise ValueError(
                "mosaic needs num_train >= 1, num_val >= 1 and image_size >= 16, got "
                f"{num_train}, {num_val}, {image_size}."
            )
        super().__init__(
            root=default_mosaic_root() if root is None else root,
            train_res=int(image_size) if train_res is None else train_res,
            test_res=int(image_size) if test_res is None else test_res,
            **kwargs,
        )
        self.num_train = int(num_train)
        self.num_val = int(num_val)
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        specs = MOSAIC_TEXTURES[: self.num_classes]
        self.class_names = [t.name for t in specs]
        self.palette = np.array([t.colour for t in specs], dtype=np.uint8)
        self.params = mosaic_params(
            self.num_train, self.num_val, self.image_size, self.num_classes, int(data_seed)
        )
        self.params_hash = _params_hash(self.params)
        self.generated_now = False
        self._verified = False

    @property
    def cache_dir(self) -> Path:
        """Directory of this configuration's scenes."""
        return self.root / f"{FORMAT}-{self.params_hash}"

    def _cache_valid(self) -> bool:
        manifest = self.cache_dir / "manifest.json"
        if not manifest.is_file():
            return False
        try:
            data = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return False
        if data.get("params") != json.loads(json.dumps(self.params, default=list)):
            return False
        for split, n in (("train", self.num_train), ("val", self.num_val)):
            for sub in ("img", "label"):
                if not (self.cache_dir / split / sub / f"{n - 1}.png").is_file():
                    return False
        return True

    def ensure_cache(self) -> Path:
        """Generate the scenes unless a valid cache for these parameters exists.

        Returns:
            The cache directory.
        """
        if self._cache_valid():
            return self.cache_dir
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{FORMAT}-{self.params_hash}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        try:
            stats = generate_mosaic(tmp, self.params)
            seconds = time.perf_counter() - start
            manifest = {
                "params": self.params,
                "hash": self.params_hash,
                "class_names": self.class_names,
                "generation_seconds": round(seconds, 3),
                **stats,
            }
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=list))
            if self.cache_dir.exists():
                # A stale or half-deleted cache with the same key: replace it.
                if self._cache_valid():
                    shutil.rmtree(tmp, ignore_errors=True)
                    return self.cache_dir
                shutil.rmtree(self.cache_dir, ignore_errors=True)
            try:
                os.rename(tmp, self.cache_dir)
            except OSError:
                # Another process finished first; its cache is equivalent (same key).
                if not self._cache_valid():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return self.cache_dir
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.generated_now = True
        log.info(
            "generated mosaic %s (%d train + %d val scenes, %d px, %d classes) in %.2f s",
            self.cache_dir,
            self.num_train,
            self.num_val,
            self.image_size,
            self.num_classes,
            seconds,
        )
        return self.cache_dir

    def verify(self) -> None:
        """Make sure the cache exists (generating it is cheap), instead of failing."""
        if not self._verified:
            self.ensure_cache()
            self._verified = True

    def samples(self, split: str) -> list[tuple[Path, Path]]:
        """``(image, label)`` paths of one split.

        Args:
            split: ``"train"`` or ``"val"``.

        Returns:
            The pairs, in index order.
        """
        self._check_split(split)
        n = self.num_train if split == "train" else self.num_val
        base = self.cache_dir / split
        return [(base / "img" / f"{i}.png", base / "label" / f"{i}.png") for i in range(n)]

    def build_dataset(self, split: str, res: int) -> Dataset:
        """Protocol-transformed scenes of one split (shorter-side nearest resize + centre crop).

        Args:
            split: ``"train"`` or ``"val"``.
            res: Output side.

        Returns:
            A :class:`SegmentationDataset`.
        """
        self._check_split(split)
        self.verify()
        return SegmentationDataset(self.samples(split), SegTransform(res, mode="crop"))

    def describe_extra(self) -> dict[str, Any]:
        """Cache location and generator parameters."""
        return {
            "cache_dir": str(self.cache_dir),
            "params_hash": self.params_hash,
            "image_size": self.image_size,
            "num_train": self.num_train,
            "num_val": self.num_val,
        }


def calibration_batches(
    size: int = 128, batches: int = 8, batch_size: int = 8, seed: int = 12345
) -> Iterator[torch.Tensor]:
    """Unlabelled mosaic scenes, the calibration set of the ``filterbank`` backbone's constants.

    The scenes come from the embedded dataset's generator (all of its textures, with its colour
    and brightness jitter) under a seed of their own, so the constants describe the textures the
    descriptor is meant for without touching any dataset's images or labels.

    Args:
        size: Scene side (a multiple of 8).
        batches: Number of batches.
        batch_size: Scenes per batch.
        seed: Generator seed.

    Yields:
        ``[batch_size, 3, size, size]`` ImageNet-normalised float tensors.
    """
    bank = _texture_bank(len(MOSAIC_TEXTURES), size)
    rng = np.random.default_rng(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for _ in range(batches):
        scenes = []
        for _ in range(batch_size):
            image, _ = generate_scene(bank, size, rng)
            tensor = torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1) / 255.0)
            scenes.append((tensor - mean) / std)
        yield torch.stack(scenes)
