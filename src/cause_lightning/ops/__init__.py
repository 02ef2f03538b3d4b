"""Pure tensor operations of CAUSE (docs/method.md §3, §4.2, §5.6; docs/api.md, ``ops``), one
module per subject: ``sampling``, ``concepts``, ``modularity``, ``contrastive``, ``kmeans`` (the
k-means baselines and the probe's seeding), ``pixels`` (image normalisation) and ``numerics``.

* :func:`grid_sample_tokens`: one token per non-overlapping ``window x window`` cell (method §3);
  :func:`grid_sample_index` draws its offsets.
* :func:`nearest_concept`: cosine nearest clusterbook row of every token.
* :func:`modularity_loss`: minus the batch mean of the soft graph modularity (method §4.2), computed
  with the monotonic-tanh identity and a chunked running maximum, so no ``[B, K, N, N]`` tensor is
  ever built.
* :func:`concept_contrastive_terms` / :func:`concept_contrastive_loss`: the concept-wise InfoNCE of
  stage 2 (method §5.6), in-batch term plus concept-bank term.

The losses run in at least float32 with autocast disabled: similarity logits and graph weights are
accumulated in full precision whatever the caller's AMP setting, which keeps them equal to the
literal formulas. Products that feed a threshold, an argmax or a maximum run at the ``"highest"``
float32 matmul precision (:func:`exact_matmul`) whatever the process-wide setting.
Nothing here touches Lightning, I/O or a specific device.
"""

from cause_lightning.ops.concepts import nearest_concept
from cause_lightning.ops.contrastive import (
    DEFAULT_CONTRASTIVE_MEMORY_BYTES,
    concept_contrastive_loss,
    concept_contrastive_terms,
    contrastive_mean,
)
from cause_lightning.ops.modularity import modularity_loss
from cause_lightning.ops.numerics import exact_matmul
from cause_lightning.ops.sampling import grid_sample_index, grid_sample_tokens

__all__ = [
    "DEFAULT_CONTRASTIVE_MEMORY_BYTES",
    "concept_contrastive_loss",
    "concept_contrastive_terms",
    "contrastive_mean",
    "exact_matmul",
    "grid_sample_index",
    "grid_sample_tokens",
    "modularity_loss",
    "nearest_concept",
]
