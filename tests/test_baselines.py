"""The k-means baseline: clustering quality, determinism and the best-of-restarts rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cause_lightning.ops.kmeans import spherical_kmeans


def _objective(points: torch.Tensor, centroids: torch.Tensor) -> float:
    return float((F.normalize(points, dim=1) @ centroids.T).amax(1).sum())


def _directions(num: int, dim: int, spread: float, per_cluster: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num, dim, generator=generator), dim=1)
    points = [
        centres[k] + spread * torch.randn(n, dim, generator=generator) / dim**0.5
        for k, n in enumerate(per_cluster)
    ]
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(per_cluster)])
    return torch.cat(points), labels


def test_recovers_separated_clusters_exactly():
    points, labels = _directions(4, 16, 0.2, [50, 80, 30, 60], seed=0)
    centroids = spherical_kmeans(points, 4, seed=0, restarts=5)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(4))
    assignment = (F.normalize(points, dim=1) @ centroids.T).argmax(1)
    # every true cluster maps to exactly one found cluster and vice versa
    pairs = {(int(a), int(b)) for a, b in zip(labels, assignment, strict=True)}
    assert len(pairs) == 4 and len({a for a, _ in pairs}) == len({b for _, b in pairs}) == 4


def test_restarts_keep_the_best_objective_of_the_single_draws():
    # Many small clusters: single k-means++ draws often merge two of them.
    points, _ = _directions(12, 8, 0.9, [40] * 12, seed=3)
    singles = [_objective(points, spherical_kmeans(points, 12, seed=s)) for s in range(8)]
    assert max(singles) - min(singles) > 1.0, singles  # the draws really differ
    best = _objective(points, spherical_kmeans(points, 12, seed=0, restarts=8))
    # The first restart is the single draw of the same seed; later ones can only improve on it.
    assert best >= singles[0] - 1e-4
    assert best >= sorted(singles)[len(singles) // 2] - 1e-4, (best, singles)


def test_same_seed_same_centroids_and_bad_arguments():
    points, _ = _directions(3, 8, 0.5, [20, 20, 20], seed=1)
    first = spherical_kmeans(points, 3, seed=7, restarts=3)
    assert torch.equal(first, spherical_kmeans(points, 3, seed=7, restarts=3))
    with pytest.raises(ValueError, match="restarts"):
        spherical_kmeans(points, 3, restarts=0)
    with pytest.raises(ValueError, match="at least 3 points"):
        spherical_kmeans(points[:2], 3)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        spherical_kmeans(points[None], 3)


def test_clusters_used_counts_clusters_with_pixels():
    from cause_lightning.reports.evaluation import clusters_used

    results = {
        "details/cluster/flip_crf/confusion": [[5, 0, 0], [3, 0, 2], [0, 0, 1]],  # C x K
        "details/baseline/kmeans/confusion": [[1, 1, 1], [0, 2, 0], [0, 0, 4]],
        "details/cluster/flip_crf/per_class_iou": [0.5, 0.0, 0.3],
        "test/cluster/flip_crf/mIoU": 0.27,
    }
    assert clusters_used(results) == {"cluster/flip_crf": 2, "baseline/kmeans": 3}
