"""Backbones (docs/method.md §2): registry, frozen interface, checkpoint readers, position tables,
the 6-head ViT-S pitfall and the parameter-free filter-bank backbone."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from cause_lightning.models.backbones import (
    FrozenBackbone,
    build_backbone,
    interpolate_pos_embed,
    list_backbones,
)
from cause_lightning.models.checkpoints import CheckpointError

API_NAMES = [
    "dino_vits8",
    "dino_vits16",
    "dino_vitb8",
    "dino_vitb16",
    "dinov2_vits14",
    "dinov2_vitb14",
    "dinov2_vitl14",
    "dinov2_vits14_reg",
    "dinov2_vitb14_reg",
    "dinov2_vitl14_reg",
    "ibot_vitb16",
    "msn_vits16",
    "mae_vitb16",
    "filterbank",
    "tiny_vit",
]
# name -> (embed_dim, patch, prefix tokens) from docs/method.md §2.2
EXPECTED = {
    "dino_vits8": (384, 8, 1),
    "dino_vits16": (384, 16, 1),
    "dino_vitb8": (768, 8, 1),
    "dino_vitb16": (768, 16, 1),
    "dinov2_vits14": (384, 14, 1),
    "dinov2_vitb14": (768, 14, 1),
    "dinov2_vitl14": (1024, 14, 1),
    "dinov2_vits14_reg": (384, 14, 5),
    "dinov2_vitb14_reg": (768, 14, 5),
    "dinov2_vitl14_reg": (1024, 14, 5),
    "ibot_vitb16": (768, 16, 1),
    "msn_vits16": (384, 16, 1),
    "mae_vitb16": (768, 16, 1),
    "tiny_vit": (64, 8, 1),
}
EXPECTED_HEADS = {"dino_vits8": 6, "dino_vits16": 6, "dinov2_vitl14": 16, "msn_vits16": 6}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Independent helpers written from the spec
# --------------------------------------------------------------------------------------------------


def upstream_state(
    dim: int, depth: int, patch: int, grid: int, layer_scale: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A ViT state dict under the upstream DINO key names (method.md §2.3), random values."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "cls_token": rnd(1, 1, dim),
        "pos_embed": rnd(1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": rnd(dim, 3, patch, patch),
        "patch_embed.proj.bias": rnd(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = 1 + rnd(dim)
        sd[p + "norm1.bias"] = rnd(dim)
        sd[p + "attn.qkv.weight"] = rnd(3 * dim, dim, scale=0.4)
        sd[p + "attn.qkv.bias"] = rnd(3 * dim)
        sd[p + "attn.proj.weight"] = rnd(dim, dim, scale=0.2)
        sd[p + "attn.proj.bias"] = rnd(dim)
        sd[p + "norm2.weight"] = 1 + rnd(dim)
        sd[p + "norm2.bias"] = rnd(dim)
        sd[p + "mlp.fc1.weight"] = rnd(4 * dim, dim, scale=0.2)
        sd[p + "mlp.fc1.bias"] = rnd(4 * dim)
        sd[p + "mlp.fc2.weight"] = rnd(dim, 4 * dim, scale=0.2)
        sd[p + "mlp.fc2.bias"] = rnd(dim)
        if layer_scale:
            sd[p + "ls1.gamma"] = 0.5 + rnd(dim)
            sd[p + "ls2.gamma"] = 0.5 + rnd(dim)
    sd["norm.weight"] = 1 + rnd(dim)
    sd["norm.bias"] = rnd(dim)
    return sd


def reference_pos_table(pos: torch.Tensor, h: int, w: int, scheme: str = "dino") -> torch.Tensor:
    """The reference interpolation written out (method.md §2.4)."""
    count = pos.shape[1] - 1
    side = int(math.sqrt(count))
    dim = pos.shape[2]
    if scheme == "msn" and h * w == count:
        return pos
    if scheme != "msn" and (h, w) == (side, side):
        return pos
    grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if scheme == "msn":
        factor: float | tuple[float, float] = math.sqrt(h * w / count)
    else:
        factor = ((h + 0.1) / math.sqrt(count), (w + 0.1) / math.sqrt(count))
    out = F.interpolate(grid.float(), scale_factor=factor, mode="bicubic", align_corners=False)
    assert out.shape[-2:] == (h, w)
    out = out.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([pos[:, :1], out], dim=1)


def reference_forward(
    sd: dict[str, torch.Tensor],
    images: torch.Tensor,
    patch: int,
    heads: int,
    scheme: str = "dino",
    registers: torch.Tensor | None = None,
) -> torch.Tensor:
    """Last-block, final-norm patch tokens of a pre-norm ViT, straight from upstream tensors."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    b, dim, h, w = x.shape
    pos = reference_pos_table(sd["pos_embed"], h, w, scheme)
    x = x.flatten(2).transpose(1, 2) + pos[:, 1:]
    prefix = [(sd["cls_token"] + pos[:, :1]).expand(b, -1, -1)]
    if registers is not None:
        prefix.append(registers.expand(b, -1, -1))
    x = torch.cat(prefix + [x], dim=1)
    n = x.shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-1, -2) / math.sqrt(dim // heads)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, dim)
        y = y @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + y * sd.get(p + "ls1.gamma", 1.0)
        y = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        y = y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + y * sd.get(p + "ls2.gamma", 1.0)
    x = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    skip = 1 + (0 if registers is None else registers.shape[1])
    return x[:, skip:].transpose(1, 2).reshape(b, dim, h, w)


def kmeans(x: torch.Tensor, k: int, seed: int = 0, restarts: int = 5, iters: int = 60):
    """Plain k-means++ / Lloyd with restarts; returns labels of the lowest-inertia run."""
    gen = torch.Generator().manual_seed(seed)
    best_inertia, best = float("inf"), None
    for _ in range(restarts):
        centres = x[torch.randint(len(x), (1,), generator=gen)]
        for _ in range(1, k):
            d2 = torch.cdist(x, centres).min(dim=1).values ** 2
            centres = torch.cat([centres, x[torch.multinomial(d2 / d2.sum(), 1, generator=gen)]])
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(dim=1)
            onehot = F.one_hot(assign, k).float()
            counts = onehot.sum(0)
            new = (onehot.T @ x) / counts.clamp_min(1)[:, None]
            new[counts == 0] = centres[counts == 0]
            if torch.allclose(new, centres):
                break
            centres = new
        assign = torch.cdist(x, centres).argmin(dim=1)
        inertia = float((torch.cdist(x, centres).min(dim=1).values ** 2).sum())
        if inertia < best_inertia:
            best_inertia, best = inertia, assign
    return best


def hungarian_accuracy(features: torch.Tensor, labels: np.ndarray, k: int) -> float:
    """k-means on patch features, nearest upsampling to pixels, Hungarian-matched pixel accuracy."""
    n, d, h, w = features.shape
    assign = kmeans(features.permute(0, 2, 3, 1).reshape(-1, d), k).reshape(n, 1, h, w)
    pred = F.interpolate(assign.float(), size=labels.shape[1:], mode="nearest").long()
    confusion = np.zeros((k, k))
    np.add.at(confusion, (pred.squeeze(1).numpy().ravel(), labels.ravel()), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return float(confusion[rows, cols].sum() / confusion.sum())


def texture_scenes(
    names: list[str], n: int, size: int, seed: int, tints: list | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Voronoi mosaics of scikit-image pictures, a random gain and colour cast per region."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    sources = []
    for i, name in enumerate(names):
        a = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
        if a.ndim == 2:
            a = a[..., None] * np.asarray(tints[i] if tints else (1.0, 1.0, 1.0), np.float32)
        sources.append(a[..., :3])
    yy, xx = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for _ in range(n):
        cells = len(names) + 3
        seeds = rng.uniform(0, size, (cells, 2))
        cell_class = np.concatenate([rng.permutation(len(names)), rng.integers(0, len(names), 3)])
        dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
        label = cell_class[dist.argmin(0)]
        image = np.zeros((size, size, 3), np.float32)
        for c, src in enumerate(sources):
            side = int(size * 1.5)  # texture shown at 2/3 scale
            y0 = rng.integers(0, src.shape[0] - side + 1)
            x0 = rng.integers(0, src.shape[1] - side + 1)
            crop = src[y0 : y0 + side, x0 : x0 + side]
            crop = np.stack(
                [
                    np.asarray(Image.fromarray(crop[..., j]).resize((size, size), Image.BILINEAR))
                    for j in range(3)
                ],
                axis=-1,
            )
            gain = rng.uniform(0.6, 1.4) * rng.uniform(0.9, 1.1, size=3).astype(np.float32)
            image[label == c] = (crop * gain)[label == c]
        image = (np.clip(image, 0, 1) - IMAGENET_MEAN) / IMAGENET_STD
        images.append(torch.from_numpy(image.transpose(2, 0, 1).copy()))
        labels.append(label)
    return torch.stack(images), np.stack(labels)


# Tiny width/depth overrides: the key names stay the upstream ones, the files stay small.
SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2}


# --------------------------------------------------------------------------------------------------
# Registry and interface
# --------------------------------------------------------------------------------------------------


def test_registry_lists_every_api_name():
    assert set(API_NAMES) <= set(list_backbones())


@pytest.mark.parametrize("name", [n for n in API_NAMES if n in EXPECTED])
def test_every_vit_builds_on_meta(name):
    kw = {} if name == "tiny_vit" else {"device": "meta"}
    model = build_backbone(name, **kw)
    dim, patch, prefix = EXPECTED[name]
    assert isinstance(model, FrozenBackbone)
    assert (model.embed_dim, model.patch_size, model.num_prefix_tokens) == (dim, patch, prefix)
    assert model.name == name
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    if name in EXPECTED_HEADS:
        assert model.vit.blocks[0].attn.num_heads == EXPECTED_HEADS[name]
    if name.startswith("dinov2"):
        assert "blocks.0.ls1.gamma" in model.vit.state_dict()
        table = model.vit.pos_embed
        assert table.shape[1] == 1 + 37 * 37  # trained at 518, no entries for registers


def test_filterbank_builds_without_parameters():
    model = build_backbone("filterbank")
    assert model.patch_size == 8 and 64 <= model.embed_dim <= 128
    assert list(model.parameters()) == [] and len(model.state_dict()) == 0
    with pytest.raises(ValueError, match="no weights"):
        build_backbone("filterbank", weights="x.pth")


def test_unknown_name_and_keyword():
    with pytest.raises(ValueError, match="dino_vits8.*tiny_vit"):
        build_backbone("dino_vits32")
    with pytest.raises(ValueError, match="unknown keyword"):
        build_backbone("tiny_vit", depht=3)
    with pytest.raises(ValueError, match="unknown keyword"):
        build_backbone("filterbank", depth=3)


def test_config_defaults_and_build_kwargs_round_trip():
    # A shared config may leave ViT keywords at None and weights empty: both mean "default".
    fb = build_backbone("filterbank", weights="", num_heads=None, pos_embed_interpolation=None)
    assert fb.build_kwargs == {}
    model = build_backbone("tiny_vit", weights="", depth=1, num_heads=None, img_size=None)
    assert model.build_kwargs == {"depth": 1} and len(model.vit.blocks) == 1
    again = build_backbone("tiny_vit", **model.build_kwargs)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("name", ["tiny_vit", "filterbank"])
@pytest.mark.parametrize("size", [(24, 40), (64, 32), (8, 8)])
def test_shapes_non_square(name, size):
    model = build_backbone(name)
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, model.embed_dim, size[0] // 8, size[1] // 8)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["tiny_vit", "filterbank"])
def test_frozen_and_always_eval(name):
    model = build_backbone(name)
    wrapper = torch.nn.Sequential(model)
    wrapper.train()
    model.train(True)
    assert not model.training and all(not m.training for m in model.modules())
    images = torch.randn(1, 3, 16, 24, requires_grad=True)
    out = model(images)
    assert not out.requires_grad and out.grad_fn is None
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["tiny_vit", "filterbank"])
def test_input_validation(name):
    model = build_backbone(name)
    with pytest.raises(ValueError, match=r"20x24.*patch size 8"):
        model(torch.randn(1, 3, 20, 24))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 16, 16))


