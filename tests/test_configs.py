"""Config matrix: every option of every group composes, and its _target_ nodes resolve."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import get_class, get_method, instantiate
from omegaconf import OmegaConf

from cause_lightning.__main__ import config_dir
from cause_lightning.config import SettingsError, validate
from cause_lightning.core.specs import HeadSpec
from cause_lightning.models import build_head, list_backbones
from cause_lightning.models.contract import head_arguments, head_class

CONF = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def resolve_target(target: str) -> object:
    try:
        return get_class(target)
    except Exception:
        return get_method(target)


@pytest.mark.parametrize(
    "group",
    [
        "stage",
        "data",
        "backbone",
        "head",
        "method",
        "trainer",
        "logger",
        "callbacks",
        "debug",
        "paths",
    ],
)
def test_every_option_composes(compose, group: str) -> None:
    names = options(group)
    assert names, f"conf/{group} is empty"
    for name in names:
        extra = {
            ("data", "folder"): ["data.num_classes=3"],
            ("backbone", "timm"): ["backbone.model=vit_tiny_patch16_224"],
        }.get((group, name), [])
        cfg = compose(f"{group}={name}", *extra)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        node = cfg.get(group)
        if isinstance(node, dict) or OmegaConf.is_dict(node):
            for sub in [node, *[v for v in node.values() if OmegaConf.is_dict(v)]]:
                if "_target_" in sub:
                    assert resolve_target(sub._target_) is not None


def test_backbone_configs_match_registry() -> None:
    registered = set(list_backbones())
    for name in options("backbone"):
        cfg = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")
        if cfg._target_ != "cause_lightning.models.build_backbone":
            continue  # backbone=timm: any timm model, labelled by its name
        assert cfg.name == name
        assert name in registered


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_presets_compose(compose, name: str) -> None:
    cfg = compose(f"experiment={name}")
    assert cfg.experiment_name == name
    data, backbone, head = cfg.data.name, cfg.backbone.name, cfg.head.name
    assert name == f"{data}_{backbone}_{head}"
    if cfg.published.source == "none":  # no published row: marked explicitly, never left blank
        assert cfg.published.mIoU is None and cfg.published.pAcc is None
    else:
        assert cfg.published.mIoU > 0
    assert cfg.method.num_concepts == 2048
    # published rows: the reference probe and the reference's per-rank step count
    assert (cfg.method.probe.init, cfg.method.probe.restarts) == ("reference", 1)
    assert cfg.method.reference_schedule and cfg.method.reference_world_size == 4
    # the head builds from its YAML and what its traits ask of the pipeline
    node = OmegaConf.to_container(cfg.head.module)
    target = node.pop("_target_")
    runtime = head_arguments(head_class(target), dim=16, num_queries=4, num_concepts=8)
    assert build_head(HeadSpec(target, {**node, **runtime})).reduced_dim == 90


@pytest.mark.parametrize("data", ["cocostuff27", "cityscapes27"])
def test_dinov3_presets_keep_320_px_on_the_patch_16_grid(compose, data: str) -> None:
    from cause_lightning.config import derive

    cfg = compose(f"experiment={data}_dinov3_vitb16_tr")
    assert cfg.backbone.name == "dinov3_vitb16" and cfg.published.source == "none"
    derived = derive(cfg, patch_size=16)
    assert derived.resolution["test"] == derived.resolution["head"] == 320
    assert derived.num_queries == 400  # 20x20 grid


def test_default_config_is_the_embedded_demo(compose) -> None:
    cfg = compose()
    assert (cfg.stage.name, cfg.data.name, cfg.backbone.name) == ("all", "mosaic", "filterbank")
    assert cfg.get("logger") is None  # W&B stays off unless asked for
    assert cfg.method.num_concepts == 2048 and cfg.method.head.ema_decay == 0.99


def test_datamodules_instantiate_without_touching_disk(compose, tmp_path: Path) -> None:
    for name in options("data"):
        extra = ["data.num_classes=3"] if name == "folder" else []
        cfg = compose(f"data={name}", *extra)
        dm = instantiate(cfg.data.module, train_res=64, test_res=64, batch_size=2, seed=0)
        assert dm.num_classes == cfg.data.num_classes
    assert not (tmp_path / "data").exists()


def test_badly_typed_override_is_refused_before_any_work(compose) -> None:
    with pytest.raises(SettingsError, match=r"method\.num_concepts='abc' must be an integer"):
        validate(compose("method.num_concepts=abc"))
    with pytest.raises(SettingsError, match=r"method\.probe\.head_dropout='maybe' must be true"):
        validate(compose("method.probe.head_dropout=maybe"))
    with pytest.raises(SettingsError, match=r"data\.num_classes='many' must be an integer"):
        validate(compose("data.num_classes=many"))
    with pytest.raises(SettingsError, match=r"method\.probe\.init='kmeans' must be one of"):
        validate(compose("method.probe.init=kmeans"))


def test_unknown_key_is_rejected(compose) -> None:
    with pytest.raises(ConfigCompositionException):
        compose("method.num_concept=12")


def test_clip_and_weight_decay_follow_the_dataset_recipe(compose) -> None:
    cfg = compose("data=cityscapes27", "head=mlp")
    assert cfg.method.head.clip == 1.0 and cfg.method.head.weight_decay == 0.0
    cfg = compose("data=cocostuff27", "head=tr")
    assert cfg.method.head.clip == 2.0 and cfg.method.probe.epochs == 5
    cfg = compose("data=pascalvoc21", "head=mlp")
    assert cfg.method.probe.clip is None and cfg.method.probe.epochs == 1
