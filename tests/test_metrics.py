"""Tests of UnsupervisedSegmentationMetrics and remap_clusters (docs/protocol.md §5)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from cause_lightning.metrics import UnsupervisedSegmentationMetrics, remap_clusters

IGNORE = 255


def _pixels_from_confusion(
    confusion: np.ndarray, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build (preds, target) maps [1, 1, N] whose confusion matrix is exactly ``confusion``."""
    target, preds = [], []
    for c, k in itertools.product(range(confusion.shape[0]), range(confusion.shape[1])):
        target += [c] * int(confusion[c, k])
        preds += [k] * int(confusion[c, k])
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed))
    return (
        torch.tensor(preds, dtype=torch.long)[order].view(1, 1, -1),
        torch.tensor(target, dtype=torch.long)[order].view(1, 1, -1),
    )


def _scores_for_mapping(confusion: np.ndarray, cluster_of: dict[int, int]) -> dict[str, float]:
    """Straightforward per-class IoU / pAcc for a given class -> cluster map (protocol.md §5)."""
    total = confusion.sum()
    ious, tps = [], 0
    for c in range(confusion.shape[0]):
        k = cluster_of.get(c)
        tp = confusion[c, k] if k is not None else 0
        fn = confusion[c].sum() - tp
        fp = (confusion[:, k].sum() - tp) if k is not None else 0
        denom = tp + fp + fn
        ious.append(tp / denom if denom else math.nan)
        tps += tp
    valid = [x for x in ious if not math.isnan(x)]
    return {"mIoU": sum(valid) / len(valid), "pAcc": tps / total, "ious": ious}


def _random_maps(
    num_classes: int, num_clusters: int, shape: tuple[int, ...], seed: int, p_correct: float = 0.6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy predictions of a hidden class -> cluster permutation, plus some ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, shape, generator=g)
    perm = torch.randperm(num_clusters, generator=g)[:num_classes]
    noise = torch.randint(0, num_clusters, shape, generator=g)
    keep = torch.rand(shape, generator=g) < p_correct
    preds = torch.where(keep, perm[target], noise)
    target[torch.rand(shape, generator=g) < 0.1] = IGNORE
    return preds, target


def test_permuted_predictions_are_perfect() -> None:
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 5, (3, 16, 16), generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    metric = UnsupervisedSegmentationMetrics(num_classes=5)
    metric.update(perm[target], target)
    out = metric.compute()
    assert out["mIoU"] == pytest.approx(1.0)
    assert out["pAcc"] == pytest.approx(1.0)
    assert out["precision_mean"] == pytest.approx(1.0)
    # assignment maps cluster -> class, i.e. the inverse permutation
    assert torch.equal(out["assignment"][perm], torch.arange(5))
    assert torch.equal(remap_clusters(perm[target], out["assignment"]), target)


def test_hand_computed_square_example() -> None:
    confusion = np.array([[3, 1], [2, 4]])
    preds, target = _pixels_from_confusion(confusion)
    metric = UnsupervisedSegmentationMetrics(num_classes=2)
    metric.update(preds, target)
    out = metric.compute()
    # identity matching; IoU0 = 3/(3+2+1), IoU1 = 4/(4+1+2); precision 3/5, 4/5
    assert out["assignment"].tolist() == [0, 1]
    assert out["per_class_iou"].tolist() == pytest.approx([0.5, 4 / 7])
    assert out["mIoU"] == pytest.approx((0.5 + 4 / 7) / 2)
    assert out["pAcc"] == pytest.approx(0.7)
    assert out["precision_mean"] == pytest.approx(0.7)
    assert torch.equal(out["confusion"], torch.as_tensor(confusion))
    assert out["num_clusters"] == 2


def test_rectangular_extra_clusters_count_as_errors() -> None:
    # class 0 -> cluster 0 (5), class 1 -> cluster 1 (4); cluster 2 is unmatched
    confusion = np.array([[5, 0, 2], [1, 4, 1]])
    preds, target = _pixels_from_confusion(confusion)
    metric = UnsupervisedSegmentationMetrics(num_classes=2, num_clusters=3)
    metric.update(preds, target)
    out = metric.compute()
    assert out["assignment"].tolist() == [0, 1, -1]
    # FN include the unmatched cluster's pixels: IoU0 = 5/(5+1+2), IoU1 = 4/(4+0+2)
    assert out["per_class_iou"].tolist() == pytest.approx([5 / 8, 4 / 6])
    assert out["mIoU"] == pytest.approx((5 / 8 + 4 / 6) / 2)
    assert out["pAcc"] == pytest.approx(9 / 13)
    # dropping the extra cluster's pixels (STEGO convention) would give 9/10
    assert out["pAcc"] != pytest.approx(9 / 10)
    remapped = remap_clusters(torch.tensor([0, 1, 2]), out["assignment"])
    assert remapped.tolist() == [0, 1, IGNORE]


