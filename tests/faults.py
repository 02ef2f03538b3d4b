"""Faults injected into training runs through the callbacks config group (tests only)."""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning.pytorch as pl


class FailAtStep(pl.Callback):
    """Stop a run in the middle of an optimiser step, after ``step`` steps have completed.

    The step's forward and backward have run; its update has not. ``kill=True`` sends SIGKILL to
    the process (nothing is flushed, no handler runs); otherwise a ``RuntimeError`` is raised.
    """

    def __init__(self, step: int, kill: bool = False) -> None:
        self.step = int(step)
        self.kill = bool(kill)

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure in step {self.step + 1}")


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
