"""The project's one logging convention: ``log = get_logger(__name__)`` at the top of a module.

Records below WARNING come from global rank 0 only, so a DDP run logs each message once. This
module depends on the standard library only, so that every layer (``ops``, ``models``, ``data``)
can use it.
"""

from __future__ import annotations

import logging
import os

__all__ = ["get_logger", "is_global_zero"]


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
