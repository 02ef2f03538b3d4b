"""Cluster probe: class centroids in the head's reduced space (docs/method.md §6.1, §7).

The centroids (reference name ``cluster_probe``) are fitted in stage 3 with the modularity loss; at
evaluation a pixel's cluster is the centroid of highest cosine similarity, and the CRF consumes
``log_softmax(alpha * cos)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClusterProbe"]


class ClusterProbe(nn.Module):
    """Learnable class centroids ``[C, R]`` compared to head features by cosine similarity.

    Args:
        num_classes: Number of clusters C.
        reduced_dim: Head output width R (90 in the reference).

    Attributes:
        centroids: Parameter ``[C, R]``, initialised uniform(-1/C, +1/C), never re-normalised in
            place.
    """

    def __init__(self, num_classes: int, reduced_dim: int = 90) -> None:
        super().__init__()
        if num_classes <= 0 or reduced_dim <= 0:
            raise ValueError(
                f"num_classes and reduced_dim must be positive, got {num_classes} and {reduced_dim}"
            )
        self.num_classes = num_classes
        self.reduced_dim = reduced_dim
        bound = 1.0 / num_classes
        self.centroids = nn.Parameter(torch.empty(num_classes, reduced_dim).uniform_(-bound, bound))

    def cosine(self, features: Tensor) -> Tensor:
        """Cosine similarity of every pixel to every centroid.

        Args:
            features: Head features ``[B, R, h, w]`` (un-normalised).

        Returns:
            ``[B, C, h, w]`` cosine similarities in [-1, 1].

        Raises:
            ValueError: If ``features`` is not ``[B, R, h, w]``.
        """
        if features.ndim != 4 or features.shape[1] != self.reduced_dim:
            raise ValueError(
                f"ClusterProbe expects head features [B, {self.reduced_dim}, h, w], got "
                f"{tuple(features.shape)}"
            )
        feats = F.normalize(features, dim=1)  # B R h w
        cents = F.normalize(self.centroids, dim=1).to(feats.dtype)  # C R
        return torch.einsum("brhw,cr->bchw", feats, cents)

    def forward(self, features: Tensor, alpha: float = 3.0) -> Tensor:
        """Cluster log-probabilities ``log_softmax(alpha * cos)`` over the C clusters.

        Args:
            features: Head features ``[B, R, h, w]``.
            alpha: Inverse temperature (3 in the reference).

        Returns:
            ``[B, C, h, w]`` log-probabilities.
        """
        return F.log_softmax(alpha * self.cosine(features), dim=1)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, reduced_dim={self.reduced_dim}"
