"""DINOv3 backbones (docs/method.md §2.2, §2.3, §2.7): upstream and timm files, the qkv bias, RoPE
periods against the upstream formula, and refused inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from cause_lightning.models.backbones import FrozenBackbone, build_backbone
from cause_lightning.models.checkpoints import CheckpointError

SMALL = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # head width 16: 4 RoPE periods
NAMES = {  # name -> (embed_dim, timm model, SwiGLU MLP)
    "dinov3_vits16": (384, "vit_small_patch16_dinov3", False),
    "dinov3_vitsp16": (384, "vit_small_plus_patch16_dinov3", True),
    "dinov3_vitb16": (768, "vit_base_patch16_dinov3", False),
    "dinov3_vitl16": (1024, "vit_large_patch16_dinov3", False),
}


# --------------------------------------------------------------------------------------------------
# Independent helpers: a random timm model, its upstream-layout file, the upstream RoPE formula
# --------------------------------------------------------------------------------------------------


def random_timm(
    name: str = "dinov3_vits16", qkv_bias: bool = True, seed: int = 0
) -> torch.nn.Module:
    """A tiny timm DINOv3 model with every parameter random (biases and gammas included)."""
    timm_name = NAMES[name][1] + ("_qkvb" if qkv_bias else "")
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **SMALL).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if key.endswith(("gamma_1", "gamma_2")):
                param.copy_(0.5 + 0.1 * noise)
            elif "norm" in key and key.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.2 * noise)
    return model


def bf16_periods(model: torch.nn.Module) -> torch.Tensor:
    """Round a timm model's RoPE periods to bfloat16, as the released upstream files store them."""
    periods = model.rope.periods.to(torch.bfloat16)
    model.rope.periods.copy_(periods.float())
    return periods


def to_upstream(model: torch.nn.Module, periods: torch.Tensor, seed: int = 1) -> dict:
    """timm ``Eva`` names -> the upstream DINOv3 release layout (the inverse of the reader).

    The key part of the qkv bias is random: upstream masks it with ``bias_mask``.
    """
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    swiglu = any(".mlp.fc1_g." in k for k in sd)
    out: dict[str, torch.Tensor] = {"mask_token": torch.zeros(1, sd["cls_token"].shape[-1])}
    for key, value in sd.items():
        if key.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        key = key.replace("reg_token", "storage_tokens")
        key = key.replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if swiglu:
            key = key.replace(".mlp.fc1_g.", ".mlp.w1.").replace(".mlp.fc1_x.", ".mlp.w2.")
            key = key.replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value.clone()
    for i, block in enumerate(model.blocks):
        dim = block.attn.qkv.weight.shape[1]
        q = block.attn.q_bias if block.attn.q_bias is not None else torch.zeros(dim)
        v = block.attn.v_bias if block.attn.v_bias is not None else torch.zeros(dim)
        k = torch.randn(dim, generator=g)
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, k, v]).detach().clone()
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
            [torch.ones(dim), torch.zeros(dim), torch.ones(dim)]
        )
    out["rope_embed.periods"] = periods.clone()
    return out


def upstream_rope(h: int, w: int, periods: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream DINOv3 RoPE tables at inference (``normalize_coords="separate"``, no jitter).

    Patch centres ``(i + 0.5) / h`` per axis mapped to ``[-1, 1]``; angles ``2 pi c / period``
    for the row then the column coordinate, the whole repeated twice.
    """
    periods = periods.float()
    rows = torch.arange(0.5, h, dtype=torch.float32) / h
    cols = torch.arange(0.5, w, dtype=torch.float32) / w
    coords = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0  # hw 2
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # hw 2 d/4
    angles = angles.flatten(1, 2).tile(2)  # hw d
    return torch.sin(angles), torch.cos(angles)


def timm_patches(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Patch tokens of a timm model as ``[B, D, h, w]``."""
    with torch.no_grad():
        x = model.forward_features(images)[:, model.num_prefix_tokens :]
    h, w = images.shape[2] // 16, images.shape[3] // 16
    return x.transpose(1, 2).reshape(images.shape[0], -1, h, w)


def _save(path: Path, sd: dict) -> str:
    torch.save(sd, path)
    return str(path)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NAMES))
