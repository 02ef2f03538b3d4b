"""Lightning callbacks of the project: resume checkpoints (also on pre-emption), a progress bar
with throughput, DDP teardown."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import RichProgressBar

from cause_lightning.core.files import atomic_write
from cause_lightning.core.logs import get_logger

__all__ = ["StageCheckpoint", "ThroughputProgressBar", "DestroyProcessGroup", "weights_finite"]

log = get_logger(__name__)


def weights_finite(module: torch.nn.Module) -> bool:
    """True when every floating-point parameter and buffer of ``module`` is finite."""
    return all(
        bool(torch.isfinite(t).all())
        for t in module.state_dict().values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    )


class StageCheckpoint(pl.Callback):
    """Keeps one resume checkpoint of a training stage up to date, and writes it on pre-emption.

    The file is rewritten at the end of every training epoch, every ``train_time_interval``
    seconds and, optionally, every ``every_n_train_steps`` optimiser steps, so a killed run
    loses at most that much work. Each write goes through
    :func:`~cause_lightning.core.files.atomic_write`, so a kill during the write leaves the previous
    checkpoint intact. A state holding non-finite weights is never written: the file on disk is
    always one a run can continue from.

    **SIGTERM** (pre-emption, a scheduler's time limit) is noted by Lightning's signal handling
    (``trainer.received_sigterm``); the checkpoint is then written at the end of the running
    optimiser step, and Lightning stops the loop with ``SIGTERMException``, which the command line
    turns into a non-zero exit. The scheduler's **warning signal** (the requeue signal of
    Lightning's ``SLURMEnvironment``, ``SIGUSR1`` by default, e.g. ``#SBATCH
    --signal=USR1@90``) is passed on as a SIGTERM to this process after Lightning's own handler
    (which requeues the SLURM job when ``auto_requeue`` is on) has run, so the run stops the same
    way before the time limit kills it.

    Args:
        dirpath: Folder of the checkpoint (the pipeline sets the stage's folder in the artifact
            directory when this is ``None``).
        filename: Name of the checkpoint file.
        every_n_train_steps: Also write every this many optimiser steps (``None``: only by time
            and at epoch ends).
        train_time_interval: Seconds between two writes during an epoch (``None``: only at epoch
            ends and by step count).
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        filename: str = "last.ckpt",
        every_n_train_steps: int | None = None,
        train_time_interval: float | None = 300.0,
    ) -> None:
        super().__init__()
        if every_n_train_steps is not None and int(every_n_train_steps) < 1:
            raise ValueError(f"every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        if train_time_interval is not None and not float(train_time_interval) > 0:
            raise ValueError(f"train_time_interval must be > 0 or null, got {train_time_interval}")
        self.dirpath = None if dirpath is None else str(dirpath)
        self.filename = filename
        self.every_n_train_steps = None if every_n_train_steps is None else int(every_n_train_steps)
        self.train_time_interval = (
            None if train_time_interval is None else float(train_time_interval)
        )
        self._last_time = time.monotonic()

    @property
    def path(self) -> Path:
        if self.dirpath is None:
            raise RuntimeError("StageCheckpoint.dirpath is not set")
        return Path(self.dirpath) / self.filename

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_time = time.monotonic()
        _forward_as_sigterm(_warning_signal(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = int(trainer.global_step)
        by_steps = self.every_n_train_steps is not None and step % self.every_n_train_steps == 0
        by_time = (
            self.train_time_interval is not None
            and time.monotonic() - self._last_time >= self.train_time_interval
        )
        stopping = trainer.received_sigterm  # Lightning stops the loop after this hook
        # Every rank must take the same decision (the write is collective); rank 0's view rules.
        if trainer.strategy.broadcast(by_steps or by_time or stopping, src=0):
            written = self.save(trainer, pl_module)
            if stopping and written:
                log.warning(
                    "SIGTERM received: wrote %s at global step %d; the run stops now, continue "
                    "it with ckpt_path=last",
                    self.path,
                    step,
                )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer, pl_module)

    def save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Write the checkpoint now (all ranks call it; rank 0 writes); False when it was not
        written (a debug run, or non-finite weights)."""
        if trainer.fast_dev_run or trainer.sanity_checking:
            return False
        finish_step = getattr(pl_module, "finish_step", None)
        if callable(finish_step):
            finish_step()  # the step's post-optimiser work belongs in the checkpoint
        if not weights_finite(pl_module):
            log.warning(
                "not writing %s at global step %d: the weights are not finite; the previous "
                "checkpoint is kept",
                self.path,
                trainer.global_step,
            )
            return False
        path = self.path
        # The dump is collective; under DDP only rank 0 writes the file (full state: optimiser,
        # loops, data position).
        if trainer.is_global_zero:
            atomic_write(
                path,
                lambda tmp: trainer.save_checkpoint(tmp, weights_only=False),
                need=_checkpoint_bytes(path, trainer, pl_module),
            )
        else:
            trainer.save_checkpoint(path, weights_only=False)
        trainer.strategy.barrier("stage_checkpoint")
        self._last_time = time.monotonic()
        return True


def _checkpoint_bytes(path: Path, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
    """About how large the checkpoint will be: the previous one, else the tensors it holds."""
    if path.is_file():
        return path.stat().st_size
    tensors = list(pl_module.state_dict().values())
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return sum(t.nbytes for t in tensors if isinstance(t, torch.Tensor))


def _warning_signal(trainer: pl.Trainer) -> signal.Signals:
    """The scheduler's warning signal, as Lightning's SLURM support chooses it."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if isinstance(environment, SLURMEnvironment) and environment.requeue_signal is not None:
        return signal.Signals(environment.requeue_signal)
    return signal.SIGUSR1


def _forward_as_sigterm(signum: signal.Signals) -> None:
    """Make ``signum`` also send SIGTERM to this process, after the handler installed for it.

    Lightning installs its handlers (SIGTERM notice, SLURM requeue) when a fit starts and restores
    the previous ones when it ends, this one included.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # Python takes signal handlers in the main thread only (as Lightning does)
    previous = signal.getsignal(signum)

    def forward(received: int, frame: FrameType | None) -> None:
        if callable(previous):
            previous(received, frame)
        log.warning("received %s: stopping at the end of this step", signal.Signals(received).name)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signum, forward)


class ThroughputProgressBar(RichProgressBar):
    """Rich progress bar that also shows images per second of the running loop.

    The throughput is measured per process from the batch sizes seen since the loop started, so
    it is the backbone-bound figure users compare across machines. Training shows it among the
    metrics; the test loop (evaluation, including the CRF) shows it in the bar's description,
    because Rich draws the metrics column only while fitting.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._images = 0
        self._start = time.perf_counter()

    def _reset(self) -> None:
        self._images = 0
        self._start = time.perf_counter()

    def _count(self, batch: Any) -> None:
        if isinstance(batch, dict) and isinstance(batch.get("image"), torch.Tensor):
            self._images += int(batch["image"].shape[0])

    def _rate(self) -> str | None:
        elapsed = time.perf_counter() - self._start
        if not self._images or elapsed <= 0:
            return None
        return f"{self._images / elapsed:.1f}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        super().on_train_epoch_start(trainer, pl_module)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        super().on_test_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[override]
        self._count(batch)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:  # type: ignore[override]
        self._count(batch)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        rate = self._rate()
        if self.is_enabled and self.progress is not None and self.test_progress_bar_id is not None:
            if rate is not None:
                description = f"{self.test_description} ({rate} img/s)"
                self.progress.update(self.test_progress_bar_id, description=description)

    def get_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        rate = self._rate()
        if rate is not None:
            metrics["img/s"] = rate
        return metrics


class DestroyProcessGroup(pl.Callback):
    """Tear the process group down cleanly at the end of a ``ddp_spawn`` run.

    Without an explicit barrier and destroy, spawned workers occasionally abort at interpreter
    exit after training has finished.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
