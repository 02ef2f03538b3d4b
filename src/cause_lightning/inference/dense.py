"""The inference path shared by the evaluation and the :class:`~cause_lightning.segmenter.Segmenter`
(docs/method.md §7, docs/protocol.md §4), as pure tensor functions:

    head features on the patch grid                      (the caller's encoder)
      -> optional horizontal-flip average on the grid    :func:`grid_features`
      -> bilinear upsampling (align_corners=False)        :func:`upsample_to`
      -> cosine with the centroids, in float32            :func:`cosine_logits`
         (or the linear probe's logits, in float32)       :func:`upsampled_logits`
      -> argmax, or ``log_softmax(scale * scores)``       :func:`crf_unaries`
         handed to a :class:`~cause_lightning.inference.crf.CRFRunner` with the
         pictures of :func:`crf_pixels`; its label maps  :func:`crf_labels`

Both callers go through these functions, so a batch gets the same labels from ``stage=eval`` and
from a saved segmenter. The CRF itself stays with the caller: the evaluation submits the unaries to
a process pool and collects them later, the segmenter waits for them.

No Lightning here: the functions take tensors (and an encoder callable) and return tensors.

Under ``torch.use_deterministic_algorithms(True)`` (``trainer.deterministic=true``), where CUDA has
no deterministic backward for ``F.interpolate(mode="bilinear")``, :func:`upsample_to` computes a
tensor that needs a gradient as two interpolation-matrix products (:func:`bilinear_matmul`), whose
backward is plain matmuls; every other call, the default path included, is ``F.interpolate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cause_lightning.inference.crf import denormalize_to_uint8
from cause_lightning.ops.pixels import normalize_uint8

__all__ = [
    "COSINE_CHUNK_ELEMENTS",
    "at_least_float32",
    "bilinear_matmul",
    "deterministic_backward",
    "cosine_argmax",
    "cosine_logits",
    "crf_labels",
    "crf_pixels",
    "crf_unaries",
    "grid_features",
    "log_probabilities",
    "upsample_to",
    "upsampled_logits",
]

# Upsampled features kept at once by `cosine_argmax` (floats): ~1 GiB in float32.
COSINE_CHUNK_ELEMENTS = 1 << 28


def deterministic_backward(tensor: Tensor) -> bool:
    """Whether ``tensor`` needs a gradient while deterministic algorithms are required.

    Then its backward must avoid the kernels PyTorch flags as nondeterministic on CUDA (bilinear
    upsampling, summed ``nll_loss2d``); in every other case the default kernels run.
    """
    return (
        torch.is_grad_enabled()
        and tensor.requires_grad
        and torch.are_deterministic_algorithms_enabled()
    )


def upsample_to(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling ``[B,C,h,w] -> [B,C,H,W]`` (align_corners=False, as the reference).

    ``F.interpolate``, except for a tensor that needs a gradient under deterministic algorithms
    (:func:`deterministic_backward`): :func:`bilinear_matmul` then, the same map with a
    deterministic backward.
    """
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    if deterministic_backward(features):
        return bilinear_matmul(features, size)
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def _interpolation_matrix(
    out_size: int, in_size: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``[out, in]`` weights of 1-D linear interpolation with align_corners=False.

    PyTorch's rule: source ``max((o + 0.5) * in / out - 0.5, 0)``, its floor and the next index
    (clamped to the last), weighted by the fractional part; computed in float64.
    """
    source = (torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5
    source = source.clamp_min(0.0)  # out
    low = source.floor().long().clamp_max(in_size - 1)  # out
    high = (low + 1).clamp_max(in_size - 1)  # out
    frac = (source - low).clamp(0.0, 1.0)  # out
    rows = torch.arange(out_size)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)  # out in
    weights.index_put_((rows, low), 1.0 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)  # at the last index both add up
    return weights.to(device=device, dtype=dtype)


def bilinear_matmul(features: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resizing (align_corners=False) as ``Wh @ X @ Ww^T``, with a deterministic backward.

    Bilinear interpolation is separable: each output row mixes two input rows and each output
    column two input columns, so it is the product with one ``[H, h]`` and one ``[W, w]`` matrix.
    It equals ``F.interpolate(features, size, mode="bilinear", align_corners=False)`` up to
    rounding, for up- and down-sampling; its backward is two matmuls, which need no atomic adds.
    Computed in at least float32 with autocast off (like :func:`upsampled_logits`).

    Args:
        features: ``[B, C, h, w]``.
        size: Output size ``(H, W)``.

    Returns:
        ``[B, C, H, W]``, float32 (float64 for float64 features).
    """
    dtype = at_least_float32(features)
    height, width = size
    rows = _interpolation_matrix(height, features.shape[-2], dtype, features.device)  # H h
    cols = _interpolation_matrix(width, features.shape[-1], dtype, features.device)  # W w
    with torch.autocast(features.device.type, enabled=False):
        return rows @ (features.to(dtype) @ cols.T)  # B C H W


def at_least_float32(tensor: Tensor) -> torch.dtype:
    """float32 for half inputs, the input's dtype for float32 and float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def grid_features(
    encode: Callable[[Tensor], Tensor],
    images: Tensor,
    flip: bool,
    plain: Tensor | None = None,
) -> Tensor:
    """Head features on the patch grid, averaged with those of the mirrored image when ``flip``.

    The mirrored image's features are flipped back on the token grid before the average (the
    reference averages there, before upsampling). The two images go through ``encode`` in two
    calls, so each one's features do not depend on the other's batch.

    Args:
        encode: Maps normalised images ``[B, 3, H, W]`` to features ``[B, R, h, w]`` (backbone
            then head, in eval mode).
        images: Normalised ``[B, 3, H, W]``.
        flip: Average with the horizontally flipped image.
        plain: ``encode(images)`` when the caller already has it (it is not recomputed).

    Returns:
        ``[B, R, h, w]`` un-normalised features.
    """
    plain = encode(images) if plain is None else plain  # B R h w
    if not flip:
        return plain
    mirrored = encode(images.flip(-1)).flip(-1)  # B R h w, back in the image's orientation
    return (plain + mirrored) / 2


def cosine_logits(features: Tensor, centroids: Tensor, size: tuple[int, int]) -> Tensor:
    """Cosine similarity of upsampled, per-pixel normalised features to normalised centroids.

    Computed in float32 whatever the autocast context or the features' precision, so near-tie
    argmaxes do not depend on the training precision.

    Args:
        features: ``[B, R, h, w]`` head (or backbone) features.
        centroids: ``[C, R]`` centroids (normalised here).
        size: Label size ``(H, W)``.

    Returns:
        ``[B, C, H, W]`` cosine similarities, float32 (float64 for float64 features).
    """
    dtype = at_least_float32(features)
    with torch.autocast(features.device.type, enabled=False):
        pixels = F.normalize(upsample_to(features.to(dtype), size), dim=1)  # B R H W
        return torch.einsum("brhw,cr->bchw", pixels, F.normalize(centroids.to(dtype), dim=1))


def cosine_argmax(
    features: Tensor,
    centroids: Tensor,
    size: tuple[int, int],
    max_elements: int = COSINE_CHUNK_ELEMENTS,
) -> Tensor:
    """Argmax of :func:`cosine_logits`, a few images at a time.

    The upsampled features of a whole batch of wide backbone features are large (768 channels at
    320x320 is 315 MB per image); chunks of images keep at most ``max_elements`` of them at once.
    Each image is computed exactly as in one call.

    Args:
        features: ``[B, R, h, w]`` features.
        centroids: ``[C, R]`` centroids.
        size: Label size ``(H, W)``.
        max_elements: Upsampled feature values allowed at once (at least one image is taken).

    Returns:
        ``[B, H, W]`` long cluster indices.
    """
    per_image = features.shape[1] * size[0] * size[1]
    step = max(1, max_elements // max(1, per_image))
    return torch.cat(
        [cosine_logits(chunk, centroids, size).argmax(1) for chunk in features.split(step)]
    )


def upsampled_logits(logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Grid logits (e.g. the linear probe's) upsampled to the label size in at least float32.

    Args:
        logits: ``[B, C, h, w]``, in the precision's dtype.
        size: Label size ``(H, W)``.

    Returns:
        ``[B, C, H, W]``, float32 (float64 for float64 logits).
    """
    with torch.autocast(logits.device.type, enabled=False):
        return upsample_to(logits.to(at_least_float32(logits)), size)


