"""The nearest concept of every token: the cosine-nearest clusterbook row (method.md §5.2)."""

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

__all__ = ["nearest_concept"]

# Element budget of one [rows, K] similarity block in `nearest_concept`.
_NEAREST_CHUNK_ELEMENTS = 1 << 24


@torch.no_grad()
def nearest_concept(tokens: Tensor, clusterbook: Tensor) -> Tensor:
    """Index of the most cosine-similar clusterbook row for every token.

    Args:
        tokens: Token set ``[B, N, D]``.
        clusterbook: Concept rows ``[K, D]`` (raw; normalised here).

    Returns:
        Long tensor ``[B, N]`` with values in ``[0, K)``; ties go to the lowest index.

    Raises:
        ValueError: On malformed shapes or a dim mismatch.
    """
    check_tokens(tokens)
    check_codebook(clusterbook, tokens.shape[-1], "clusterbook")
    batch, num_tokens, dim = tokens.shape
    dtype = compute_dtype(tokens, clusterbook)
    with autocast_off(tokens.device), exact_matmul():
        flat = F.normalize(tokens.reshape(batch * num_tokens, dim).to(dtype), dim=-1)  # BN D
        concepts = F.normalize(clusterbook.to(device=tokens.device, dtype=dtype), dim=-1)  # K D
        rows = max(1, _NEAREST_CHUNK_ELEMENTS // concepts.shape[0])
        out = [(part @ concepts.T).argmax(dim=-1) for part in flat.split(rows)]  # BN
    if not out:
        return torch.empty(batch, num_tokens, dtype=torch.long, device=tokens.device)
    return torch.cat(out).view(batch, num_tokens)
