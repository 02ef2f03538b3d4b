"""The CAUSE stages through Hydra configs: chain via the artifact directory, errors, guards."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from cause_lightning.artifacts import (
    ArtifactError,
    MissingArtifactError,
    load_artifact,
    save_artifact,
)
from cause_lightning.modules.base import NonFiniteLossError
from cause_lightning.run import run
from cause_lightning.specs import BackboneRef, ModelSpec, Resolution
from tiny import TINY


@pytest.mark.parametrize("head", ["tr", "mlp"])
def test_stages_chain_through_artifacts(tiny, tmp_path: Path, head: str) -> None:
    for stage in ("mediator", "head", "probe"):
        results = run(tiny(f"stage={stage}", f"head={head}"))
        assert Path(
            results[f"artifacts/{'clusterbook' if stage == 'mediator' else stage}"]
        ).is_file()
    root = tmp_path / "artifacts" / "mosaic" / "tiny_vit"
    clusterbook = load_artifact(root / "clusterbook.pt", "clusterbook", "mediator")
    assert clusterbook["clusterbook"].shape == (32, 64)
    head_record = load_artifact(root / head / "head.pt", "head", "head")
    assert ModelSpec.from_meta(head_record["meta"]).head.name == f"{head.upper()}Head"
    assert head_record["meta"]["config"]["head"]["name"] == head  # resolved config inside
    results = run(tiny("stage=eval", f"head={head}", "method.eval.variants=[raw,flip]"))
    for key in (
        "test/cluster/raw/mIoU",
        "test/cluster/flip/pAcc",
        "test/linear/raw/mIoU",
        "test/baseline/kmeans/mIoU",
        "test/baseline/majority/pAcc",
    ):
        assert 0.0 <= results[key] <= 1.0, key
    report = json.loads((root / head / "metrics.json").read_text())
    assert report["unsupervised"] and report["record_variant"] == "flip"
    assert len(report["details"]["details/cluster/flip/per_class_iou"]) == 6
    used = report["clusters_used"]
    assert set(used) >= {"cluster/raw", "cluster/flip", "baseline/kmeans", "baseline/majority"}
    assert used["baseline/majority"] == 1 and all(1 <= n <= 6 for n in used.values())
    assert (root / head / "segmenter.pt").is_file()
    assert (tmp_path / "out" / "predictions" / "contact_sheet.png").is_file()
    assert (tmp_path / "out" / "config_resolved.yaml").is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["test/cluster/raw/mIoU"] >= 0


def test_stage_all_runs_every_step(tiny, tmp_path: Path) -> None:
    results = run(tiny("stage=all", "method.eval.variants=[raw]", "method.eval.baselines=false"))
    assert {"artifacts/clusterbook", "artifacts/head", "artifacts/probe"} <= set(results)
    assert "test/cluster/raw/mIoU" in results and results["objective"] is None


def test_mediator_stage_does_not_warn_about_its_unused_val_loader(tiny) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tiny("stage=mediator"))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "validation_step" in m], messages


def test_stage_before_its_prerequisite_names_the_stage(tiny) -> None:
    with pytest.raises(MissingArtifactError, match="stage=mediator"):
        run(tiny("stage=head"))
    with pytest.raises(MissingArtifactError, match="stage=head"):
        run(tiny("stage=probe"))


def test_clusterbook_of_another_backbone_is_rejected(tiny, tmp_path: Path) -> None:
    path = tmp_path / "artifacts" / "mosaic" / "tiny_vit" / "clusterbook.pt"
    save_artifact(path, "clusterbook", {"clusterbook": torch.zeros(32, 64), "meta": {}})
    with pytest.raises(ArtifactError, match="no readable model spec.*re-run stage=mediator"):
        run(tiny("stage=head"))
    spec = ModelSpec(BackboneRef("tiny_vit", None, {}, 64, 8), 6, 32, Resolution(64, 64))
    meta = {"spec": spec.to_dict()}
    save_artifact(path, "clusterbook", {"clusterbook": torch.zeros(32, 48), "meta": meta})
    with pytest.raises(ArtifactError, match="width"):
        run(tiny("stage=head"))
    other = dataclasses.replace(spec, backbone=BackboneRef("dino_vits8", None, {}, 64, 8))
    meta = {"spec": other.to_dict()}
    save_artifact(path, "clusterbook", {"clusterbook": torch.zeros(32, 64), "meta": meta})
    with pytest.raises(ArtifactError, match="backbone='dino_vits8'"):
        run(tiny("stage=head"))


def test_head_for_another_class_count_is_rejected(tiny) -> None:
    run(tiny("stage=mediator"))
    run(tiny("stage=head", "head=mlp"))
    with pytest.raises(ArtifactError, match="num_classes"):
        run(tiny("stage=probe", "head=mlp", "data.num_classes=5"))


def test_nan_loss_stops_with_step_and_cause(tiny) -> None:
    with pytest.raises(NonFiniteLossError, match="global step"):
        run(
            tiny(
                "stage=mediator",
                "+callbacks.fault._target_=faults.PoisonGradients",
                "+callbacks.fault.step=0",
            )
        )


def test_interrupted_stage_resumes_from_last_checkpoint(tiny, tmp_path: Path) -> None:
    with_checkpoints = [o for o in TINY if not o.startswith("callbacks=")]
    run(tiny("stage=mediator", "method.mediator.epochs=1", base=with_checkpoints))
    root = tmp_path / "artifacts" / "mosaic" / "tiny_vit"
    last = root / "checkpoints" / "mediator" / "last.ckpt"
    first = torch.load(last, map_location="cpu")  # default weights_only: no pickled objects
    assert first["global_step"] == 2 and not any(
        k.startswith("backbone.") for k in first["state_dict"]
    )
    run(tiny("stage=mediator", "method.mediator.epochs=2", "ckpt_path=last", base=with_checkpoints))
    second = torch.load(last, map_location="cpu")
    assert second["global_step"] == 4 and second["epoch"] > first["epoch"]


def test_mixed_precision_head_stage(tiny, tmp_path: Path) -> None:
    run(tiny("stage=mediator"))
    run(tiny("stage=head", "head=mlp", "trainer.precision=bf16-mixed"))
    record = load_artifact(tmp_path / "artifacts/mosaic/tiny_vit/mlp/head.pt", "head", "head")
    assert all(v.dtype == torch.float32 for v in record["head_state"].values())
    assert all(torch.isfinite(v).all() for v in record["head_state"].values())
