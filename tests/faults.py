"""Faults injected into runs (tests only): through the callbacks config group (failures, kills
and signals at a given step, diverging gradients) and by patching file writes (a full disk)."""

from __future__ import annotations

import errno
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class FailAtStep(pl.Callback):
    """Stop a run in the middle of an optimiser step, after ``step`` steps have completed.

    The step's forward and backward have run; its update has not. ``kill=True`` sends SIGKILL to
    the process (nothing is flushed, no handler runs); otherwise a ``RuntimeError`` is raised.
    ``module`` (a stage module's class name) limits the fault to that stage of a multi-step run.
    """

    def __init__(self, step: int, kill: bool = False, module: str | None = None) -> None:
        self.step = int(step)
        self.kill = bool(kill)
        self.module = module

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        if self.module is not None and type(pl_module).__name__ != self.module:
            return
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure in step {self.step + 1}")


class SignalAtStep(pl.Callback):
    """Send ``signum`` to this process in the middle of an optimiser step, after ``step`` steps
    have completed (forward and backward have run, the update has not), as a scheduler would."""

    def __init__(self, step: int, signum: str = "SIGTERM") -> None:
        self.step = int(step)
        self.signum = signal.Signals[signum]

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class PoisonGradients(pl.Callback):
    """Make the gradients of the update that completes step ``step + 1`` NaN (a diverging run:
    the loss of that step is finite, the weights after it are not)."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if trainer.global_step == self.step:
            for parameter in pl_module.parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(float("nan"))


# ------------------------------------------------------------------------------ a full disk


def fill_disk(monkeypatch: Any, free: int, flush_fails: bool = True) -> None:
    """Make the disk look full: ``free`` bytes reported free and, with ``flush_fails``, flushing
    a file to it fails with ENOSPC (as file systems that allocate late report it)."""
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - free, free)

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    if flush_fails:
        monkeypatch.setattr(os, "fsync", fsync)


def torch_save_on_full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    """``torch.save`` into a file on a full disk: part of the file, then torch's own error."""
    Path(f).write_bytes(b"PK\x03\x04" + bytes(1024))
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


def atomic_save_on_full_disk(checkpoint: Any, filepath: Any) -> None:
    """Lightning's checkpoint write on a full disk: part of the file, then ENOSPC."""
    Path(filepath).write_bytes(bytes(4096))
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filepath))
