"""Stage 1 (mediator): learn the concept clusterbook by soft graph modularity (method.md §4).

The loss is a mean over images and the grid offsets are drawn per global-batch position
(:meth:`StageModule.grid_index`), so DDP's gradient average over equal shards equals the gradient
of one process on the global batch (docs/scaling.md).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from torch import nn

from cause_lightning.core.bounds import COUNT, OPTIONAL_COUNT, POSITIVE, SEED
from cause_lightning.modules.base import OptimizerFactory, SchedulerFactory, StageModule
from cause_lightning.ops import grid_sample_tokens, modularity_loss

__all__ = ["MediatorModule"]


class MediatorModule(StageModule):
    """Trains the clusterbook ``[K, D]`` on grid-sampled frozen backbone tokens.

    Every hyper-parameter comes from ``method.mediator`` (conf/method/cause.yaml); none has a
    default here.

    Args:
        backbone: Frozen backbone with attribute ``embed_dim``.
        num_concepts: K, number of concepts (2048 in the reference).
        lr: Adam learning rate (absolute; see ``derived.mediator.lr``).
        temperature: Modularity temperature tau.
        window: Grid-sampling window.
        chunk_size: Concepts per chunk of the max-product (None = automatic).
        debug_checks: Check the grid-sampling offsets and the loss's finiteness at every step
            (each check reads a value back from the device). Off: the step never waits for the
            device, and the loss is checked at the end of each epoch and before each checkpoint.
        optimizer: Optimiser factory (``method.mediator.optimizer``; None = Adam).
        scheduler: Per-epoch schedule factory (``method.mediator.scheduler``; None = constant).
        seed: Seed of the per-step grid sampling.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_concepts: Annotated[int, COUNT],
        lr: float,
        temperature: Annotated[float, POSITIVE],
        window: Annotated[int, COUNT],
        chunk_size: Annotated[int | None, OPTIONAL_COUNT],
        debug_checks: bool,
        optimizer: OptimizerFactory | None,
        scheduler: SchedulerFactory | None,
        seed: Annotated[int, SEED],
    ) -> None:
        super().__init__(backbone, seed=seed, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["backbone", "optimizer", "scheduler"])
        dim = int(backbone.embed_dim)
        bound = 1.0 / num_concepts
        self.clusterbook = nn.Parameter(torch.empty(num_concepts, dim).uniform_(-bound, bound))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features = self.extract(batch["image"])  # B D h w
        window = self.hparams.window
        check = bool(self.hparams.debug_checks)
        index = self.grid_index(features, window, batch_idx)  # B N
        tokens, _ = grid_sample_tokens(features, window, index, validate=check)  # B N D
        loss = modularity_loss(
            tokens,
            self.clusterbook,
            temperature=self.hparams.temperature,
            chunk_size=self.hparams.chunk_size,
        )
        if check:
            self.check_finite(loss, modularity=loss)
        else:
            self.defer_finite_check(loss)
        self.log_progress("train/modularity", loss, batch_size=tokens.shape[0])
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        return self.build_optimization([self.clusterbook], lr=self.hparams.lr)

    def export(self) -> dict[str, Any]:
        """Artifact payload of ``clusterbook.pt`` (without meta)."""
        return {"clusterbook": self.clusterbook.detach().float().cpu().clone()}
