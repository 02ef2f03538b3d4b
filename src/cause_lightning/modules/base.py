"""Shared Lightning glue of the CAUSE stages: the frozen backbone and the loss guards."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StageModule", "NonFiniteLossError", "upsample_to", "linear_probe_loss"]


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; the step was not applied."""


class StageModule(pl.LightningModule):
    """Base of every stage module: holds the frozen backbone and keeps it out of checkpoints.

    Lightning switches the whole module to training mode when a fit loop starts; :meth:`train`
    puts the backbone straight back into eval mode. The backbone's weights are not written to
    Lightning checkpoints (they are the user's upstream file and can be large); they are
    restored from the module itself when a checkpoint is loaded.

    Args:
        backbone: Frozen feature extractor ``[B,3,H,W] -> [B,D,h,w]``.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        for parameter in self.backbone.parameters():
            parameter.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> StageModule:
        super().train(mode)
        self.backbone.eval()
        return self

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
            "applied; the last good checkpoint is the stage's last.ckpt (resume with "
            "ckpt_path=last after fixing the cause: learning rate, clipping, or NaN inputs)"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("backbone.")]:
            del state[key]

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        merged = dict(state_dict)
        if not any(k.startswith("backbone.") for k in merged):
            merged.update({f"backbone.{k}": v for k, v in self.backbone.state_dict().items()})
        return super().load_state_dict(merged, strict=strict, assign=assign)


def upsample_to(features: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling ``[B,C,h,w] -> [B,C,H,W]`` (align_corners=False, as the reference)."""
    if tuple(features.shape[-2:]) == tuple(size):
        return features
    return F.interpolate(features, size=size, mode="bilinear", align_corners=False)


def linear_probe_loss(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Pixel cross-entropy of upsampled probe logits on labels in ``[0, C)``.

    Args:
        logits: ``[B,C,h,w]`` probe logits on the feature grid.
        labels: ``[B,H,W]`` long, ``ignore_index`` for unlabelled pixels.
        num_classes: C; labels outside ``[0, C)`` are ignored as in the reference.
        ignore_index: Label value of unlabelled pixels.

    Returns:
        Scalar mean cross-entropy over labelled pixels (0 when a batch has none).
    """
    logits = upsample_to(logits, tuple(labels.shape[-2:]))  # B C H W
    target = torch.where((labels >= 0) & (labels < num_classes), labels, ignore_index)
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)
