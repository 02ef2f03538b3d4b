"""Resuming a training step: finding its checkpoint and refusing one of another configuration.

Every stage checkpoint carries the flat signature of the settings that determine what the step
computes and of the artifact it started from
(:func:`cause_lightning.config.identity.resume_signature`); a resume compares it with the
current run's and names every setting that differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cause_lightning.artifacts.io import describe_load_error
from cause_lightning.core.constants import CHECKPOINT_KEY
from cause_lightning.core.errors import CheckpointRefusedError, SettingsError
from cause_lightning.core.logs import get_logger

__all__ = [
    "newest_first",
    "read_checkpoint",
    "resume_checkpoint",
    "finite_advice",
]

log = get_logger(__name__)


def newest_first(folder: Path) -> list[Path]:
    """The checkpoint files of a folder, newest first."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint read without running code from it (``weights_only=True``).

    Raises:
        CheckpointRefusedError: The file is unreadable or not a Lightning checkpoint.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for damaged or foreign files
        raise CheckpointRefusedError(
            f"unreadable checkpoint {path} ({describe_load_error(err, path)})"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointRefusedError(f"{path} is not a Lightning checkpoint")
    return checkpoint


def resume_checkpoint(
    requested: Any, folder: Path, step: str, current: dict[str, Any], single_stage: bool
) -> str | None:
    """The checkpoint a training step resumes from (``ckpt_path``), checked and logged.

    ``"last"`` is the newest readable checkpoint in ``folder``; unreadable ones (a write cut
    short) are skipped with a warning.

    Args:
        requested: The ``ckpt_path`` setting (None, ``"last"`` or a file).
        folder: The step's checkpoint folder.
        step: The step's name (for messages).
        current: The current run's signature of the step.
        single_stage: Whether the run trains one stage only (an explicit file needs that).

    Raises:
        CheckpointRefusedError: The checkpoint was written by a run of another configuration (the
            differing settings are named) or cannot be read.
        FileNotFoundError: An explicit ``ckpt_path`` does not exist.
    """
    if requested in (None, "", "null"):
        return None
    if requested == "last":
        for path in newest_first(folder):
            try:
                checkpoint = read_checkpoint(path)
            except ValueError as err:
                log.warning("skipping %s", err)
                continue
            return _checked(step, path, checkpoint, current)
        log.info("no checkpoint in %s to resume %s from: starting fresh", folder, step)
        return None
    if not single_stage:
        raise SettingsError(
            "ckpt_path=<file> needs a single training stage; use ckpt_path=last with stage=all"
        )
    path = Path(requested)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={requested} does not exist")
    return _checked(step, path, read_checkpoint(path), current)


def _checked(step: str, path: Path, checkpoint: dict[str, Any], current: dict[str, Any]) -> str:
    stored = (checkpoint.get(CHECKPOINT_KEY) or {}).get("signature")
    if not stored:
        raise CheckpointRefusedError(
            f"checkpoint {path} carries no record of the configuration that wrote it, so "
            f"resuming from it could silently mix two runs: start stage={step} afresh "
            "(ckpt_path=null)"
        )
    differ = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    if differ:
        unset = "<unset>"
        shown = "; ".join(
            f"{k}: {stored.get(k, unset)!r} in the checkpoint, {current.get(k, unset)!r} now"
            for k in differ[:8]
        )
        more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
        raise CheckpointRefusedError(
            f"checkpoint {path} was written by a run of another configuration: {shown}{more}. "
            f"Resume with the same settings, or start stage={step} afresh (ckpt_path=null) "
            "or in another artifact directory (artifact_tag=...)"
        )
    log.info(
        "resuming %s from %s at global step %d (epoch %d)",
        step,
        path,
        int(checkpoint.get("global_step", 0)),
        int(checkpoint.get("epoch", 0)),
    )
    return str(path)


def finite_advice(folder: Path, step: str) -> str:
    """Where to resume a diverged step from: the newest checkpoint with finite weights."""
    for path in newest_first(folder):
        try:
            checkpoint = read_checkpoint(path)
        except ValueError:
            continue
        state = checkpoint.get("state_dict", {})
        if all(
            bool(torch.isfinite(v).all())
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        ):
            return (
                f"The newest checkpoint with finite weights is {path} (global step "
                f"{int(checkpoint.get('global_step', 0))}): fix the cause, then resume with "
                f"ckpt_path={path}"
            )
    return (
        f"No checkpoint with finite weights exists in {folder}: fix the cause and run "
        f"stage={step} again from the start"
    )