def test_tiny_vit_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_backbone("tiny_vit"), build_backbone("tiny_vit")
    assert torch.equal(torch.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        build_backbone("dino_vits16", **SMALL)
    assert "RANDOM" in caplog.text and "weights" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_backbone("tiny_vit")
        build_backbone("filterbank")
    assert "RANDOM" not in caplog.text


def test_real_vit_s16_forward_small():
    model = build_backbone("dino_vits16")
    out = model(torch.randn(1, 3, 32, 48))
    assert out.shape == (1, 384, 2, 3) and torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("dinov2_vits14_reg", (28, 42)), ("msn_vits16", (48, 32))])
def test_real_vit_forward_small_other_families(name, size):
    model = build_backbone(name)
    out = model(torch.randn(1, 3, *size))
    p = model.patch_size
    assert out.shape == (1, model.embed_dim, size[0] // p, size[1] // p)


# --------------------------------------------------------------------------------------------------
# Checkpoint formats (docs/method.md §2.3)
# --------------------------------------------------------------------------------------------------


def _write(path: Path, obj) -> str:
    torch.save(obj, path)
    return str(path)


def _check_loaded(model, expected: dict[str, torch.Tensor]) -> None:
    own = model.vit.state_dict()
    for key, value in expected.items():
        assert torch.equal(own[key], value), key


def test_dino_raw_state_dict(tmp_path):
    sd = upstream_state(32, 2, 16, 4)
    path = _write(tmp_path / "dino_deitsmall16_pretrain.pth", sd)
    model = build_backbone("dino_vits16", weights=path, **SMALL)
    _check_loaded(model, sd)
    assert model.weights == path
    images = torch.randn(2, 3, 48, 80)  # a 3x5 grid: the 4x4 table is interpolated
    torch.testing.assert_close(model(images), reference_forward(sd, images, 16, 2))


def test_dinov2_raw_with_layer_scale_registers_and_mask_token(tmp_path):
    sd = upstream_state(32, 2, 14, 4, layer_scale=True)
    registers = torch.randn(1, 4, 32)
    upstream = dict(sd, mask_token=torch.zeros(1, 32), register_tokens=registers)
    path = _write(tmp_path / "dinov2_vits14_reg4_pretrain.pth", upstream)
    model = build_backbone("dinov2_vits14_reg", weights=path, img_size=56, **SMALL)
    _check_loaded(model, sd)
    assert torch.equal(model.vit.reg_token, registers)
    images = torch.randn(2, 3, 42, 70)
    expected = reference_forward(sd, images, 14, 2, registers=registers)
    torch.testing.assert_close(model(images), expected)


def test_ibot_state_dict_container(tmp_path):
    sd = upstream_state(32, 2, 16, 4)
    extra = {"masked_embed": torch.zeros(1, 32), "head.mlp.0.weight": torch.zeros(8, 32)}
    path = _write(tmp_path / "checkpoint_teacher.pth", {"state_dict": {**sd, **extra}})
    model = build_backbone("ibot_vitb16", weights=path, **SMALL)
    _check_loaded(model, sd)
    images = torch.randn(1, 3, 64, 32)
    torch.testing.assert_close(model(images), reference_forward(sd, images, 16, 2))


def test_msn_target_encoder_with_module_prefix_and_fc_keys(tmp_path):
    sd = upstream_state(32, 2, 16, 4)
    encoder = {f"module.{k}": v for k, v in sd.items()}
    encoder["module.fc.fc1.weight"] = torch.zeros(16, 32)
    encoder["module.fc.bn1.running_mean"] = torch.zeros(16)
    ckpt = {"target_encoder": encoder, "encoder": encoder, "epoch": 3}
    path = _write(tmp_path / "vits16_800ep.pth.tar", ckpt)
    model = build_backbone("msn_vits16", weights=path, **SMALL)
    _check_loaded(model, sd)
    images = torch.randn(1, 3, 80, 80)  # 5x5: MSN's scalar factor sqrt(25/16)
    torch.testing.assert_close(model(images), reference_forward(sd, images, 16, 2, scheme="msn"))


def test_bare_state_dict_accepted_for_container_families(tmp_path):
    sd = upstream_state(32, 2, 16, 4)
    path = _write(tmp_path / "msn_raw.pth", {f"module.{k}": v for k, v in sd.items()})
    model = build_backbone("msn_vits16", weights=path, **SMALL)  # DDP prefix undone
    _check_loaded(model, sd)


def test_mae_model_container_with_decoder_keys(tmp_path):
    sd = upstream_state(32, 2, 16, 4)
    extra = {
        "mask_token": torch.zeros(1, 1, 16),
        "decoder_embed.weight": torch.zeros(16, 32),
        "decoder_pos_embed": torch.zeros(1, 17, 16),
        "decoder_blocks.0.norm1.weight": torch.zeros(16),
        "decoder_norm.weight": torch.zeros(16),
        "decoder_pred.weight": torch.zeros(768, 16),
    }
    path = _write(tmp_path / "mae_visualize_vit_base.pth", {"model": {**sd, **extra}})
    model = build_backbone("mae_vitb16", weights=path, **SMALL)
    _check_loaded(model, sd)
    images = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(model(images), reference_forward(sd, images, 16, 2))


def test_timm_safetensors_dino_and_dinov2_reg_layouts(tmp_path):
    from safetensors.torch import save_file

    sd = upstream_state(32, 2, 8, 4)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = build_backbone("dino_vits8", weights=str(path), **SMALL)
    _check_loaded(model, sd)

    # timm stores DINOv2-with-registers without a class entry in the table (folded into cls_token).
    sd2 = upstream_state(32, 2, 14, 4, layer_scale=True, seed=1)
    registers = torch.randn(1, 4, 32)
    timm_sd = {k: v for k, v in sd2.items() if k not in ("cls_token", "pos_embed")}
    timm_sd["cls_token"] = sd2["cls_token"] + sd2["pos_embed"][:, :1]
    timm_sd["pos_embed"] = sd2["pos_embed"][:, 1:].contiguous()
    timm_sd["reg_token"] = registers
    path2 = tmp_path / "reg" / "model.safetensors"
    path2.parent.mkdir()
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(path2))
    model2 = build_backbone("dinov2_vits14_reg", weights=str(path2), img_size=56, **SMALL)
    images = torch.randn(1, 3, 56, 42)
    expected = reference_forward(sd2, images, 14, 2, registers=registers)
    torch.testing.assert_close(model2(images), expected)


