"""Trying an idea is one class and one YAML: a head from outside the package, a timm backbone,
hyper-parameter defaults written once (docs/architecture.md, "Extending")."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from cause_lightning.artifacts.io import load_artifact
from cause_lightning.config import SettingsError, validate
from cause_lightning.core.specs import ModelSpec
from cause_lightning.run import run

EXTENSION = Path(__file__).resolve().parent / "extension"
CONV_HEAD = [f"hydra.searchpath=[file://{EXTENSION / 'conf'}]", "head=conv3x3"]


@pytest.fixture
def extension(monkeypatch: pytest.MonkeyPatch) -> type:
    """The conv head's module importable, as it is for a user who put its folder on the path."""
    monkeypatch.syspath_prepend(str(EXTENSION))
    from conv_head import ConvHead

    ConvHead.seen_shapes.clear()
    return ConvHead


def _predict_in_a_fresh_process(
    segmenter: Path, pythonpath: str | None
) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import numpy as np
        from cause_lightning.segmenter import Segmenter
        segmenter = Segmenter.load({str(segmenter)!r})
        image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype("uint8")
        print("labels", segmenter.predict_image(image).shape)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )


def test_a_head_declared_by_its_yaml_alone_trains_on_the_grid_and_predicts_elsewhere(
    tiny, extension: type
) -> None:
    results = run(tiny(*CONV_HEAD))
    # A head that declares no traits sees whole patch grids (8x8 tokens of the 64 px tiny runs),
    # never a strip of sampled tokens, in every stage.
    shapes = set(extension.seen_shapes)
    assert shapes and all(s[1:] == (64, 8, 8) for s in shapes), shapes
    head = load_artifact(results["artifacts/head"], "head", "head")
    spec = ModelSpec.from_meta(head["meta"]).head
    assert spec.target == "conv_head.ConvHead"
    assert spec.kwargs == {"dim": 64, "reduced_dim": 16, "hidden": 24}
    assert "test/cluster/raw/mIoU" in results

    segmenter = Path(results["artifacts/segmenter"])
    found = _predict_in_a_fresh_process(segmenter, str(EXTENSION))
    assert found.returncode == 0, found.stderr[-2000:]
    assert "labels (50, 70)" in found.stdout
    # Without the class on the path, loading says which class and what to do.
    missing = _predict_in_a_fresh_process(segmenter, None)
    assert missing.returncode != 0
    assert "conv_head.ConvHead" in missing.stderr and "PYTHONPATH" in missing.stderr


def test_a_new_hyper_parameter_is_refused_until_a_class_reads_it(tiny) -> None:
    with pytest.raises(SettingsError, match=r"method\.head\.no_ema is not a setting.*no_ema: \$"):
        validate(tiny("+method.head.no_ema=true"))
    with pytest.raises(SettingsError, match=r"HeadModule takes no argument 'no_ema'"):
        validate(tiny("+method.head.module.no_ema=true"))


def test_unknown_keys_name_their_file_and_the_closest_known_ones(tiny) -> None:
    with pytest.raises(SettingsError) as error:
        validate(tiny("+sed=1", "+method.mediator.epoch=2", "+trainer.max_epoch=3"))
    text = str(error.value)
    assert "sed is not a setting" in text and "did you mean 'seed'" in text
    assert "method.mediator.epoch is not a setting" in text and "'epochs'" in text
    assert "takes no argument 'max_epoch'" in text and "'max_epochs'" in text


def test_every_method_default_is_written_once(compose) -> None:
    """Stage modules take every hyper-parameter the YAML hands them without a default of their
    own; the defaults that once drifted (probe init and restarts, debug checks) are the YAML's."""
    cfg = compose()
    for stage in ("mediator", "head", "probe", "eval"):
        node = cfg.method[stage].module
        parameters = inspect.signature(get_class(node._target_)).parameters
        defaulted = [
            key
            for key in node
            if not key.startswith("_") and parameters[key].default is not inspect.Parameter.empty
        ]
        assert not defaulted, f"{node._target_} has defaults of its own for {defaulted}"
    probe = inspect.signature(get_class(cfg.method.probe.module._target_)).parameters
    assert probe["init"].default is probe["restarts"].default is inspect.Parameter.empty
    head = inspect.signature(get_class(cfg.method.head.module._target_)).parameters
    assert head["debug_checks"].default is inspect.Parameter.empty
    from cause_lightning.config.schema import Setting

    assert "default" not in {f for f in Setting.__dataclass_fields__}


