"""Unsupervised segmentation metrics: dataset-level Hungarian matching (docs/protocol.md §5).

A confusion matrix ``confusion[c, k]`` (ground-truth class ``c`` x predicted cluster ``k``) is
accumulated over the whole split, summed across processes under DDP, and matched to classes with
**one** Hungarian assignment at :meth:`UnsupervisedSegmentationMetrics.compute` (docs/method.md §7,
item 5; reference defect #9 of method.md §11 fixed: no per-batch re-solving, no device
assumptions).

Deviation from the STEGO-family metrics (docs/protocol.md §6, trap 1): clusters left unmatched
when ``num_clusters > num_classes`` are **not** dropped; their pixels count as false negatives of
their classes, so over-clustering cannot hide hard pixels. With ``num_clusters == num_classes``
the numbers equal the reference's.

The over-clustering protocol (PiCIE, HP) uses ``matching="majority"`` instead: many-to-one, each
cluster to the class it overlaps most (:func:`majority_assignment`).

The names of the evaluation's rows live here too: its variants (:data:`EVAL_VARIANTS`), the one a
report records (:func:`record_variant`) and the over-clustering rows (:func:`overcluster_row`).
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from cause_lightning.core.constants import IGNORE_INDEX
from cause_lightning.core.logs import get_logger

__all__ = [
    "EVAL_VARIANTS",
    "MATCHINGS",
    "OVERCLUSTER_PREFIX",
    "RECORD_PREFERENCE",
    "UnsupervisedSegmentationMetrics",
    "check_assignment",
    "majority_assignment",
    "overcluster_row",
    "record_variant",
    "remap_clusters",
    "remap_with_ignore",
    "supervised_metrics",
]

log = get_logger(__name__)

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)

MATCHINGS = ("hungarian", "majority")

#: The evaluation's cluster-probe variants, in the order they are computed and shown: plain,
#: with a horizontal flip averaged in, with a dense CRF, both (docs/protocol.md §5).
EVAL_VARIANTS = ("raw", "flip", "crf", "flip_crf")
#: The variant a report records, best first: the published protocol (flip + CRF), else the best
#: one the run computed (the CRF ones need pydensecrf).
RECORD_PREFERENCE = ("flip_crf", "flip", "crf", "raw")
#: Over-clustering rows are named ``<prefix><k>/<probe>/<variant>``.
OVERCLUSTER_PREFIX = "overcluster_k"


def record_variant(available: Any) -> str:
    """The variant a report records among ``available`` ones (:data:`RECORD_PREFERENCE`).

    Raises:
        ValueError: None of the variants is available.
    """
    found = next((v for v in RECORD_PREFERENCE if v in set(available)), None)
    if found is None:
        raise ValueError(f"no evaluation variant in {sorted(available)}: expected {EVAL_VARIANTS}")
    return found


def overcluster_row(num_clusters: int) -> str:
    """Prefix of the over-clustering rows with ``num_clusters`` clusters (``overcluster_k54``)."""
    return f"{OVERCLUSTER_PREFIX}{num_clusters}"


def supervised_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """mIoU / pAcc of a supervised (linear-probe) prediction: no matching, ignored pixels left
    out."""
    return MetricCollection(
        {
            "mIoU": MulticlassJaccardIndex(num_classes, average="macro", ignore_index=IGNORE_INDEX),
            "pAcc": MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE_INDEX),
        },
        prefix=prefix,
    )


def majority_assignment(confusion: Tensor | np.ndarray) -> Tensor:
    """Many-to-one matching: each cluster to the class it overlaps most.

    Args:
        confusion: ``[C, K]`` pixel counts (ground-truth class x predicted cluster).

    Returns:
        long ``[K]`` cluster -> class; ``-1`` for a cluster that covers no labelled pixel (it
        matches no class and predicts nothing). Ties go to the lowest class id.
    """
    conf = torch.as_tensor(
        np.asarray(confusion) if isinstance(confusion, np.ndarray) else confusion
    )
    conf = conf.detach().cpu().long()  # C K
    assignment = conf.argmax(0)  # first maximum: the lowest class id on ties
    return torch.where(conf.sum(0) > 0, assignment, torch.full_like(assignment, -1))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


class UnsupervisedSegmentationMetrics(Metric):
    """mIoU / pixel accuracy of cluster predictions after one dataset-level Hungarian matching.

    State: ``confusion`` long ``[num_classes, num_clusters]``, sum-reduced across processes.

    Pixel rules of :meth:`update`:

    * pixels whose target is ``ignore_index`` are skipped;
    * pixels whose target lies outside ``[0, num_classes)`` are skipped as well (the reference
      metric does the same), e.g. ``-1`` or a label id that a dataset maps to no class;
    * predictions must lie in ``[0, num_clusters)`` at *every* pixel (ignored ones included);
      anything else raises, because an out-of-range cluster id means a wrong cluster count.

    Definitions of :meth:`compute` (docs/protocol.md §5), with ``k(c)`` the cluster matched to class
    ``c``: ``TP_c = confusion[c, k(c)]``; ``FN_c = row_c - TP_c`` (includes pixels in unmatched
    clusters); ``FP_c = column_k(c) - TP_c``; ``IoU_c = TP/(TP+FP+FN)``, NaN when that is 0/0
    (class absent and its cluster unused); ``mIoU`` = mean of the non-NaN IoUs;
    ``pAcc = sum_c TP_c / total``. A class left without a cluster (``C > K``) has ``TP = FP = 0``.

    With ``matching="majority"`` every cluster goes to the class it overlaps most (several
    clusters may share a class; a cluster covering no labelled pixel matches none), the columns
    are summed per matched class into a ``[C, C]`` matrix, and the same definitions apply with
    ``k(c)`` the set of clusters matched to ``c``. A class no cluster matches has ``TP = FP = 0``.

    Args:
        num_classes: number of ground-truth classes ``C``.
        num_clusters: number of predicted clusters ``K`` (defaults to ``C``). ``K != C`` gives a
            rectangular matching: each class gets at most one cluster and vice versa.
        ignore_index: target value to skip. Must not be a valid class id.
        matching: ``"hungarian"`` (one-to-one, the default) or ``"majority"`` (many-to-one, the
            over-clustering protocol).
        **kwargs: forwarded to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Raises:
        TypeError: if a count is not an int.
        ValueError: if a count is < 1, ``ignore_index`` lies inside ``[0, num_classes)`` or
            ``matching`` is unknown.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confusion: Tensor

    def __init__(
        self,
        num_classes: int,
        num_clusters: int | None = None,
        ignore_index: int = IGNORE_INDEX,
        matching: str = "hungarian",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if matching not in MATCHINGS:
            raise ValueError(f"matching={matching!r}; use one of {MATCHINGS}")
        self.matching = matching
        self.num_classes = _check_int("num_classes", num_classes, 1)
        self.num_clusters = (
            self.num_classes
            if num_clusters is None
            else _check_int("num_clusters", num_clusters, 1)
        )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}.")
        if 0 <= ignore_index < self.num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a valid class id for "
                f"num_classes={self.num_classes}; choose a value outside [0, num_classes) "
                "(the project uses 255)."
            )
        self.ignore_index = int(ignore_index)
        self.add_state(
            "confusion",
            default=torch.zeros(self.num_classes, self.num_clusters, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add one batch to the confusion matrix.

        Args:
            preds: integer cluster ids ``[B, H, W]`` (a single ``[H, W]`` map is accepted too),
                values in ``[0, num_clusters)``.
            target: integer labels of the same shape; ``ignore_index`` and values outside
                ``[0, num_classes)`` are skipped.

        Raises:
            TypeError: if an input is not an integer tensor.
            ValueError: on a shape mismatch or a cluster id outside ``[0, num_clusters)``.
        """
        for name, value in (("preds", preds), ("target", target)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
            if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                raise TypeError(
                    f"{name} must hold integer ids, got dtype {value.dtype}. For logits or "
                    "probabilities [B, K, H, W] pass logits.argmax(1)."
                )
        if preds.shape != target.shape:
            raise ValueError(
                f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same "
                "shape [B, H, W]; upsample the predictions to label size first."
            )
        if preds.ndim not in (2, 3):
            raise ValueError(
                "expected [B, H, W] (or [H, W]) label maps, got "
                f"{preds.ndim} dims {tuple(preds.shape)}."
            )
        if preds.numel() == 0:
            return
        p_min, p_max = torch.stack(torch.aminmax(preds)).tolist()  # one host sync
        if p_min < 0 or p_max >= self.num_clusters:
            raise ValueError(
                f"preds hold cluster ids in [{p_min}, {p_max}] but "
                f"num_clusters={self.num_clusters} allows [0, {self.num_clusters - 1}]; "
                "build the metric with the right num_clusters."
            )
        preds = preds.reshape(-1).long()
        target = target.to(preds.device).reshape(-1).long()
        valid = (target >= 0) & (target < self.num_classes)  # also drops ignore_index
        flat = target[valid] * self.num_clusters + preds[valid]  # [n] in [0, C*K)
        counts = torch.bincount(flat, minlength=self.num_classes * self.num_clusters)
        self.confusion += counts.view(self.num_classes, self.num_clusters).to(self.confusion.device)

    def compute(self) -> dict[str, Any]:
        """Match clusters to classes once on the accumulated matrix and score the result.

        Returns:
            dict with ``mIoU``, ``pAcc``, ``precision_mean`` (python floats, fractions in
            [0, 1]; NaN when no pixel was counted), ``per_class_iou`` float64 ``[C]`` (NaN for
            classes absent from both the labels and their matched cluster), ``assignment`` long
            ``[num_clusters]`` (cluster -> class, -1 when unmatched), ``confusion`` long
            ``[C, num_clusters]`` (all tensors on the CPU), ``num_clusters`` (int) and
            ``matching``.
            ``precision_mean`` is the mean over classes of ``TP/(TP+FP)`` ignoring NaN (what the
            reference prints as "mAP").
        """
        confusion = self.confusion.detach().cpu().long()  # C K
        conf = confusion.double()
        if self.matching == "majority":
            assignment = majority_assignment(confusion)
            matched = assignment >= 0
            # Columns summed per matched class: C C, [c, c'] = pixels of c predicted as c'.
            merged = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64)
            merged.index_add_(1, assignment[matched], conf[:, matched])
            tp = merged.diagonal().clone()
            matched_col_sum = merged.sum(0)
        else:
            rows, cols = linear_sum_assignment(confusion.numpy(), maximize=True)
            rows_t = torch.as_tensor(rows, dtype=torch.long)
            cols_t = torch.as_tensor(cols, dtype=torch.long)
            assignment = torch.full((self.num_clusters,), -1, dtype=torch.long)
            assignment[cols_t] = rows_t
            tp = torch.zeros(self.num_classes, dtype=torch.float64)
            tp[rows_t] = conf[rows_t, cols_t]
            # A class without a cluster (C > K) predicts nothing: FP = 0, all its pixels are FN.
            matched_col_sum = torch.zeros(self.num_classes, dtype=torch.float64)
            matched_col_sum[rows_t] = conf[:, cols_t].sum(0)
        fn = conf.sum(1) - tp
        fp = matched_col_sum - tp

        iou = tp / (tp + fp + fn)  # 0/0 -> NaN
        precision = tp / (tp + fp)
        total = float(conf.sum())
        valid_iou = iou[~torch.isnan(iou)]
        valid_prec = precision[~torch.isnan(precision)]
        return {
            "mIoU": float(valid_iou.mean()) if valid_iou.numel() else math.nan,
            "pAcc": float(tp.sum()) / total if total > 0 else math.nan,
            "precision_mean": float(valid_prec.mean()) if valid_prec.numel() else math.nan,
            "per_class_iou": iou,
            "assignment": assignment,
            "confusion": confusion,
            "num_clusters": self.num_clusters,
            "matching": self.matching,
        }


def remap_clusters(
    preds: ArrayT, assignment: Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX
) -> ArrayT:
    """Map cluster ids to their matched class ids, e.g. to colour predictions with a class palette.

    Args:
        preds: integer cluster ids of any shape (tensor or numpy array), values in
            ``[0, len(assignment))``.
        assignment: ``[num_clusters]`` cluster -> class, -1 when unmatched (from
            :meth:`UnsupervisedSegmentationMetrics.compute`).
        ignore_index: value written for clusters without a class.

    Returns:
        class ids of the same shape and container type as ``preds`` (long / int64).

    Raises:
        TypeError: if ``preds`` is not an integer tensor / array.
        ValueError: if a cluster id lies outside ``[0, len(assignment))``.
    """
    is_numpy = isinstance(preds, np.ndarray)
    p = torch.from_numpy(preds) if is_numpy else preds
    if (
        not isinstance(p, Tensor)
        or p.is_floating_point()
        or p.is_complex()
        or p.dtype == torch.bool
    ):
        raise TypeError("preds must be an integer tensor or numpy array of cluster ids.")
    lut = torch.as_tensor(
        np.asarray(assignment) if isinstance(assignment, np.ndarray) else assignment
    )
    lut = lut.long().reshape(-1).to(p.device)
    lut = torch.where(lut >= 0, lut, torch.full_like(lut, ignore_index))
    if p.numel():
        p_min, p_max = torch.stack(torch.aminmax(p)).tolist()
        if p_min < 0 or p_max >= lut.numel():
            raise ValueError(
                f"cluster ids in [{p_min}, {p_max}] do not fit an assignment of "
                f"{lut.numel()} clusters."
            )
    out = lut[p.long()]
    return out.numpy() if is_numpy else out


def check_assignment(assignment: Any, num_clusters: int) -> list[int]:
    """Validate a cluster -> class table (-1 = unmatched) and return it as a list.

    Args:
        assignment: Length-``num_clusters`` integer table (sequence, array or tensor).
        num_clusters: C.

    Raises:
        ValueError: On a wrong length or values outside ``[-1, 255)``.
    """
    table = [int(v) for v in np.asarray(torch.as_tensor(assignment).cpu()).reshape(-1)]
    if len(table) != num_clusters:
        raise ValueError(f"assignment has {len(table)} entries for {num_clusters} clusters")
    if any(v < -1 or v >= IGNORE_INDEX for v in table):
        raise ValueError(f"assignment values must lie in [-1, {IGNORE_INDEX}), got {table}")
    return table


def remap_with_ignore(cluster_ids: ArrayT, assignment: list[int]) -> ArrayT:
    """Like :func:`remap_clusters`, but ignore ids (255) pass through instead of raising.

    Args:
        cluster_ids: Integer cluster ids in ``[0, C)`` or 255.
        assignment: Checked table (:func:`check_assignment`).

    Returns:
        Class ids, 255 where the cluster is unmatched or ignored; same container type.
    """
    lut = np.full(256, IGNORE_INDEX, dtype=np.int64)
    lut[: len(assignment)] = [IGNORE_INDEX if v < 0 else v for v in assignment]
    if isinstance(cluster_ids, Tensor):
        table = torch.as_tensor(lut, device=cluster_ids.device)
        return table[cluster_ids.long().clamp(0, 255)]
    ids = np.asarray(cluster_ids).astype(np.int64)
    return lut[np.clip(ids, 0, 255)]
