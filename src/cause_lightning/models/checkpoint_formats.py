"""What each upstream checkpoint family looks like: its container, its extra keys, its layout.

Declarations only; ``checkpoints.py`` reads and converts the files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cause_lightning.core.errors import ExpectedError

__all__ = [
    "CHECKPOINT_FORMATS",
    "CONTAINER_FAMILY",
    "CheckpointError",
    "CheckpointFormat",
    "DINOV3_LAYOUT",
    "LoadReport",
]


class CheckpointError(ExpectedError, ValueError):
    """A weights file cannot be read, belongs to another model, or does not fit the backbone."""


@dataclass(frozen=True)
class CheckpointFormat:
    """How one upstream family stores its backbone.

    Attributes:
        family: Family name (``dino``, ``dinov2``, ``ibot``, ``msn``, ``mae``, ``timm``).
        container: Top-level key holding the state dict, or ``None`` when the file is the state
            dict.
        strip_prefix: Prefix removed from every key (MSN: ``module.``).
        rename: Exact key renames applied after stripping (upstream name -> timm name).
        extra_keys: fnmatch patterns of keys that are not part of the backbone and are dropped
            (logged).
        missing_ok: fnmatch patterns of backbone keys allowed to be absent (logged; the random init
            stays).
        layer_scale: Whether the family's blocks carry LayerScale gammas (``True``/``False``), or
            ``None`` when either is allowed (timm files).
        accepts_raw: Whether a bare state dict is accepted when a container key is declared.
        example: An upstream file name, for error messages.
    """

    family: str
    container: str | None
    strip_prefix: str = ""
    rename: tuple[tuple[str, str], ...] = ()
    extra_keys: tuple[str, ...] = ()
    missing_ok: tuple[str, ...] = ()
    layer_scale: bool | None = False
    accepts_raw: bool = False
    example: str = ""


CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = {
    "dino": CheckpointFormat(
        family="dino",
        container=None,
        extra_keys=("head.*",),
        example="dino_deitsmall8_pretrain.pth",
    ),
    "dinov2": CheckpointFormat(
        family="dinov2",
        container=None,
        rename=(("register_tokens", "reg_token"),),
        extra_keys=("mask_token", "head.*"),
        layer_scale=True,
        example="dinov2_vitb14_pretrain.pth",
    ),
    "ibot": CheckpointFormat(
        family="ibot",
        container="state_dict",
        extra_keys=("masked_embed", "mask_token", "head.*"),
        accepts_raw=True,
        example="checkpoint_teacher.pth",
    ),
    "msn": CheckpointFormat(
        family="msn",
        container="target_encoder",
        strip_prefix="module.",
        extra_keys=("fc.*", "head.*", "mask_token"),
        accepts_raw=True,
        example="vits16_800ep.pth.tar",
    ),
    "mae": CheckpointFormat(
        family="mae",
        container="model",
        extra_keys=("mask_token", "decoder_*", "head.*"),
        accepts_raw=True,
        example="mae_pretrain_vit_base.pth",
    ),
    "dinov3": CheckpointFormat(
        family="dinov3",
        container=None,
        extra_keys=("mask_token",),
        layer_scale=None,  # timm's Eva names the gammas gamma_1/gamma_2: checked by layout instead
        example="dinov3_vitb16_pretrain_lvd1689m-<hash>.pth",
    ),
    "timm": CheckpointFormat(
        family="timm",
        container=None,
        extra_keys=("head.*",),
        layer_scale=None,
        example="model.safetensors",
    ),
}

# What a DINOv3 file holds (method.md §2.3), for error messages.
DINOV3_LAYOUT = (
    "a raw state dict with cls_token [1,1,D], storage_tokens [1,4,D], mask_token [1,D], "
    "patch_embed.proj.weight [D,3,16,16], rope_embed.periods [D/heads/4], "
    "blocks.N.{norm1, attn.qkv (+ bias_mask), attn.proj, ls1.gamma, norm2, mlp.fc1/fc2 "
    "(S+: mlp.w1/w2/w3), ls2.gamma}, norm; no pos_embed (or timm's model.safetensors of a "
    "vit_*_patch16_dinov3 model)"
)

# Top-level keys that identify a container, and the family that uses it.
CONTAINER_FAMILY = {"target_encoder": "msn", "model": "mae", "state_dict": "ibot"}


@dataclass
class LoadReport:
    """What happened while loading a weights file.

    Attributes:
        path: The file read.
        container: The detected container (``raw``, ``safetensors``, or the top-level key).
        dropped: Keys dropped through the family's allow-list.
        missing: Declared-optional backbone keys that were absent (left at their initial values).
        notes: Conversions applied (renames, position-table layout changes).
    """

    path: str
    container: str
    dropped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