def test_shape_mismatch_names_key_shapes_and_cause(tmp_path):
    path = _write(tmp_path / "w.pth", upstream_state(48, 2, 16, 4))
    with pytest.raises(CheckpointError) as err:
        build_backbone("dino_vits16", weights=path, **SMALL)
    message = str(err.value)
    assert "expects [1, 1, 32]" in message and "[1, 1, 48]" in message
    assert "cls_token" in message and "wrong backbone name" in message
    path8 = _write(tmp_path / "p8.pth", upstream_state(32, 2, 8, 4))
    with pytest.raises(CheckpointError, match="patch size 8.*patch size 16"):
        build_backbone("dino_vits16", weights=path8, **SMALL)
    narrow = upstream_state(32, 2, 16, 4)
    narrow["patch_embed.proj.weight"] = torch.zeros(48, 3, 16, 16)
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight.*48 wide.*32 wide"):
        build_backbone("dino_vits16", weights=_write(tmp_path / "n.pth", narrow), **SMALL)
    v2 = upstream_state(32, 2, 14, 4, layer_scale=True)
    reg = _write(tmp_path / "reg.pth", dict(v2, register_tokens=torch.zeros(1, 4, 32)))
    with pytest.raises(CheckpointError, match="_reg backbone name"):
        build_backbone("dinov2_vits14", weights=reg, img_size=56, **SMALL)
    with pytest.raises(CheckpointError, match="without _reg"):
        build_backbone("dinov2_vits14_reg", weights=_write(tmp_path / "v2.pth", v2), **SMALL)


