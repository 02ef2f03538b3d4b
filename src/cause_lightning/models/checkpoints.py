"""Readers for upstream self-supervised ViT checkpoints (docs/method.md §2.3).

Every supported family stores the backbone under DINO/timm key names, in a different container:

* DINO: the state dict itself;
* DINOv2: the state dict itself, with LayerScale ``blocks.N.ls{1,2}.gamma``, a ``mask_token`` and,
  for the ``_reg`` files, ``register_tokens`` (renamed here to timm's ``reg_token``);
* iBOT: ``ckpt["state_dict"]``;
* MSN: ``ckpt["target_encoder"]``, every key prefixed ``module.``;
* MAE: ``ckpt["model"]`` (with ``decoder_*`` keys when the decoder was saved);
* DINOv3: the state dict itself, in its own layout (RoPE instead of a position table, storage
  tokens, a masked qkv bias), converted here to timm's ``Eva`` names (``_dinov3_to_timm``);
* timm: a ``model.safetensors`` file, any family.

A file is read on the CPU with ``torch.load(weights_only=True)`` (or ``safetensors``), its container
is detected and checked against the family the backbone name implies, a declared allow-list of extra
keys (heads, mask tokens, projection layers, decoders) is dropped, and the rest is loaded
**strictly**: an unexpected key, an undeclared missing key or a shape mismatch is an error naming
the key, the shapes and the likely cause (method.md §11, rule 6).
"""

from __future__ import annotations

import fnmatch
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cause_lightning.core.logs import get_logger
from cause_lightning.models.checkpoint_formats import (
    CHECKPOINT_FORMATS,
    CONTAINER_FAMILY,
    DINOV3_LAYOUT,
    CheckpointError,
    CheckpointFormat,
    LoadReport,
)

__all__ = [
    "CHECKPOINT_FORMATS",
    "CheckpointError",
    "CheckpointFormat",
    "DINOV3_LAYOUT",
    "LoadReport",
    "detect_container",
    "load_backbone_weights",
    "read_checkpoint",
    "read_file",
]

