"""Label-free baselines reported beside CAUSE: spherical k-means on raw backbone features.

The k-means centroids are used exactly like the cluster probe's centroids (cosine logits,
bilinear upsampling, argmax, dataset-level Hungarian), so the comparison is made by the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["spherical_kmeans"]


def spherical_kmeans(
    points: torch.Tensor,
    num_clusters: int,
    iterations: int = 30,
    seed: int = 0,
    chunk_size: int = 65536,
) -> torch.Tensor:
    """Cosine k-means with k-means++ seeding.

    Args:
        points: ``[N, D]`` feature vectors (normalised inside).
        num_clusters: k.
        iterations: Lloyd iterations.
        seed: Seed of the k-means++ draws (same seed -> same centroids on every process).
        chunk_size: Points per chunk of the assignment step (bounds memory).

    Returns:
        Unit-norm centroids ``[k, D]``.

    Raises:
        ValueError: With fewer points than clusters.
    """
    if points.ndim != 2:
        raise ValueError(f"points must be [N, D], got shape {tuple(points.shape)}")
    if points.shape[0] < num_clusters:
        raise ValueError(f"k-means needs at least {num_clusters} points, got {points.shape[0]}")
    x = F.normalize(points.float(), dim=1)  # N D
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(weights: torch.Tensor) -> int:
        probabilities = (weights / weights.sum()).cpu() if weights.sum() > 0 else None
        if probabilities is None:
            return int(torch.randint(x.shape[0], (1,), generator=generator))
        return int(torch.multinomial(probabilities, 1, generator=generator))

    # k-means++ on cosine distance: spread-out seeds make the result stable.
    centroids = [x[draw(torch.ones(x.shape[0]))]]
    distance = 1 - x @ centroids[0]  # N
    for _ in range(1, num_clusters):
        centroids.append(x[draw(distance.clamp_min(0) ** 2)])
        distance = torch.minimum(distance, 1 - x @ centroids[-1])
    c = torch.stack(centroids)  # k D
    for _ in range(iterations):
        assignment = torch.cat([(chunk @ c.T).argmax(1) for chunk in x.split(chunk_size)])  # N
        sums = torch.zeros_like(c).index_add_(0, assignment, x)  # k D
        counts = torch.bincount(assignment, minlength=num_clusters)
        # An empty cluster keeps its centroid rather than collapsing to zero.
        updated = torch.where(counts[:, None] > 0, sums, c)
        c = F.normalize(updated, dim=1)
    return c
