"""Stage 3 (fine-tuning): cluster probe by modularity and the linear probe (method.md §6).

The head is frozen and the probe input is detached, which fixes the reference's label leak
(method.md §6.3). ``reference_leak=True`` reproduces the released behaviour for comparison: the
linear-probe loss then trains the teacher head, and every report is labelled accordingly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cause_lightning.logs import get_logger
from cause_lightning.metrics import UnsupervisedSegmentationMetrics
from cause_lightning.models import ClusterProbe, LinearProbe
from cause_lightning.modules.base import StageModule, linear_probe_loss, upsample_to
from cause_lightning.modules.head import supervised_metrics
from cause_lightning.ops import grid_sample_tokens, modularity_loss

__all__ = ["ProbeModule"]

log = get_logger(__name__)


class ProbeModule(StageModule):
    """Fits the class centroids ``[C, R]`` and the linear probe on a frozen teacher head.

    Args:
        backbone: Frozen backbone.
        head: The stage-2 teacher head (loaded).
        linear: The stage-2 linear probe (training continues from it).
        num_classes: C.
        lr: Adam learning rate of the linear probe (and of the head with ``reference_leak``).
        cluster_lr: Adam learning rate of the centroids.
        weight_decay: Weight decay of the segment parameters (not of the centroids).
        temperature: Modularity temperature.
        window: Grid-sampling window.
        step_size: StepLR step in epochs.
        gamma: StepLR decay.
        clip: Grad-norm clip of the segment parameters (None = none).
        head_dropout: Keep the frozen head's dropout active while the centroids are fitted.
        reference_leak: Reproduce the released label leak into the head (labelled).
        seed: Seed of the per-step grid sampling.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        linear: LinearProbe,
        num_classes: int,
        lr: float = 4e-3,
        cluster_lr: float = 4e-3,
        weight_decay: float = 1e-4,
        temperature: float = 0.1,
        window: int = 4,
        step_size: int = 2,
        gamma: float = 0.5,
        clip: float | None = None,
        head_dropout: bool = True,
        reference_leak: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone, seed=seed)
        self.save_hyperparameters(ignore=["backbone", "head", "linear"])
        self.head = head.requires_grad_(reference_leak)
        self.linear = linear
        self.cluster = ClusterProbe(num_classes, head.reduced_dim)
        if reference_leak:
            log.warning(
                "reference_leak=true: the linear-probe loss trains the head, as the released "
                "code does; results are NOT unsupervised and are labelled as such"
            )
        self.val_cluster = UnsupervisedSegmentationMetrics(num_classes)
        self.val_linear = supervised_metrics(num_classes, "val/linear/")

    def train(self, mode: bool = True) -> ProbeModule:
        super().train(mode)
        # The head's dropout is a stage option, not a side effect of Lightning's train().
        self.head.train(mode and (self.hparams.head_dropout or self.hparams.reference_leak))
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning starts fitting with the modes the modules were built in (it never calls
        # train()), so the head-dropout option is applied here.
        self.train(True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features = self.extract(batch["image"])  # B D h w
        with torch.set_grad_enabled(self.hparams.reference_leak):
            segment = self.head(features)  # B R h w
        window = self.hparams.window
        index = self.grid_index(segment, window, batch_idx)  # B N, whatever the world size
        tokens, _ = grid_sample_tokens(segment.detach(), window=window, index=index)  # B N R
        loss_cluster = modularity_loss(
            tokens, self.cluster.centroids, temperature=self.hparams.temperature
        )
        probe_input = segment if self.hparams.reference_leak else segment.detach()
        loss_linear = linear_probe_loss(
            self.linear(probe_input), batch["label"], self.hparams.num_classes
        )
        loss = loss_cluster + loss_linear
        self.check_finite(loss, loss_cluster=loss_cluster, loss_linear=loss_linear)
        batch_size = tokens.shape[0]
        self.log("train/modularity", loss_cluster, prog_bar=True, batch_size=batch_size)
        self.log("train/loss_linear", loss_linear, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        features = self.extract(batch["image"])
        segment = self.head(features)  # B R h w
        size = tuple(batch["label"].shape[-2:])
        cosine = self.cluster.cosine(upsample_to(segment, size))  # B C H W
        self.val_cluster.update(cosine.argmax(1), batch["label"])
        logits = upsample_to(self.linear(segment), size)
        self.val_linear.update(logits.argmax(1), batch["label"])

    def on_validation_epoch_end(self) -> None:
        scores = self.val_cluster.compute()
        self.log("val/cluster/mIoU", float(scores["mIoU"]), prog_bar=True)
        self.log("val/cluster/pAcc", float(scores["pAcc"]))
        self.log_dict(self.val_linear.compute())
        self.val_cluster.reset()
        self.val_linear.reset()

    def _segment_parameters(self) -> list[nn.Parameter]:
        parameters = list(self.linear.parameters())
        if self.hparams.reference_leak:
            parameters += list(self.head.parameters())
        return parameters

    def configure_optimizers(self) -> dict[str, Any]:
        # One Adam with two groups equals the reference's two Adams (Adam is per parameter).
        optimizer = torch.optim.Adam(
            [
                {
                    "params": self._segment_parameters(),
                    "lr": self.hparams.lr,
                    "weight_decay": self.hparams.weight_decay,
                },
                {"params": [self.cluster.centroids], "lr": self.hparams.cluster_lr},
            ]
        )
        scheduler = torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=self.hparams.step_size, gamma=self.hparams.gamma
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # The reference clips the segment parameters only, never the centroids.
        if self.hparams.clip is not None:
            torch.nn.utils.clip_grad_norm_(self._segment_parameters(), self.hparams.clip)

    def export(self) -> dict[str, Any]:
        """Artifact payload of ``probe.pt`` (without meta)."""
        payload: dict[str, Any] = {
            "centroids": self.cluster.centroids.detach().clone(),
            "linear_state": {k: v.detach().clone() for k, v in self.linear.state_dict().items()},
        }
        if self.hparams.reference_leak:
            payload["head_state"] = {
                k: v.detach().clone() for k, v in self.head.state_dict().items()
            }
        return payload