def test_dinov3_names_build_on_meta(name):
    model = build_backbone(name, device="meta")
    dim, timm_name, swiglu = NAMES[name]
    assert isinstance(model, FrozenBackbone) and not model.training
    assert (model.embed_dim, model.patch_size, model.num_prefix_tokens) == (dim, 16, 5)
    assert model.timm_name == timm_name and not model.qkv_bias  # random weights: bias-free
    keys = model.vit.state_dict()
    assert ("blocks.0.mlp.fc1_g.weight" in keys) == swiglu
    assert keys["reg_token"].shape == (1, 4, dim)
    assert all(not p.requires_grad for p in model.parameters())


def test_unknown_keywords_and_rope_mode():
    with pytest.raises(ValueError, match="unknown keyword.*patch_size"):
        build_backbone("dinov3_vits16", patch_size=14, device="meta")
    with pytest.raises(ValueError, match="rope_periods='bf32'"):
        build_backbone("dinov3_vits16", rope_periods="bf32", device="meta")


# --------------------------------------------------------------------------------------------------
# Loading: upstream .pth and timm safetensors, compared with the timm model they came from
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vitsp16"])
def test_upstream_file_with_qkv_bias_matches_timm(tmp_path, name):
    reference = random_timm(name, qkv_bias=True)
    periods = bf16_periods(reference)
    path = _save(tmp_path / f"{name}_pretrain_lvd1689m-0000.pth", to_upstream(reference, periods))
    model = build_backbone(name, weights=path, **SMALL)
    assert model.qkv_bias and model.timm_name.endswith("_qkvb")
    assert model.rope_periods_source == "file" and model.weights == path
    assert torch.equal(model.vit.rope.periods, periods.float())
    images = torch.randn(2, 3, 48, 80)  # a 3x5 grid
    expected = timm_patches(reference, images)
    torch.testing.assert_close(model(images), expected)

    # Dropping the bias changes the features: the comparison above would catch it.
    dropped = random_timm(name, qkv_bias=False)
    state = {k: v for k, v in reference.state_dict().items() if "_bias" not in k}
    dropped.load_state_dict(state)
    dropped.rope.periods.copy_(periods.float())
    assert (timm_patches(dropped, images) - expected).abs().max() > 1e-3


def test_zero_qkv_bias_builds_the_bias_free_variant(tmp_path):
    reference = random_timm(qkv_bias=False, seed=3)
    periods = bf16_periods(reference)
    path = _save(tmp_path / "b.pth", to_upstream(reference, periods))  # zero q/v, random masked k
    model = build_backbone("dinov3_vits16", weights=path, **SMALL)
    assert not model.qkv_bias and model.timm_name == "vit_small_patch16_dinov3"
    images = torch.randn(1, 3, 32, 64)
    torch.testing.assert_close(model(images), timm_patches(reference, images))


def test_timm_safetensors_and_rope_period_modes(tmp_path):
    from safetensors.torch import save_file

    reference = random_timm(seed=5)  # timm's own float32 periods
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    images = torch.randn(1, 3, 64, 48)

    fp32 = build_backbone("dinov3_vits16", weights=str(path), rope_periods="fp32", **SMALL)
    assert fp32.qkv_bias and fp32.rope_periods_source == "fp32"
    assert fp32.build_kwargs["rope_periods"] == "fp32"
    torch.testing.assert_close(fp32(images), timm_patches(reference, images))

    # Default: no periods in the file -> the float32 formula rounded to bfloat16.
    default = build_backbone("dinov3_vits16", weights=str(path), **SMALL)
    assert default.rope_periods_source == "bf16"
    bf16_periods(reference)
    torch.testing.assert_close(default(images), timm_patches(reference, images))
    assert not torch.equal(default.vit.rope.periods, fp32.vit.rope.periods)


