"""DINOv3 backbones (docs/method.md §2.2, §2.7): timm's ``vit_*_patch16_dinov3`` behind the
frozen-backbone contract.

DINOv3 ViTs have no position table: attention rotates queries and keys by an axial RoPE whose
periods are ``100 ** (2 i / (d / 2))`` for ``i < d / 4`` (d = head width), applied to the patch
tokens only; a class token and 4 storage (register) tokens lead the sequence. The upstream files
store the periods (``rope_embed.periods``) rounded to bfloat16, while timm recomputes them in
float32; ``rope_periods`` chooses which ones the model uses (method.md §2.7).
"""

from __future__ import annotations

from typing import Any

import torch

from cause_lightning.core.logs import get_logger
from cause_lightning.models.checkpoints import (
    DINOV3_LAYOUT,
    CheckpointError,
    load_backbone_weights,
    read_checkpoint,
)
from cause_lightning.models.frozen import BackboneSpec, FrozenBackbone

__all__ = ["DINOv3Backbone", "ROPE_PERIODS", "build_dinov3", "dinov3_rope_periods"]

log = get_logger(__name__)

ROPE_PERIODS = ("reference", "fp32")
ROPE_BASE = 100.0
_OVERRIDES = ("embed_dim", "depth", "num_heads")


def dinov3_rope_periods(head_dim: int) -> torch.Tensor:
    """RoPE periods of a DINOv3 head, computed in float32.

    Args:
        head_dim: Width of one attention head (a multiple of 4).

    Returns:
        ``[head_dim // 4]`` float32 periods ``ROPE_BASE ** (2 i / (head_dim // 2))``.
    """
    exponents = 2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2)
    return ROPE_BASE**exponents


