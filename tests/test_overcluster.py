"""Over-clustering evaluation (``method.eval.overcluster``): k-centroid probes fitted beside the
C-centroid probe in stage 3, k-means baselines with k clusters, many-to-one rows in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cause_lightning.artifacts.io import MissingArtifactError, load_artifact
from cause_lightning.config import stage_module
from cause_lightning.core.specs import builtin_head_spec
from cause_lightning.models import LinearProbe, build_backbone, build_head
from cause_lightning.modules.evaluate import EvalModule
from cause_lightning.modules.probe import ProbeModule
from cause_lightning.run import run


def _parts(num_classes: int, reduced_dim: int):
    backbone = build_backbone("tiny_vit")
    head = build_head(builtin_head_spec("mlp", backbone.embed_dim, reduced_dim, 0.1))
    return backbone, head, LinearProbe(reduced_dim, num_classes)


def _eval_module(overcluster: dict[int, torch.Tensor], **kwargs) -> EvalModule:
    """An eval module with C=2 classes, head width R=3 and the raw variant."""
    backbone, head, linear = _parts(num_classes=2, reduced_dim=3)
    return stage_module(
        "eval",
        backbone,
        head=head,
        centroids=torch.randn(2, 3),
        linear=linear,
        num_classes=2,
        variants=["raw"],
        crf_runner=None,
        overcluster=overcluster,
        **kwargs,
    )


def test_k_centroid_probe_scores_many_to_one_with_a_cluster_that_matches_no_class() -> None:
    eye = torch.eye(3)
    # Cluster 3 points away from every pixel: it wins none and matches no class.
    centroids = torch.stack([eye[0], eye[1], eye[2], -eye.sum(0)])  # k=4 R=3
    module = _eval_module({4: centroids}, baselines=False)
    # Class 0 (left half) is split over clusters 0 and 1; class 1 (right half) is cluster 2,
    # except one pixel that looks like cluster 0.
    labels = torch.tensor([[0, 0, 1, 1]] * 4).unsqueeze(0)  # 1 4 4
    cluster = torch.tensor([[0, 1, 2, 2]] * 4)
    cluster[0, 2] = 0
    grid = eye[cluster].permute(2, 0, 1).unsqueeze(0)  # 1 R 4 4, the label size: no resampling
    module._overcluster_step({"": grid}, labels)
    rows = module._overcluster_rows("cluster")
    assert list(rows) == ["overcluster_k4/cluster/raw"]
    scores = rows["overcluster_k4/cluster/raw"].compute()
    assert scores["assignment"].tolist() == [0, 0, 1, -1]
    # class 0: TP 8 (clusters 0 and 1), FP 1 (the class-1 pixel in cluster 0); class 1: TP 7, FN 1
    assert scores["per_class_iou"].tolist() == pytest.approx([8 / 9, 7 / 8])
    assert scores["mIoU"] == pytest.approx((8 / 9 + 7 / 8) / 2)
    assert scores["pAcc"] == pytest.approx(15 / 16)


def test_k_centroid_probe_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match=r"k=4 have shape \(5, 3\), expected \(4, 3\)"):
        _eval_module({4: torch.randn(5, 3)})


def _probe(overcluster: list[int], init: str = "reference") -> ProbeModule:
    backbone, head, linear = _parts(num_classes=4, reduced_dim=8)
    return stage_module(
        "probe",
        backbone,
        head=head,
        linear=linear,
        lr=4e-3,
        cluster_lr=4e-3,
        num_classes=4,
        init=init,
        restarts=3,
        overcluster=overcluster,
        debug_checks=True,
    )


def test_extra_centroid_sets_leave_the_class_probe_as_it_was_and_export_the_best() -> None:
    torch.manual_seed(0)
    alone = _probe([])
    torch.manual_seed(0)
    both = _probe([9, 6])
    # Seeded generators of their own: the C-centroid start (global RNG) is untouched.
    assert torch.equal(alone.centroids, both.centroids)
    assert both.overcluster_counts == [6, 9]
    assert tuple(both.overcluster["k9"].shape) == (3, 9, 8)
    assert both.overcluster["k9"].abs().max() <= 1 / 9
    assert "overcluster" not in alone.export()
    objectives = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.2, 0.1]], dtype=torch.float64)
    both.overcluster_objectives.copy_(objectives)
    both.scored.fill_(True)
    records = both.export()["overcluster"]
    assert [r["num_clusters"] for r in records] == [6, 9]
    assert [r["fit"]["kept"] for r in records] == [1, 0]
    assert torch.equal(records[0]["centroids"], both.overcluster["k6"][1])
    assert records[1]["fit"]["objectives"] == pytest.approx([0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="overcluster"):
        _probe([4])  # not above the class count


def test_overcluster_run_writes_many_to_one_rows(tiny, tmp_path: Path) -> None:
    for stage in ("mediator", "head"):
        run(tiny(f"stage={stage}", "head=mlp"))
    restarts = "method.probe.restarts=2"
    alone_path = run(tiny("stage=probe", "head=mlp", restarts))["artifacts/probe"]
    alone = load_artifact(alone_path, "probe", "probe")
    path = run(tiny("stage=probe", "head=mlp", restarts, "method.eval.overcluster=[12]"))[
        "artifacts/probe"
    ]
    record = load_artifact(path, "probe", "probe")
    # The extra sets leave the C-centroid probe exactly as a run without them fits it.
    assert torch.equal(record["centroids"], alone["centroids"]) and record["fit"] == alone["fit"]
    evaluate = ("stage=eval", "head=mlp", restarts, "method.eval.variants=[raw]")
    # A probe fitted without a count is another probe: the stage to run is named before any work.
    with pytest.raises(MissingArtifactError, match=r"stage=probe.*module\.overcluster"):
        run(tiny(*evaluate, "method.eval.overcluster=[12,18]"))
    (entry,) = record["overcluster"]
    assert entry["num_clusters"] == 12 and entry["centroids"].shape == (12, 90)
    assert entry["fit"]["kept"] == max(range(2), key=entry["fit"]["objectives"].__getitem__)
    results = run(tiny(*evaluate, "method.eval.overcluster=[12]"))
    report = json.loads(Path(results["artifacts/metrics"]).read_text())
    for row in ("cluster/raw", "baseline/kmeans", "baseline/kmeans_head"):
        name = f"overcluster_k12/{row}"
        assert 0.0 <= results[f"test/{name}/mIoU"] <= 1.0, name
        assert report["metrics"][f"test/{name}/pAcc"] == results[f"test/{name}/pAcc"]
        assignment = report["details"][f"details/{name}/assignment"]
        assert len(assignment) == 12 and set(assignment) <= set(range(-1, 6))
    assert report["overcluster"]["counts"] == [12]
    assert report["overcluster"]["cluster_probe"]["12"] == entry["fit"]
    assert report["metrics"]["test/cluster/raw/mIoU"] == results["test/cluster/raw/mIoU"]


def test_probe_checkpoints_record_the_counts_only_when_set(tiny) -> None:
    from cause_lightning.stages.context import RunContext

    def signature(*overrides: str) -> dict:
        return RunContext(tiny(*overrides)).settings("probe")

    # The probe stage fits the over-clustering centroids too: its module receives the counts.
    assert signature()["method.probe.module.overcluster"] == []
    assert signature("method.eval.overcluster=[18,12]")["method.probe.module.overcluster"] == [
        18,
        12,
    ]


def test_too_few_tokens_for_the_k_cluster_baselines_name_the_settings() -> None:
    module = _eval_module({4: torch.randn(4, 3)})
    width = int(module.backbone.embed_dim)
    module._token_samples = {
        "kmeans": [torch.randn(3, width)],
        "kmeans_head": [torch.randn(3, 3)],
    }
    with pytest.raises(ValueError, match=r"overcluster_k4/kmeans baseline sampled 3 tokens for 4"):
        module._fit_kmeans()
    assert module.kmeans_centroids["kmeans"].shape == (2, width)


@pytest.mark.slow
@pytest.mark.ddp
def test_overcluster_rows_under_ddp_equal_one_process(tiny) -> None:
    for stage in ("mediator", "head"):
        run(tiny(f"stage={stage}", "head=mlp"))
    counts = ("method.eval.overcluster=[12]", "method.probe.restarts=2")
    run(tiny("stage=probe", "head=mlp", *counts))
    evaluate = ("stage=eval", "head=mlp", "method.eval.variants=[raw,flip]", *counts)
    fp32 = "trainer.precision=32-true"  # the same arithmetic in both runs
    single = run(tiny(*evaluate, fp32))
    ddp = run(
        tiny(*evaluate, fp32, "trainer=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2")
    )
    # The probe rows sum their confusions over the processes: the same numbers as one process.
    for row in ("cluster/raw", "cluster/flip"):
        key = f"test/overcluster_k12/{row}/mIoU"
        assert ddp[key] == pytest.approx(single[key]), key
    for row in ("baseline/kmeans", "baseline/kmeans_head"):
        assert 0.0 <= ddp[f"test/overcluster_k12/{row}/mIoU"] <= 1.0, row
