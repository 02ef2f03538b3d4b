"""Many-to-one (majority) matching for over-clustering (PiCIE / HP protocol), and the
``method.eval.overcluster`` setting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cause_lightning.core.bounds import check_overcluster
from cause_lightning.metrics import UnsupervisedSegmentationMetrics, majority_assignment

IGNORE = 255


def _maps(confusion: list[list[int]], ignored: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(preds, target) ``[1, 1, N]`` whose confusion is exactly ``confusion``, plus ignored pixels
    predicted as the last cluster."""
    target, preds = [], []
    for c, row in enumerate(confusion):
        for k, count in enumerate(row):
            target += [c] * count
            preds += [k] * count
    target += [IGNORE] * ignored
    preds += [len(confusion[0]) - 1] * ignored
    return torch.tensor(preds).view(1, 1, -1), torch.tensor(target).view(1, 1, -1)


def _score(confusion: list[list[int]], ignored: int = 0) -> dict:
    preds, target = _maps(confusion, ignored)
    metric = UnsupervisedSegmentationMetrics(3, len(confusion[0]), matching="majority")
    metric.update(preds, target)
    return metric.compute()


def test_known_answer_with_an_empty_cluster():
    confusion = [
        [10, 0, 5, 0, 0],
        [0, 8, 1, 0, 0],
        [2, 0, 0, 6, 0],
    ]  # cluster 4 covers only ignored pixels: it matches no class
    out = _score(confusion, ignored=7)
    assert out["assignment"].tolist() == [0, 1, 0, 2, -1]
    # class 0 <- clusters {0, 2}: TP 15, FP 1 + 2, FN 0; class 1: 8 / (8 + 1); class 2: 6 / (6 + 2)
    expected = [15 / 18, 8 / 9, 6 / 8]
    np.testing.assert_allclose(out["per_class_iou"].numpy(), expected)
    assert out["mIoU"] == pytest.approx(sum(expected) / 3)
    assert out["pAcc"] == pytest.approx(29 / 32)
    assert out["matching"] == "majority" and out["num_clusters"] == 5
    assert out["confusion"].tolist() == confusion


def test_class_that_no_cluster_matches_scores_zero():
    confusion = [
        [10, 0, 0, 0],
        [0, 5, 0, 0],
        [3, 2, 0, 0],
    ]  # class 2 never wins a cluster; clusters 2 and 3 cover nothing
    out = _score(confusion)
    assert out["assignment"].tolist() == [0, 1, -1, -1]
    np.testing.assert_allclose(out["per_class_iou"].numpy(), [10 / 13, 5 / 7, 0.0])
    assert out["pAcc"] == pytest.approx(15 / 20)


def test_ties_go_to_the_lowest_class_and_absent_classes_are_nan():
    assert majority_assignment(np.array([[0, 3, 0], [0, 3, 4], [0, 0, 0]])).tolist() == [-1, 0, 1]
    out = _score([[4, 0, 0, 0], [0, 0, 6, 0], [0, 0, 0, 0]])  # class 2 absent, never predicted
    assert math.isnan(float(out["per_class_iou"][2]))
    assert out["mIoU"] == pytest.approx(1.0)


def test_majority_beats_or_equals_hungarian_and_agrees_on_a_permutation():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 16, 16), generator=g)
    split = torch.randint(0, 2, target.shape, generator=g)  # each class split over 2 clusters
    preds = 2 * target + split
    hungarian = UnsupervisedSegmentationMetrics(3, 6)
    majority = UnsupervisedSegmentationMetrics(3, 6, matching="majority")
    hungarian.update(preds, target)
    majority.update(preds, target)
    assert majority.compute()["mIoU"] == pytest.approx(1.0)  # many-to-one recovers every class
    assert hungarian.compute()["mIoU"] < 0.75
    permuted = UnsupervisedSegmentationMetrics(3, 3, matching="majority")
    one_to_one = UnsupervisedSegmentationMetrics(3, 3)
    for metric in (permuted, one_to_one):
        metric.update((target + 1) % 3, target)
    assert permuted.compute()["mIoU"] == one_to_one.compute()["mIoU"] == pytest.approx(1.0)


def test_unknown_matching_is_refused():
    with pytest.raises(ValueError, match="matching='best'"):
        UnsupervisedSegmentationMetrics(3, 6, matching="best")


def test_overcluster_setting_is_validated(compose):
    assert compose().method.eval.overcluster == []
    assert check_overcluster([108, 54], 27) == [54, 108]
    assert check_overcluster(None, 27) == []
    with pytest.raises(ValueError, match=r"greater than data.num_classes=27.*\[27\]"):
        check_overcluster([54, 27], 27)
    with pytest.raises(ValueError, match="offending"):
        check_overcluster([True], 0)
    with pytest.raises(ValueError, match="repeats"):
        check_overcluster([54, 54], 27)
    cfg = compose("data=cocostuff27", "method.eval.overcluster=[20]")
    from cause_lightning.config import derive

    with pytest.raises(ValueError, match="overcluster"):
        derive(cfg, patch_size=16)
    derive(compose("data=cocostuff27", "method.eval.overcluster=[54]"), patch_size=16)