class DINOv3Backbone(FrozenBackbone):
    """A frozen timm DINOv3 ``Eva`` model returning its final-norm patch tokens as a grid.

    Args:
        name: Registry name.
        timm_name: The bias-free timm model (``vit_*_patch16_dinov3``).
        arch: Architecture (``embed_dim``, ``depth``, ``num_heads``, ``patch_size``,
            ``reg_tokens``, ...); the first three are passed to timm as overrides.
        qkv_bias: Build timm's ``_qkvb`` variant (learned q and v biases).
        device: Device to build on (``"meta"`` builds without memory).

    Attributes:
        vit: The timm ``Eva`` module (``cls_token``, ``reg_token``, ``blocks.N.gamma_{1,2}``, RoPE
            in ``rope``).
        family: ``"dinov3"``.
        arch: The architecture built.
        timm_name: The timm model built (``_qkvb`` suffix when ``qkv_bias``).
        qkv_bias: Whether the q/v biases are learned parameters.
        weights: The weights reference loaded (``None`` = random).
        rope_periods_source: Where the RoPE periods came from (``file``, ``bf16``, ``fp32``, or
            ``state`` when restored by ``load_state_dict``).
    """

    def __init__(
        self,
        name: str,
        timm_name: str,
        arch: dict[str, Any],
        qkv_bias: bool,
        device: torch.device | str | None = None,
    ):
        reg_tokens = int(arch.get("reg_tokens", 4))
        super().__init__(name, arch["embed_dim"], arch["patch_size"], 1 + reg_tokens)
        self.family = "dinov3"
        self.arch = dict(arch)
        self.base_timm_name = timm_name
        self.weights: str | None = None
        self._make_vit(qkv_bias, device)
        if self.vit.num_prefix_tokens != self.num_prefix_tokens:
            raise ValueError(
                f"{name}: timm's {self.timm_name} has {self.vit.num_prefix_tokens} prefix tokens, "
                f"the registry says {self.num_prefix_tokens}"
            )
        self.head_dim = self.embed_dim // int(arch["num_heads"])
        self._periods = dinov3_rope_periods(self.head_dim)
        self.rope_periods_source = "fp32"
        self.freeze()

    def _make_vit(self, qkv_bias: bool, device: torch.device | str | None) -> None:
        import timm

        self.qkv_bias = bool(qkv_bias)
        self.timm_name = self.base_timm_name + ("_qkvb" if qkv_bias else "")
        self.vit = timm.create_model(
            self.timm_name,
            pretrained=False,
            num_classes=0,
            embed_dim=int(self.arch["embed_dim"]),
            depth=int(self.arch["depth"]),
            num_heads=int(self.arch["num_heads"]),
            device=device,
        )

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load a state of this backbone, switching timm's variant to the state's q/v bias.

        The RoPE periods travel in the state as the module's extra state.
        """
        has_bias = any(str(k).endswith(".attn.q_bias") for k in state_dict)
        if has_bias != self.qkv_bias:
            self._make_vit(has_bias, self.vit.cls_token.device)
            self._copy_periods()
            self.freeze()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def get_extra_state(self) -> torch.Tensor:
        """The RoPE periods in use (timm keeps them out of its state dict)."""
        return self._periods.clone()

    def set_extra_state(self, state: Any) -> None:
        """Restore RoPE periods saved by ``get_extra_state``."""
        self.set_rope_periods(torch.as_tensor(state), "state")

    def set_rope_periods(self, periods: torch.Tensor, source: str) -> None:
        """Use these RoPE periods (kept in float32, also across dtype casts of the module).

        Args:
            periods: ``[head_dim // 4]``.
            source: ``file``, ``bf16``, ``fp32`` or ``state``, for the record.
        """
        self._periods = periods.detach().to("cpu", torch.float32).clone()
        self.rope_periods_source = source
        self._copy_periods()

    def _copy_periods(self) -> None:
        buffer = self.vit.rope.periods
        if buffer.device.type != "meta":
            with torch.no_grad():
                buffer.copy_(self._periods.to(buffer.device, buffer.dtype))

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> DINOv3Backbone:
        # timm rebuilds float32 periods when a cast lowers their dtype, dropping loaded ones.
        module = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "_periods"):
            self._copy_periods()
        return module

    def rope_tables(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE ``sin`` and ``cos`` tables the model applies on a patch grid.

        Args:
            grid: ``(h, w)``.

        Returns:
            ``(sin, cos)``, each ``[h * w, head_dim]`` (row-major patches; per head the row
            frequencies then the column frequencies, repeated twice).
        """
        table = self.vit.rope.get_embed(shape=list(grid))  # hw 2*head_dim
        sin, cos = table.chunk(2, dim=-1)
        return sin, cos

    def extract(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        x = self.vit.forward_features(images)[:, self.num_prefix_tokens :]  # B hw D
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)  # B D h w

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, timm={self.timm_name!r}, rope={self.rope_periods_source}"


def build_dinov3(spec: BackboneSpec, path: str | None, **kw: Any) -> DINOv3Backbone:
    """Build a DINOv3 backbone, choosing timm's variant from the file's qkv bias.

    Args:
        spec: The registry entry.
        path: A local DINOv3 file (upstream ``.pth`` or timm ``.safetensors``), or ``None`` for
            random weights.
        **kw: ``embed_dim``, ``depth``, ``num_heads`` (overrides), ``rope_periods``
            (``"reference"``, the default: the file's stored periods, else the float32 formula
            rounded to bfloat16 as the released files store them; ``"fp32"``: timm's float32
            formula whatever the file holds) and ``device``.

    Returns:
        The frozen backbone.

    Raises:
        ValueError: On an unknown keyword or ``rope_periods`` value, or weights on ``meta``.
        CheckpointError: When the file is not a DINOv3 file of this architecture.
    """
    kw = {k: v for k, v in kw.items() if v is not None}  # None: the default, as in a config
    rope = kw.pop("rope_periods", None) or "reference"
    if rope not in ROPE_PERIODS:
        raise ValueError(f"{spec.name}: rope_periods={rope!r}; use one of {ROPE_PERIODS}")
    device = kw.pop("device", None)
    unknown = sorted(set(kw) - set(_OVERRIDES))
    if unknown:
        raise ValueError(
            f"unknown keyword(s) for backbone {spec.name!r}: {unknown}; accepted: "
            f"{sorted(_OVERRIDES + ('rope_periods', 'device'))}"
        )
    arch = dict(spec.arch)
    overrides = {k: v for k, v in kw.items() if v is not None and v != arch.get(k)}
    arch.update(overrides)
    if overrides:
        log.info("backbone %s: architecture overrides %s", spec.name, overrides)

    state: dict[str, torch.Tensor] | None = None
    file_periods = None
    if path is not None:
        if str(device) == "meta":
            raise ValueError(f"cannot load weights into backbone {spec.name!r} on the meta device")
        state, report = read_checkpoint(path, "dinov3")
        file_periods = state.pop("rope.periods", None)
    qkv_bias = state is not None and any(k.endswith(".attn.q_bias") for k in state)
    assert spec.timm_name is not None
    model = DINOv3Backbone(spec.name, spec.timm_name, arch, qkv_bias, device=device)
    if state is not None:
        try:
            load_backbone_weights(model.vit, state, "dinov3", spec.name, report)
        except CheckpointError as err:
            raise CheckpointError(f"{err} A {spec.name} file holds {DINOV3_LAYOUT}.") from None
        model.weights = path
        log.info(
            "backbone %s: loaded %s as timm %s (%s)",
            spec.name,
            path,
            model.timm_name,
            "; ".join(report.notes) or report.container,
        )

    expected = dinov3_rope_periods(model.head_dim)
    if rope == "fp32":
        model.set_rope_periods(expected, "fp32")
    elif file_periods is not None:
        if tuple(file_periods.shape) != tuple(expected.shape):
            raise CheckpointError(
                f"{path}: rope_embed.periods has shape {list(file_periods.shape)}, {spec.name} "
                f"(head width {model.head_dim}) expects [{expected.numel()}]: the file belongs to "
                f"a model with another head width; check the backbone name. A {spec.name} file "
                f"holds {DINOV3_LAYOUT}."
            )
        model.set_rope_periods(file_periods, "file")
    else:
        model.set_rope_periods(expected.to(torch.bfloat16).float(), "bf16")
    model.freeze()
    return model