def test_loaded_periods_survive_dtype_casts(tmp_path):
    reference = random_timm(seed=2)
    periods = torch.tensor([1.0, 2.0, 4.5, 9.0])  # deliberately off the formula
    model = build_backbone(
        "dinov3_vits16", weights=_save(tmp_path / "p.pth", to_upstream(reference, periods)), **SMALL
    )
    model.to(torch.bfloat16).to(torch.float32)
    assert torch.equal(model.vit.rope.periods, periods)


def test_state_dict_round_trip_restores_variant_and_periods(tmp_path):
    reference = random_timm(seed=4)
    periods = torch.tensor([1.0, 2.5, 5.0, 12.0])
    path = _save(tmp_path / "s.pth", to_upstream(reference, periods))
    loaded = build_backbone("dinov3_vits16", weights=path, **SMALL)
    fresh = build_backbone("dinov3_vits16", **SMALL)  # bias-free, formula periods
    assert not fresh.qkv_bias
    fresh.load_state_dict(loaded.state_dict())
    assert fresh.qkv_bias and torch.equal(fresh.vit.rope.periods, periods)
    assert not fresh.training and not any(p.requires_grad for p in fresh.parameters())
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(fresh(images), loaded(images))


# --------------------------------------------------------------------------------------------------
# RoPE at 320 px against the upstream computation
# --------------------------------------------------------------------------------------------------


def test_rope_at_320px_equals_the_upstream_formula(tmp_path):
    # ViT-B head width (64 -> 16 periods) at 320 px: a 20x20 grid.
    model = build_backbone("dinov3_vitb16", depth=1, device="cpu")
    head = model.head_dim
    assert head == 64 and model.grid_size(320, 320) == (20, 20)
    exact = 100.0 ** (torch.arange(16, dtype=torch.float64) * 2 / 32)
    stored = exact.to(torch.bfloat16)  # what the released files carry
    assert torch.equal(model.vit.rope.periods, stored.float())  # random weights: reference
    sin, cos = model.rope_tables((20, 20))
    up_sin, up_cos = upstream_rope(20, 20, stored)
    assert sin.shape == (400, 64)
    torch.testing.assert_close(sin, up_sin, rtol=0, atol=1e-6)
    torch.testing.assert_close(cos, up_cos, rtol=0, atol=1e-6)

    # timm's float32 periods differ from the stored bfloat16 ones (method.md §2.7).
    fp32 = build_backbone("dinov3_vitb16", depth=1, rope_periods="fp32")
    torch.testing.assert_close(fp32.vit.rope.periods, exact.float())
    f_sin, f_cos = fp32.rope_tables((20, 20))
    gap = max((f_sin - up_sin).abs().max().item(), (f_cos - up_cos).abs().max().item())
    assert 1e-3 < gap < 5e-2


# --------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the file and the expected layout
# --------------------------------------------------------------------------------------------------


def _dinov2_file(tmp_path: Path) -> str:
    from test_backbones import upstream_state

    sd = upstream_state(32, 2, 14, 4, layer_scale=True)
    return _save(
        tmp_path / "dinov2_vits14_reg4_pretrain.pth", dict(sd, mask_token=torch.zeros(1, 32))
    )


