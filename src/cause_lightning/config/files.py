"""Where the YAML lives, and composing it from Python as the command line does."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

__all__ = ["compose", "config_dir", "stage_module"]

_PACKAGE = Path(__file__).resolve().parents[1]


def config_dir() -> str:
    """Absolute path of the Hydra config root (packaged copy first, then the repository's)."""
    packaged = _PACKAGE / "conf"
    if packaged.is_dir():
        return str(packaged)
    repository = _PACKAGE.parents[1] / "conf"
    if repository.is_dir():
        return str(repository)
    raise FileNotFoundError(
        f"no Hydra config found in {packaged} or {repository}: reinstall cause-lightning"
    )


def compose(*overrides: str) -> DictConfig:
    """The configuration the command line would compose for these overrides.

    For notebooks and scripts: stage modules, data modules and heads built from it get exactly the
    YAML's values (``hydra.utils.instantiate(cfg.method.head.module, _partial_=True)``). Run-time
    paths that only a Hydra run knows (``paths.output_dir``) default to ``./outputs`` unless given.

    Args:
        *overrides: Overrides as on the command line (``"head=mlp"``,
            ``"method.head.temperature=0.1"``).

    Returns:
        The composed config (not validated: :func:`cause_lightning.config.validate` does that).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    given = (
        ["paths.output_dir=outputs"]
        if not any(o.startswith("paths.output_dir=") for o in overrides)
        else []
    )
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app or an initialised test
        return hydra_compose("config", overrides=[*given, *overrides])
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose("config", overrides=[*given, *overrides])


def stage_module(stage: str, backbone: Any, *overrides: str, **arguments: Any) -> Any:
    """A stage module built as the command line builds it: ``method.<stage>.module`` with the
    YAML's values (after ``overrides``); ``arguments`` give what exists only at run time (the
    head, the clusterbook, learning rates) and may replace any YAML value.

    Args:
        stage: ``mediator``, ``head``, ``probe`` or ``eval``.
        backbone: The frozen backbone.
        *overrides: Config overrides, as for :func:`compose`.
        **arguments: Constructor arguments given directly.

    Returns:
        The LightningModule.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.create(_module_nodes(overrides)[stage])
    return instantiate(node, _partial_=True)(backbone, **arguments)


@functools.lru_cache(maxsize=8)
def _module_nodes(overrides: tuple[str, ...]) -> dict[str, Any]:
    """The resolved ``method.<stage>.module`` nodes for some overrides (composing costs about a
    second; scripts and tests build many modules)."""
    from omegaconf import OmegaConf

    method = compose(*overrides).method
    return {
        stage: OmegaConf.to_container(method[stage].module, resolve=True)
        for stage in ("mediator", "head", "probe", "eval")
    }
