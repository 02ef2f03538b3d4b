"""Frozen feature backbones: the registry behind ``build_backbone`` (docs/method.md §2, api.md).

Every backbone maps ImageNet-normalised images ``[B, 3, H, W]`` to the last block's patch tokens
after the final LayerNorm, as a grid ``[B, D, H/p, W/p]`` (class and register tokens dropped,
row-major). The ViTs are timm ``VisionTransformer`` modules under DINO key names; the forward pass
is written here so that the position table is interpolated exactly as the reference does (method.md
§2.4). DINO ViT-S has 6 heads; ``num_heads=12`` gives the reference's bug-compatible variant
(method.md §2.5). The DINOv3 ViTs (RoPE, 4 storage tokens) are timm ``Eva`` modules, built in
``models.dinov3``.
"""

from __future__ import annotations

import os
import re
import socket
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from cause_lightning.core.logs import get_logger
from cause_lightning.models.checkpoints import (
    LoadReport,
    load_backbone_weights,
    read_checkpoint,
)
from cause_lightning.models.frozen import BackboneSpec, FrozenBackbone
from cause_lightning.models.pos_embed import POS_EMBED_SCHEMES, interpolate_pos_embed

__all__ = [
    "ARCH_OVERRIDES",
    "BackboneSpec",
    "FrozenBackbone",
    "ViTBackbone",
    "build_backbone",
    "get_backbone_spec",
    "interpolate_pos_embed",
    "is_hub_tag",
    "list_backbones",
]

log = get_logger(__name__)

_TINY_VIT_SEED = 0
_POS_CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


_REGISTRY: OrderedDict[str, BackboneSpec] = OrderedDict()


def _register(spec: BackboneSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec


def _vit(width: str, patch: int, **extra: Any) -> dict[str, Any]:
    dims = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16)}[width]
    arch = dict(
        embed_dim=dims[0],
        depth=dims[1],
        num_heads=dims[2],
        patch_size=patch,
        mlp_ratio=4.0,
        reg_tokens=0,
        init_values=None,
    )
    arch.update(extra)
    return arch


def _register_vits() -> None:
    """Register the upstream ViTs of docs/method.md §2.2."""
    for width, patch, upstream, tag in (
        ("s", 8, "dino_deitsmall8_pretrain.pth", "timm/vit_small_patch8_224.dino"),
        ("s", 16, "dino_deitsmall16_pretrain.pth", "timm/vit_small_patch16_224.dino"),
        ("b", 8, "dino_vitbase8_pretrain.pth", "timm/vit_base_patch8_224.dino"),
        ("b", 16, "dino_vitbase16_pretrain.pth", "timm/vit_base_patch16_224.dino"),
    ):
        _register(
            BackboneSpec(
                name=f"dino_vit{width}{patch}",
                family="dino",
                arch=_vit(width, patch),
                img_size=224,
                reader="dino",
                pos_embed="dino",
                upstream_file=upstream,
                hub_tag=tag,
                description=f"DINO ViT-{width.upper()}/{patch}",
            )
        )
    for registers in (False, True):
        for width, size in (("s", "small"), ("b", "base"), ("l", "large")):
            reg4 = "reg4_" if registers else ""
            _register(
                BackboneSpec(
                    name=f"dinov2_vit{width}14" + ("_reg" if registers else ""),
                    family="dinov2",
                    arch=_vit(width, 14, init_values=1e-5, reg_tokens=4 if registers else 0),
                    img_size=518,
                    reader="dinov2",
                    pos_embed="dinov2",
                    upstream_file=f"dinov2_vit{width}14_{reg4}pretrain.pth",
                    hub_tag=f"timm/vit_{size}_patch14_{reg4}dinov2.lvd142m",
                    description=f"DINOv2 ViT-{width.upper()}/14"
                    + (" with 4 registers" if registers else ""),
                )
            )
    for name, family, width, upstream, tag in (
        ("ibot_vitb16", "ibot", "b", "iBOT ViT-B/16 checkpoint_teacher.pth", None),
        ("msn_vits16", "msn", "s", "MSN ViT-S/16 release checkpoint (vits16_800ep.pth.tar)", None),
        ("mae_vitb16", "mae", "b", "mae_pretrain_vit_base.pth", "timm/vit_base_patch16_224.mae"),
    ):
        _register(
            BackboneSpec(
                name=name,
                family=family,
                arch=_vit(width, 16),
                img_size=224,
                reader=family,
                pos_embed="msn" if family == "msn" else "dino",
                upstream_file=upstream,
                hub_tag=tag,
                description=f"{family.upper()} ViT-{width.upper()}/16",
            )
        )

    for width, size, upstream, mlp in (
        ("s", "small", "vits16", "gelu"),
        ("sp", "small_plus", "vits16plus", "swiglu"),
        ("b", "base", "vitb16", "gelu"),
        ("l", "large", "vitl16", "gelu"),
    ):
        title = {"sp": "S+"}.get(width, width.upper())
        _register(
            BackboneSpec(
                name=f"dinov3_vit{width}16",
                family="dinov3",
                arch=_vit(width[0], 16, init_values=1e-5, reg_tokens=4, mlp=mlp),
                img_size=224,
                reader="dinov3",
                pos_embed="rope",
                upstream_file=f"dinov3_{upstream}_pretrain_lvd1689m-<hash>.pth",
                # The _qkvb files hold the bias where the release has one; zeros are dropped.
                hub_tag=f"timm/vit_{size}_patch16_dinov3_qkvb.lvd1689m",
                timm_name=f"vit_{size}_patch16_dinov3",
                description=f"DINOv3 ViT-{title}/16 (RoPE, 4 storage tokens)",
            )
        )


