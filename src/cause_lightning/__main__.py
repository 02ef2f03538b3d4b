"""Command line: ``python -m cause_lightning stage=<stage> [group=option ...] [key=value ...]``.

``@hydra.main`` is declared here so the config path resolves from this file: the copy of ``conf/``
shipped inside the wheel when installed, the repository's ``conf/`` in an editable checkout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cause_lightning.config.files import config_dir
from cause_lightning.core.errors import expected, report


def main() -> None:
    """The command line: refuse an override that names no setting (with the closest names),
    then run Hydra's application."""
    from cause_lightning.config.overrides import command_line_overrides, unknown_override

    overrides = command_line_overrides(sys.argv[1:])
    problem = None if not overrides else unknown_override(config_dir(), overrides)
    if problem is not None:
        print(f"Error: invalid settings (nothing was run):\n  {problem}", file=sys.stderr)
        raise SystemExit(1)
    _application()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _application(cfg: DictConfig) -> float | None:
    """Run the selected stage; returns the summary metric for Hydra sweepers.

    An expected error (:mod:`cause_lightning.core.errors`) ends the process with its message and a
    non-zero status, without Hydra's traceback unless ``HYDRA_FULL_ERROR=1``.
    """
    try:
        return _job(cfg)
    except BaseException as err:
        known = expected(err)
        if known is None:
            raise
        raise SystemExit(report(known, err)) from None


def _job(cfg: DictConfig) -> float | None:
    from cause_lightning.config import validate

    if not _in_multirun():
        validate(cfg)  # every setting is checked before anything is built
        from cause_lightning.run import run

        return run(cfg).get("objective")
    # In a sweep one failing job, an out-of-range setting included, must not stop the others:
    # record it for `stage=summarize`.
    try:
        validate(cfg)
        from cause_lightning.run import run

        return run(cfg).get("objective")
    except Exception as err:
        _record_failure(cfg, err)
        return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    import json
    import logging
    import traceback

    logging.getLogger("cause_lightning").error("job failed: %s: %s", type(err).__name__, err)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    (output_dir / "failure.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
