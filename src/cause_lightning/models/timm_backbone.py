"""Any timm Vision Transformer as a frozen backbone, chosen by its timm name (``backbone=timm``).

The registered backbones (``build_backbone``) reproduce each upstream release exactly: its file
layout, its position-table interpolation, its prefix tokens. This factory opens the rest of timm
for experiments: ``timm.create_model(model)`` with the classifier removed and dynamic input sizes,
weights from a local file in timm's own layout (the ``model.safetensors`` of a timm hub repo, or a
``.pth`` of ``model.state_dict()``), the patch tokens of ``forward_features`` (final norm applied,
class and register tokens dropped) as the ``[B, D, h, w]`` grid. Position tables are resized with
timm's own interpolation, which is not the reference's for the DINO families: use the registered
names to reproduce published rows.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cause_lightning.core.logs import get_logger
from cause_lightning.models.checkpoint_formats import CheckpointError
from cause_lightning.models.checkpoints import read_file
from cause_lightning.models.frozen import FrozenBackbone

__all__ = ["TimmViTBackbone", "build_timm_backbone"]

log = get_logger(__name__)

#: Import path of :func:`build_timm_backbone`, recorded in artifacts to rebuild the backbone.
TIMM_FACTORY = "cause_lightning.models.build_timm_backbone"


class TimmViTBackbone(FrozenBackbone):
    """A frozen timm ViT whose ``forward_features`` tokens become the patch grid.

    Args:
        name: Label of the backbone (artifacts, logs, reports): the timm model name by default.
        model: timm model name (``timm.list_models("vit_*")``); any model with a patch embedding
            and ``dynamic_img_size`` support (ViT, DeiT, EVA, ...).
        img_size: Pretraining resolution of the position table (timm's default for the model
            when ``None``).

    Raises:
        ValueError: On an unknown timm name or a model that is not a ViT with square patches.
    """

    def __init__(self, name: str, model: str, img_size: int | None = None) -> None:
        import timm

        kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "dynamic_img_size": True}
        if img_size is not None:
            kwargs["img_size"] = int(img_size)
        try:
            vit = timm.create_model(model, **kwargs)
        except RuntimeError as err:  # timm's "Unknown model"
            close = timm.list_models(f"*{model.split('_')[0]}*")[:8]
            raise ValueError(
                f"backbone.model={model!r} is not a timm model ({err}); timm names such as "
                f"{', '.join(close) or 'vit_small_patch16_224'} (timm.list_models('vit_*'))"
            ) from err
        except TypeError as err:  # a model without dynamic_img_size
            raise ValueError(
                f"timm model {model!r} is not a Vision Transformer that runs at any input size "
                f"({err}); use a ViT-family model (vit_*, deit_*, eva*)"
            ) from err
        patch_embed = getattr(vit, "patch_embed", None)
        patch = getattr(patch_embed, "patch_size", None)
        if patch is None or not hasattr(vit, "forward_features"):
            raise ValueError(f"timm model {model!r} has no patch embedding: it is not a ViT")
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if patch[0] != patch[1]:
            raise ValueError(f"timm model {model!r} has non-square patches {patch}")
        prefix = int(getattr(vit, "num_prefix_tokens", 1))
        super().__init__(name, int(vit.embed_dim), int(patch[0]), num_prefix_tokens=prefix)
        self.vit = vit
        self.model_name = model
        self.weights: str | None = None
        self.freeze()

    def extract(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        tokens = self.vit.forward_features(images)[:, self.num_prefix_tokens :]  # B hw D
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, h, w)  # B D h w

    def load_weights(self, path: str | os.PathLike[str]) -> None:
        """Load a timm state dict strictly (the classifier's keys, which this model drops, aside).

        Args:
            path: A local ``.safetensors`` or ``.pth`` file of the model's ``state_dict()``.

        Raises:
            CheckpointError: When the file cannot be read or does not fit the model.
        """
        import importlib

        state = dict(read_file(path))
        for key in ("state_dict", "model"):  # training checkpoints wrap the state dict
            if isinstance(state.get(key), dict):
                state = dict(state[key])
        # The model's own filter converts timm's older layouts and resizes the position table.
        module = importlib.import_module(type(self.vit).__module__)
        convert = getattr(module, "checkpoint_filter_fn", None)
        if convert is not None:
            state = convert(state, self.vit)
        expected = set(self.vit.state_dict())
        state = {k: v for k, v in state.items() if k in expected or not _classifier(k)}
        try:
            self.vit.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"{path} does not fit timm model {self.model_name!r}: {str(err)[:600]}. Pass the "
                "weights of this model (its timm hub repo's model.safetensors)"
            ) from None
        self.weights = str(path)
        self.freeze()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, model={self.model_name!r}"


def _classifier(key: str) -> bool:
    """Keys of the classification head that ``num_classes=0`` removes."""
    return key.startswith(("head.", "fc_norm.", "head_drop.")) or key in ("head", "fc_norm")


def build_timm_backbone(
    name: str, model: str, weights: str | os.PathLike[str] | None = None, **kw: Any
) -> FrozenBackbone:
    """Build a frozen timm ViT by its timm name (``conf/backbone/timm.yaml``).

    Args:
        name: Label of the backbone in artifacts, logs and reports (the YAML sets the model name).
        model: timm model name, e.g. ``"vit_small_patch16_224"``.
        weights: A local file in timm's layout, or ``None`` for random weights (a loud warning).
        **kw: ``img_size`` (pretraining resolution of the position table).

    Returns:
        The backbone, frozen and in eval mode; ``build_kwargs`` and ``build_target`` rebuild it.

    Raises:
        ValueError: On an unknown model or keyword.
        FileNotFoundError: When ``weights`` does not exist.
        CheckpointError: When the weights do not fit the model.
    """
    unknown = sorted(set(kw) - {"img_size", "device"})
    if unknown:
        raise ValueError(f"unknown keyword(s) for backbone=timm: {unknown}; accepted: ['img_size']")
    img_size = kw.get("img_size")
    backbone = TimmViTBackbone(name, model, img_size=img_size)
    backbone.build_target = TIMM_FACTORY
    backbone.build_kwargs = {"model": model, **({"img_size": img_size} if img_size else {})}
    if weights is None or not os.fspath(weights):
        log.warning(
            "!!! backbone %s (timm %s) has RANDOM weights: its features are meaningless. Pass "
            "backbone.weights=<local file> (the model.safetensors of its timm hub repo). !!!",
            name,
            model,
        )
        return backbone
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone.weights={weights} not found: pass a local file holding the state dict of "
            f"timm model {model!r} (download model.safetensors of its hub repo on a machine with "
            "internet)"
        )
    backbone.load_weights(path)
    log.info("backbone %s: loaded timm %s weights from %s", name, model, path)
    return backbone