def test_dinov3_file_for_a_dinov2_backbone_and_back(tmp_path):
    from safetensors.torch import save_file

    reference = random_timm()
    v3 = _save(tmp_path / "dinov3_vits16.pth", to_upstream(reference, bf16_periods(reference)))
    with pytest.raises(
        CheckpointError, match=r"dinov3_vits16\.pth is a DINOv3 checkpoint.*dinov3_"
    ):
        build_backbone("dinov2_vits14_reg", weights=v3, **SMALL)
    timm_v3 = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(timm_v3))
    with pytest.raises(CheckpointError, match="is a DINOv3 checkpoint"):
        build_backbone("dinov2_vits14", weights=str(timm_v3), **SMALL)

    v2 = _dinov2_file(tmp_path)
    with pytest.raises(CheckpointError) as err:
        build_backbone("dinov3_vits16", weights=v2, **SMALL)
    message = str(err.value)
    assert "dinov2_vits14_reg4_pretrain.pth is not a DINOv3 checkpoint" in message
    assert "pos_embed" in message and "storage_tokens [1,4,D]" in message


def test_missing_storage_tokens(tmp_path):
    reference = random_timm()
    sd = to_upstream(reference, bf16_periods(reference))
    del sd["storage_tokens"]
    path = _save(tmp_path / "no_storage.pth", sd)
    with pytest.raises(CheckpointError, match=r"no_storage\.pth has no storage tokens.*rope_embed"):
        build_backbone("dinov3_vits16", weights=path, **SMALL)


def test_patch_size_and_width_mismatches(tmp_path):
    reference = random_timm()
    sd = to_upstream(reference, bf16_periods(reference))
    sd["patch_embed.proj.weight"] = torch.zeros(32, 3, 14, 14)
    path = _save(tmp_path / "p14.pth", sd)
    with pytest.raises(CheckpointError) as err:
        build_backbone("dinov3_vits16", weights=path, **SMALL)
    message = str(err.value)
    assert "p14.pth" in message and "patch size 14" in message and "patch size 16" in message
    assert "storage_tokens [1,4,D]" in message  # the expected layout
    with pytest.raises(CheckpointError, match="rope_embed.periods has shape.*expects \\[2\\]"):
        build_backbone("dinov3_vits16", weights=_save(tmp_path / "w.pth", to_upstream(
            reference, bf16_periods(reference))), embed_dim=32, depth=2, num_heads=4)  # fmt: skip


def test_resolution_not_a_multiple_of_16_names_the_file(tmp_path):
    reference = random_timm()
    path = _save(tmp_path / "v3.pth", to_upstream(reference, bf16_periods(reference)))
    model = build_backbone("dinov3_vits16", weights=path, **SMALL)
    with pytest.raises(ValueError, match=r"weights .*v3\.pth.*322x322.*patch size 16.*320x320"):
        model(torch.zeros(1, 3, 322, 322))


def test_unmasked_key_bias_and_foreign_mask_are_refused(tmp_path):
    reference = random_timm()
    sd = to_upstream(reference, bf16_periods(reference))
    del sd["blocks.0.attn.qkv.bias_mask"]  # the random key part would now be used
    with pytest.raises(CheckpointError, match="non-zero key part and no bias_mask"):
        build_backbone("dinov3_vits16", weights=_save(tmp_path / "k.pth", sd), **SMALL)
    sd = to_upstream(reference, bf16_periods(reference))
    sd["blocks.1.attn.qkv.bias_mask"] = torch.ones_like(sd["blocks.1.attn.qkv.bias_mask"])
    with pytest.raises(CheckpointError, match="not the DINOv3 key mask"):
        build_backbone("dinov3_vits16", weights=_save(tmp_path / "m.pth", sd), **SMALL)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_keeps_the_file_periods_and_matches_cpu(tmp_path, full_fp32_cuda):
    reference = random_timm(seed=6)
    periods = bf16_periods(reference)
    model = build_backbone(
        "dinov3_vits16", weights=_save(tmp_path / "c.pth", to_upstream(reference, periods)), **SMALL
    )
    images = torch.randn(2, 3, 320, 320)
    cpu = model(images)
    model = model.cuda()
    assert torch.equal(model.vit.rope.periods.cpu(), periods.float())
    torch.testing.assert_close(model(images.cuda()).cpu(), cpu, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(images.cuda()).float().cpu()
    assert model.vit.rope.periods.dtype == torch.float32 and torch.isfinite(half).all()
