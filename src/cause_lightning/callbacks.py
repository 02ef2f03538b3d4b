"""Lightning callbacks of the project: a progress bar with throughput, DDP teardown."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["ThroughputProgressBar", "DestroyProcessGroup"]


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
