"""The parameter-free default backbone: colour statistics plus an oriented filter bank per patch.

No pretrained ViT weights can be had offline (docs/environment.md §4), and random ViT features are no better
than the trivial answer (§4.1), so the embedded default backbone is a hand-made patch descriptor with the
``FrozenBackbone`` interface (patch 8, ``[B, D, H/8, W/8]``). Per 8x8 patch it holds:

* colour: mean and standard deviation of the de-normalised RGB, the log-opponent chromaticity
  ``log R - log G`` and ``log R + log G - 2 log B`` (unchanged by a brightness gain), and log luminance;
* texture: Gabor quadrature energy on log luminance (so a brightness gain cancels) at 4 octaves (a
  pyramid of 2x average pools) and 6 orientations, summarised per octave by rotation-invariant numbers:
  log mean energy, the amplitudes of the orientation harmonics 1-3 relative to the mean (anisotropy; a
  90-degree rotation or a flip leaves them unchanged) and the log standard deviation of log luminance;
* context: the same colour and texture statistics averaged over the 3x3 neighbourhood of patches, so a
  texture whose period exceeds one patch is still recognisable.

Every channel is standardised with fixed constants (measured once on scikit-image pictures, see
``feature_statistics``), and the colour and texture groups are scaled to comparable total variance, so
Euclidean and cosine distances weigh them alike. Nothing is learned and nothing depends on the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from cause_lightning.models.backbones import FrozenBackbone

__all__ = ["FEATURE_NAMES", "FilterBankBackbone", "feature_statistics"]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_PATCH = 8
_LEVELS = 4
_ORIENTATIONS = 6
_LOG_EPS = 0.04  # keeps log luminance finite in black regions (about 10/255)
_ENERGY_EPS = 1e-3


def _gabor_bank(orientations: int, sigma: float = 1.2, wavelength: float = 4.0) -> torch.Tensor:
    """Zero-mean even/odd Gabor pairs ``[2 * orientations, 1, k, k]`` (even first, then odd)."""
    radius = math.ceil(3 * sigma)
    coords = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    kernels = []
    for part in ("even", "odd"):
        for i in range(orientations):
            theta = math.pi * i / orientations
            u = xx * math.cos(theta) + yy * math.sin(theta)
            envelope = torch.exp(-(xx**2 + yy**2) / (2 * sigma**2))
            wave = torch.cos if part == "even" else torch.sin
            kernel = envelope * wave(2 * math.pi * u / wavelength)
            kernel = kernel - envelope * kernel.sum() / envelope.sum()  # no response to flat regions
            kernel = kernel / kernel.abs().sum()
            kernels.append(kernel)
    return torch.stack(kernels)[:, None].float()  # 2O 1 k k


def _feature_names() -> list[str]:
    colour = ["mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "opp_rg", "opp_yb", "log_lum"]
    texture = []
    for level in range(_LEVELS):
        texture += [f"l{level}_{n}" for n in ("log_energy", "harm1", "harm2", "harm3")]
        if level < _LEVELS - 1:  # the coarsest level has one pixel per patch: no spread
            texture.append(f"l{level}_log_std")
    patch = colour + texture
    return patch + [f"ctx_{n}" for n in patch]


FEATURE_NAMES: tuple[str, ...] = tuple(_feature_names())
_NUM_COLOUR = 9

# Per-channel standardisation constants, measured with ``feature_statistics`` on scikit-image pictures
# (see ``_calibration_images``); fixed so that features never depend on the batch.
_FEATURE_MEAN: tuple[float, ...] | None = None
_FEATURE_STD: tuple[float, ...] | None = None


class FilterBankBackbone(FrozenBackbone):
    """Parameter-free patch descriptor backbone (patch 8), the embedded default.

    Args:
        name: Registry name.
        colour_weight: Relative weight of the colour group (per-image jitter of colour makes it less
            reliable than texture; 1 = equal total variance with the texture group).
        context: Whether the 3x3-patch context channels are included.

    Attributes:
        name: Registry name.
        embed_dim: Feature width (``len(FEATURE_NAMES)`` with context).
        patch_size: 8.
        num_prefix_tokens: 0.
    """

    def __init__(self, name: str = "filterbank", colour_weight: float = 1.0, context: bool = True):
        dim = len(FEATURE_NAMES) if context else len(FEATURE_NAMES) // 2
        super().__init__(name, dim, _PATCH, num_prefix_tokens=0)
        self.context = bool(context)
        self.colour_weight = float(colour_weight)
        self.register_buffer("gabor", _gabor_bank(_ORIENTATIONS), persistent=False)
        mean = torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        angles = torch.arange(_ORIENTATIONS) * (2 * math.pi / _ORIENTATIONS)
        harmonics = torch.arange(1, 4)[:, None] * angles[None]  # 3 O
        self.register_buffer("harm_cos", torch.cos(harmonics), persistent=False)
        self.register_buffer("harm_sin", torch.sin(harmonics), persistent=False)
        half = len(FEATURE_NAMES) // 2
        if _FEATURE_MEAN is not None and _FEATURE_STD is not None:
            f_mean = torch.tensor(_FEATURE_MEAN)
            f_std = torch.tensor(_FEATURE_STD)
        else:
            f_mean = torch.zeros(len(FEATURE_NAMES))
            f_std = torch.ones(len(FEATURE_NAMES))
        weight = torch.ones(len(FEATURE_NAMES))
        texture = half - _NUM_COLOUR
        # Equal total variance per group, whatever the channel counts.
        for offset in (0, half):
            weight[offset : offset + _NUM_COLOUR] = self.colour_weight / math.sqrt(_NUM_COLOUR)
            weight[offset + _NUM_COLOUR : offset + half] = 1.0 / math.sqrt(texture)
        if not self.context:
            f_mean, f_std, weight = f_mean[:half], f_std[:half], weight[:half]
        self.register_buffer("feature_mean", f_mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("feature_scale", (weight / f_std).view(1, -1, 1, 1), persistent=False)
        self.freeze()

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unstandardised descriptor channels (``FEATURE_NAMES`` order).

        Args:
            images: ``[B, 3, H, W]`` ImageNet-normalised, sides multiples of 8.

        Returns:
            ``[B, len(FEATURE_NAMES), H/8, W/8]`` (patch channels, then context channels).
        """
        rgb = (images.float() * self.pixel_std + self.pixel_mean).clamp(0.0, 1.0)  # B 3 H W
        pool = partial_pool = _PATCH
        mean_rgb = F.avg_pool2d(rgb, pool)  # B 3 h w
        sq_rgb = F.avg_pool2d(rgb * rgb, pool)
        std_rgb = (sq_rgb - mean_rgb**2).clamp_min(0.0).sqrt()  # B 3 h w
        log_rgb = torch.log(mean_rgb + _LOG_EPS)  # B 3 h w
        opp_rg = log_rgb[:, 0:1] - log_rgb[:, 1:2]
        opp_yb = log_rgb[:, 0:1] + log_rgb[:, 1:2] - 2 * log_rgb[:, 2:3]
        lum = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]  # B 1 H W
        log_lum_patch = torch.log(F.avg_pool2d(lum, pool) + _LOG_EPS)
        colour = [mean_rgb, std_rgb, opp_rg, opp_yb, log_lum_patch]

        texture = []
        level_image = torch.log(lum + _LOG_EPS)  # B 1 H W; a brightness gain becomes an offset
        pad = self.gabor.shape[-1] // 2
        for level in range(_LEVELS):
            if level:
                level_image = F.avg_pool2d(level_image, 2)
            padded = F.pad(level_image, (pad, pad, pad, pad), mode="replicate")
            response = F.conv2d(padded, self.gabor)  # B 2O H' W'
            even, odd = response[:, :_ORIENTATIONS], response[:, _ORIENTATIONS:]
            energy = (even**2 + odd**2).sqrt()  # B O H' W'
            size = partial_pool // (2**level)
            if size > 1:
                energy = F.avg_pool2d(energy, size)  # B O h w
                mean_l = F.avg_pool2d(level_image, size)
                sq_l = F.avg_pool2d(level_image**2, size)
            else:
                mean_l, sq_l = level_image, level_image**2
            total = energy.mean(dim=1, keepdim=True) + _ENERGY_EPS  # B 1 h w
            re = torch.einsum("ko,bohw->bkhw", self.harm_cos, energy)  # B 3 h w
            im = torch.einsum("ko,bohw->bkhw", self.harm_sin, energy)
            harm = (re**2 + im**2).sqrt() / (_ORIENTATIONS * total)  # B 3 h w
            texture += [torch.log(total), harm]
            if level < _LEVELS - 1:
                log_std = 0.5 * torch.log((sq_l - mean_l**2).clamp_min(0.0) + _ENERGY_EPS**2)
                texture.append(log_std)
        patch = torch.cat(colour + texture, dim=1)  # B C h w
        if not self.context:
            return patch
        ctx = F.avg_pool2d(
            F.pad(patch, (1, 1, 1, 1), mode="replicate"), 3, stride=1
        )  # B C h w; 3x3 patches
        return torch.cat([patch, ctx], dim=1)

    def extract(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        features = self.raw_features(images)
        features = (features - self.feature_mean) * self.feature_scale  # B D h w
        return features.to(images.dtype) if images.is_floating_point() else features


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
