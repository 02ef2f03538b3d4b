"""Small helpers shared by the stages: logging, instantiation, W&B teardown."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig

__all__ = ["get_logger", "instantiate_group", "finish_wandb", "is_global_zero"]


class _RankZeroFilter(logging.Filter):
    """Keeps records below WARNING on global rank 0 only, so DDP runs log each message once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_global_zero()


_RANK_ZERO = _RankZeroFilter()


def get_logger(name: str = "cause_lightning") -> logging.Logger:
    """A project logger whose info and debug messages come from global rank 0 only."""
    logger = logging.getLogger(name)
    if _RANK_ZERO not in logger.filters:
        logger.addFilter(_RANK_ZERO)
    return logger


def is_global_zero() -> bool:
    """True on the process of global rank 0 (or when not distributed)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key]) == 0
    return True


def instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every ``_target_`` node of a config group mapping (e.g. callbacks).

    Args:
        group: A mapping of name -> node, or None.

    Returns:
        The instantiated objects in config order.
    """
    from hydra.utils import instantiate

    objects: list[Any] = []
    if not group:
        return objects
    for name, node in group.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ValueError(f"config node {name!r} has no _target_")
        objects.append(instantiate(node))
    return objects


def finish_wandb(exit_code: int = 0) -> None:
    """Close any W&B run left open, so runs never bleed into the next multirun job."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency, but stay tolerant
        return
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
