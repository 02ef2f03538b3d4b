"""Shared Lightning glue of the CAUSE stages: the frozen backbone, the loss guards and the
rank-invariant randomness of data-parallel runs (docs/scaling.md).

Under DDP with a sequential ``DistributedSampler``, local sample ``j`` of rank ``r`` is sample
``j * W + r`` of the global batch (``W`` = world size). The random grid-sampling offsets of a step
are drawn for the whole global batch from a generator seeded by ``(seed, global_step, batch_idx)``
on every rank, and each rank keeps its rows, so an image gets the same offsets whatever the world
size. (``batch_idx`` keeps the micro-batches of an accumulated step apart.)

A Lightning checkpoint of a stage holds, besides weights, optimiser, scheduler and loop state,
the global random states (dropout draws from them) and the configuration signature of the run
(:attr:`StageModule.signature`), so a resumed run continues exactly where the killed one stopped
and a checkpoint of another configuration is recognised.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from cause_lightning.core.constants import CHECKPOINT_KEY, IGNORE_INDEX
from cause_lightning.core.errors import ExpectedError
from cause_lightning.inference.dense import deterministic_backward, upsample_to
from cause_lightning.ops import grid_sample_index
from cause_lightning.ops.pixels import normalize_uint8

__all__ = [
    "StageModule",
    "OptimizerFactory",
    "SchedulerFactory",
    "NonFiniteLossError",
    "upsample_to",
    "to_device",
    "linear_probe_loss",
    "step_generator",
    "GRID_STREAM",
    "BANK_STREAM",
    "random_states",
    "restore_random_states",
    "INIT_STREAM",
]

# The batch-transfer hooks below are the modules' on purpose (the data modules define none):
# Lightning's notice that it uses them although a data module was passed says nothing to users.
warnings.filterwarnings(
    "ignore",
    message=r"You have overridden `on_(before|after)_batch_transfer` in `LightningModule` but",
)

# `_partial_` optimisers and schedulers of `conf/method` (the hyper-parameters bound, the
# parameters and the optimiser left to the module).
OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


# Independent random streams of one training step (keys of `step_generator`).
GRID_STREAM = 0
BANK_STREAM = 1
INIT_STREAM = 2  # draws made once before training (the probe's fixed samples and seeding)


def step_generator(seed: int, stream: int, *keys: int) -> torch.Generator:
    """A CPU generator determined by the run seed, a stream id and the position in training.

    Every process of a data-parallel run builds the same generator for the same keys, so draws
    made for the global batch agree across ranks; a resumed run continues the same sequence.

    Args:
        seed: Run seed (``cfg.seed``).
        stream: Which draw (``GRID_STREAM``, ``BANK_STREAM``, ``INIT_STREAM``).
        *keys: Position keys: the global optimiser step and the batch index, then optional extras
            (e.g. the rank, for deliberately rank-specific draws).

    Returns:
        A seeded ``torch.Generator`` on the CPU.
    """
    keys = [int(k) % 2**63 for k in (seed, stream, *keys)]
    state = np.random.SeedSequence(keys).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def random_states() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, NumPy, Python) as plain values.

    NumPy's state is stored as lists so that ``torch.load(weights_only=True)`` reads it back.
    """
    name, keys, position, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: Mapping[str, Any]) -> None:
    """Set the global random states saved by :func:`random_states`."""
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


class NonFiniteLossError(ExpectedError, FloatingPointError):
    """A training loss became NaN or infinite; the step was not applied."""