def log_probabilities(scores: Tensor, scale: float = 1.0) -> Tensor:
    """Class log-probabilities ``log_softmax(scale * scores)``: the CRF's input.

    Args:
        scores: ``[B, C, H, W]`` cosines (``scale`` = the CRF's ``alpha``) or logits (1).
        scale: Sharpness of the softmax.

    Returns:
        ``[B, C, H, W]``, in the scores' dtype.
    """
    return F.log_softmax(scale * scores, dim=1)


def crf_unaries(scores: Tensor, scale: float = 1.0) -> np.ndarray:
    """:func:`log_probabilities` as host float32 arrays, ready for ``CRFRunner.submit``.

    Args:
        scores: ``[B, C, H, W]`` cosines or logits.
        scale: Sharpness of the softmax.

    Returns:
        float32 ``[B, C, H, W]`` array, one ``[C, H, W]`` unary per image.
    """
    return log_probabilities(scores, scale).float().cpu().numpy()  # the one copy the CRF needs


def crf_pixels(images: Tensor) -> np.ndarray:
    """Host uint8 ``[B, H, W, 3]`` pictures for the CRF's bilateral kernel (and the report).

    The reference gives the CRF its normalised image de-normalised and truncated to uint8, which
    can be one level below the decoded pixel; uint8 batches go through the same round trip on the
    host so the CRF sees exactly the reference's picture.

    Args:
        images: Normalised ``[B, 3, H, W]``, or uint8 pixels as the data loaders give them.

    Returns:
        uint8 ``[B, H, W, 3]``.
    """
    if images.dtype == torch.uint8:
        images = normalize_uint8(images.cpu())
    return np.stack([denormalize_to_uint8(image) for image in images])


def crf_labels(maps: Sequence[np.ndarray], device: torch.device | str) -> Tensor:
    """Label maps returned by ``CRFRunner`` (``argmax=True``) as one long tensor.

    Args:
        maps: ``[H, W]`` integer maps, one per image.
        device: Where the labels go.

    Returns:
        ``[B, H, W]`` long.
    """
    return torch.from_numpy(np.stack(maps)).to(device).long()
