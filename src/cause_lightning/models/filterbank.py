"""The parameter-free default backbone: colour statistics and texture descriptors per 8x8 patch.

No pretrained ViT weights can be had offline (docs/environment.md §4) and random ViT features are no
better than the trivial answer (§4.1), so the embedded default backbone is a fixed patch descriptor
with the ``FrozenBackbone`` interface (patch 8, ``[B, D, H/8, W/8]`` on ImageNet-normalised input).
Per patch it computes three groups of channels:

* colour: mean and standard deviation of the de-normalised RGB, the log-opponent chromaticity
  ``log R - log G`` and ``log R + log G - 2 log B`` (unchanged by a brightness gain), and log
  luminance;
* oriented filter bank: zero-mean Gabor quadrature pairs (6 orientations) on log luminance at 4
  octaves of a 2x average-pool pyramid; their energy ``sqrt(even**2 + odd**2)`` is averaged per
  patch and summarised per octave by the log mean energy and the orientation anisotropy (amplitude
  of the first orientation harmonic over the mean; unchanged by 90-degree rotations and flips);
* local binary patterns: histograms of rotation-invariant uniform LBP codes (8 neighbours, 10 codes;
  a neighbour counts when it is brighter than the centre by 3 % in log luminance) at radius 1 on the
  full image and on the 2x pooled image. Comparisons make them independent of brightness and
  contrast; they separate fine textures (grass, gravel) that energy statistics confuse.

Each patch channel is also averaged over its 3x3 patch neighbourhood ("context"), which makes
textures whose period exceeds a patch recognisable; the descriptor is ``[patch channels, context
channels]``. Every channel is standardised with fixed constants (measured once with
``feature_statistics(calibration_batches())`` of ``data/mosaic.py`` on unlabelled mosaics of
scikit-image's textures, with the embedded dataset's colour jitter, so that different textures
point in different directions: mean cosine about 0.07 between and 0.45 within textures) and
multiplied by a fixed group weight: the context LBP and chromaticity channels carry most of the
weight, the per-patch channels less (they localise boundaries but are noisy). The vector is
centred on the calibration mean, so cosine similarity is meaningful. Nothing is learned and
nothing depends on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from cause_lightning.core.constants import IMAGENET_MEAN, IMAGENET_STD
from cause_lightning.models.frozen import FrozenBackbone

__all__ = [
    "FEATURE_NAMES",
    "FilterBankBackbone",
    "feature_statistics",
]

_PATCH = 8
_LEVELS = 4
_ORIENTATIONS = 6
_LBP_LEVELS = 2
_LBP_CODES = 10  # riu2 codes 0..8 (uniform, number of brighter neighbours) and 9 (non-uniform)
_LBP_THRESHOLD = 0.03  # in log luminance: 3 % brighter
_LOG_EPS = 0.04  # keeps log luminance finite in black regions (about 10/255)
_ENERGY_EPS = 1e-3

# (group name, channel names); the order is the order of the patch channels.
_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("rgb", ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b")),
    ("chroma", ("opp_rg", "opp_yb")),
    ("luminance", ("log_lum",)),
    (
        "gabor",
        tuple(f"gabor{lv}_log_energy" for lv in range(_LEVELS))
        + tuple(f"gabor{lv}_anisotropy" for lv in range(_LEVELS)),
    ),
    ("lbp0", tuple(f"lbp0_code{c}" for c in range(_LBP_CODES))),
    ("lbp1", tuple(f"lbp1_code{c}" for c in range(_LBP_CODES))),
)
_PATCH_NAMES = tuple(name for _, names in _GROUPS for name in names)
FEATURE_NAMES: tuple[str, ...] = _PATCH_NAMES + tuple(f"ctx_{n}" for n in _PATCH_NAMES)

# Weight of each group after per-channel standardisation (each group is also divided by the square
# root of its channel count, so a weight is the group's share of the squared norm). Chosen on
# texture mosaics: LBP and chromaticity separate textures and tinted regions; brightness and the raw
# RGB statistics change with per-image jitter, so they count less.
_CONTEXT_WEIGHTS = {
    "rgb": 0.3,
    "chroma": 1.0,
    "luminance": 0.3,
    "gabor": 0.3,
    "lbp0": 1.0,
    "lbp1": 0.5,
}
_PATCH_WEIGHT = 0.2  # per-patch channels relative to their context counterparts

# fmt: off
# Per-channel standardisation constants (FEATURE_NAMES order), measured with
# ``feature_statistics(calibration_batches())`` (data/mosaic.py); fixed so that features never
# depend on the batch.
_FEATURE_MEAN: tuple[float, ...] = (
    0.502653, 0.393144, 0.305279, 0.0735664, 0.0684084, 0.0588465, 0.191876, 0.703536, -0.881014,
    -3.25141, -3.03562, -2.79414, -2.55619, 0.166786, 0.213487, 0.248581, 0.266092, 0.265993,
    0.14631, 0.0926466, 0.111319, 0.0970383, 0.043457, 0.0254869, 0.0295153, 0.0152111, 0.173023,
    0.270573, 0.134762, 0.0882988, 0.103001, 0.0994263, 0.0444107, 0.0293846, 0.0375938, 0.0194168,
    0.173134, 0.502653, 0.393144, 0.305279, 0.0735664, 0.0684084, 0.0588465, 0.191876, 0.703536,
    -0.881014, -3.25141, -3.03562, -2.79414, -2.55619, 0.166786, 0.213487, 0.248581, 0.266092,
    0.265993, 0.14631, 0.0926466, 0.111319, 0.0970383, 0.043457, 0.0254869, 0.0295153, 0.0152111,
    0.173023, 0.270573, 0.134762, 0.0882988, 0.103001, 0.0994263, 0.0444107, 0.0293846, 0.0375938,
    0.0194168, 0.173134,
)
_FEATURE_STD: tuple[float, ...] = (
    0.235911, 0.170264, 0.171753, 0.0679612, 0.0580098, 0.0506867, 0.357482, 0.650116, 0.493193,
    0.892188, 0.97675, 0.971312, 0.916616, 0.100972, 0.114499, 0.115657, 0.115776, 0.175266,
    0.0634223, 0.0509189, 0.0833743, 0.0850623, 0.0402684, 0.0263587, 0.0304337, 0.0206376,
    0.090425, 0.228542, 0.0989963, 0.0811684, 0.106153, 0.103724, 0.0623463, 0.0480787, 0.05382,
    0.0347288, 0.129699, 0.208421, 0.144642, 0.150625, 0.0381553, 0.0370894, 0.030298, 0.327016,
    0.592555, 0.421405, 0.692455, 0.746199, 0.793302, 0.836394, 0.0552567, 0.063601, 0.0681203,
    0.0761642, 0.139088, 0.0364044, 0.0296346, 0.052878, 0.0562095, 0.0250658, 0.0158483,
    0.0203908, 0.0145887, 0.0647338, 0.168684, 0.046071, 0.0369583, 0.0563967, 0.0554574,
    0.0308569, 0.0235342, 0.0274442, 0.0177325, 0.0808204,
)
# fmt: on


def _gabor_bank(orientations: int, sigma: float = 1.2, wavelength: float = 4.0) -> torch.Tensor:
    """Zero-mean even/odd Gabor pairs ``[2 * orientations, 1, k, k]`` (even first, then odd)."""
    radius = math.ceil(3 * sigma)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    envelope = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    kernels = []
    for wave in (torch.cos, torch.sin):
        for i in range(orientations):
            theta = math.pi * i / orientations
            u = xx * math.cos(theta) + yy * math.sin(theta)
            kernel = envelope * wave(2 * math.pi * u / wavelength)
            kernel = kernel - envelope * kernel.sum() / envelope.sum()  # flat regions give 0
            kernels.append(kernel / kernel.abs().sum())
    return torch.stack(kernels)[:, None].float()  # 2O 1 k k


def _group_weights(context: bool) -> torch.Tensor:
    weights = []
    for scale in (_PATCH_WEIGHT, 1.0) if context else (_PATCH_WEIGHT,):
        for group, names in _GROUPS:
            weights += [scale * _CONTEXT_WEIGHTS[group] / math.sqrt(len(names))] * len(names)
    return torch.tensor(weights)


class FilterBankBackbone(FrozenBackbone):
    """Parameter-free patch descriptor backbone (patch 8), the embedded default.

    Args:
        name: Registry name.
        context: Whether the 3x3-patch context channels are appended (default; ``False`` halves
            ``embed_dim``).

    Attributes:
        name: Registry name.
        embed_dim: Feature width (``len(FEATURE_NAMES)`` = 74 with context, 37 without).
        patch_size: 8.
        num_prefix_tokens: 0.
    """

    def __init__(self, name: str = "filterbank", context: bool = True):
        num_patch = len(_PATCH_NAMES)
        super().__init__(name, 2 * num_patch if context else num_patch, _PATCH, 0)
        self.context = bool(context)
        self.register_buffer("gabor", _gabor_bank(_ORIENTATIONS), persistent=False)
        self.register_buffer(
            "pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False
        )
        angles = torch.arange(_ORIENTATIONS) * (2 * math.pi / _ORIENTATIONS)
        self.register_buffer("harm_cos", torch.cos(angles).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("harm_sin", torch.sin(angles).view(1, -1, 1, 1), persistent=False)
        f_mean, f_std = torch.tensor(_FEATURE_MEAN), torch.tensor(_FEATURE_STD)
        if not self.context:
            f_mean, f_std = f_mean[:num_patch], f_std[:num_patch]
        scale = _group_weights(self.context) / f_std.clamp_min(1e-6)
        self.register_buffer("feature_mean", f_mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("feature_scale", scale.view(1, -1, 1, 1), persistent=False)
        self.freeze()

    def _lbp_histogram(self, log_lum: torch.Tensor, pool: int) -> torch.Tensor:
        """Per-patch histogram of riu2 LBP codes ``[B, 10, h, w]`` of a ``[B, 1, H', W']`` image."""
        batch, _, height, width = log_lum.shape
        padded = F.pad(log_lum, (1, 1, 1, 1), mode="replicate")
        threshold = log_lum + _LBP_THRESHOLD
        ring = ((0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0))  # circular order
        ones = torch.zeros_like(log_lum, dtype=torch.uint8)  # B 1 H' W'
        transitions = torch.zeros_like(ones)
        first = previous = None
        for dy, dx in ring:
            bit = padded[:, :, dy : dy + height, dx : dx + width] >= threshold  # B 1 H' W'
            ones += bit
            if previous is None:
                first = bit
            else:
                transitions += bit != previous
            previous = bit
        transitions += previous != first
        code = torch.where(transitions <= 2, ones, torch.full_like(ones, _LBP_CODES - 1))
        # Histogram per patch by one scatter (cheaper than a 10-channel one-hot map).
        h, w = height // pool, width // pool
        rows = torch.arange(height, device=code.device) // pool
        cols = torch.arange(width, device=code.device) // pool
        cell = (rows[:, None] * w + cols[None, :]).view(1, -1)  # 1 H'W'
        index = code.view(batch, -1).long() * (h * w) + cell  # B H'W'
        counts = torch.zeros(batch, _LBP_CODES * h * w, device=code.device)
        counts.scatter_add_(1, index, torch.ones_like(index, dtype=counts.dtype))
        return counts.view(batch, _LBP_CODES, h, w) / (pool * pool)  # B 10 h w

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unstandardised descriptor channels (``FEATURE_NAMES`` order).

        Args:
            images: ``[B, 3, H, W]`` ImageNet-normalised, sides multiples of 8.

        Returns:
            ``[B, C, H/8, W/8]``: the patch channels, then (with ``context``) their 3x3 averages.
        """
        # Buffers may have been cast with the module (.half()); the descriptor is computed in fp32.
        rgb = (images.float() * self.pixel_std.float() + self.pixel_mean.float()).clamp(0.0, 1.0)
        mean_rgb = F.avg_pool2d(rgb, _PATCH)  # B 3 h w
        std_rgb = (F.avg_pool2d(rgb * rgb, _PATCH) - mean_rgb**2).clamp_min(0.0).sqrt()
        log_rgb = torch.log(mean_rgb + _LOG_EPS)  # B 3 h w
        opp_rg = log_rgb[:, 0:1] - log_rgb[:, 1:2]
        opp_yb = log_rgb[:, 0:1] + log_rgb[:, 1:2] - 2 * log_rgb[:, 2:3]
        lum = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]  # B 1 H W
        log_lum = torch.log(lum + _LOG_EPS)  # a brightness gain becomes an offset
        log_lum_patch = torch.log(F.avg_pool2d(lum, _PATCH) + _LOG_EPS)

        gabor = self.gabor.float()
        harm_cos, harm_sin = self.harm_cos.float(), self.harm_sin.float()
        pad = gabor.shape[-1] // 2
        level_image = log_lum
        log_energy, anisotropy = [], []
        for level in range(_LEVELS):
            if level:
                level_image = F.avg_pool2d(level_image, 2)
            padded = F.pad(level_image, (pad, pad, pad, pad), mode="replicate")
            response = F.conv2d(padded, gabor)  # B 2O H' W'
            even, odd = response[:, :_ORIENTATIONS], response[:, _ORIENTATIONS:]
            energy = (even**2 + odd**2).sqrt()  # B O H' W'
            pool = _PATCH >> level
            if pool > 1:
                energy = F.avg_pool2d(energy, pool)  # B O h w
            mean_energy = energy.mean(dim=1, keepdim=True) + _ENERGY_EPS  # B 1 h w
            re = (energy * harm_cos).sum(dim=1, keepdim=True)
            im = (energy * harm_sin).sum(dim=1, keepdim=True)
            log_energy.append(torch.log(mean_energy))
            anisotropy.append((re**2 + im**2).sqrt() / (_ORIENTATIONS * mean_energy))

        lbp = [
            self._lbp_histogram(log_lum if lv == 0 else F.avg_pool2d(log_lum, 2**lv), _PATCH >> lv)
            for lv in range(_LBP_LEVELS)
        ]
        patch = torch.cat(
            [mean_rgb, std_rgb, opp_rg, opp_yb, log_lum_patch, *log_energy, *anisotropy, *lbp],
            dim=1,
        )  # B C h w
        if not self.context:
            return patch
        context = F.avg_pool2d(F.pad(patch, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return torch.cat([patch, context], dim=1)  # B 2C h w

    def extract(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        features = self.raw_features(images)  # B D h w
        features = (features - self.feature_mean.float()) * self.feature_scale.float()
        return features.to(images.dtype)


def feature_statistics(images: Iterable[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of the raw descriptor over images.

    This is how the fixed standardisation constants were measured; it is not used at run time.

    Args:
        images: Batches ``[B, 3, H, W]`` (ImageNet-normalised, sides multiples of 8).

    Returns:
        ``(mean, std)`` lists of ``len(FEATURE_NAMES)`` floats.
    """
    model = FilterBankBackbone()
    total = torch.zeros(len(FEATURE_NAMES), dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    count = 0
    with torch.no_grad():
        for batch in images:
            raw = model.raw_features(batch).double()  # B C h w
            total += raw.sum(dim=(0, 2, 3))
            total_sq += (raw**2).sum(dim=(0, 2, 3))
            count += raw.shape[0] * raw.shape[2] * raw.shape[3]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
