"""Values that follow from the config, the backbone and the process count (method.md §2.6, §8)."""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from cause_lightning.core.bounds import check_overcluster
from cause_lightning.errors import SettingsError

__all__ = ["derive", "snap_resolution", "to_plain"]


def snap_resolution(resolution: int, patch_size: int) -> int:
    """Round a nominal resolution up to a multiple of the patch size (320 -> 322 for patch 14)."""
    return int(math.ceil(resolution / patch_size) * patch_size)


def train_resolution(cfg: DictConfig) -> int | None:
    """The nominal training resolution of stages 2 and 3: the dataset's override
    (``data.recipe.resolution.train``), else the head's (``head.train_resolution``); ``None`` =
    the test resolution."""
    override = OmegaConf.select(cfg, "data.recipe.resolution.train", default=None)
    return override if override is not None else cfg.head.get("train_resolution")


def derive(cfg: DictConfig, patch_size: int, world_size: int = 1) -> dict[str, Any]:
    """Compute the values that follow from the config, the backbone and the process count.

    Args:
        cfg: The composed config.
        patch_size: Patch size of the backbone.
        world_size: Number of training processes (devices x nodes).

    Returns:
        A plain dict stored as ``cfg.derived``: resolutions per step, the query count of a
        fixed-grid head, effective learning rates and global batch sizes.

    Raises:
        SettingsError: On a bad ``method.eval.overcluster``, or a fixed-grid head asked to train at
            another resolution than the test one.
    """
    from cause_lightning.models.heads import head_class, head_traits

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
    with open_dict(cfg):
        cfg.derived = derived
    return derived


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as a plain dict (safe inside checkpoints and artifacts)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
