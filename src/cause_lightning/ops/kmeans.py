"""Label-free baselines reported beside CAUSE: spherical k-means on raw backbone features.

The k-means centroids are used exactly like the cluster probe's centroids (cosine logits,
bilinear upsampling, argmax, dataset-level Hungarian), so the comparison is made by the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["spherical_kmeans", "spherical_kmeans_plus_plus"]


def spherical_kmeans(
    points: torch.Tensor,
    num_clusters: int,
    iterations: int = 30,
    seed: int = 0,
    chunk_size: int = 65536,
    restarts: int = 1,
) -> torch.Tensor:
    """Cosine k-means with k-means++ seeding, keeping the best of several restarts.

    Args:
        points: ``[N, D]`` feature vectors (normalised inside).
        num_clusters: k.
        iterations: Lloyd iterations per restart.
        seed: Seed of the k-means++ draws (same seed -> same centroids on every process).
        chunk_size: Points per chunk of the assignment step (bounds memory).
        restarts: Independent k-means++ seedings; the one with the highest objective (sum of
            each point's cosine to its centroid) is returned. One draw can settle in a local
            optimum that merges two clusters, which moves the baseline by several mIoU points
            from one seed to the next.

    Returns:
        Unit-norm centroids ``[k, D]``.

    Raises:
        ValueError: With fewer points than clusters or fewer than one restart.
    """
    if points.ndim != 2:
        raise ValueError(f"points must be [N, D], got shape {tuple(points.shape)}")
    if points.shape[0] < num_clusters:
        raise ValueError(f"k-means needs at least {num_clusters} points, got {points.shape[0]}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")
    x = F.normalize(points.float(), dim=1)  # N D
    generator = torch.Generator(device="cpu").manual_seed(seed)
    best, best_objective = None, -float("inf")
    for _ in range(restarts):
        centroids = _lloyd(x, _kmeans_plus_plus(x, num_clusters, generator), iterations, chunk_size)
        objective = sum(float((chunk @ centroids.T).amax(1).sum()) for chunk in x.split(chunk_size))
        if objective > best_objective:
            best, best_objective = centroids, objective
    return best


def spherical_kmeans_plus_plus(
    points: torch.Tensor, num_clusters: int, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ seeding on cosine distance: spread-out unit seeds drawn from the points.

    The first seed is uniform; each next one is drawn with probability proportional to the squared
    cosine distance to the nearest seed so far. The draws use only ``generator`` (a CPU
    generator), so the same generator state gives the same seeds on every process.

    Args:
        points: ``[N, D]`` feature vectors (normalised inside).
        num_clusters: k.
        generator: CPU generator of the draws.

    Returns:
        Unit-norm seeds ``[k, D]`` (rows of the normalised points).

    Raises:
        ValueError: With fewer points than clusters or points that are not ``[N, D]``.
    """
    if points.ndim != 2:
        raise ValueError(f"points must be [N, D], got shape {tuple(points.shape)}")
    if num_clusters < 1 or points.shape[0] < num_clusters:
        raise ValueError(
            f"k-means++ needs at least num_clusters={num_clusters} >= 1 points, "
            f"got {points.shape[0]}"
        )
    return _kmeans_plus_plus(F.normalize(points.float(), dim=1), num_clusters, generator)


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeds on cosine distance ``[k, D]`` (spread-out seeds make Lloyd stable)."""

    def draw(weights: torch.Tensor) -> int:
        if weights.sum() <= 0:
            return int(torch.randint(x.shape[0], (1,), generator=generator))
        return int(torch.multinomial((weights / weights.sum()).cpu(), 1, generator=generator))

    seeds = [x[draw(torch.ones(x.shape[0]))]]
    distance = 1 - x @ seeds[0]  # N
    for _ in range(1, k):
        seeds.append(x[draw(distance.clamp_min(0) ** 2)])
        distance = torch.minimum(distance, 1 - x @ seeds[-1])
    return torch.stack(seeds)  # k D


def _lloyd(x: torch.Tensor, c: torch.Tensor, iterations: int, chunk_size: int) -> torch.Tensor:
    """Spherical Lloyd iterations from centroids ``c [k, D]`` on unit points ``x [N, D]``."""
    for _ in range(iterations):
        assignment = torch.cat([(chunk @ c.T).argmax(1) for chunk in x.split(chunk_size)])  # N
        sums = torch.zeros_like(c).index_add_(0, assignment, x)  # k D
        counts = torch.bincount(assignment, minlength=c.shape[0])
        # An empty cluster keeps its centroid rather than collapsing to zero.
        c = F.normalize(torch.where(counts[:, None] > 0, sums, c), dim=1)
    return c