log = get_logger(__name__)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _short_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def read_file(path: str | os.PathLike[str]) -> Mapping[str, object]:
    """Read a ``.pth``/``.pt``/``.tar`` or ``.safetensors`` file on the CPU without unpickling code.

    Args:
        path: A local file.

    Returns:
        The top-level mapping stored in the file.

    Raises:
        FileNotFoundError: When the file does not exist.
        CheckpointError: When the file is truncated, not a checkpoint, or holds no mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"weights file {path} is empty (an interrupted download?)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise CheckpointError(
                f"could not read weights file {path}: it is truncated or not a PyTorch checkpoint "
                f"({exc}). Download it again and check its size."
            ) from exc
        raise CheckpointError(
            f"{path} holds pickled Python objects besides tensors (e.g. the argparse Namespace of "
            "a training checkpoint), which weights_only loading refuses. If you trust the file, "
            "extract the backbone state dict once with torch.load(..., weights_only=False), save "
            "it with torch.save(state_dict, 'backbone.pth') and pass that file."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"could not read weights file {path}: it is truncated or not a PyTorch/safetensors "
            f"checkpoint ({type(exc).__name__}: {exc}). Download it again and check its size."
        ) from exc
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(
            f"could not read weights file {path} ({type(exc).__name__}: {exc}); it is truncated or "
            "not a checkpoint."
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"weights file {path} holds a {type(obj).__name__}, not a state dict or checkpoint dict"
        )
    return obj


def _is_state_dict(obj: Mapping[str, object]) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _has_layer_scale(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.endswith(("ls1.gamma", "ls2.gamma")) for k in state_dict)


def _reject_foreign(obj: Mapping[str, object], path: str) -> None:
    """Raise a clear error for files that are clearly not backbone weights."""
    keys = [str(k) for k in obj]
    if "format_version" in obj and "kind" in obj:
        raise CheckpointError(
            f"{path} is a cause_lightning artifact (kind={obj['kind']!r}), not backbone weights; "
            "pass the upstream backbone file (e.g. dino_deitsmall8_pretrain.pth) as weights"
        )
    if "pytorch-lightning_version" in obj or "lightning_version" in obj:
        raise CheckpointError(
            f"{path} is a Lightning training checkpoint, not backbone weights; resume it with "
            "ckpt_path= and pass the upstream backbone file as backbone weights"
        )
    if any(k.startswith(("head_ema.", "projection_head")) for k in keys) or (
        "cluster_probe" in obj or "codebook" in obj
    ):
        raise CheckpointError(
            f"{path} looks like a CAUSE head or cluster-probe release file (keys such as "
            f"{_short_list(keys, 3)}), not backbone weights; import it with "
            "cause_lightning.interop and pass the upstream backbone file as backbone weights"
        )
    if "teacher" in obj and "student" in obj:
        raise CheckpointError(
            f"{path} is a full self-distillation training checkpoint (keys 'teacher'/'student'); "
            "use the released backbone-only file (e.g. dino_deitsmall8_pretrain.pth), or save the "
            "'backbone.'-prefixed entries of ckpt['teacher'] with that prefix removed"
        )


def detect_container(obj: Mapping[str, object], path: str = "<checkpoint>") -> str:
    """Name the container of a checkpoint mapping.

    Args:
        obj: The top-level mapping read from a file.
        path: The file name, for error messages.

    Returns:
        ``"raw"`` for a bare state dict, or the top-level key (``state_dict``, ``target_encoder``,
        ``model``) holding it.

    Raises:
        CheckpointError: When the mapping is a CAUSE head/probe file, a project artifact, a training
            checkpoint, or holds no recognisable state dict.
    """
    _reject_foreign(obj, path)
    if _is_state_dict(obj):
        return "raw"
    for key in CONTAINER_FAMILY:
        value = obj.get(key)
        if isinstance(value, Mapping) and _is_state_dict(value):
            return key
    raise CheckpointError(
        f"{path} holds no recognisable backbone state dict (top-level keys: "
        f"{_short_list([str(k) for k in obj])}); expected a raw state dict (DINO, DINOv2), "
        "ckpt['state_dict'] (iBOT), ckpt['target_encoder'] (MSN), ckpt['model'] (MAE) or a timm "
        "model.safetensors"
    )


def _pos_table_with_class_entry(state_dict: dict[str, torch.Tensor], notes: list[str]) -> None:
    """Give a timm ``no_embed_class`` position table (DINOv2 with registers) a class-token entry.

    timm folds the class token's position entry into ``cls_token`` and stores the patch part only,
    so a zero class entry restores the DINOv2 layout ``[1, 1 + M, D]`` exactly.
    """
    pos = state_dict.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return
    count = pos.shape[1]
    if math.isqrt(count) ** 2 == count:  # no class entry: the count is a perfect square
        state_dict["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
        notes.append("timm no_embed_class position table given a zero class entry")


def _is_dinov3_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """DINOv3 upstream or timm ``Eva`` layout: RoPE (no ``pos_embed``), storage/LayerScale keys."""
    if "pos_embed" in state_dict:
        return False
    return (
        "storage_tokens" in state_dict
        or "rope_embed.periods" in state_dict
        or any(k.endswith(".gamma_1") for k in state_dict)
    )


def _check_dinov3_family(state_dict: Mapping[str, torch.Tensor], family: str, path: str) -> None:
    """Refuse a DINOv3 file for another family and the other way round, naming both layouts."""
    dinov3 = _is_dinov3_layout(state_dict)
    if family != "dinov3" and dinov3:
        raise CheckpointError(
            f"{path} is a DINOv3 checkpoint (RoPE, storage tokens, no pos_embed table), but the "
            f"backbone name is a {family} model; use a dinov3_* backbone name for this file "
            f"(dinov3_vits16, dinov3_vitsp16, dinov3_vitb16, dinov3_vitl16)"
        )
    if family == "dinov3" and not dinov3:
        kind = "learned position table pos_embed" if "pos_embed" in state_dict else "no RoPE keys"
        raise CheckpointError(
            f"{path} is not a DINOv3 checkpoint ({kind}); a dinov3_* backbone expects "
            f"{DINOV3_LAYOUT}. A DINO/DINOv2 file needs a dino_*/dinov2_* backbone name."
        )
    if family == "dinov3" and not ({"storage_tokens", "reg_token"} & set(state_dict)):
        raise CheckpointError(
            f"{path} has no storage tokens (storage_tokens [1,4,D]); every released DINOv3 ViT "
            f"carries 4, and the dinov3_* backbones expect {DINOV3_LAYOUT}"
        )


_DINOV3_RENAMES = (
    (".ls1.gamma", ".gamma_1"),
    (".ls2.gamma", ".gamma_2"),
    (".mlp.w1.", ".mlp.fc1_g."),
    (".mlp.w2.", ".mlp.fc1_x."),
    (".mlp.w3.", ".mlp.fc2."),
)


def _dinov3_qv_bias(
    bias: torch.Tensor, mask: torch.Tensor | None, key: str, path: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The q and v parts of an upstream qkv bias; the key part must be masked or zero.

    Upstream multiplies the bias by ``bias_mask`` (ones for q and v, zeros for k); timm's
    ``Eva`` keeps a zero key bias, so a key bias the model would use cannot be represented.
    """
    q, k, v = bias.chunk(3)
    if mask is not None:
        mq, mk, mv = mask.to(bias.dtype).chunk(3)
        if not (bool((mq == 1).all()) and bool((mk == 0).all()) and bool((mv == 1).all())):
            raise CheckpointError(
                f"{path}: {key}_mask is not the DINOv3 key mask (ones for q and v, zeros for k); "
                "the file does not hold a released DINOv3 attention layout"
            )
        return q, v
    if bool(k.any()):
        raise CheckpointError(
            f"{path}: {key} has a non-zero key part and no bias_mask; DINOv3 (and timm's port) "
            "keep the key bias at zero, so this file cannot be loaded faithfully"
        )
    return q, v