_register_vits()


def _build_filterbank(name: str, **kw: Any) -> FrozenBackbone:
    from cause_lightning.models.filterbank import FilterBankBackbone

    # ViT keywords left at None by a shared config mean "default" and do not apply here.
    kw = {k: v for k, v in kw.items() if v is not None and k != "device"}
    unknown = sorted(set(kw) - {"context"})
    if unknown:
        raise ValueError(
            f"unknown keyword(s) for backbone {name!r}: {unknown}; accepted: ['context']"
        )
    return FilterBankBackbone(name=name, **kw)


_register(
    BackboneSpec(
        name="filterbank",
        family="builtin",
        builder=_build_filterbank,
        needs_weights=False,
        description="parameter-free colour + oriented filter-bank patch descriptor, patch 8",
    )
)
_register(
    BackboneSpec(
        name="tiny_vit",
        family="dino",
        arch=dict(
            embed_dim=64,
            depth=2,
            num_heads=2,
            patch_size=8,
            mlp_ratio=4.0,
            reg_tokens=0,
            init_values=None,
        ),
        img_size=64,
        reader="dino",
        pos_embed="dino",
        needs_weights=False,
        description="tiny random ViT (patch 8, dim 64, depth 2) for tests; seeded init",
    )
)


def list_backbones() -> list[str]:
    """Names accepted by ``build_backbone``.

    Returns:
        Registry names in registration order.
    """
    return list(_REGISTRY)


