"""Run-to-run identical training under ``trainer.deterministic=true`` (docs/performance.md §10):
the separable bilinear upsampling equals ``F.interpolate`` forward and backward, the default path
is untouched, and two runs of the stages give identical weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cause_lightning.artifacts.io import load_artifact
from cause_lightning.inference.dense import bilinear_matmul, upsample_to
from cause_lightning.modules.base import linear_probe_loss
from cause_lightning.run import run
from cause_lightning.stages.precision import apply_stage_precision

# (h, w) -> (H, W): odd sizes, up, down, one axis each way, a single row, the eval's 40 -> 320.
SIZES = [
    ((5, 7), (13, 11)),
    ((13, 11), (5, 7)),
    ((5, 17), (12, 6)),
    ((9, 9), (9, 20)),
    ((1, 6), (4, 3)),
    ((40, 40), (320, 320)),
]


@pytest.fixture
def deterministic(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Deterministic algorithms on inside the test and the previous state back afterwards
    (Lightning's ``deterministic=True`` sets them process-wide and never resets them)."""
    mode = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    benchmark = torch.backends.cudnn.benchmark
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # removed again afterwards
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(mode, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark


def _interpolate(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@pytest.mark.parametrize(("source", "size"), SIZES)
def test_bilinear_matmul_equals_interpolate_forward_and_backward(
    source: tuple[int, int], size: tuple[int, int]
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *source, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 3, *size, generator=g, dtype=torch.float64)
    expected = _interpolate(x, size)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    got = bilinear_matmul(x, size)
    (grad,) = torch.autograd.grad(got, x, upstream)
    assert got.dtype == torch.float64 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)


def test_bilinear_matmul_computes_half_inputs_in_float32_under_autocast() -> None:
    x = torch.randn(1, 2, 5, 7, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bilinear_matmul(x, (9, 4))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _interpolate(x.float(), (9, 4)), rtol=0, atol=1e-6)


def _probe_case(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, 7, 9, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 6, (2, 23, 31), generator=g)  # 5 = out of range, ignored
    labels[0, :4] = 255
    return logits, labels


def _loss_and_grad(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    loss = linear_probe_loss(logits, labels, num_classes=5)
    return (loss.detach(), *torch.autograd.grad(loss, logits))


def test_default_path_is_interpolate_and_summed_cross_entropy_bit_for_bit() -> None:
    logits, labels = _probe_case(torch.float32)
    assert not torch.are_deterministic_algorithms_enabled()
    up = _interpolate(logits, (23, 31))
    target = torch.where(labels < 5, labels, 255)
    total = F.cross_entropy(up, target, ignore_index=255, reduction="sum")
    reference = total / (target != 255).sum()
    (reference_grad,) = torch.autograd.grad(reference, logits)
    loss, grad = _loss_and_grad(logits, labels)
    assert torch.equal(loss, reference.detach()) and torch.equal(grad, reference_grad)
    assert torch.equal(upsample_to(logits, (23, 31)), up)


def test_deterministic_setting_upsamples_by_matmul_and_sums_pixel_losses(deterministic) -> None:
    logits, labels = _probe_case(torch.float32)
    up = bilinear_matmul(logits, (23, 31))
    target = torch.where(labels < 5, labels, 255)
    pixels = F.cross_entropy(up, target, ignore_index=255, reduction="none")
    reference = pixels.sum() / (target != 255).sum()
    (reference_grad,) = torch.autograd.grad(reference, logits)
    loss, grad = _loss_and_grad(logits, labels)
    assert torch.equal(loss, reference.detach()) and torch.equal(grad, reference_grad)
    with torch.no_grad():  # nothing to differentiate (validation, evaluation): F.interpolate
        assert torch.equal(upsample_to(logits, (23, 31)), _interpolate(logits, (23, 31)))


def test_deterministic_loss_equals_the_default_loss_in_float64(deterministic) -> None:
    logits, labels = _probe_case(torch.float64)
    loss, grad = _loss_and_grad(logits, labels)
    torch.use_deterministic_algorithms(False)
    default_loss, default_grad = _loss_and_grad(logits, labels)
    torch.testing.assert_close(loss, default_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, default_grad, rtol=0, atol=1e-12)


def test_gpu_stages_keep_cudnn_autotuning_off_under_the_setting(deterministic) -> None:
    matmul, tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        for stage in ("mediator", "head", "probe", "eval"):
            torch.backends.cudnn.benchmark = False
            settings = apply_stage_precision(stage, on_gpu=True)
            assert settings is not None and not settings.cudnn_benchmark
            assert not torch.backends.cudnn.benchmark, stage
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = tf32


def _two_runs(tiny, tmp_path: Path, *trainer: str) -> None:
    """``stage=all`` (TR head) twice: every artifact and metric identical bit for bit."""
    records = []
    for tag in ("first", "second"):
        results = run(
            tiny(
                "stage=all",
                "head=tr",
                f"artifact_tag={tag}",
                "method.eval.variants=[raw,flip]",
                "method.eval.baselines=false",
                *trainer,
            )
        )
        assert f"-{tag}-" in Path(results["artifacts/clusterbook"]).parent.name  # trained again
        records.append(
            {
                "clusterbook": load_artifact(
                    results["artifacts/clusterbook"], "clusterbook", "mediator"
                ),
                "head": load_artifact(results["artifacts/head"], "head", "head"),
                "probe": load_artifact(results["artifacts/probe"], "probe", "probe"),
                "metrics": {k: v for k, v in results.items() if k.startswith("test/")},
            }
        )
    first, second = records
    assert torch.equal(first["clusterbook"]["clusterbook"], second["clusterbook"]["clusterbook"])
    for record, key in (
        ("head", "head_state"),
        ("head", "linear_state"),
        ("probe", "linear_state"),
    ):
        for name, tensor in first[record][key].items():
            assert torch.equal(tensor, second[record][key][name]), (record, key, name)
    assert torch.equal(first["probe"]["centroids"], second["probe"]["centroids"])
    assert first["metrics"] and first["metrics"] == second["metrics"]


def test_two_cpu_runs_with_the_setting_give_identical_weights(
    tiny, tmp_path: Path, deterministic
) -> None:
    _two_runs(tiny, tmp_path, "trainer=cpu", "trainer.deterministic=true")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_gpu_runs_with_the_preset_give_identical_weights(
    tiny, tmp_path: Path, deterministic
) -> None:
    _two_runs(tiny, tmp_path, "trainer=gpu_deterministic")