def _dinov3_to_timm(
    state_dict: dict[str, torch.Tensor], path: str, notes: list[str]
) -> dict[str, torch.Tensor]:
    """Upstream DINOv3 (or timm ``Eva``) names -> timm ``Eva`` names, with the qkv bias resolved.

    ``rope_embed.periods`` is kept as ``rope.periods`` (timm holds it as a non-persistent buffer;
    the backbone applies it). The q/v biases are kept when any is non-zero, so that the backbone
    builds timm's ``_qkvb`` variant, and dropped when all are zero (the bias-free variant computes
    the same thing).
    """
    out: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".attn.qkv.bias"):
            biases[key] = value
            continue
        if key.endswith(".attn.qkv.bias_mask"):
            masks[key[: -len("_mask")]] = value
            continue
        if key == "storage_tokens":
            key = "reg_token"
        elif key == "rope_embed.periods":
            key = "rope.periods"
        for old, new in _DINOV3_RENAMES:
            key = key.replace(old, new)
        out[key] = value
    for key, bias in biases.items():
        q, v = _dinov3_qv_bias(bias, masks.get(key), key, path)
        stem = key[: -len("qkv.bias")]
        out[stem + "q_bias"], out[stem + "v_bias"] = q, v
    if biases:
        notes.append(f"qkv bias of {len(biases)} blocks split into q_bias/v_bias (k masked)")
    qv_keys = [k for k in out if k.endswith((".attn.q_bias", ".attn.v_bias"))]
    if qv_keys and not any(bool(out[k].any()) for k in qv_keys):
        for key in qv_keys:
            del out[key]
        notes.append("q/v bias zero in every block: the bias-free timm variant is built")
    return out