def get_backbone_spec(name: str) -> BackboneSpec:
    """Registry entry of a backbone name.

    Args:
        name: Registry name.

    Returns:
        Its spec.

    Raises:
        ValueError: On an unknown name (the message lists the known ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# --------------------------------------------------------------------------------------------------
# ViT backbone
# --------------------------------------------------------------------------------------------------


class ViTBackbone(FrozenBackbone):
    """A frozen timm ``VisionTransformer`` (DINO layout) with the reference position interpolation.

    Args:
        name: Registry name.
        family: Checkpoint family (``dino``, ``dinov2``, ...).
        arch: Architecture (see ``BackboneSpec.arch``).
        img_size: Pretraining resolution (sets the position table size).
        pos_embed_scheme: ``dino``, ``dinov2``, ``msn`` or ``timm`` (see ``interpolate_pos_embed``).
        device: Device to build on (``"meta"`` builds without memory).

    Attributes:
        vit: The timm module; its ``state_dict`` uses DINO key names (``cls_token``, ``pos_embed``,
            ``patch_embed.proj``, ``blocks.N.*``, ``norm``; DINOv2 adds ``blocks.N.ls{1,2}.gamma``
            and, with registers, ``reg_token``). ``pos_embed`` is ``[1, 1 + M, D]``; registers carry
            no position entry (DINOv2 layout).
        family: Checkpoint family.
        pos_embed_scheme: Interpolation scheme in use.
        arch: The architecture built.
        weights: The weights reference loaded (``None`` = random).
        reference_bug_compatible: True for the reference's 12-head DINO ViT-S.
    """

    def __init__(
        self,
        name: str,
        family: str,
        arch: dict[str, Any],
        img_size: int,
        pos_embed_scheme: str,
        device: torch.device | str | None = None,
    ):
        from timm.models.vision_transformer import VisionTransformer

        if pos_embed_scheme not in POS_EMBED_SCHEMES:
            raise ValueError(
                f"unknown pos_embed_interpolation scheme {pos_embed_scheme!r}; use one of "
                f"{POS_EMBED_SCHEMES} (or 'reference')"
            )
        patch = int(arch["patch_size"])
        reg_tokens = int(arch.get("reg_tokens", 0))
        super().__init__(name, arch["embed_dim"], patch, num_prefix_tokens=1 + reg_tokens)
        if img_size % patch:
            raise ValueError(
                f"{name}: img_size {img_size} is not a multiple of the patch size {patch}"
            )
        self.family = family
        self.arch = dict(arch)
        self.pos_embed_scheme = pos_embed_scheme
        self.weights: str | None = None
        self.reference_bug_compatible = (
            family == "dino" and arch["embed_dim"] == 384 and int(arch["num_heads"]) == 12
        )
        self.vit = VisionTransformer(
            img_size=img_size,
            patch_size=patch,
            embed_dim=int(arch["embed_dim"]),
            depth=int(arch["depth"]),
            num_heads=int(arch["num_heads"]),
            mlp_ratio=float(arch.get("mlp_ratio", 4.0)),
            qkv_bias=True,
            init_values=arch.get("init_values"),
            class_token=True,
            reg_tokens=reg_tokens,
            no_embed_class=False,
            pre_norm=False,
            final_norm=True,
            global_pool="token",
            num_classes=0,
            dynamic_img_size=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            device=device,
        )
        if reg_tokens:
            # DINOv2 gives registers no position entry: the table is [1, 1 + M, D] (timm: 1+R+M).
            grid = img_size // patch
            table = torch.empty(1, 1 + grid * grid, self.embed_dim, device=device)
            nn.init.trunc_normal_(table, std=0.02)
            self.vit.pos_embed = nn.Parameter(table)
        self._pos_cache: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self.freeze()

    def position_table(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position table for a patch grid, cached per grid (and per weights version).

        Args:
            grid: ``(h, w)``.

        Returns:
            ``[1, 1 + h * w, D]``.
        """
        pos = self.vit.pos_embed
        key = (grid, pos.device, pos.dtype, pos.data_ptr(), pos._version)
        table = self._pos_cache.get(key)
        if table is None:
            with torch.no_grad():
                table = interpolate_pos_embed(pos, grid, self.pos_embed_scheme)
            self._pos_cache[key] = table
            while len(self._pos_cache) > _POS_CACHE_SIZE:
                self._pos_cache.popitem(last=False)
        return table

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All output tokens (prefix first) after the final LayerNorm.

        Args:
            images: ``[B, 3, H, W]`` (sides multiples of the patch).

        Returns:
            ``[B, num_prefix_tokens + h * w, D]``.
        """
        x = self.vit.patch_embed(images)  # B h w D
        batch, h, w, dim = x.shape
        pos = self.position_table((h, w)).to(x.dtype)  # 1 1+hw D
        x = x.reshape(batch, h * w, dim) + pos[:, 1:]  # B hw D
        prefix = [(self.vit.cls_token + pos[:, :1]).expand(batch, -1, -1)]  # B 1 D
        if self.vit.reg_token is not None:
            prefix.append(self.vit.reg_token.expand(batch, -1, -1))  # B R D
        x = torch.cat(prefix + [x], dim=1)  # B 1+R+hw D
        x = self.vit.blocks(x)
        return self.vit.norm(x)

    def extract(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        x = self.tokens(images)[:, self.num_prefix_tokens :]  # B hw D
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)  # B D h w

    def load_weights(self, path: str | os.PathLike[str], reader: str) -> LoadReport:
        """Load an upstream weights file strictly (see ``models.checkpoints``).

        Args:
            path: Local file.
            reader: Checkpoint family of the file.

        Returns:
            The load report.
        """
        state_dict, report = read_checkpoint(path, reader)
        report = load_backbone_weights(self.vit, state_dict, reader, self.name, report)
        self._pos_cache.clear()
        self.freeze()
        self.weights = str(path)
        return report


# --------------------------------------------------------------------------------------------------
# Hub tags (online only)
# --------------------------------------------------------------------------------------------------

_HUB_TAG = re.compile(r"^(hf-hub:|hf_hub:)?[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_SUFFIXES = {".pth", ".pt", ".safetensors", ".tar", ".bin", ".ckpt", ".npz", ".pkl"}
_OFFLINE_VALUES = {"1", "true", "yes", "on"}


def is_hub_tag(weights: str) -> bool:
    """Whether a ``weights`` reference names a hub repo (``owner/repo``) rather than a file."""
    if weights.startswith(("hf-hub:", "hf_hub:")):
        return bool(_HUB_TAG.match(weights))
    # A missing local file ("weights/dino.pth") must read as a missing file, not as a hub repo.
    if weights.startswith(("/", ".", "~")) or Path(weights).suffix.lower() in _WEIGHT_SUFFIXES:
        return False
    return bool(_HUB_TAG.match(weights))


def _offline_reason() -> str | None:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _OFFLINE_VALUES:
            return f"{var}={os.environ[var]}"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=3.0):
            return None
    except OSError as exc:
        return f"{host} unreachable ({exc})"


def _fetch_hub_weights(tag: str, spec: BackboneSpec) -> str:
    """Download ``model.safetensors`` of a hub repo through the Hugging Face client timm uses."""
    repo = tag.split(":", 1)[1] if tag.startswith(("hf-hub:", "hf_hub:")) else tag
    hint = f" (for {spec.name}: {spec.upstream_file})" if spec.upstream_file else ""
    reason = _offline_reason()
    if reason is not None:
        raise RuntimeError(
            f"cannot fetch hub weights {tag!r}: offline ({reason}). Download "
            f"{repo}/model.safetensors or the upstream release file{hint} on a machine with "
            "internet, and pass the local file as weights=<path> (backbone.weights=<path>)."
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo, filename="model.safetensors")
    except Exception as exc:
        raise RuntimeError(
            f"could not fetch hub weights {tag!r} ({type(exc).__name__}: {exc}); pass a local file "
            f"as weights=<path>{hint}"
        ) from exc


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------

ARCH_OVERRIDES = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "reg_tokens")


def _resolve_weights(weights: str, spec: BackboneSpec) -> str:
    """A local file as is, a hub tag downloaded (online only); anything else is an error."""
    if Path(weights).expanduser().exists():
        return str(Path(weights).expanduser())
    if is_hub_tag(weights):
        return _fetch_hub_weights(weights, spec)
    raise FileNotFoundError(
        f"weights file not found: {weights!r} (backbone {spec.name}); pass an existing local "
        f"file (e.g. {spec.upstream_file or 'the upstream release file'}) or a hub tag such as "
        f"{spec.hub_tag or 'timm/<model>'} when online"
    )


def _warn_random(spec: BackboneSpec) -> None:
    source = spec.upstream_file or "the upstream release file"
    log.warning(
        "!!! backbone %s has RANDOM weights: its features are meaningless and every metric "
        "will be near chance. Pass backbone.weights=<local file> (e.g. %s%s). !!!",
        spec.name,
        source,
        f", or the timm file of {spec.hub_tag}" if spec.hub_tag else "",
    )


def build_backbone(
    name: str, weights: str | os.PathLike[str] | None = None, **kw: Any
) -> FrozenBackbone:
    """Build a frozen backbone by registry name.

    Args:
        name: A name from ``list_backbones()``.
        weights: A local file in the family's upstream format (``.pth``/``.pt``/``.tar``) or a timm
            ``model.safetensors``; a hub tag (``"timm/vit_small_patch8_224.dino"``,
            ``"hf-hub:..."``) only when it is not an existing path and the hub is reachable; or
            ``None`` for random weights (a loud warning, except ``filterbank`` and ``tiny_vit``).
        **kw: ViT overrides: ``num_heads`` (``12`` on ``dino_vits*`` = the reference's
            bug-compatible variant), ``embed_dim``, ``depth``, ``mlp_ratio``, ``patch_size``,
            ``reg_tokens``, ``img_size`` (pretraining resolution), ``pos_embed_interpolation``
            (``"reference"``, the default: the family's scheme; ``"timm"``; or a scheme name),
            ``device``. ``dinov3_*`` take ``embed_dim``, ``depth``, ``num_heads``,
            ``rope_periods`` (see ``models.dinov3``) and ``device``. ``filterbank`` takes its own
            keywords.

    Returns:
        A ``FrozenBackbone`` in eval mode with ``requires_grad=False`` everywhere.

    Raises:
        ValueError: On an unknown name or keyword.
        FileNotFoundError: When ``weights`` is neither an existing file nor a hub tag.
        CheckpointError: When the file cannot be read or does not fit the backbone.
        RuntimeError: When a hub tag is given offline.
    """
    spec = get_backbone_spec(name)
    if weights is not None and not os.fspath(weights):
        weights = None  # an empty config value means "no file"
    if spec.builder is not None:
        if weights is not None:
            raise ValueError(f"backbone {name!r} has no weights; pass weights=None")
        model = spec.builder(name, **kw)
        model.build_kwargs = {k: v for k, v in kw.items() if v is not None and k != "device"}
        return model

    build_kwargs = {k: v for k, v in kw.items() if v is not None and k != "device"}
    if spec.family == "dinov3":
        from cause_lightning.models.dinov3 import build_dinov3

        path = None if weights is None else _resolve_weights(os.fspath(weights), spec)
        if path is None:
            _warn_random(spec)
        model = build_dinov3(spec, path, **kw)
        model.build_kwargs = build_kwargs
        if path is not None and os.fspath(weights) != path:
            model.weights = os.fspath(weights)
        return model
    scheme = kw.pop("pos_embed_interpolation", None)
    scheme = spec.pos_embed if scheme in (None, "reference") else scheme
    img_size = kw.pop("img_size", None)
    img_size = spec.img_size if img_size is None else int(img_size)
    device = kw.pop("device", None)
    arch = dict(spec.arch)
    unknown = sorted(k for k in kw if k not in ARCH_OVERRIDES)
    if unknown:
        raise ValueError(
            f"unknown keyword(s) for backbone {name!r}: {unknown}; accepted: "
            f"{sorted(ARCH_OVERRIDES + ('img_size', 'pos_embed_interpolation', 'device'))}"
        )
    overrides = {k: v for k, v in kw.items() if v is not None and v != arch.get(k)}
    arch.update(overrides)
    if overrides:
        log.info("backbone %s: architecture overrides %s", name, overrides)

    if name == "tiny_vit":
        # A fixed seed makes the random tiny model identical across runs and test processes.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_TINY_VIT_SEED)
            model = ViTBackbone(name, spec.family, arch, img_size, scheme, device=device)
    else:
        model = ViTBackbone(name, spec.family, arch, img_size, scheme, device=device)
    model.build_kwargs = build_kwargs
    if model.reference_bug_compatible:
        log.warning(
            "backbone %s built with 12 attention heads: the reference's bug-compatible DINO ViT-S "
            "(official DINO ViT-S has 6); use it only to reproduce the released ViT-S heads "
            "(docs/method.md §2.5)",
            name,
        )

    if weights is None:
        if spec.needs_weights:
            _warn_random(spec)
        return model

    weights_str = os.fspath(weights)
    path = _resolve_weights(weights_str, spec)
    if str(device) == "meta":
        raise ValueError(f"cannot load weights into backbone {name!r} built on the meta device")
    report = model.load_weights(path, spec.reader)
    log.info(
        "backbone %s: loaded %s (%s container%s)",
        name,
        path,
        report.container,
        f"; {len(report.dropped)} extra keys dropped" if report.dropped else "",
    )
    if weights_str != path:
        model.weights = weights_str
    return model