def test_head_yaml_arguments_match_the_class_signature_defaults(compose) -> None:
    """The built-in heads keep their public defaults (docs/api.md); their YAML states the same."""
    for name in ("mlp", "tr"):
        node = compose(f"head={name}").head.module
        parameters = inspect.signature(get_class(node._target_)).parameters
        for key in node:
            if not key.startswith("_"):
                assert node[key] == parameters[key].default, (name, key)


def test_each_stage_module_built_from_python_with_the_yaml_values_equals_the_cli_one(tiny) -> None:
    from cause_lightning.models import LinearProbe
    from cause_lightning.stages.build import new_head, stage_module
    from cause_lightning.stages.context import RunContext

    run_context = RunContext(tiny()).setup()
    backbone = run_context.backbone
    clusterbook = torch.randn(int(run_context.cfg.method.num_concepts), backbone.embed_dim)
    head = new_head(run_context, clusterbook)
    runtime = {
        "mediator": {"lr": 0.01, "debug_checks": True},
        "head": {"head": head, "clusterbook": clusterbook, "lr": 0.01, "debug_checks": True},
        "probe": {
            "head": head,
            "linear": LinearProbe(head.reduced_dim, 6),
            "lr": 0.01,
            "cluster_lr": 0.02,
            "debug_checks": True,
        },
        "eval": {
            "head": head,
            "centroids": torch.randn(6, head.reduced_dim),
            "linear": LinearProbe(head.reduced_dim, 6),
            "variants": ["raw"],
            "crf_runner": None,
            "overcluster": None,
        },
    }
    plain = OmegaConf.to_container(run_context.cfg.method, resolve=True)
    for stage, extra in runtime.items():
        cli = stage_module(run_context, stage, **extra)
        values = {k: v for k, v in plain[stage]["module"].items() if not k.startswith("_")}
        for key in ("optimizer", "scheduler"):
            if key in values:
                values[key] = instantiate(run_context.cfg.method[stage][key], _partial_=True)
        python = type(cli)(backbone, **values, **extra)
        assert dict(python.hparams) == dict(cli.hparams), stage
        # A value the YAML does not hand over is an error, never a silent default.
        dropped = next(k for k in values if k not in ("optimizer", "scheduler"))
        with pytest.raises(TypeError, match=dropped):
            type(cli)(backbone, **{k: v for k, v in values.items() if k != dropped}, **extra)


def test_a_timm_vit_is_a_backbone_by_config(tiny, tmp_path: Path) -> None:
    import timm

    model = "vit_tiny_patch16_224"
    reference = timm.create_model(model, pretrained=False, num_classes=0, dynamic_img_size=True)
    weights = tmp_path / "model.pth"
    torch.save(reference.state_dict(), weights)
    cfg = tiny(
        "backbone=timm",
        f"backbone.model={model}",
        f"backbone.weights={weights}",
        "data.module.image_size=128",
        "data.recipe.resolution={train:128,test:128}",
        "stage=mediator",
    )
    validate(cfg)
    results = run(cfg)
    assert "/mosaic/vit_tiny_patch16_224" in results["artifacts/clusterbook"]
    spec = ModelSpec.from_meta(
        load_artifact(results["artifacts/clusterbook"], "clusterbook", "mediator")["meta"]
    )
    assert spec.backbone.name == model and spec.backbone.kwargs == {"model": model}
    assert spec.backbone.target == "cause_lightning.models.build_timm_backbone"
    backbone = instantiate(cfg.backbone)
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        tokens = reference.eval().forward_features(images)[:, reference.num_prefix_tokens :]
    expected = tokens.transpose(1, 2).reshape(2, reference.embed_dim, 8, 8)
    torch.testing.assert_close(backbone(images), expected)


def test_a_head_class_that_is_not_a_module_is_never_called() -> None:
    from cause_lightning.core.specs import HeadSpec
    from cause_lightning.models import build_head

    with pytest.raises(TypeError, match="not a Module class"):
        build_head(HeadSpec("os.system", {"command": "true"}))
    with pytest.raises(ImportError, match="PYTHONPATH"):
        build_head(HeadSpec("no_such_package.Head", {}))
