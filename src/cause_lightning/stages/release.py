"""``stage=import``: the reference release's files as this project's stage artifacts, checked
against the configured data, backbone and test resolution before anything is written."""

from __future__ import annotations

from typing import Any

from cause_lightning.core.errors import SettingsError
from cause_lightning.core.logs import get_logger
from cause_lightning.core.specs import tr_grid_error
from cause_lightning.interop import RELEASE_TAG, import_official
from cause_lightning.stages.context import RunContext

__all__ = ["import_release"]

log = get_logger(__name__)


def import_release(run: RunContext) -> dict[str, Any]:
    """``stage=import``: the reference release files as this project's stage artifacts.

    They land in the run's artifact root, labelled ``artifact_tag`` (``release`` when empty);
    ``stage=eval`` and ``stage=predict`` with the same ``artifact_tag`` use them.

    Raises:
        SettingsError: A release file is not given, or the release does not fit the configured
            data (class count), backbone (width) or test resolution (the TR query grid).
    """
    cfg = run.cfg
    source = cfg["import"]
    missing = [key for key in ("segment", "cluster", "clusterbook") if not source.get(key)]
    if missing:
        raise SettingsError(
            "stage=import needs "
            + ", ".join(f"import.{k}=<file>" for k in missing)
            + " (segment_{tr,mlp}.pth, cluster_{tr,mlp}.pth and modular.npy of the release)"
        )
    bundle = import_official(source.segment, source.cluster, source.clusterbook, head=cfg.head.name)
    if bundle.num_classes != int(cfg.data.num_classes):
        raise SettingsError(
            f"the release has {bundle.num_classes} classes but data={cfg.data.name} has "
            f"{cfg.data.num_classes}: pick the matching data= option"
        )
    run.setup()
    backbone = run.backbone
    if bundle.dim != backbone.embed_dim:
        raise SettingsError(
            f"the release head expects {bundle.dim}-d features but backbone={cfg.backbone.name} "
            f"gives {backbone.embed_dim}: pick the backbone the release was trained on"
        )
    resolution = run.derived.resolution["test"]
    patch = int(backbone.patch_size)
    error = bundle.head_type == "tr" and tr_grid_error(
        int(bundle.num_queries or 0), resolution, patch
    )
    if error:
        # The TR position queries fix the token grid: eval would fail on the first batch.
        raise SettingsError(
            f"release for data={cfg.data.name}: {error} (set data.recipe.resolution.test to it)"
        )
    node = {k: v for k, v in run.plain["backbone"].items() if k not in ("_target_", "name")}
    weights = node.pop("weights", None)
    tag = run.tag or RELEASE_TAG
    # A run uses the import only with the backbone options and data it was imported for.
    requirements = {
        k: v
        for k, v in run.settings("mediator").items()
        if k.startswith("backbone.") or k in ("data.name", "data.num_classes")
    }
    paths = bundle.save(
        run.store.root,
        backbone=cfg.backbone.name,
        backbone_weights=weights,
        backbone_kwargs=node,
        backbone_target=str(cfg.backbone._target_),
        resolution=resolution,
        class_names=_class_names(cfg),
        head_name=cfg.head.name,
        patch_size=patch,
        tag=tag,
        requirements=requirements,
    )
    log.info(
        "imported the reference release into %s; run stage=eval or stage=predict next with "
        "artifact_tag=%s",
        paths["probe"].parent,
        tag,
    )
    return {f"artifacts/{k}": str(v) for k, v in paths.items()}


def _class_names(cfg: Any) -> list[str] | None:
    """Class names of the configured dataset, or ``None`` when it does not name its classes."""
    from hydra.utils import get_class, instantiate

    expected = int(cfg.data.num_classes)
    names = getattr(get_class(cfg.data.module._target_), "class_names", None)
    if not (isinstance(names, (list, tuple)) and len(names) == expected):
        # Some data modules (mosaic, folder) set their names per instance; building one reads
        # no data (that happens in prepare_data / setup).
        try:
            names = getattr(instantiate(cfg.data.module), "class_names", None)
        except Exception as err:  # names are optional metadata: never fail the import on them
            log.warning("class names of data=%s unavailable (%s)", cfg.data.name, err)
            return None
    if isinstance(names, (list, tuple)) and len(names) == expected:
        return [str(name) for name in names]
    return None
