"""The evaluation module: the CRF in a background pool, per-rank k-means token shares and the
hand-off of a spawned test run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cause_lightning.config import stage_module
from cause_lightning.core.specs import builtin_head_spec
from cause_lightning.inference.crf import CRFRunner, crf_available, dense_crf
from cause_lightning.models import LinearProbe, build_backbone, build_head
from cause_lightning.modules.evaluate import EvalModule

C = 4


def module(crf_runner: CRFRunner | None = None, **kwargs: object) -> EvalModule:
    torch.manual_seed(0)
    backbone = build_backbone("tiny_vit")
    head = build_head(builtin_head_spec("mlp", int(backbone.embed_dim), 8, 0.1)).eval()
    variants = ["raw", "flip", "crf", "flip_crf"] if crf_runner else ["raw", "flip"]
    return stage_module(
        "eval",
        backbone,
        head=head,
        centroids=torch.randn(C, 8),
        linear=LinearProbe(8, C),
        num_classes=C,
        variants=variants,
        crf_runner=crf_runner,
        kmeans_restarts=1,
        save_images=3,
        overcluster=None,
        **kwargs,
    )


def batches(count: int = 3, size: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        {
            "image": torch.randint(0, 256, (2, 3, size, size), generator=g, dtype=torch.uint8),
            "label": torch.randint(0, C, (2, size, size), generator=g, dtype=torch.uint8),
            "index": torch.arange(2),
        }
        for _ in range(count)
    ]


def evaluate(eval_module: EvalModule, data: list[dict[str, torch.Tensor]]) -> None:
    eval_module.on_test_start()
    for i, batch in enumerate(data):
        batch = eval_module.on_before_batch_transfer(dict(batch), 0)
        eval_module.test_step(eval_module.on_after_batch_transfer(batch, 0), i)
    eval_module._drain(wait=True)


@pytest.mark.slow  # starts a worker pool
@pytest.mark.skipif(not crf_available(), reason="needs pydensecrf")
def test_background_crf_pool_scores_like_the_serial_crf() -> None:
    data = batches()
    results = {}
    for workers, in_flight in ((0, None), (2, 1)):  # in_flight=1: the loop waits on every batch
        with CRFRunner(num_workers=workers, timeout=120.0, iterations=2) as runner:
            eval_module = module(runner, crf_in_flight=in_flight)
            evaluate(eval_module, data)
        results[workers] = eval_module
    serial, pooled = results[0], results[2]
    for variant in ("crf", "flip_crf"):
        confusion = serial.cluster_metrics[variant].confusion
        assert int(confusion.sum()) == 3 * 2 * 32 * 32
        assert torch.equal(pooled.cluster_metrics[variant].confusion, confusion)
    assert not pooled._pending
    linear = [
        {k: float(v) for k, v in m.linear_metrics["crf"].compute().items()}
        for m in results.values()
    ]
    assert linear[0] == linear[1]
    for ex_serial, ex_pooled in zip(serial.examples, pooled.examples, strict=True):
        assert set(ex_pooled) == {"image", "label", "raw", "flip", "crf", "flip_crf"}
        for key in ex_serial:
            np.testing.assert_array_equal(ex_serial[key], ex_pooled[key])


class RecordingRunner(CRFRunner):
    """The serial runner, keeping what each submission handed over."""

    def __init__(self) -> None:
        super().__init__(num_workers=0, iterations=2)
        self.submissions: list[tuple[list[np.ndarray], list[list[np.ndarray]]]] = []

    def submit(self, images, logits, argmax=False):  # type: ignore[no-untyped-def]
        self.submissions.append((list(images), [list(maps) for maps in logits]))
        return super().submit(images, logits, argmax=argmax)


@pytest.mark.skipif(not crf_available(), reason="needs pydensecrf")
def test_each_image_crosses_once_and_scores_as_separate_crfs() -> None:
    runner = RecordingRunner()
    eval_module = module(runner)
    evaluate(eval_module, batches())
    assert len(runner.submissions) == 3  # one per batch, not one per CRF row
    confusions = {row: torch.zeros(C, C, dtype=torch.long) for row in ("crf", "flip_crf", "lin")}
    for (images, per_image), batch in zip(runner.submissions, batches(), strict=True):
        assert len(images) == 2 and all(len(maps) == 3 for maps in per_image)
        for image, maps, labels in zip(images, per_image, batch["label"].long(), strict=True):
            for row, unary in zip(confusions, maps, strict=True):  # crf, flip_crf, linear
                separate = torch.from_numpy(dense_crf(image, unary, iterations=2).argmax(0))
                flat = labels.flatten() * C + separate.flatten()
                confusions[row] += torch.bincount(flat, minlength=C * C).view(C, C)
    for variant in ("crf", "flip_crf"):
        assert torch.equal(eval_module.cluster_metrics[variant].confusion, confusions[variant])
    linear = eval_module.linear_metrics["crf"]["mIoU"].confmat  # torchmetrics: [target, pred]
    assert torch.equal(linear, confusions["lin"])
    assert (confusions["crf"] != confusions["flip_crf"]).any()


def test_linear_crf_can_be_switched_off() -> None:
    runner = CRFRunner(num_workers=0)
    assert "crf" in module(runner).linear_metrics
    assert "crf" not in module(runner, linear_crf=False).linear_metrics


def test_each_rank_samples_its_share_of_the_kmeans_budget() -> None:
    budget = 200
    shares = {}
    for world in (1, 2, 4):
        eval_module = module(kmeans_max_tokens=budget)
        eval_module.world = lambda w=world: (w, 0)  # noqa: B023 - a fixed world per module
        evaluate(eval_module, batches(count=8, size=64))
        sampled = sum(t.shape[0] for t in eval_module._token_samples["kmeans"])
        heads = sum(t.shape[0] for t in eval_module._token_samples["kmeans_head"])
        assert sampled == heads == math.ceil(budget / world)
        shares[world] = eval_module._token_samples["kmeans_head"][0]
        assert shares[world].shape[1] == 8  # head tokens, beside the backbone's
    eval_module.world = lambda: (1, 0)
    eval_module._fit_kmeans()
    assert eval_module.kmeans_centroids["kmeans"].shape == (C, eval_module.backbone.embed_dim)
    assert eval_module.kmeans_centroids["kmeans_head"].shape == (C, 8)


def test_outcome_of_a_run_elsewhere_is_received(tmp_path: Path) -> None:
    ran = module()
    evaluate(ran, batches(count=1))
    ran.results = {"test/cluster/raw/mIoU": 0.5}
    ran.kmeans_centroids = {"kmeans": torch.ones(C, 3)}
    handoff = tmp_path / "outcome.pt"
    torch.save(ran.outcome(), handoff)
    parent = module()  # its own loop never ran: it takes the outcome over
    parent.handoff = handoff
    parent.receive()
    assert parent.results == ran.results and not handoff.exists()
    assert torch.equal(parent.kmeans_centroids["kmeans"], torch.ones(C, 3))
    assert len(parent.examples) == 2 and set(parent.examples[0]) == {
        "image",
        "label",
        "raw",
        "flip",
    }
    torch.save({"results": {"other": 1.0}, "examples": [], "kmeans_centroids": {}}, handoff)
    ran.handoff = handoff
    ran.receive()  # a process that ran the loop keeps its own outcome
    assert ran.results == {"test/cluster/raw/mIoU": 0.5} and not handoff.exists()


def test_eval_step_under_bfloat16_autocast_scores_every_pixel() -> None:
    eval_module = module()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        evaluate(eval_module, batches(count=1))
    for metric in eval_module.cluster_metrics.values():
        assert int(metric.confusion.sum()) == 2 * 32 * 32


def test_setup_gives_each_process_private_metric_state() -> None:
    eval_module = module()
    state = eval_module.cluster_metrics["raw"].confusion
    state.share_memory_()  # as a spawning strategy hands it over
    eval_module.setup("test")
    assert not eval_module.cluster_metrics["raw"].confusion.is_shared()