def test_more_classes_than_clusters() -> None:
    # class 2 gets no cluster: its pixels are all FN, IoU 0
    confusion = np.array([[6, 1], [0, 5], [2, 3]])
    preds, target = _pixels_from_confusion(confusion)
    metric = UnsupervisedSegmentationMetrics(num_classes=3, num_clusters=2)
    metric.update(preds, target)
    out = metric.compute()
    assert out["assignment"].tolist() == [0, 1]
    expected = _scores_for_mapping(confusion, {0: 0, 1: 1})
    assert out["per_class_iou"].tolist() == pytest.approx(expected["ious"])
    assert out["per_class_iou"][2] == 0.0
    assert out["pAcc"] == pytest.approx(11 / 17)


def test_absent_class_rules() -> None:
    # class 2 absent and its cluster unused -> NaN and excluded from the mean
    metric = UnsupervisedSegmentationMetrics(num_classes=3)
    preds, target = _pixels_from_confusion(np.array([[4, 1, 0], [1, 3, 0], [0, 0, 0]]))
    metric.update(preds, target)
    out = metric.compute()
    assert math.isnan(out["per_class_iou"][2])
    assert out["mIoU"] == pytest.approx((4 / 6 + 3 / 5) / 2)
    # class 2 absent but its matched cluster predicted -> IoU 0, counted in the mean
    metric = UnsupervisedSegmentationMetrics(num_classes=3)
    preds, target = _pixels_from_confusion(np.array([[4, 1, 2], [1, 3, 0], [0, 0, 0]]))
    metric.update(preds, target)
    out = metric.compute()
    assert out["assignment"].tolist() == [0, 1, 2]
    assert out["per_class_iou"][2] == 0.0
    assert out["mIoU"] == pytest.approx((4 / 8 + 3 / 5 + 0.0) / 3)


@pytest.mark.parametrize("num_classes", [2, 3, 4, 5, 6])
def test_brute_force_square_matches_hungarian(num_classes: int) -> None:
    preds, target = _random_maps(
        num_classes, num_classes, (2, 24, 24), seed=num_classes, p_correct=0.3
    )
    metric = UnsupervisedSegmentationMetrics(num_classes=num_classes)
    metric.update(preds, target)
    out = metric.compute()
    valid = target != IGNORE
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (target[valid].numpy(), preds[valid].numpy()), 1)
    scored = []
    for perm in itertools.permutations(range(num_classes)):  # perm[c] = cluster of class c
        scored.append((sum(confusion[c, perm[c]] for c in range(num_classes)), perm))
    scored.sort(reverse=True)
    best, best_perm = scored[0]
    assert out["pAcc"] == pytest.approx(best / confusion.sum())
    assert scored[1][0] < best, "test data must have a unique optimum"
    expected = _scores_for_mapping(confusion, dict(enumerate(best_perm)))
    assert out["mIoU"] == pytest.approx(expected["mIoU"])
    assert [int(out["assignment"][best_perm[c]]) for c in range(num_classes)] == list(
        range(num_classes)
    )