def test_missing_and_unexpected_keys_are_errors(tmp_path):
    sd = upstream_state(32, 2, 16, 4)
    del sd["norm.weight"]
    with pytest.raises(CheckpointError, match="missing.*'norm.weight'"):
        build_backbone("dino_vits16", weights=_write(tmp_path / "a.pth", sd), **SMALL)
    sd = upstream_state(32, 3, 16, 4)  # one block too many
    with pytest.raises(CheckpointError, match="blocks.2.*3 blocks"):
        build_backbone("dino_vits16", weights=_write(tmp_path / "b.pth", sd), **SMALL)


def test_square_position_table_of_another_size_is_adopted(tmp_path):
    sd = upstream_state(32, 1, 16, 6)  # trained on a 6x6 grid, the model default is 4x4
    model = build_backbone("dino_vits16", weights=_write(tmp_path / "t.pth", sd), depth=1,
                           embed_dim=32, num_heads=2, img_size=64)  # fmt: skip
    images = torch.randn(1, 3, 96, 96)  # 6x6: used as is
    torch.testing.assert_close(model(images), reference_forward(sd, images, 16, 2))


def test_files_of_another_family_or_kind_are_rejected(tmp_path):
    sd = upstream_state(32, 2, 16, 4)
    kw = SMALL
    msn = _write(
        tmp_path / "msn.pth", {"target_encoder": {f"module.{k}": v for k, v in sd.items()}}
    )
    with pytest.raises(CheckpointError, match="msn checkpoint.*target_encoder"):
        build_backbone("dino_vits16", weights=msn, **kw)
    v2 = _write(tmp_path / "v2.pth", upstream_state(32, 2, 14, 4, layer_scale=True))
    with pytest.raises(CheckpointError, match="LayerScale.*dinov2"):
        build_backbone("dino_vits16", weights=v2, **kw)
    dino = _write(tmp_path / "dino.pth", upstream_state(32, 2, 14, 4))
    with pytest.raises(CheckpointError, match="not a DINOv2 file"):
        build_backbone("dinov2_vits14", weights=dino, **kw)
    head = _write(tmp_path / "segment_tr.pth", {"head_ema.f1.weight": torch.zeros(90, 32, 1, 1)})
    with pytest.raises(CheckpointError, match="CAUSE head"):
        build_backbone("dino_vits16", weights=head, **kw)
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        build_backbone("dino_vits16", weights=str(truncated), **kw)
    lightning = _write(tmp_path / "last.ckpt", {"state_dict": sd, "pytorch-lightning_version": "2"})
    with pytest.raises(CheckpointError, match="Lightning training checkpoint"):
        build_backbone("ibot_vitb16", weights=lightning, **kw)
    pickled = _write(tmp_path / "full.pth", {"teacher": sd, "args": argparse.Namespace(lr=1.0)})
    with pytest.raises(CheckpointError, match="weights_only"):
        build_backbone("dino_vits16", weights=pickled, **kw)