class StageModule(pl.LightningModule):
    """Base of every stage module: holds the frozen backbone and keeps it out of checkpoints.

    The backbone is put in eval mode here and :meth:`train` keeps it there whenever the module
    is switched (Lightning restores the recorded mode of every submodule around its loops, so the
    frozen parts never run in training mode). The backbone's weights are not written to
    Lightning checkpoints (they are the user's upstream file and can be large); they are
    restored from the module itself when a checkpoint is loaded.

    Args:
        backbone: Frozen feature extractor ``[B,3,H,W] -> [B,D,h,w]``.
        seed: Seed of the per-step random draws (grid sampling, bank subsets).
        optimizer: Builds the optimiser from parameters (or groups) and ``lr``; default Adam.
        scheduler: Builds the learning-rate schedule, stepped once per epoch (None = constant).
    """

    def __init__(
        self,
        backbone: nn.Module,
        seed: int = 0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.optimizer_factory: OptimizerFactory = optimizer or torch.optim.Adam
        self.scheduler_factory = scheduler
        # The settings that determine the result, written into checkpoints (set by the pipeline).
        self.signature: dict[str, Any] = {}
        self._random_states: Mapping[str, Any] | None = None
        self.backbone = backbone
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> StageModule:
        super().train(mode)
        self.backbone.eval()
        return self

    def build_optimization(
        self, parameters: Iterable[Any], lr: float | None = None
    ) -> torch.optim.Optimizer | dict[str, Any]:
        """``configure_optimizers``' answer from the stage's optimiser and schedule factories.

        Args:
            parameters: Parameters, or parameter groups each with its own ``lr``.
            lr: Learning rate of plain parameters (None when every group sets its own).
        """
        extra = {} if lr is None else {"lr": lr}
        optimizer = self.optimizer_factory(parameters, **extra)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def world(self) -> tuple[int, int]:
        """``(world_size, global_rank)`` of the attached trainer, ``(1, 0)`` without one."""
        trainer = self._trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def grid_index(self, features: torch.Tensor, window: int, batch_idx: int) -> torch.Tensor:
        """Grid-sampling offsets of this rank's images for the current step.

        Drawn for the global batch (``B * W`` images) from :func:`step_generator`, rows
        ``rank::W`` kept (local image ``j`` is global image ``j * W + rank``).

        Args:
            features: Local feature maps ``[B, C, h, w]``.
            window: Grid-sampling window.
            batch_idx: Index of the batch in the epoch (as passed to ``training_step``).

        Returns:
            Long offsets ``[B, (h // window) * (w // window)]`` on the features' device.
        """
        world, rank = self.world()
        batch, _, height, width = features.shape
        generator = step_generator(self.seed, GRID_STREAM, self.global_step, batch_idx)
        index = grid_sample_index(batch * world, height, width, window, generator=generator)
        return to_device(index[rank::world], features.device)  # B N

    def gather_global(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-gather a per-rank batch ``[B, ...]`` into the global batch ``[B * W, ...]``.

        Rows come out in global sample order (``j * W + r``), the order of a one-process run.
        The result carries no gradient.
        """
        world, _ = self.world()
        if world == 1:
            return tensor
        gathered = self.all_gather(tensor.detach().contiguous())  # W B ...
        return gathered.transpose(0, 1).flatten(0, 1)  # (B W) ...

    def global_rows(self, batch: int) -> torch.Tensor:
        """Global-batch position of each local image: ``arange(B) * W + rank`` (long ``[B]``)."""
        world, rank = self.world()
        return torch.arange(batch, device=self.device) * world + rank

    def setup(self, stage: str) -> None:
        """Give every metric private state in this process.

        A spawning strategy (``ddp_spawn``) hands the module to its processes through shared
        memory, metric states included: without this, the ranks would all count into one
        confusion matrix, and the sum across ranks would count every pixel once per rank.
        """
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise uint8 images and widen uint8 labels on the device (every stage).

        The loaders send uint8 pixels and labels across the worker boundary and to the device
        (a quarter and an eighth of float32 / int64), and Lightning's precision plugin converts
        inputs before the transfer, when they are still uint8; float images pass unchanged.
        """
        if not isinstance(batch, dict):
            return batch
        image = batch.get("image")
        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            image = normalize_uint8(image)  # B 3 H W float32
            if self._trainer is not None:  # the precision's input dtype (e.g. float64, bf16-true)
                image = self.trainer.precision_plugin.convert_input(image)
            batch["image"] = image
        label = batch.get("label")
        if isinstance(label, torch.Tensor) and label.dtype != torch.long:
            batch["label"] = label.long()  # B H W
        return batch

    @torch.no_grad()
    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features ``[B,D,h,w]`` of ImageNet-normalised images ``[B,3,H,W]``."""
        return self.backbone(images)

    def check_finite(self, loss: torch.Tensor, **parts: torch.Tensor) -> None:
        """Stop with the step and the cause when a loss is not finite (before any update)."""
        if torch.isfinite(loss).all():
            return
        bad = [name for name, value in parts.items() if not torch.isfinite(value).all()]
        raise NonFiniteLossError(
            f"non-finite training loss at global step {self.global_step} "
            f"(epoch {self.current_epoch}); non-finite terms: {bad or ['total']}. No update was "
            "applied (likely causes: learning rate, clipping, or NaN inputs)"
        )

    def finish_step(self) -> None:
        """Apply the work of the last step that follows the optimiser update (EMA, banks).

        Called by the module's own ``on_train_batch_end`` and by a checkpoint callback before it
        writes (callbacks run before the module's hook), so a checkpoint never misses it. It must
        do its work once per step whoever calls it first. Default: nothing.
        """

    def defer_finite_check(self, loss: torch.Tensor) -> None:
        """Record on the device whether ``loss`` is finite; :meth:`raise_if_nonfinite` reads it.

        The sync-free counterpart of :meth:`check_finite` for steps that must not wait for the
        device: the flag is read at the end of every training epoch and before every checkpoint
        is written, so a non-finite loss still stops the run before it reaches a checkpoint.
        """
        finite = torch.isfinite(loss.detach()).all()
        flag = getattr(self, "_finite_flag", None)
        self._finite_flag = finite if flag is None else flag & finite
        if getattr(self, "_finite_since", None) is None:
            self._finite_since = int(self.global_step)

    def raise_if_nonfinite(self) -> None:
        """Read the flag of :meth:`defer_finite_check` (one read-back) and stop on a bad loss."""
        flag = getattr(self, "_finite_flag", None)
        since = getattr(self, "_finite_since", None)
        self._finite_flag, self._finite_since = None, None
        if flag is None or bool(flag):
            return
        raise NonFiniteLossError(
            f"non-finite training loss between global steps {since} and {self.global_step} "
            f"(epoch {self.current_epoch}), found at the deferred check (debug checks are off, so "
            "steps are not checked one by one); updates after it were applied, and no checkpoint "
            "was written after it: resume from the stage's last.ckpt after fixing the cause "
            "(learning rate, clipping, or NaN inputs), with method.debug_checks=true to stop at "
            "the exact step"
        )

    def log_progress(self, name: str, value: torch.Tensor, batch_size: int) -> None:
        """Log a training value to the loggers and the progress bar without a per-step read-back.

        Lightning turns every progress-bar value into a Python number after every batch, which on
        an accelerator waits for the device. This logs a host copy of ``value`` instead, taken at
        the first step and on the steps on which the loggers write (every
        ``trainer.log_every_n_steps``; their own conversion reads the value back then anyway), so
        the loggers get every value they write and the bar shows the last of them.

        Args:
            name: Metric name.
            value: Scalar tensor of this step.
            batch_size: Images of the step.
        """
        if self._trainer is None:  # no loop, no progress bar: Lightning only warns
            self.log(name, value, prog_bar=True, batch_size=batch_size)
            return
        every = int(self.trainer.log_every_n_steps)
        shown: dict[str, torch.Tensor] | None = getattr(self, "_progress_values", None)
        if shown is None:
            shown = self._progress_values = {}
        if name not in shown or (every and (self.global_step + 1) % every == 0):
            # The read-back, once per logging interval; a copy of its own on a CPU run too.
            shown[name] = value.detach().to("cpu", copy=True)
        self.log(name, shown[name], prog_bar=True, batch_size=batch_size)

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.raise_if_nonfinite()
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]
        checkpoint[CHECKPOINT_KEY] = {"signature": self.signature, "random": random_states()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Restored just before the first resumed step, when the uninterrupted run would draw next.
        self._random_states = checkpoint.get(CHECKPOINT_KEY, {}).get("random")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._random_states is not None:
            restore_random_states(self._random_states)
            self._random_states = None

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        merged = dict(state_dict)
        if not any(k.startswith("backbone.") for k in merged):
            merged.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        return super().load_state_dict(merged, strict=strict, assign=assign)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait (page-locked, non-blocking)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda":
        tensor = tensor.contiguous().pin_memory()
    return tensor.to(device, non_blocking=True)


def linear_probe_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Pixel cross-entropy of upsampled probe logits on labels in ``[0, C)``.

    Args:
        logits: ``[B,C,h,w]`` probe logits on the feature grid.
        labels: ``[B,H,W]`` long, ``ignore_index`` for unlabelled pixels.
        num_classes: C; labels outside ``[0, C)`` are ignored as in the reference.
        ignore_index: Label value of unlabelled pixels.

    Returns:
        Scalar mean cross-entropy over labelled pixels (0 when a batch has none), formed as a sum
        over a device-side count so that no value is read back. Under deterministic algorithms
        (``trainer.deterministic=true``) the upsampling is a matrix product and the sum is taken
        over per-pixel losses: CUDA's bilinear backward and summed ``nll_loss2d`` are
        nondeterministic (docs/performance.md §10).
    """
    deterministic = deterministic_backward(logits)
    logits = upsample_to(logits, tuple(labels.shape[-2:]))  # B C H W
    target = torch.where((labels >= 0) & (labels < num_classes), labels, ignore_index)
    labelled = (target != ignore_index).sum()
    if deterministic:
        pixels = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
        total = pixels.sum()  # B H W -> scalar, ignored pixels are 0
    else:
        total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / labelled.clamp_min(1).to(total.dtype)
