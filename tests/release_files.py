"""Fake files of the reference CAUSE release, with the keys and shapes of docs/method.md §10."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

R, K, P = 90, 2048, 2048  # head width, concepts and projection width of the release


def _rand(g: torch.Generator, *shape: int, scale: float = 0.2, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale + offset


def _head_state(g: torch.Generator, kind: str, prefix: str, d: int, q: int) -> dict[str, Any]:
    """One head (``head.`` or ``head_ema.``) with the keys and shapes of method.md §10.1 / §10.2."""
    sd: dict[str, torch.Tensor] = {}
    if kind == "tr":
        sd[prefix + "query_pos"] = _rand(g, q, d, scale=1.0)
        for attn in ("self_attn", "multihead_attn"):
            sd[f"{prefix}tr.{attn}.in_proj_weight"] = _rand(g, 3 * d, d)
            sd[f"{prefix}tr.{attn}.in_proj_bias"] = _rand(g, 3 * d, scale=0.1)
            sd[f"{prefix}tr.{attn}.out_proj.weight"] = _rand(g, d, d)
            sd[f"{prefix}tr.{attn}.out_proj.bias"] = _rand(g, d, scale=0.1)
        sd[f"{prefix}tr.linear1.weight"] = _rand(g, 2048, d)
        sd[f"{prefix}tr.linear1.bias"] = _rand(g, 2048, scale=0.1)
        sd[f"{prefix}tr.linear2.weight"] = _rand(g, d, 2048, scale=0.03)
        sd[f"{prefix}tr.linear2.bias"] = _rand(g, d, scale=0.1)
        for n in (1, 2, 3):
            sd[f"{prefix}tr.norm{n}.weight"] = _rand(g, d, scale=0.1, offset=1.0)
            sd[f"{prefix}tr.norm{n}.bias"] = _rand(g, d, scale=0.1)
        prefix += "tr."
    sd[prefix + "f1.weight"] = _rand(g, R, d, 1, 1)
    sd[prefix + "f1.bias"] = _rand(g, R, scale=0.1)
    sd[prefix + "f2.0.weight"] = _rand(g, d, d, 1, 1)
    sd[prefix + "f2.0.bias"] = _rand(g, d, scale=0.1)
    sd[prefix + "f2.2.weight"] = _rand(g, R, d, 1, 1)
    sd[prefix + "f2.2.bias"] = _rand(g, R, scale=0.1)
    return sd


def write_release(
    root: Path,
    kind: str = "tr",
    *,
    seed: int = 0,
    d: int,
    q: int,
    c: int,
    book_shape: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Write ``segment_<kind>.pth``, ``cluster_<kind>.pth`` and ``modular.npy`` (method.md §10)."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    seg = _head_state(g, kind, "head.", d, q) | _head_state(g, kind, "head_ema.", d, q)
    for name in ("projection_head", "projection_head_ema"):
        seg[f"{name}.f.weight"] = _rand(g, P, R, 1, 1)
        seg[f"{name}.f.bias"] = _rand(g, P, scale=0.1)
    seg["linear.f.weight"] = _rand(g, c, R, 1, 1)
    seg["linear.f.bias"] = _rand(g, c, scale=0.1)
    assert len(seg) == (56 if kind == "tr" else 18)  # the key counts of method.md §10.1
    book = np.random.default_rng(seed).standard_normal(book_shape or (K, d)).astype(np.float32)
    cluster = {
        "codebook": torch.from_numpy(book.copy()),
        "cluster_probe": _rand(g, c, R, scale=1.0),
    }
    paths = {
        "segment": root / f"segment_{kind}.pth",
        "cluster": root / f"cluster_{kind}.pth",
        "clusterbook": root / "modular.npy",
    }
    torch.save(seg, paths["segment"])
    torch.save(cluster, paths["cluster"])
    np.save(paths["clusterbook"], book)
    return {"paths": paths, "segment": seg, "cluster": cluster, "book": book}