def test_declared_missing_keys_are_logged_not_fatal(tmp_path, monkeypatch, caplog):
    from cause_lightning.models import checkpoints

    relaxed = dataclasses.replace(checkpoints.CHECKPOINT_FORMATS["mae"], missing_ok=("norm.*",))
    monkeypatch.setitem(checkpoints.CHECKPOINT_FORMATS, "mae", relaxed)
    sd = upstream_state(32, 2, 16, 4)
    del sd["norm.weight"], sd["norm.bias"]
    path = _write(tmp_path / "mae.pth", {"model": sd})
    with caplog.at_level(logging.WARNING):
        model = build_backbone("mae_vitb16", weights=path, **SMALL)
    assert "norm.weight" in caplog.text and "initial values" in caplog.text
    _check_loaded(model, sd)


def test_missing_file_and_offline_hub_tag(monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_backbone("tiny_vit", weights="/nonexistent/dir/weights.pth")
    with pytest.raises(FileNotFoundError, match="not found"):
        build_backbone("tiny_vit", weights="weights/dino.pth")  # relative, not a hub repo
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="offline.*local file"):
        build_backbone("dino_vits16", weights="timm/vit_small_patch16_224.dino", depth=1)
    assert time.perf_counter() - start < 3.0


# --------------------------------------------------------------------------------------------------
# Position-embedding interpolation (docs/method.md §2.4)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(20, 20), (12, 20), (7, 3), (14, 14)])
def test_dino_scheme_matches_reference_formula(grid):
    pos = torch.randn(1, 1 + 196, 16)
    out = interpolate_pos_embed(pos, grid, "dino")
    h, w = grid
    patch = pos[:, 1:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    if grid == (14, 14):
        assert out is pos
        return
    factors = ((h + 0.1) / 14, (w + 0.1) / 14)
    expected = F.interpolate(patch, scale_factor=factors, mode="bicubic", align_corners=False)
    expected = torch.cat([pos[:, :1], expected.permute(0, 2, 3, 1).reshape(1, h * w, 16)], 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_msn_scheme_matches_reference_formula():
    pos = torch.randn(1, 1 + 196, 16)
    out = interpolate_pos_embed(pos, (20, 20), "msn")
    patch = pos[:, 1:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    expected = F.interpolate(
        patch, scale_factor=math.sqrt(400 / 196), mode="bicubic", align_corners=False
    )
    expected = torch.cat([pos[:, :1], expected.permute(0, 2, 3, 1).reshape(1, 400, 16)], 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # MSN keeps the table whenever the count matches, even for another aspect ratio.
    assert interpolate_pos_embed(pos, (7, 28), "msn") is pos
    assert interpolate_pos_embed(pos, (7, 28), "dino").shape == (1, 197, 16)
    # floor(14 * sqrt(29**2 / 196)) is 28; the grid must still come out 29x29.
    assert interpolate_pos_embed(pos, (29, 29), "msn").shape == (1, 1 + 29 * 29, 16)


def test_dinov2_scheme_runs_in_float32_and_timm_scheme_differs():
    pos = torch.randn(1, 1 + 37 * 37, 8)
    half = interpolate_pos_embed(pos.half(), (23, 23), "dinov2")
    assert half.dtype == torch.float16
    expected = reference_pos_table(pos.half(), 23, 23, "dinov2")
    torch.testing.assert_close(half, expected, rtol=0, atol=0)
    timm_table = interpolate_pos_embed(pos, (23, 23), "timm")
    assert timm_table.shape == (1, 1 + 23 * 23, 8)
    assert not torch.allclose(timm_table, interpolate_pos_embed(pos, (23, 23), "dinov2"))


def test_backbone_uses_its_scheme_and_caches_tables():
    model = build_backbone("tiny_vit")
    table = model.position_table((3, 5))
    torch.testing.assert_close(table, reference_pos_table(model.vit.pos_embed, 3, 5))
    assert model.position_table((3, 5)) is table
    timm_model = build_backbone("tiny_vit", pos_embed_interpolation="timm")
    assert timm_model.pos_embed_scheme == "timm"
    msn = build_backbone("msn_vits16", depth=1, embed_dim=32, num_heads=2, img_size=64)
    assert msn.pos_embed_scheme == "msn"


# --------------------------------------------------------------------------------------------------
# DINO ViT-S heads (docs/method.md §2.5)
# --------------------------------------------------------------------------------------------------


def test_six_and_twelve_heads_differ_on_the_same_weights(tmp_path, caplog):
    sd = upstream_state(384, 1, 16, 2, seed=3)
    path = _write(tmp_path / "dino_deitsmall16_pretrain.pth", sd)
    six = build_backbone("dino_vits16", weights=path, depth=1, img_size=32)
    assert six.vit.blocks[0].attn.num_heads == 6 and not six.reference_bug_compatible
    with caplog.at_level(logging.WARNING):
        twelve = build_backbone("dino_vits16", weights=path, depth=1, img_size=32, num_heads=12)
    assert twelve.reference_bug_compatible and "12 attention heads" in caplog.text
    images = torch.randn(1, 3, 48, 48)
    out6, out12 = six(images), twelve(images)
    torch.testing.assert_close(out6, reference_forward(sd, images, 16, 6))
    torch.testing.assert_close(out12, reference_forward(sd, images, 16, 12))
    assert (out6 - out12).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# Filter-bank backbone
# --------------------------------------------------------------------------------------------------


def test_filterbank_is_deterministic_and_batch_independent():
    model = build_backbone("filterbank")
    images = torch.randn(3, 3, 32, 48)
    full = model(images)
    torch.testing.assert_close(model(images[:1]), full[:1])
    assert torch.equal(model(images), full)
    assert model(images.double()).dtype == torch.float64


def test_filterbank_separates_texture_mosaics():
    model = build_backbone("filterbank")
    images, labels = texture_scenes(["brick", "grass", "gravel"], n=8, size=128, seed=0)
    majority = np.bincount(labels.ravel()).max() / labels.size
    features = F.normalize(model(images), dim=1)  # cosine geometry, as the heads use
    accuracy = hungarian_accuracy(features, labels, 3)
    colour = hungarian_accuracy(F.avg_pool2d(images, 8), labels, 3)
    assert accuracy > majority + 0.25, (accuracy, majority)
    assert accuracy > colour + 0.25, (accuracy, colour)


def test_filterbank_separates_tinted_textures_and_a_photo():
    model = build_backbone("filterbank")
    tints = [(1.05, 0.62, 0.5), (0.62, 0.98, 0.45), (0.98, 0.9, 0.72), None]
    images, labels = texture_scenes(
        ["brick", "grass", "gravel", "chelsea"], n=8, size=128, seed=1, tints=tints
    )
    majority = np.bincount(labels.ravel()).max() / labels.size
    accuracy = hungarian_accuracy(F.normalize(model(images), dim=1), labels, 4)
    colour = hungarian_accuracy(F.avg_pool2d(images, 8), labels, 4)
    assert accuracy > majority + 0.25, (accuracy, majority)
    assert accuracy > colour + 0.1, (accuracy, colour)


@pytest.mark.slow
def test_filterbank_constants_are_the_documented_calibration():
    from cause_lightning.data.mosaic import calibration_batches
    from cause_lightning.models import filterbank

    mean, std = filterbank.feature_statistics(calibration_batches())
    assert len(mean) == len(filterbank.FEATURE_NAMES) == build_backbone("filterbank").embed_dim
    torch.testing.assert_close(
        torch.tensor(mean), torch.tensor(filterbank._FEATURE_MEAN), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(std), torch.tensor(filterbank._FEATURE_STD), rtol=1e-4, atol=1e-5
    )
