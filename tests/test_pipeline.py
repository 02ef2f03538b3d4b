"""The CAUSE stages through Hydra configs: chain via the artifact directory, errors, guards."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from cause_lightning.artifacts.io import (
    ArtifactError,
    MissingArtifactError,
    load_artifact,
)
from cause_lightning.core.specs import BackboneRef, ModelSpec, Resolution
from cause_lightning.modules.base import NonFiniteLossError
from cause_lightning.run import run
from tiny import TINY


@pytest.mark.parametrize("head", ["tr", "mlp"])
def test_stages_chain_through_artifacts(tiny, tmp_path: Path, head: str) -> None:
    paths = {}
    for stage in ("mediator", "head", "probe"):
        results = run(tiny(f"stage={stage}", f"head={head}"))
        kind = "clusterbook" if stage == "mediator" else stage
        paths[kind] = Path(results[f"artifacts/{kind}"])
        assert paths[kind].is_file()
    # Each artifact sits in the directory of the one it was made from.
    assert paths["probe"].parent.parent == paths["head"].parent
    assert paths["head"].parent.parent == paths["clusterbook"].parent
    assert paths["head"].parent.name.startswith(f"{head}-")
    clusterbook = load_artifact(paths["clusterbook"], "clusterbook", "mediator")
    assert clusterbook["clusterbook"].shape == (32, 64)
    head_record = load_artifact(paths["head"], "head", "head")
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
    evaluated = Path(results["artifacts/metrics"]).parent
    assert evaluated.parent == paths["probe"].parent
    report = json.loads((evaluated / "metrics.json").read_text())
    assert report["unsupervised"] and report["record_variant"] == "flip"
    assert len(report["details"]["details/cluster/flip/per_class_iou"]) == 6
    used = report["clusters_used"]
    assert set(used) >= {"cluster/raw", "cluster/flip", "baseline/kmeans", "baseline/majority"}
    assert used["baseline/majority"] == 1 and all(1 <= n <= 6 for n in used.values())
    assert (evaluated / "segmenter.pt").is_file()
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
    run(tiny("stage=mediator"))
    with pytest.raises(MissingArtifactError, match="stage=head"):
        run(tiny("stage=probe"))


def test_a_damaged_clusterbook_is_refused(tiny) -> None:
    from cause_lightning.stages.context import RunContext

    context = RunContext(tiny("stage=head"))
    directory = context.target("mediator")
    settings = context.settings("mediator")

    def store(clusterbook: torch.Tensor, meta: dict) -> None:
        payload = {"clusterbook": clusterbook, "meta": meta}
        context.store.save(
            "clusterbook", directory, payload, settings=settings, inputs={}, label="clusterbook"
        )

    store(torch.zeros(32, 64), {})
    with pytest.raises(ArtifactError, match="no readable model spec.*re-run stage=mediator"):
        run(tiny("stage=head"))
    spec = ModelSpec(BackboneRef("tiny_vit", None, {}, 64, 8), 6, 32, Resolution(64, 64))
    store(torch.zeros(32, 48), {"spec": spec.to_dict()})
    with pytest.raises(ArtifactError, match="width"):
        run(tiny("stage=head"))


def test_a_head_of_other_data_is_not_used(tiny) -> None:
    run(tiny("stage=mediator"))
    run(tiny("stage=head", "head=mlp"))
    with pytest.raises(MissingArtifactError, match=r"data\.num_classes: 6 there, 5 now"):
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


def test_a_finished_stage_trains_on_from_its_checkpoint(tiny) -> None:
    with_checkpoints = [o for o in TINY if not o.startswith("callbacks=")]
    one = run(tiny("stage=mediator", "method.mediator.epochs=1", base=with_checkpoints))
    last = Path(one["artifacts/clusterbook"]).parent / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu")  # default weights_only: no pickled objects
    assert first["global_step"] == 2 and not any(
        k.startswith("backbone.") for k in first["state_dict"]
    )
    # Two epochs are other settings (another directory): training on names the checkpoint.
    two = run(
        tiny(
            "stage=mediator", "method.mediator.epochs=2", f"ckpt_path={last}", base=with_checkpoints
        )
    )
    assert Path(two["artifacts/clusterbook"]).parent != last.parent.parent
    second = torch.load(
        Path(two["artifacts/clusterbook"]).parent / "checkpoints" / "last.ckpt", map_location="cpu"
    )
    assert second["global_step"] == 4 and second["epoch"] > first["epoch"]


def test_mixed_precision_head_stage(tiny, tmp_path: Path) -> None:
    run(tiny("stage=mediator", "trainer.precision=bf16-mixed"))
    results = run(tiny("stage=head", "head=mlp", "trainer.precision=bf16-mixed"))
    record = load_artifact(results["artifacts/head"], "head", "head")
    assert all(v.dtype == torch.float32 for v in record["head_state"].values())
    assert all(torch.isfinite(v).all() for v in record["head_state"].values())