@pytest.mark.parametrize(("num_classes", "num_clusters"), [(2, 4), (3, 5), (4, 6), (4, 3)])
def test_brute_force_rectangular_matches_hungarian(num_classes: int, num_clusters: int) -> None:
    preds, target = _random_maps(
        min(num_classes, num_clusters), num_clusters, (2, 20, 20), seed=7 * num_clusters
    )
    if num_classes > num_clusters:  # add pixels of the surplus classes
        target[0, :3] = torch.arange(num_classes)[-1]
    metric = UnsupervisedSegmentationMetrics(num_classes=num_classes, num_clusters=num_clusters)
    metric.update(preds, target)
    out = metric.compute()
    valid = target != IGNORE
    confusion = np.zeros((num_classes, num_clusters), dtype=np.int64)
    np.add.at(confusion, (target[valid].numpy(), preds[valid].numpy()), 1)
    n_match = min(num_classes, num_clusters)
    scored = []
    for classes in itertools.permutations(range(num_classes), n_match):
        for clusters in itertools.permutations(range(num_clusters), n_match):
            if classes != tuple(sorted(classes)):
                continue  # each class subset once, in sorted order
            scored.append(
                (sum(confusion[c, k] for c, k in zip(classes, clusters)), classes, clusters)
            )
    scored.sort(reverse=True)
    best, classes, clusters = scored[0]
    assert scored[1][0] < best, "test data must have a unique optimum"
    assert out["pAcc"] == pytest.approx(best / confusion.sum())
    expected = _scores_for_mapping(confusion, dict(zip(classes, clusters)))
    assert out["mIoU"] == pytest.approx(expected["mIoU"])
    assert (out["assignment"] >= 0).sum() == n_match


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_miou_equals_torchmetrics_jaccard_on_remapped(seed: int) -> None:
    num_classes = 6
    preds, target = _random_maps(num_classes, num_classes, (4, 20, 20), seed=seed)
    if seed == 1:
        target[target == 3] = IGNORE  # class 3 absent from labels, still predicted -> IoU 0
    if seed == 2:
        # class 4 absent and its cluster never predicted -> NaN here, skipped by torchmetrics
        cluster_of_4 = preds[target == 4].mode().values
        target[target == 4] = IGNORE
        preds[preds == cluster_of_4] = (cluster_of_4 + 1) % num_classes
    metric = UnsupervisedSegmentationMetrics(num_classes=num_classes)
    metric.update(preds, target)
    out = metric.compute()
    remapped = remap_clusters(preds, out["assignment"])
    jaccard = MulticlassJaccardIndex(num_classes=num_classes, average="macro", ignore_index=IGNORE)
    assert out["mIoU"] == pytest.approx(float(jaccard(remapped, target)), abs=1e-6)
    if seed == 2:
        assert torch.isnan(out["per_class_iou"]).sum() == 1


def test_ignore_pixels_change_nothing() -> None:
    preds, target = _random_maps(4, 5, (2, 16, 16), seed=3)
    base = UnsupervisedSegmentationMetrics(num_classes=4, num_clusters=5)
    base.update(preds, target)
    g = torch.Generator().manual_seed(9)
    extra_preds = torch.randint(0, 5, (2, 16, 8), generator=g)
    extra_target = torch.full((2, 16, 8), IGNORE)
    extra_target[0, 0, :4] = torch.tensor([-1, 4, 7, 254])  # outside [0, C): ignored as well
    padded = UnsupervisedSegmentationMetrics(num_classes=4, num_clusters=5)
    padded.update(torch.cat([preds, extra_preds], -1), torch.cat([target, extra_target], -1))
    a, b = base.compute(), padded.compute()
    assert torch.equal(a["confusion"], b["confusion"])
    assert a["mIoU"] == b["mIoU"] and a["pAcc"] == b["pAcc"]


def test_two_halves_sum_equals_one_pass() -> None:
    # The halves prefer different matchings, so only summing counts (not averaging scores) agrees.
    first = _pixels_from_confusion(np.array([[9, 0, 0], [0, 2, 5], [0, 4, 1]]), seed=1)
    second = _pixels_from_confusion(np.array([[1, 8, 0], [0, 0, 9], [7, 0, 0]]), seed=2)
    full = UnsupervisedSegmentationMetrics(num_classes=3)
    full.update(torch.cat([first[0], second[0]], -1), torch.cat([first[1], second[1]], -1))
    expected = full.compute()

    rank0 = UnsupervisedSegmentationMetrics(num_classes=3)
    rank1 = UnsupervisedSegmentationMetrics(num_classes=3)
    rank0.update(*first)
    rank1.update(*second)
    # compute() caches its result, so score the halves on clones
    per_half = [rank0.clone().compute()["mIoU"], rank1.clone().compute()["mIoU"]]
    assert abs(sum(per_half) / 2 - expected["mIoU"]) > 1e-3

    manual = UnsupervisedSegmentationMetrics(num_classes=3)
    manual.update(torch.zeros(0, 1, 1, dtype=torch.long), torch.zeros(0, 1, 1, dtype=torch.long))
    manual.confusion = rank0.confusion + rank1.confusion  # what dist_reduce_fx="sum" does
    rank0.merge_state(rank1)
    for merged in (rank0.compute(), manual.compute()):
        assert torch.equal(merged["confusion"], expected["confusion"])
        assert torch.equal(merged["assignment"], expected["assignment"])
        assert merged["mIoU"] == pytest.approx(expected["mIoU"])
        assert merged["pAcc"] == pytest.approx(expected["pAcc"])


