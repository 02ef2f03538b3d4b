"""Numerical precision settings of each stage on an accelerator (docs/performance.md).

* Backbone and heads: float32 matmuls at ``"high"`` (TF32 tensor cores on NVIDIA GPUs) and cuDNN
  with TF32 and autotuning, since every training and evaluation batch has one fixed shape. Under a
  mixed-precision trainer (``trainer=gpu`` / ``trainer=ddp``) the backbone runs in half precision
  anyway and these settings only reach what autocast keeps in float32.
* Losses: the products that feed a threshold, an argmax or a maximum (concept similarities,
  nearest concepts, the modularity's assignment) run at ``"highest"`` inside ``ops`` whatever is
  set here (:func:`cause_lightning.ops.exact_matmul`); the projection products of the contrastive
  loss follow the trainer's precision.
* Prediction on arbitrary image sizes keeps cuDNN autotuning off (a new shape would be tuned anew).

Nothing changes on the CPU: these settings would alter CPU results (and tests) for no gain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["StagePrecision", "STAGE_PRECISION", "apply_stage_precision", "float32_warning"]


@dataclass(frozen=True)
class StagePrecision:
    """Process-wide settings of one stage on a GPU."""

    matmul: str  # torch.set_float32_matmul_precision
    cudnn_tf32: bool
    cudnn_benchmark: bool


_FIXED_SHAPES = StagePrecision(matmul="high", cudnn_tf32=True, cudnn_benchmark=True)
STAGE_PRECISION: dict[str, StagePrecision] = {
    "mediator": _FIXED_SHAPES,
    "head": _FIXED_SHAPES,
    "probe": _FIXED_SHAPES,
    "eval": _FIXED_SHAPES,
    "predict": StagePrecision(matmul="high", cudnn_tf32=True, cudnn_benchmark=False),
}


def apply_stage_precision(stage: str, on_gpu: bool) -> StagePrecision | None:
    """Apply the settings of ``stage`` when it runs on a GPU; nothing on other devices.

    Args:
        stage: A key of :data:`STAGE_PRECISION`.
        on_gpu: Whether the stage's trainer runs on a CUDA device.

    Returns:
        The settings applied, or ``None`` when nothing was changed.

    Raises:
        ValueError: On an unknown stage.
    """
    if stage not in STAGE_PRECISION:
        raise ValueError(f"unknown stage {stage!r}; stages are {sorted(STAGE_PRECISION)}")
    if not on_gpu:
        return None
    settings = STAGE_PRECISION[stage]
    if torch.are_deterministic_algorithms_enabled():
        # Autotuning times the candidate kernels anew in every run and may keep another one,
        # which deterministic algorithms (trainer.deterministic=true) must not allow.
        settings = replace(settings, cudnn_benchmark=False)
    torch.set_float32_matmul_precision(settings.matmul)
    torch.backends.cudnn.allow_tf32 = settings.cudnn_tf32
    torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    return settings


def float32_warning(on_gpu: bool, precision: str | int | None) -> str | None:
    """The warning for a GPU trainer in full float32 precision, or ``None``.

    Args:
        on_gpu: Whether the trainer runs on a CUDA device.
        precision: The trainer's ``precision`` setting.

    Returns:
        A message naming the GPU presets, or ``None`` when there is nothing to say.
    """
    if not on_gpu or str(precision) not in ("32-true", "32", "None"):
        return None
    return (
        f"the trainer runs on a GPU in float32 (trainer.precision={precision}, the "
        "trainer=default preset): the backbone forward alone is several times slower than in "
        "mixed precision. Use trainer=gpu (one GPU) or trainer=ddp (all GPUs), which run "
        "16-mixed, or set trainer.precision=bf16-mixed."
    )
