"""A Lightning callback that times a run's own loop: the instrument of ``benchmarks/gpu.sh``.

It is added to a run through the ``callbacks`` group and is never part of the default config::

    PYTHONPATH=benchmarks python -m cause_lightning stage=head ... \\
        +callbacks.step_timer._target_=step_timer.StepTimer \\
        +callbacks.step_timer.path=timing.json

What it records, the device synchronised at every mark so that each figure is the time the work
took, not the time its launch took:

* **training steps**: the wall time from the end of one training step to the end of the next,
  so everything a step costs in the real loop counts: waiting for the loader, the batch transfer
  and on-device normalisation, forward, backward, gradient scaling and clipping, the optimiser, the
  module's post-step work (EMA, bank update), logging, the progress bar and the checkpoint
  callback. Steps after ``warmup`` are the sample;
* **the backbone forward on the same batch**, in the precision context of the step, timed just
  before each sampled step and subtracted from that step's interval (the ratio's denominator);
* **FLOPs** of one whole training step (forward, backward, optimiser) and of one backbone forward,
  counted by :class:`torch.utils.flop_counter.FlopCounterMode` on the last warm-up step, since
  counting slows the step it counts;
* **validation and test batches**: the same end-to-end intervals, per loop run;
* **epoch ends**: from the end of the epoch's last step (or its validation) to the end of the epoch
  hooks, which write the stage's checkpoint;
* **start-up and end**: from fit start to the end of the first step, and from the last epoch end
  to fit end (the probe's seeding and centroid selection, the loaders' workers starting);
* the peak device memory of the fit.

``fill_bank`` fills the head stage's concept bank to capacity before the second step, through
its own ``update``, with normalised random entries in the dtype the stage chose for it: the
steady state of a long run, where every concept has been seen ``capacity`` times over, without
running the thousands of steps it takes to get there.

Each loop end rewrites ``path`` as JSON with everything recorded so far.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cause_lightning.models import ConceptBank

__all__ = ["StepTimer", "fill_bank"]

# Rows of one bank update while filling: bounds the random entries held at once.
_FILL_ROWS = 65_536


def _sync(device: torch.device) -> float:
    """Wait for ``device`` to finish its queued work; the time after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    """Peak bytes of tensors on ``device`` since the last reset (``None`` where unknown)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _images(batch: Any) -> int:
    image = batch.get("image") if isinstance(batch, dict) else None
    return int(image.shape[0]) if isinstance(image, torch.Tensor) else 0


@torch.no_grad()
def fill_bank(bank: ConceptBank, seed: int = 0) -> None:
    """Fill every slot of an allocated concept bank, through :meth:`ConceptBank.update`.

    Each concept gets enough normalised random entries for its kept fraction to fill its
    ``capacity`` slots, in the buffer's dtype and on its device.

    Args:
        bank: The bank, allocated by a first update (which sets its dtype and device).
        seed: Seed of the entries and of the subset draws.

    Raises:
        ValueError: When the bank is not allocated yet or keeps no entry at all.
        RuntimeError: When a slot is still empty afterwards.
    """
    storage = bank.storage
    if storage is None:
        raise ValueError("the concept bank is not allocated yet: fill it after the first step")
    if bank.keep_fraction <= 0:
        raise ValueError("a bank with keep_fraction 0 never fills")
    per_concept = math.ceil(bank.capacity / bank.keep_fraction)
    concepts_per_update = max(1, _FILL_ROWS // per_concept)
    device = storage.device
    values = torch.Generator(device=device).manual_seed(seed)
    draws = torch.Generator().manual_seed(seed)
    for first in range(0, bank.num_concepts, concepts_per_update):
        last = min(first + concepts_per_update, bank.num_concepts)
        ids = torch.arange(first, last, device=device).repeat_interleave(per_concept)  # n
        entries = torch.randn(ids.shape[0], bank.dim, device=device, generator=values)  # n P
        entries = F.normalize(entries, dim=-1).to(storage.dtype)
        bank.update(ids, entries, generator=draws, validate=False)
    if not bool((bank.count == bank.capacity).all()):
        raise RuntimeError("the concept bank still has empty slots after filling it")


class StepTimer(pl.Callback):
    """Synchronised per-step wall times of a run's own loops, written to a JSON file.

    Args:
        path: JSON file written at the end of every fit and test run.
        warmup: Training steps before the sample; the last of them is the one whose FLOPs are
            counted (at least 2, so that the bank exists before it when ``fill_bank`` is on).
        fill_bank: Fill the module's concept bank (its ``bank`` attribute) to capacity before the
            second training step.

    Raises:
        ValueError: On fewer than 2 warm-up steps.
    """

    def __init__(self, path: str | Path, warmup: int = 5, fill_bank: bool = False) -> None:
        super().__init__()
        if int(warmup) < 2:
            raise ValueError(
                f"warmup must be at least 2 (steps before the sample; the last one counts the "
                f"FLOPs), got {warmup}"
            )
        self.path = Path(path)
        self.warmup = int(warmup)
        self.fill_bank = bool(fill_bank)
        self.record: dict[str, Any] = {
            "warmup": self.warmup,
            "train": [],
            "validate": [],
            "test": [],
            "epoch_end_s": [],
        }
        self._fit_start = 0.0
        self._epoch_end: float | None = None
        self._mark = 0.0  # time of the last synchronised mark that ends a timed span
        self._steps = 0  # training steps of this fit so far
        self._backbone_s: float | None = None
        self._counter: FlopCounterMode | None = None
        self._loop: dict[str, Any] | None = None

    # ------------------------------------------------------------------ fit
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _reset_peak(pl_module.device)
        self._steps = 0
        self._mark = self._fit_start = _sync(pl_module.device)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._backbone_s = None
        if self._steps == 1 and self.fill_bank:
            bank = getattr(pl_module, "bank", None)
            if not isinstance(bank, ConceptBank):
                raise ValueError(
                    f"fill_bank=true, but {type(pl_module).__name__} has no concept bank: set it "
                    "for the head stage only"
                )
            fill_bank(bank)
        if self._steps == self.warmup - 1:
            with FlopCounterMode(display=False) as counter:
                self._backbone(trainer, pl_module, batch)
            self.record["backbone_flops"] = counter.get_total_flops()
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        elif self._steps >= self.warmup:
            start = _sync(pl_module.device)
            self._backbone(trainer, pl_module, batch)
            self._backbone_s = _sync(pl_module.device) - start

    def _backbone(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            pl_module.extract(batch["image"])

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        now = _sync(pl_module.device)
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.record["step_flops"] = self._counter.get_total_flops()
            self._counter = None
        spent = now - self._mark - (self._backbone_s or 0.0)
        if self._steps == 0:
            self.record["first_step_end_s"] = now - self._fit_start
        self.record["train"].append(
            {"seconds": spent, "backbone_s": self._backbone_s, "images": _images(batch)}
        )
        self._steps += 1
        self._mark = now

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._counter is not None:  # a failed step must not leave its counter active
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = _sync(pl_module.device)
        self.record["epoch_end_s"].append(now - self._mark)
        self._mark = self._epoch_end = now

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        now = _sync(pl_module.device)
        self.record["fit_s"] = now - self._fit_start
        self.record["end_s"] = now - (self._epoch_end or now)
        self.record["peak_memory_bytes"] = _peak(pl_module.device)
        self._write()

    # ------------------------------------------------------------------ validation and test
    def _loop_start(self, kind: str, device: torch.device) -> None:
        if kind == "test":  # a validation inside a fit counts towards the fit's peak
            _reset_peak(device)
        self._loop = {"batches": [], "images": [], "start": _sync(device)}
        self._loop["last"] = self._loop["start"]
        self.record[kind].append(self._loop)

    def _loop_batch(self, batch: Any, device: torch.device) -> None:
        assert self._loop is not None
        now = _sync(device)
        self._loop["batches"].append(now - self._loop["last"])
        self._loop["images"].append(_images(batch))
        self._loop["last"] = now

    def _loop_end(self, device: torch.device) -> float:
        assert self._loop is not None
        now = _sync(device)
        self._loop["wall_s"] = now - self._loop.pop("start")
        self._loop["peak_memory_bytes"] = _peak(device)
        self._loop.pop("last")
        self._loop = None
        return now

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_start("validate", pl_module.device)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._loop_batch(batch, pl_module.device)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation inside a fit is timed on its own, not as part of the next step or epoch end.
        self._mark = self._loop_end(pl_module.device)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_start("test", pl_module.device)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._loop_batch(batch, pl_module.device)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._loop_end(pl_module.device)
        self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.record, indent=1) + "\n")
