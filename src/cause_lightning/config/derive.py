"""Values that follow from the config, the backbone and the process count (method.md §2.6, §8)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cause_lightning.core.bounds import check_overcluster
from cause_lightning.core.errors import SettingsError
from cause_lightning.core.specs import grid_tokens

__all__ = ["Derived", "derive", "snap_resolution", "to_plain", "train_resolution"]


def snap_resolution(resolution: int, patch_size: int) -> int:
    """Round a nominal resolution up to a multiple of the patch size (320 -> 322 for patch 14)."""
    return int(math.ceil(resolution / patch_size) * patch_size)


def train_resolution(cfg: DictConfig) -> int | None:
    """The nominal training resolution of stages 2 and 3: the dataset's override
    (``data.recipe.resolution.train``), else the head's (``head.train_resolution``); ``None`` =
    the test resolution."""
    override = OmegaConf.select(cfg, "data.recipe.resolution.train", default=None)
    return override if override is not None else cfg.head.get("train_resolution")


@dataclass(frozen=True)
class Derived:
    """The values a run derives from its config, the backbone's patch size and its process count.

    Attributes:
        patch_size: The backbone's patch size.
        world_size: Training processes (devices x nodes).
        lr_scale: The factor of every learning rate (``world_size`` with
            ``method.scale_lr_with_world_size``, else 1).
        resolution: Input side per step (``mediator``, ``head``, ``probe``, ``test``), snapped up to
            a multiple of the patch.
        num_queries: Tokens per image at the training resolution (a fixed-grid head's queries).
        lr: Effective learning rate per training step (``probe_cluster``: the centroids').
        batch_size: Per-device batch size per training step.
    """

    patch_size: int
    world_size: int
    lr_scale: int
    resolution: dict[str, int]
    num_queries: int
    lr: dict[str, float]
    batch_size: dict[str, int]

    def global_batch(self, step: str) -> int:
        """The batch of one optimiser step over every process."""
        return self.batch_size[step] * self.world_size

    def to_dict(self) -> dict[str, Any]:
        """Plain values (written beside the resolved config)."""
        return dataclasses.asdict(self)


def derive(cfg: DictConfig, patch_size: int, world_size: int = 1) -> Derived:
    """Compute the values that follow from the config, the backbone and the process count.

    Args:
        cfg: The composed config.
        patch_size: Patch size of the backbone.
        world_size: Number of training processes (devices x nodes).

    Returns:
        The derived values (the config itself is not changed).

    Raises:
        SettingsError: On a bad ``method.eval.overcluster``, or a fixed-grid head asked to train at
            another resolution than the test one.
    """
    from cause_lightning.models.contract import head_class, head_traits

    check_overcluster(cfg.method.eval.get("overcluster"), int(cfg.data.num_classes))
    test_res = snap_resolution(int(cfg.data.recipe.resolution.test), patch_size)
    nominal = train_resolution(cfg)
    train_res = test_res if nominal is None else snap_resolution(int(nominal), patch_size)
    target = str(cfg.head.module._target_)
    if head_traits(head_class(target)).fixed_grid and train_res != test_res:
        raise SettingsError(
            f"head={cfg.head.name} ({target}) has one position query per training token, so it "
            f"trains at the test resolution ({test_res}), but data.recipe.resolution.train / "
            f"head.train_resolution ask for {nominal} ({train_res} after snapping to the patch): "
            "remove that setting or set it to the test resolution (method.md §2.6)"
        )
    scale = world_size if cfg.method.scale_lr_with_world_size else 1
    steps = ("mediator", "head", "probe")
    lr = {step: float(cfg.method[step].lr) * scale for step in steps}
    lr["probe_cluster"] = float(cfg.method.probe.cluster_lr) * scale
    return Derived(
        patch_size=int(patch_size),
        world_size=int(world_size),
        lr_scale=int(scale),
        # stage 1 runs at the test resolution for every head (method.md §2.6)
        resolution={"mediator": test_res, "head": train_res, "probe": train_res, "test": test_res},
        num_queries=grid_tokens(train_res, patch_size),
        lr=lr,
        batch_size={step: int(cfg.method[step].batch_size) for step in steps},
    )


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict (safe inside checkpoints and artifacts)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
