"""Stage modules, optimisers and schedules built from ``conf/method``; the explicit set-up step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cause_lightning.core.specs import builtin_head_spec
from cause_lightning.models import LinearProbe, build_head
from cause_lightning.modules.head import HeadModule
from cause_lightning.modules.mediator import MediatorModule
from cause_lightning.modules.probe import ProbeModule
from cause_lightning.stages import build
from cause_lightning.stages.context import RunContext


class _Pipeline:
    """A set-up run and the step builders, as a step uses them."""

    def __init__(self, run: RunContext) -> None:
        self.run = run
        self.cfg, self.backbone, self.derived = run.cfg, run.backbone, run.derived

    def stage_module(self, step: str, **runtime: object):  # noqa: ANN201
        return build.stage_module(self.run, step, **runtime)

    def new_head(self, clusterbook: torch.Tensor) -> torch.nn.Module:
        return build.new_head(self.run, clusterbook)


def _pipeline(tiny: Callable[..., object], *overrides: str) -> _Pipeline:
    return _Pipeline(RunContext(tiny(*overrides)).setup())  # type: ignore[arg-type]


def test_the_run_builds_nothing_and_writes_nothing_before_setup(
    tiny: Callable[..., object],
) -> None:
    cfg = tiny()
    run = RunContext(cfg)  # type: ignore[arg-type]
    written = Path(cfg.paths.output_dir) / "config_resolved.yaml"  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match=r"setup\(\)"):
        _ = run.backbone
    with pytest.raises(RuntimeError, match=r"setup\(\)"):
        _ = run.derived
    assert not written.exists()
    assert run.setup() is run
    # The derived values are the run's, returned: the config itself is never written into.
    assert "derived" not in cfg and "derived:" in written.read_text()  # type: ignore[operator]
    backbone = run.backbone
    assert run.setup().backbone is backbone  # a second set-up changes nothing


def test_mediator_module_hyper_parameters_and_schedule_come_from_the_config(
    tiny: Callable[..., object],
) -> None:
    pipeline = _pipeline(
        tiny,
        "method.mediator.temperature=0.3",
        "method.mediator.step_size=3",
        "method.mediator.gamma=0.7",
    )
    module = pipeline.stage_module("mediator", lr=0.05)
    assert isinstance(module, MediatorModule)
    assert module.hparams.temperature == 0.3
    assert module.hparams.num_concepts == pipeline.cfg.method.num_concepts
    answer = module.configure_optimizers()
    assert isinstance(answer, dict)
    optimizer, scheduler = answer["optimizer"], answer["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.05
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert (scheduler.step_size, scheduler.gamma) == (3, 0.7)
    assert answer["lr_scheduler"]["interval"] == "epoch"


def test_head_optimizer_is_swappable_and_keeps_its_weight_decay(
    tiny: Callable[..., object],
) -> None:
    pipeline = _pipeline(
        tiny,
        "method.head.optimizer._target_=torch.optim.AdamW",
        "method.head.weight_decay=0.25",
        "method.head.bank_keep=0.75",
    )
    dim = int(pipeline.backbone.embed_dim)
    clusterbook = torch.randn(int(pipeline.cfg.method.num_concepts), dim)
    module = pipeline.stage_module(
        "head",
        head=pipeline.new_head(clusterbook),
        clusterbook=clusterbook,
        lr=0.01,
        debug_checks=True,
    )
    assert isinstance(module, HeadModule)
    assert module.bank.keep_fraction == 0.75
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)  # method.head.scheduler is null
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.param_groups[0]["weight_decay"] == 0.25


def test_probe_groups_keep_their_learning_rates_and_spare_the_centroids_weight_decay(
    tiny: Callable[..., object],
) -> None:
    pipeline = _pipeline(tiny, "method.probe.weight_decay=0.5", "head=mlp")
    spec = builtin_head_spec("mlp", int(pipeline.backbone.embed_dim), 8, 0.1)
    classes = int(pipeline.cfg.data.num_classes)
    module = pipeline.stage_module(
        "probe", head=build_head(spec), linear=LinearProbe(8, classes), lr=0.02, cluster_lr=0.03
    )
    assert isinstance(module, ProbeModule)
    answer = module.configure_optimizers()
    assert isinstance(answer, dict)
    linear, centroids = answer["optimizer"].param_groups
    assert (linear["lr"], linear["weight_decay"]) == (0.02, 0.5)
    assert (centroids["lr"], centroids["weight_decay"]) == (0.03, 0.0)
    assert centroids["params"][0] is module.centroids
    assert isinstance(answer["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.StepLR)


def test_stage_hyper_parameters_are_read_from_the_stage_section_once() -> None:
    from omegaconf import OmegaConf

    from cause_lightning.__main__ import config_dir

    method = OmegaConf.load(Path(config_dir()) / "method" / "cause.yaml")
    for step in ("mediator", "head", "probe", "eval"):
        module = method[step]["module"]
        literal = {
            k: v
            for k, v in OmegaConf.to_container(module, resolve=False).items()  # type: ignore[union-attr]
            if k != "_target_" and not (isinstance(v, str) and v.startswith("${"))
        }
        assert not literal, f"method.{step}.module writes {literal} instead of reading them"
