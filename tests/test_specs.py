"""Model specs: round trips, files written before the spec, and stage 3 rebuilding the head."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cause_lightning.artifacts.bundle import segmenter_payload
from cause_lightning.artifacts.io import load_artifact, save_artifact
from cause_lightning.core.specs import (
    SPEC_VERSION,
    BackboneRef,
    HeadSpec,
    ModelSpec,
    Resolution,
    SpecError,
    builtin_head_spec,
)
from cause_lightning.models import build_backbone, build_head, head_spec
from cause_lightning.run import run
from cause_lightning.segmenter import Segmenter

TR_CLASS = "cause_lightning.models.heads.TRHead"
TR = HeadSpec(
    TR_CLASS,
    {"dim": 64, "reduced_dim": 12, "num_queries": 64, "num_concepts": 16, "dropout": 0.25},
)
SPEC = ModelSpec(
    backbone=BackboneRef("tiny_vit", None, {"num_heads": 4}, dim=64, patch_size=8),
    num_classes=6,
    num_concepts=16,
    resolution=Resolution(train=64, test=64),
    head=TR,
)


def test_spec_round_trips_through_plain_values(tmp_path: Path) -> None:
    save_artifact(tmp_path / "a.pt", "head", {"meta": {"spec": SPEC.to_dict()}})
    stored = torch.load(tmp_path / "a.pt", weights_only=True)["meta"]["spec"]
    assert ModelSpec.from_dict(stored) == SPEC
    assert ModelSpec.from_meta({"spec": stored}) == SPEC


def test_build_head_follows_every_spec_field() -> None:
    head = build_head(TR)
    assert head_spec(head) == TR
    assert head.head_dropout.p == head.tr.dropout1.p == 0.25


def test_unknown_spec_version_names_it() -> None:
    with pytest.raises(
        SpecError, match=rf"version 99 .*reads versions 1, 2 and writes {SPEC_VERSION}"
    ):
        ModelSpec.from_dict({**SPEC.to_dict(), "version": 99})
    with pytest.raises(SpecError, match=r"unknown fields \['width'\]"):
        HeadSpec.from_dict({**TR.to_dict(), "width": 3})


def test_version_one_specs_read_into_the_current_layout() -> None:
    v1 = {
        **SPEC.to_dict(),
        "version": 1,
        "backbone": {k: v for k, v in SPEC.backbone.to_dict().items() if k != "target"},
        "head": {
            "kind": "tr",
            "dim": 64,
            "reduced_dim": 12,
            "dropout": 0.25,
            "num_queries": 64,
            "num_concepts": 16,
        },
    }
    assert ModelSpec.from_dict(v1) == SPEC
    mlp = {"kind": "mlp", "dim": 64, "reduced_dim": 12, "dropout": 0.1}
    mlp.update(num_queries=None, num_concepts=None)
    assert HeadSpec.from_dict(mlp).target == "cause_lightning.models.heads.MLPHead"


def test_head_specs_hold_plain_values_only() -> None:
    with pytest.raises(SpecError, match="plain values"):
        HeadSpec(TR_CLASS, {"clusterbook": torch.zeros(2, 2)})
    with pytest.raises(SpecError, match="import path"):
        HeadSpec("", {})


def test_flat_meta_of_earlier_files_is_read() -> None:
    legacy = {
        "backbone": "tiny_vit",
        "backbone_weights": None,
        "backbone_kwargs": {"num_heads": 4},
        "dim": 64,
        "patch_size": 8,
        "num_classes": 6,
        "num_concepts": 16,
        "resolution": {"train": 64, "test": 64},
        "head_type": "tr",
        "reduced_dim": 12,
        "num_queries": 64,
    }
    spec = ModelSpec.from_meta(legacy)
    # Earlier heads were always built with the default dropout.
    assert spec.head == builtin_head_spec("tr", 64, 12, 0.1, num_queries=64, num_concepts=16)
    assert spec.backbone == SPEC.backbone
    with pytest.raises(SpecError, match=r"neither a spec .* keys \['dim'\]"):
        ModelSpec.from_meta({k: v for k, v in legacy.items() if k != "dim"})


def test_segmenter_file_of_the_earlier_layout_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = build_backbone("tiny_vit")
    clusterbook = torch.randn(16, backbone.embed_dim)
    head = build_head(builtin_head_spec("tr", 64, 12, num_queries=64, num_concepts=16), clusterbook)
    seg = Segmenter(backbone, head.eval(), torch.randn(6, 12), resolution=64)
    new = segmenter_payload(seg)
    spec = ModelSpec.from_dict(new.pop("spec"))
    legacy = {
        **new,
        "backbone": {
            "name": "tiny_vit",
            "weights": None,
            "kwargs": {},
            "embed_dim": 64,
            "patch_size": 8,
            "state": new.pop("backbone_state"),
        },
        "head": {
            "type": "tr",
            "kwargs": {"dim": 64, "reduced_dim": 12, "num_queries": 64, "num_concepts": 16},
            "state": new.pop("head_state"),
        },
        "resolution": 64,
    }
    del legacy["backbone_state"], legacy["head_state"]
    save_artifact(tmp_path / "old.pt", "segmenter", legacy)
    old = Segmenter.load(tmp_path / "old.pt")
    assert old.head_spec == spec.head
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(old(images), seg(images))


def test_stage_three_rebuilds_the_head_with_its_dropout(tiny, tmp_path: Path) -> None:
    head = "tr"  # head and decoder dropouts; build_head(spec) covers both kinds above
    from cause_lightning.stages.context import RunContext

    for stage in ("mediator", "head"):
        run(tiny(f"stage={stage}", f"head={head}", "head.module.dropout=0.3"))
    # Stage 3 rebuilds the head from head.pt's spec, not from the head YAML it finds it with.
    context = RunContext(tiny("stage=probe", f"head={head}", "head.module.dropout=0.3"))
    entry = context.require("head")
    rebuilt, _ = context.store.trained_head(context.store.load(entry))
    assert head_spec(rebuilt).kwargs["dropout"] == pytest.approx(0.3)
    stored = load_artifact(entry.file, "head", "head")
    assert ModelSpec.from_meta(stored["meta"]).head == head_spec(rebuilt)
