"""Typed configuration schemas and the values derived from a composed config.

The schemas are registered in Hydra's ConfigStore and merged under the YAML files of their group
(``defaults: [_schema, _self_]``), so a badly typed override such as ``method.num_concepts=abc``
is rejected when the config is composed, before anything runs. The ranges of the numeric settings
(:data:`RANGES`) are checked by :func:`validate` as soon as the config is composed, before any
work starts. Values that depend on the
backbone or on the number of processes (resolutions snapped to the patch size, effective learning
rates, global batch) are computed by :func:`derive` and stored in the config under ``derived``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from cause_lightning.errors import SettingsError
from cause_lightning.logs import get_logger

__all__ = [
    "MethodConfig",
    "DataConfig",
    "BackboneConfig",
    "HeadConfig",
    "register_configs",
    "Bound",
    "RANGES",
    "validate",
    "snap_resolution",
    "check_overcluster",
    "derive",
    "to_plain",
    "PROBE_INITS",
]

log = get_logger(__name__)

# Starting points of the cluster probe's centroids (docs/method.md §6.1).
PROBE_INITS = ("reference", "kmeans++")


@dataclass
class MediatorConfig:
    epochs: int = 1
    lr: float = 4e-3
    batch_size: int = 16
    temperature: float = 0.1
    step_size: int = 1
    gamma: float = 0.2
    chunk_size: int | None = None
    optimizer: Any = None
    scheduler: Any = None
    module: Any = None


@dataclass
class HeadStageConfig:
    epochs: int = 2
    lr: float = 4e-3
    weight_decay: float = 1e-4
    clip: float | None = None
    batch_size: int = 16
    ema_decay: float = 0.99
    projection_dim: int = 2048
    temperature: float = 0.07
    pos_thresh: float = 0.3
    neg_thresh: float = 0.1
    bank_capacity: int = 100
    bank_keep: float = 0.5
    sync_bank: bool = False
    contrastive_memory_mb: int = 1024
    optimizer: Any = None
    scheduler: Any = None
    module: Any = None


@dataclass
class ProbeStageConfig:
    epochs: int = 5
    lr: float = 4e-3
    cluster_lr: float = 4e-3
    weight_decay: float = 1e-4
    clip: float | None = None
    batch_size: int = 16
    temperature: float = 0.1
    step_size: int = 2
    gamma: float = 0.5
    head_dropout: bool = True
    reference_leak: bool = False
    init: str = "kmeans++"
    restarts: int = 4
    sample_images: int = 64
    optimizer: Any = None
    scheduler: Any = None
    module: Any = None


@dataclass
class EvalStageConfig:
    batch_size: int = 8
    alpha: float = 3.0
    variants: list[str] = field(default_factory=lambda: ["raw", "flip", "crf", "flip_crf"])
    crf_iterations: int = 10
    crf_workers: int | None = None
    crf_timeout: float = 600.0
    linear_crf: bool = True
    baselines: bool = True
    kmeans_iters: int = 30
    kmeans_restarts: int = 10
    kmeans_max_tokens: int = 200_000
    save_images: int = 16
    overcluster: list[int] = field(default_factory=list)
    module: Any = None


@dataclass
class MethodConfig:
    num_concepts: int = 2048
    window: int = 4
    scale_lr_with_world_size: bool = False
    debug_checks: bool | None = None
    reference_schedule: bool = False
    reference_world_size: int = 4
    mediator: MediatorConfig = field(default_factory=MediatorConfig)
    head: HeadStageConfig = field(default_factory=HeadStageConfig)
    probe: ProbeStageConfig = field(default_factory=ProbeStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)


@dataclass
class ClipConfig:
    head: dict[str, float | None] = field(default_factory=dict)
    probe: dict[str, float | None] = field(default_factory=dict)


@dataclass
class ResolutionConfig:
    train: dict[str, int] = field(default_factory=dict)
    test: int = 320


@dataclass
class RecipeConfig:
    resolution: ResolutionConfig = field(default_factory=ResolutionConfig)
    weight_decay: float = 1e-4
    clip: ClipConfig = field(default_factory=ClipConfig)


@dataclass
class DataConfig:
    name: str = MISSING
    num_classes: int = MISSING
    module: Any = MISSING
    recipe: RecipeConfig = field(default_factory=RecipeConfig)


@dataclass
class BackboneConfig:
    _target_: str = "cause_lightning.models.build_backbone"
    name: str = MISSING
    weights: str | None = None


@dataclass
class HeadConfig:
    name: str = MISSING
    probe_epochs: int = 5
    module: Any = MISSING


def register_configs() -> None:
    """Register the schemas as ``_schema`` in their config groups (idempotent)."""
    store = ConfigStore.instance()
    store.store(group="method", name="_schema", node=MethodConfig)
    store.store(group="data", name="_schema", node=DataConfig)
    store.store(group="backbone", name="_schema", node=BackboneConfig)
    store.store(group="head", name="_schema", node=HeadConfig)


def snap_resolution(resolution: int, patch_size: int) -> int:
    """Round a nominal resolution up to a multiple of the patch size (320 -> 322 for patch 14)."""
    return int(math.ceil(resolution / patch_size) * patch_size)


def check_overcluster(counts: Any, num_classes: int) -> list[int]:
    """Validate ``method.eval.overcluster``: distinct cluster counts, each above the class count.

    Args:
        counts: The configured list (empty = over-clustering off).
        num_classes: ``data.num_classes``.

    Returns:
        The counts as a sorted list of ints.

    Raises:
        SettingsError: When a count is not an integer greater than ``num_classes`` or repeats.
    """
    values = list(counts or [])
    bad = [k for k in values if isinstance(k, bool) or not isinstance(k, int) or k <= num_classes]
    if bad:
        raise SettingsError(
            f"method.eval.overcluster={values}: every entry must be an integer cluster count "
            f"greater than data.num_classes={num_classes} (over-clustering scores k > C clusters "
            f"with many-to-one matching); offending: {bad}. Use e.g. "
            f"method.eval.overcluster=[{2 * num_classes},{4 * num_classes}], or [] to turn it off."
        )
    if len(set(values)) != len(values):
        raise SettingsError(f"method.eval.overcluster={values} repeats a cluster count")
    return sorted(values)


def derive(cfg: DictConfig, patch_size: int, world_size: int = 1) -> dict[str, Any]:
    """Compute the values that follow from the config, the backbone and the process count.

    Args:
        cfg: The composed config.
        patch_size: Patch size of the backbone.
        world_size: Number of training processes (devices x nodes).

    Returns:
        A plain dict stored as ``cfg.derived``: resolutions per step, the TR query count,
        effective learning rates and global batch sizes.

    Raises:
        SettingsError: On a bad ``method.eval.overcluster`` or a TR resolution mismatch.
    """
    check_overcluster(cfg.method.eval.get("overcluster"), int(cfg.data.num_classes))
    resolution = cfg.data.recipe.resolution
    head_name = cfg.head.name
    if head_name not in resolution.train:
        raise SettingsError(
            f"data.recipe.resolution.train has no entry for head {head_name!r} "
            f"(has {list(resolution.train)})"
        )
    train_res = snap_resolution(int(resolution.train[head_name]), patch_size)
    test_res = snap_resolution(int(resolution.test), patch_size)
    scale = world_size if cfg.method.scale_lr_with_world_size else 1
    derived: dict[str, Any] = {
        "patch_size": patch_size,
        "world_size": world_size,
        "lr_scale": scale,
        "resolution": {
            # stage 1 runs at the test resolution for every head (method.md §2.6)
            "mediator": test_res,
            "head": train_res,
            "probe": train_res,
            "test": test_res,
        },
        "num_queries": (train_res // patch_size) ** 2,
    }
    for step in ("mediator", "head", "probe"):
        step_cfg = cfg.method[step]
        derived[step] = {
            "lr": float(step_cfg.lr) * scale,
            "batch_size_per_device": int(step_cfg.batch_size),
            "global_batch_size": int(step_cfg.batch_size) * world_size,
        }
    derived["probe"]["cluster_lr"] = float(cfg.method.probe.cluster_lr) * scale
    if head_name == "tr" and train_res != test_res:
        raise SettingsError(
            f"the TR head needs the train resolution ({train_res}) to equal the test resolution "
            f"({test_res}): its query table has one entry per token (method.md §2.6)"
        )
    with open_dict(cfg):
        cfg.derived = derived
    return derived


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict (safe inside checkpoints and artifacts)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- numeric ranges
@dataclass(frozen=True)
class Bound:
    """The values a numeric setting accepts: an interval, whole numbers only, or also null."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            text = f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = f"a finite {kind[2:] if self.integer else 'number'}"
        return text + (" or null" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if not math.isfinite(value) or (self.integer and float(value) != int(value)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value >= self.high if self.high_open else value <= self.high)


COUNT = Bound(low=1, integer=True)
NON_NEGATIVE_INT = Bound(low=0, integer=True)
OPTIONAL_NON_NEGATIVE_INT = Bound(low=0, integer=True, optional=True)
POSITIVE = Bound(low=0, low_open=True)
NON_NEGATIVE = Bound(low=0)
FRACTION = Bound(low=0, high=1)
SIMILARITY = Bound(low=-1, high=1)
OPTIONAL_POSITIVE = Bound(low=0, low_open=True, optional=True)

# Every numeric setting of the schemas (and the trainer and data options the stages read), with
# the values it accepts. `*` stands for every key of a mapping. A setting missing from the config
# is skipped (e.g. a trainer option nobody set).
RANGES: dict[str, Bound] = {
    "seed": Bound(low=0, high=2**32 - 1, integer=True),
    "method.num_concepts": COUNT,
    "method.window": COUNT,
    "method.mediator.epochs": COUNT,
    "method.mediator.lr": POSITIVE,
    "method.mediator.batch_size": COUNT,
    "method.mediator.temperature": POSITIVE,
    "method.mediator.step_size": COUNT,
    "method.mediator.gamma": POSITIVE,
    "method.mediator.chunk_size": Bound(low=1, integer=True, optional=True),
    "method.head.epochs": COUNT,
    "method.head.lr": POSITIVE,
    "method.head.weight_decay": NON_NEGATIVE,
    "method.head.clip": OPTIONAL_POSITIVE,
    "method.head.batch_size": COUNT,
    "method.head.ema_decay": FRACTION,
    "method.head.projection_dim": COUNT,
    "method.head.temperature": POSITIVE,
    "method.head.pos_thresh": SIMILARITY,
    "method.head.neg_thresh": SIMILARITY,
    "method.head.bank_capacity": COUNT,
    "method.head.bank_keep": FRACTION,
    "method.head.contrastive_memory_mb": COUNT,
    "method.probe.epochs": COUNT,
    "method.probe.lr": POSITIVE,
    "method.probe.cluster_lr": POSITIVE,
    "method.probe.weight_decay": NON_NEGATIVE,
    "method.probe.clip": OPTIONAL_POSITIVE,
    "method.probe.batch_size": COUNT,
    "method.probe.temperature": POSITIVE,
    "method.probe.step_size": COUNT,
    "method.probe.gamma": POSITIVE,
    "method.probe.restarts": COUNT,
    "method.probe.sample_images": COUNT,
    "method.reference_world_size": COUNT,
    "method.eval.batch_size": COUNT,
    "method.eval.alpha": POSITIVE,
    "method.eval.crf_iterations": COUNT,
    "method.eval.crf_workers": OPTIONAL_NON_NEGATIVE_INT,  # null: from the cores
    "method.eval.crf_timeout": POSITIVE,
    "method.eval.kmeans_iters": COUNT,
    "method.eval.kmeans_restarts": COUNT,
    "method.eval.kmeans_max_tokens": COUNT,
    "method.eval.save_images": NON_NEGATIVE_INT,
    "data.num_classes": COUNT,
    "data.recipe.resolution.train.*": COUNT,
    "data.recipe.resolution.test": COUNT,
    "data.recipe.weight_decay": NON_NEGATIVE,
    "data.recipe.clip.head.*": OPTIONAL_POSITIVE,
    "data.recipe.clip.probe.*": OPTIONAL_POSITIVE,
    "data.module.num_workers": OPTIONAL_NON_NEGATIVE_INT,  # null: from the cores
    "data.module.limit_train": Bound(low=1, integer=True, optional=True),
    "data.module.eval_batch_size": Bound(low=1, integer=True, optional=True),
    "data.module.num_train": COUNT,
    "data.module.num_val": COUNT,
    "data.module.image_size": COUNT,
    "head.probe_epochs": COUNT,
    "trainer.num_nodes": COUNT,
    "trainer.log_every_n_steps": COUNT,
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.limit_train_batches": NON_NEGATIVE,  # 0 runs a stage without an optimiser step
    "trainer.limit_val_batches": NON_NEGATIVE,
    "trainer.num_sanity_val_steps": Bound(low=-1, integer=True),
    "callbacks.stage_checkpoint.every_n_train_steps": Bound(low=1, integer=True, optional=True),
    "callbacks.stage_checkpoint.train_time_interval": OPTIONAL_POSITIVE,
}

# Trainer options that every stage sets from `method`: an override would be silently replaced.
_STAGE_OWNED = {
    "trainer.max_epochs": "method.<stage>.epochs (method.mediator.epochs, method.head.epochs, "
    "method.probe.epochs)",
    "trainer.min_epochs": "method.<stage>.epochs",
    "trainer.gradient_clip_val": "method.head.clip / method.probe.clip",
}


_ABSENT = object()


def _values(cfg: DictConfig, key: str) -> list[tuple[str, Any]]:
    if not key.endswith(".*"):
        found = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        return [] if found is _ABSENT or OmegaConf.is_missing(cfg, key) else [(key, found)]
    parent = OmegaConf.select(cfg, key[:-2], default=None)
    if not isinstance(parent, DictConfig):
        return []
    return [(f"{key[:-2]}.{name}", parent[name]) for name in parent]


def validate(cfg: DictConfig) -> None:
    """Check every numeric setting of a composed config against :data:`RANGES`.

    Args:
        cfg: The composed config.

    Raises:
        ValueError: Naming each setting out of range, its value and what it accepts.
    """
    problems = []
    for key, bound in RANGES.items():
        for name, value in _values(cfg, key):
            if not bound.accepts(value):
                problems.append(f"{name}={value!r} must be {bound.describe()}")
    for key, owner in _STAGE_OWNED.items():
        if OmegaConf.select(cfg, key, default=None) is not None:
            problems.append(f"{key} is set per stage and would be ignored: set {owner} instead")
    head = OmegaConf.select(cfg, "method.head", default=None)
    if head is not None and SIMILARITY.accepts(head.get("pos_thresh")):
        if SIMILARITY.accepts(head.get("neg_thresh")) and head.neg_thresh > head.pos_thresh:
            problems.append(
                f"method.head.neg_thresh={head.neg_thresh} must not exceed "
                f"method.head.pos_thresh={head.pos_thresh}"
            )
    init = OmegaConf.select(cfg, "method.probe.init", default=None)
    if init is not None and init not in PROBE_INITS:
        problems.append(
            f"method.probe.init={init!r} must be one of {', '.join(PROBE_INITS)} (reference = "
            "uniform(±1/C) centroids, the published recipe)"
        )
    overcluster = OmegaConf.select(cfg, "method.eval.overcluster", default=None)
    classes = OmegaConf.select(cfg, "data.num_classes", default=None)
    if overcluster is not None and COUNT.accepts(classes):
        try:
            check_overcluster(overcluster, int(classes))
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise SettingsError("invalid settings (nothing was run):\n  " + "\n  ".join(problems))
