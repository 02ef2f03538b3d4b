"""Per-stage precision settings on a GPU and the float32-on-GPU warning (docs/performance.md)."""

from __future__ import annotations

import pytest
import torch

from cause_lightning.ops import exact_matmul, nearest_concept
from cause_lightning.stages.precision import STAGE_PRECISION, apply_stage_precision, float32_warning


@pytest.fixture
def restore_settings():
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def test_gpu_stages_use_high_matmuls_and_tune_fixed_shapes(restore_settings) -> None:
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.benchmark = False
    assert apply_stage_precision("head", on_gpu=False) is None  # the CPU is left alone
    assert torch.get_float32_matmul_precision() == "highest"
    for stage in ("mediator", "head", "probe", "eval"):
        settings = apply_stage_precision(stage, on_gpu=True)
        assert settings is STAGE_PRECISION[stage]
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    apply_stage_precision("predict", on_gpu=True)  # arbitrary image sizes: no autotuning
    assert not torch.backends.cudnn.benchmark
    with pytest.raises(ValueError, match="unknown stage"):
        apply_stage_precision("train", on_gpu=True)


def test_losses_run_their_decisions_at_highest_precision(restore_settings) -> None:
    torch.set_float32_matmul_precision("medium")
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func in (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__):
                seen.append(torch.get_float32_matmul_precision())
            return func(*args, **(kwargs or {}))

    with Spy():
        nearest_concept(torch.randn(2, 5, 4), torch.randn(3, 4))
    assert seen and set(seen) == {"highest"}
    assert torch.get_float32_matmul_precision() == "medium"  # restored
    with exact_matmul():
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == "medium"


def test_float32_on_a_gpu_warns_and_names_the_presets() -> None:
    message = float32_warning(True, "32-true")
    assert message is not None and "trainer=gpu" in message and "trainer=ddp" in message
    assert float32_warning(False, "32-true") is None
    assert float32_warning(True, "16-mixed") is None
    assert float32_warning(True, "bf16-mixed") is None