def read_checkpoint(
    path: str | os.PathLike[str], family: str
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Read an upstream weights file into DINO/timm key names.

    Args:
        path: Local ``.pth``/``.pt``/``.tar`` (upstream release) or ``.safetensors`` (timm) file.
        family: The family the backbone name implies (a key of ``CHECKPOINT_FORMATS`` other than
            ``timm``); safetensors files are read with the timm format whatever the family.

    Returns:
        ``(state_dict, report)``: backbone tensors under timm ``VisionTransformer`` names with the
        allow-listed extra keys already dropped.

    Raises:
        FileNotFoundError: When the file does not exist.
        CheckpointError: When the file cannot be read, is not backbone weights, or looks like
            another family's checkpoint.
    """
    if family not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"unknown checkpoint family {family!r}; known: {sorted(CHECKPOINT_FORMATS)}"
        )
    path_str = str(path)
    obj = read_file(path)
    container = detect_container(obj, path_str)
    is_safetensors = Path(path_str).suffix == ".safetensors"
    fmt = CHECKPOINT_FORMATS["timm" if is_safetensors else family]
    report = LoadReport(path=path_str, container="safetensors" if is_safetensors else container)

    if not is_safetensors:
        if container == "raw" and fmt.container is not None and not fmt.accepts_raw:
            raise CheckpointError(
                f"{path_str} is a bare state dict, but {family} checkpoints keep the backbone "
                f"under ckpt[{fmt.container!r}]"
            )
        if container != "raw" and container != fmt.container:
            other = CONTAINER_FAMILY[container]
            raise CheckpointError(
                f"{path_str} looks like a {other} checkpoint (backbone under ckpt[{container!r}]), "
                f"but the backbone name is a {family} model; use a {other}_* backbone name for "
                f"this file, or the {family} release file (e.g. {fmt.example})"
            )
        if container == "raw" and fmt.container is not None:
            report.notes.append(
                f"bare state dict accepted for {family} (no ckpt[{fmt.container!r}])"
            )
    raw = obj if container == "raw" else obj[container]

    state_dict: dict[str, torch.Tensor] = {}
    strip = fmt.strip_prefix if container == fmt.container and container != "raw" else ""
    for key, value in raw.items():  # type: ignore[union-attr]
        key = str(key)
        if strip:
            if not key.startswith(fmt.strip_prefix):
                raise CheckpointError(
                    f"{path_str}: key {key!r} lacks the {fmt.strip_prefix!r} prefix that {family} "
                    f"checkpoints carry in ckpt[{fmt.container!r}]; is this a {family} file?"
                )
            key = key[len(strip) :]
        state_dict[key] = value  # type: ignore[assignment]
    for old, new in fmt.rename:
        if old in state_dict:
            state_dict[new] = state_dict.pop(old)
            report.notes.append(f"renamed {old!r} -> {new!r}")
    if not is_safetensors:
        # A DDP-wrapped save ('module.' everywhere) is common enough to undo (noted in the log).
        if state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
            report.notes.append("stripped a 'module.' prefix from every key")
    _check_dinov3_family(state_dict, family, path_str)
    if family == "dinov3":
        state_dict = _dinov3_to_timm(state_dict, path_str, report.notes)
    elif is_safetensors:
        _pos_table_with_class_entry(state_dict, report.notes)

    layer_scale = _has_layer_scale(state_dict)
    expected_ls = CHECKPOINT_FORMATS[family].layer_scale
    if expected_ls is True and not layer_scale:
        raise CheckpointError(
            f"{path_str} has no LayerScale gammas (blocks.N.ls1.gamma), so it is not a DINOv2 "
            "file; it looks like DINO/iBOT/MSN/MAE weights: use the matching backbone name"
        )
    if expected_ls is False and layer_scale:
        raise CheckpointError(
            f"{path_str} has LayerScale gammas (blocks.N.ls1.gamma), as DINOv2 files do, but the "
            f"backbone name is a {family} model; use a dinov2_* backbone name for this file"
        )

    for key in list(state_dict):
        if _matches(key, fmt.extra_keys) or _matches(key, CHECKPOINT_FORMATS[family].extra_keys):
            del state_dict[key]
            report.dropped.append(key)
    if report.dropped:
        log.info(
            "%s: dropped %d non-backbone keys allowed for %s (%s)",
            path_str,
            len(report.dropped),
            fmt.family,
            _short_list(report.dropped, 4),
        )
    for note in report.notes:
        log.info("%s: %s", path_str, note)
    return state_dict, report


def _width_name(width: int) -> str:
    return {192: "ViT-Ti", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1536: "ViT-g"}.get(
        width, f"{width}-wide"
    )


def _mismatch_cause(key: str, expected: torch.Size, found: torch.Size, model_name: str) -> str:
    is_patch_weight = key == "patch_embed.proj.weight" and len(found) == 4 == len(expected)
    if is_patch_weight and found[0] == expected[0] and found[-2:] != expected[-2:]:
        return (
            f"the file has patch size {found[-1]}, {model_name} has patch size {expected[-1]}: "
            "wrong backbone name for this file"
        )
    # Width is the first axis of the patch projection and the last axis of everything else.
    axis = 0 if is_patch_weight else -1
    if len(found) and len(expected) and found[axis] != expected[axis]:
        got, want = found[axis], expected[axis]
        return (
            f"the file is a {_width_name(got)} ({got} wide) model, {model_name} is a "
            f"{_width_name(want)} ({want} wide): wrong backbone name for this file"
        )
    if key == "reg_token":
        return (
            f"the file has {found[1] if len(found) == 3 else '?'} register/storage tokens, "
            f"{model_name} has {expected[1]}: use the matching backbone name"
            + (" (_reg or not)" if model_name.startswith("dinov2") else "")
        )
    return "the file belongs to a different architecture: wrong backbone name for this file"


def load_backbone_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    family: str,
    model_name: str,
    report: LoadReport | None = None,
) -> LoadReport:
    """Load a read state dict into a ViT strictly (after the allow-list has been applied).

    A square position table of another size than the model's is adopted as is (it is interpolated at
    run time anyway); every other shape difference is an error.

    Args:
        model: The timm ``VisionTransformer`` (or any module with the same key names).
        state_dict: Output of ``read_checkpoint``.
        family: The family the backbone name implies (its ``missing_ok`` patterns apply).
        model_name: The backbone name, for error messages.
        report: The report from ``read_checkpoint``, extended in place.

    Returns:
        The load report.

    Raises:
        CheckpointError: On unexpected keys, undeclared missing keys, or shape mismatches.
    """
    report = report or LoadReport(path="<state dict>", container="raw")
    fmt = CHECKPOINT_FORMATS[family]
    expected = model.state_dict()
    where = report.path

    unexpected = sorted(k for k in state_dict if k not in expected)
    if unexpected:
        depth_hint = ""
        file_blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.")}
        model_blocks = {k.split(".")[1] for k in expected if k.startswith("blocks.")}
        if len(file_blocks) != len(model_blocks):
            depth_hint = (
                f" The file has {len(file_blocks)} blocks, {model_name} has {len(model_blocks)}."
            )
        if "reg_token" in unexpected:
            depth_hint += " The file has register tokens: use the matching *_reg backbone name."
        raise CheckpointError(
            f"{where}: {len(unexpected)} keys are not part of the {model_name} backbone and not in "
            f"the {family} allow-list: {_short_list(unexpected)}.{depth_hint} The file probably "
            "belongs to a different model: check the backbone name."
        )
    missing = sorted(k for k in expected if k not in state_dict)
    declared = [k for k in missing if _matches(k, fmt.missing_ok)]
    undeclared = [k for k in missing if k not in declared]
    if undeclared:
        hint = ""
        if "reg_token" in undeclared:
            hint = " The file has no register tokens: use the backbone name without _reg."
        raise CheckpointError(
            f"{where}: {len(undeclared)} {model_name} backbone keys are missing from the file: "
            f"{_short_list(undeclared)}. Loading would leave them random; the file is incomplete "
            f"or belongs to a different model (check the backbone name).{hint}"
        )
    if declared:
        log.warning(
            "%s: %d keys absent, allowed for %s and left at their initial values: %s",
            where,
            len(declared),
            family,
            _short_list(declared),
        )
        report.missing.extend(declared)

    for key, value in state_dict.items():
        target = expected[key]
        if value.shape == target.shape:
            continue
        if (
            key == "pos_embed"
            and value.ndim == 3
            and value.shape[2] == target.shape[2]
            and math.isqrt(value.shape[1] - 1) ** 2 == value.shape[1] - 1
        ):
            # Any square table works: it is interpolated to the input grid at run time.
            param = model.get_parameter("pos_embed")
            param.data = torch.empty_like(value, device=param.device, dtype=param.dtype)
            report.notes.append(
                f"position table of {value.shape[1] - 1} patches adopted "
                f"(model default {target.shape[1] - 1})"
            )
            log.info("%s: %s", where, report.notes[-1])
            continue
        raise CheckpointError(
            f"{where}: shape mismatch for {key!r}: {model_name} expects {list(target.shape)}, the "
            f"file has {list(value.shape)}; "
            f"{_mismatch_cause(key, target.shape, value.shape, model_name)}."
        )
    model.load_state_dict(state_dict, strict=not declared)
    return report
