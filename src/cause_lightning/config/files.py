"""Where the YAML lives, and composing it from Python as the command line does."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

__all__ = ["compose", "config_dir"]

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