def test_state_is_sum_reduced_long_and_resets() -> None:
    metric = UnsupervisedSegmentationMetrics(num_classes=3, num_clusters=4)
    assert metric.confusion.dtype == torch.long
    assert tuple(metric.confusion.shape) == (3, 4)
    assert metric._reductions["confusion"] is not None  # sum across processes
    metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    assert int(metric.confusion.sum()) == 4
    metric.reset()
    assert int(metric.confusion.sum()) == 0


def test_update_accepts_2d_and_int_dtypes() -> None:
    metric = UnsupervisedSegmentationMetrics(num_classes=2)
    metric.update(
        torch.tensor([[1, 0]], dtype=torch.uint8), torch.tensor([[0, 1]], dtype=torch.int32)
    )
    assert metric.compute()["confusion"].tolist() == [[0, 1], [1, 0]]


def test_compute_without_data_gives_nan() -> None:
    metric = UnsupervisedSegmentationMetrics(num_classes=2)
    with pytest.warns(UserWarning):
        out = metric.compute()
    assert math.isnan(out["mIoU"]) and math.isnan(out["pAcc"])


@pytest.mark.parametrize(
    ("preds", "target", "error"),
    [
        (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), TypeError),  # float preds
        (torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4), TypeError),  # float target
        (np.zeros((1, 4, 4), dtype=np.int64), torch.zeros(1, 4, 4, dtype=torch.long), TypeError),
        (
            torch.zeros(1, 4, 4, dtype=torch.long),
            torch.zeros(1, 4, 5, dtype=torch.long),
            ValueError,
        ),
        (
            torch.zeros(1, 3, 4, 4, dtype=torch.long),
            torch.zeros(1, 3, 4, 4, dtype=torch.long),
            ValueError,
        ),
        (torch.full((1, 2, 2), 3), torch.zeros(1, 2, 2, dtype=torch.long), ValueError),  # id >= K
        (torch.full((1, 2, 2), -1), torch.zeros(1, 2, 2, dtype=torch.long), ValueError),  # id < 0
    ],
)
def test_bad_update_inputs_raise(preds: object, target: object, error: type[Exception]) -> None:
    metric = UnsupervisedSegmentationMetrics(num_classes=3)
    with pytest.raises(error):
        metric.update(preds, target)  # type: ignore[arg-type]
    assert int(metric.confusion.sum()) == 0


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="ignore_index"):
        UnsupervisedSegmentationMetrics(num_classes=3, ignore_index=1)
    with pytest.raises(ValueError):
        UnsupervisedSegmentationMetrics(num_classes=0)
    with pytest.raises(ValueError):
        UnsupervisedSegmentationMetrics(num_classes=3, num_clusters=0)
    with pytest.raises(TypeError):
        UnsupervisedSegmentationMetrics(num_classes=3.0)  # type: ignore[arg-type]
    UnsupervisedSegmentationMetrics(num_classes=3, ignore_index=-1)  # outside [0, C): allowed


def test_remap_clusters_numpy_and_errors() -> None:
    assignment = torch.tensor([2, -1, 0])
    out = remap_clusters(np.array([[0, 1], [2, 2]]), assignment, ignore_index=99)
    assert isinstance(out, np.ndarray)
    assert out.tolist() == [[2, 99], [0, 0]]
    with pytest.raises(ValueError):
        remap_clusters(torch.tensor([3]), assignment)
    with pytest.raises(TypeError):
        remap_clusters(torch.tensor([0.0]), assignment)


def test_forward_returns_batch_scores_and_accumulates() -> None:
    metric = UnsupervisedSegmentationMetrics(num_classes=3)
    preds, target = _random_maps(3, 3, (2, 8, 8), seed=5)
    batch = metric(preds, target)
    assert 0.0 <= batch["mIoU"] <= 1.0
    metric(preds, target)
    assert int(metric.compute()["confusion"].sum()) == 2 * int((target != IGNORE).sum())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    preds, target = _random_maps(5, 7, (2, 32, 32), seed=11)
    cpu = UnsupervisedSegmentationMetrics(num_classes=5, num_clusters=7)
    gpu = UnsupervisedSegmentationMetrics(num_classes=5, num_clusters=7).to("cuda")
    cpu.update(preds, target)
    gpu.update(preds.cuda(), target.cuda())
    a, b = cpu.compute(), gpu.compute()
    assert torch.equal(a["confusion"], b["confusion"])
    assert a["mIoU"] == b["mIoU"]
