"""Numerics shared by the operations: the compute dtype (at least float32), autocast switched
off, exact float32 products for decisions, and the checks of token sets and codebooks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "autocast_off",
    "check_codebook",
    "check_index",
    "check_tokens",
    "compute_dtype",
    "exact_matmul",
]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Floating dtype at least as wide as float32 that all ``tensors`` promote to."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Full-precision float32 matmuls (no TF32 / reduced-precision inner products) inside.

    The backbone may run with ``torch.set_float32_matmul_precision("high")``; the products whose
    results go through a threshold, an argmax or a maximum (concept similarities, nearest concepts,
    the modularity's concept assignment) are computed at ``"highest"`` so that those decisions do
    not move with the accelerator's matmul mode. The setting is process-wide host state; it is
    restored on exit.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def check_tokens(tokens: Tensor, name: str = "tokens") -> None:
    """Refuse anything but a token set ``[B, N, D]``, saying how to make one."""
    if tokens.dim() != 3:
        raise ValueError(
            f"{name} must be a token set [B, N, D], got shape {tuple(tokens.shape)}; "
            "flatten a feature map with `features.flatten(2).transpose(1, 2)` or grid-sample it "
            "with `grid_sample_tokens`."
        )


def check_codebook(codebook: Tensor, dim: int, name: str) -> None:
    """Refuse a codebook that is not ``[K, D]`` with ``K >= 1`` rows of the tokens' width."""
    if codebook.dim() != 2:
        raise ValueError(f"{name} must be [K, D], got shape {tuple(codebook.shape)}.")
    if codebook.shape[0] == 0:
        raise ValueError(f"{name} is empty (K = 0); it needs at least one row.")
    if codebook.shape[1] != dim:
        raise ValueError(
            f"{name} dim {codebook.shape[1]} != token dim {dim}: the {name} must live in the "
            "same feature space as the tokens (was it built for another backbone?)."
        )


def check_index(index: Tensor, name: str) -> None:
    """Refuse a floating-point or boolean tensor where integer indices are expected."""
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {index.dtype}.")
