"""The soft graph modularity of stages 1 and 3 (method.md §4.2), computed with the
monotonic-tanh identity and a chunked running maximum, so no ``[B, K, N, N]`` tensor is built."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cause_lightning.ops.numerics import (
    autocast_off,
    check_codebook,
    check_tokens,
    compute_dtype,
    exact_matmul,
)

__all__ = ["modularity_loss"]

# Element budget of one [B, chunk, N, N] block of pairwise products in `modularity_loss`
# (8M float32 = 32 MiB); the default chunk over concepts is derived from it.
_MODULARITY_CHUNK_ELEMENTS = 1 << 23


def _default_modularity_chunk(batch: int, num_tokens: int, num_concepts: int) -> int:
    per_concept = max(1, batch * num_tokens * num_tokens)
    return max(1, min(num_concepts, _MODULARITY_CHUNK_ELEMENTS // per_concept))


def modularity_loss(
    tokens: Tensor,
    prototypes: Tensor,
    temperature: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Minus the batch mean of the soft modularity ``Q`` of each image's token graph.

    Per image (method §4.2): ``A = relu(x̂ x̂ᵀ)`` with a zero diagonal, ``d = A 1``,
    ``e = 1ᵀ A 1``, ``W = A - d dᵀ / e``, ``S = relu(x̂ ĉᵀ)``,
    ``δ_ij = max_k tanh(S_ik S_jk / τ)`` and ``Q = Σ_ij W_ij δ_ij / e`` including ``i = j``.

    Because ``S >= 0`` and tanh is increasing, ``δ = tanh(max_k S_ik S_jk / τ)``. The max-product
    ``G`` is found with a running maximum over chunks of concepts without gradient tracking; the
    winning products are then rebuilt from ``S`` by gathering the arg-max concept, so autograd
    routes the gradient to the arg-max element only (exactly the gradient of ``max``) and never
    stores a ``[B, K, N, N]`` tensor. Peak memory is ``B * N * N * chunk_size`` elements.

    Args:
        tokens: Token set ``[B, N, D]``; treated as constants (detached).
        prototypes: Prototype rows ``[K, D]`` (clusterbook or centroids); receive the gradient.
        temperature: ``τ > 0``.
        chunk_size: Concepts per block of the running maximum; ``None`` picks one that keeps a
            block near 8M elements. Results do not depend on it.

    Returns:
        Scalar loss (``-mean_b Q_b``) in at least float32. An image whose graph has no edges
        (``e = 0``, e.g. ``N = 1``) contributes ``Q = 0`` instead of the literal ``0 / 0``.

    Raises:
        ValueError: On malformed shapes, a dim mismatch, ``temperature <= 0`` or ``chunk_size < 1``.
    """
    check_tokens(tokens)
    check_codebook(prototypes, tokens.shape[-1], "prototypes")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
    batch, num_tokens, _ = tokens.shape
    num_concepts = prototypes.shape[0]
    if batch == 0:
        raise ValueError("modularity_loss needs at least one image (B = 0).")
    chunk = chunk_size or _default_modularity_chunk(batch, num_tokens, num_concepts)
    dtype = compute_dtype(tokens, prototypes)

    with autocast_off(tokens.device), exact_matmul():
        x = F.normalize(tokens.detach().to(dtype), dim=-1)  # B N D
        c = F.normalize(prototypes.to(device=tokens.device, dtype=dtype), dim=-1)  # K D

        # Graph of each image: constants, no gradient.
        affinity = torch.relu(x @ x.transpose(1, 2))  # B N N
        affinity.diagonal(dim1=1, dim2=2).zero_()
        degree = affinity.sum(dim=2)  # B N
        total = degree.sum(dim=1)  # B
        # A graph without edges has d = 0, so clamping e only turns 0/0 into 0.
        total = total.clamp_min(torch.finfo(dtype).tiny)
        weights = affinity - degree[:, :, None] * degree[:, None, :] / total[:, None, None]  # B N N

        assign = torch.relu(x @ c.T)  # B N K

        with torch.no_grad():
            assign_t = assign.detach().transpose(1, 2).contiguous()  # B K N
            best = assign.new_zeros(batch, num_tokens, num_tokens)  # B N N
            arg = torch.zeros(batch, num_tokens, num_tokens, dtype=torch.long, device=x.device)
            for start in range(0, num_concepts, chunk):
                block = assign_t[:, start : start + chunk]  # B c N
                products = block[:, :, :, None] * block[:, :, None, :]  # B c N N
                value, where = products.max(dim=1)  # B N N
                better = value > best
                best = torch.where(better, value, best)
                arg = torch.where(better, where + start, arg)
                del products, value, where, better

        # G_ij = S_{i,k*} S_{j,k*} with k* the arg-max concept of pair (i, j).
        left = torch.gather(assign, 2, arg)  # B N N: S[b, i, k*_ij]
        # B N N: S[b, j, k*_ij]
        right = torch.gather(assign, 2, arg.transpose(1, 2)).transpose(1, 2)
        delta = torch.tanh(left * right / temperature)  # B N N
        quality = (weights * delta).sum(dim=(1, 2)) / total  # B
        return -quality.mean()
