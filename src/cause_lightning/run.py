"""``run(cfg)``: run the stage(s) a composed config selects.

Every stage is one function of the run (:class:`~cause_lightning.stages.context.RunContext`),
looked up by name in :data:`STAGES`: the four CAUSE steps (``mediator`` -> ``head`` -> ``probe``
-> ``eval``), ``predict``, and the tasks ``prepare``, ``import``, ``summarize`` and
``artifacts``. ``stage.steps`` lists what a stage runs (``stage=all``: the four steps, in one
process, reusing the backbone; a step whose artifact already exists with the run's settings is
kept, not run again, so an interrupted ``stage=all`` resumes where it stopped).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig

from cause_lightning.config.identity import STAGE_INPUT
from cause_lightning.core.files import ensure_writable
from cause_lightning.core.logs import get_logger
from cause_lightning.reports.tracking import finish_wandb
from cause_lightning.stages.context import RunContext

__all__ = ["STAGES", "run"]

log = get_logger(__name__)


def _prepare(run: RunContext) -> dict[str, Any]:
    """``stage=prepare``: download (where possible), verify and crop the configured data module.

    The configured ``data.module`` (its ``_target_``, ``root``, lists and crop recipe) is what
    gets prepared, so training later finds exactly what was written.
    """
    from hydra.utils import instantiate

    from cause_lightning.data.prepare import prepare_module

    cfg = run.cfg
    try:
        report = prepare_module(
            lambda: instantiate(cfg.data.module),
            download=cfg.stage.get("download"),
            num_workers=int(cfg.data.module.get("num_workers", 0) or 0),
        )
    except TypeError as err:
        raise ValueError(f"data={cfg.data.name}: {err}") from err
    return {"prepare": report}


def _import(run: RunContext) -> dict[str, Any]:
    from cause_lightning.stages.release import import_release

    return import_release(run)


def _predict(run: RunContext) -> dict[str, Any]:
    from cause_lightning.stages.predict import predict_images

    return predict_images(run)


def _summarize(run: RunContext) -> dict[str, Any]:
    from cause_lightning.reports.sweeps import summarize

    return summarize(run.cfg)


def _artifacts(run: RunContext) -> dict[str, Any]:
    from cause_lightning.artifacts.listing import list_artifacts

    return list_artifacts(run.store)


def _step(name: str) -> Callable[[RunContext], dict[str, Any]]:
    def step(run: RunContext) -> dict[str, Any]:
        from cause_lightning.stages.steps import STEPS

        return STEPS[name](run)

    return step


#: Every stage by the name ``stage.steps`` uses.
STAGES: dict[str, Callable[[RunContext], dict[str, Any]]] = {
    **{name: _step(name) for name in ("mediator", "head", "probe", "eval")},
    "predict": _predict,
    "prepare": _prepare,
    "import": _import,
    "summarize": _summarize,
    "artifacts": _artifacts,
}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage(s) selected by ``cfg.stage``.

    Args:
        cfg: Composed config (``python -m cause_lightning`` or ``hydra.compose``).

    Returns:
        A dict of results: the metrics of ``eval`` (``test/...`` keys), artifact paths, and
        ``objective`` (the sweep objective, ``cfg.summary_metric`` when available).
    """
    from cause_lightning.config import validate
    from cause_lightning.reports.tracking import require_wandb_login

    validate(cfg)
    require_wandb_login(cfg)
    _configure_logging()
    steps = [str(step) for step in cfg.stage.steps]
    unknown = [step for step in steps if step not in STAGES]
    if unknown:
        raise ValueError(f"stage.steps names unknown steps {unknown}; known: {list(STAGES)}")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    context = RunContext(cfg)
    if any(step in STAGE_INPUT for step in steps):
        # Every folder a step writes to is below this one: proven writable before any work.
        ensure_writable(context.store.root, "paths.artifact_dir")
    results: dict[str, Any] = {}
    exit_code = 1
    try:
        for step in steps:
            with context.making(step):
                if len(steps) > 1 and _finished(context, step):
                    continue
                # Every step starts from the run seed, so its initial weights do not depend on
                # what ran before it in this process (stage=all vs one stage).
                pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
                results.update(STAGES[step](context))
        exit_code = 0
    finally:
        finish_wandb(exit_code)
    if "objective" not in results:
        results["objective"] = results.get(str(cfg.summary_metric))
    _write_results(cfg, results)
    return results


def _finished(context: RunContext, step: str) -> bool:
    """Whether a step of a multi-step run already has its artifact, made with this run's settings
    from the current version of its input; it is then kept, not run again."""
    from cause_lightning.core.errors import ExpectedError

    if step == "eval" or step not in STAGE_INPUT:
        return False  # the evaluation is cheap beside training and always reports
    try:
        entry = context.made(step)
        parent = STAGE_INPUT[step]
        if entry is None:
            return False
        context.store.check_fresh(entry, None if parent is None else context.find(parent))
    except ExpectedError:
        return False
    log.info("=== stage %s: kept %s (made with these settings) ===", step, entry.path)
    return True


class _DropAdvertisement(logging.Filter):
    """Drops Lightning's product tip, printed once per trainer (four times in stage=all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _write_results(cfg: DictConfig, results: dict[str, Any]) -> None:
    """Save the results of the run in its output directory (rank 0), for sweep summaries."""
    from pathlib import Path

    from cause_lightning.core.files import write_json_atomic
    from cause_lightning.core.logs import is_global_zero

    output_dir = cfg.paths.get("output_dir")
    if output_dir and is_global_zero():
        plain = {k: v for k, v in results.items() if not k.startswith("details/")}
        write_json_atomic(Path(output_dir) / "results.json", plain)


def _configure_logging() -> None:
    package = logging.getLogger("cause_lightning")
    if package.level == logging.NOTSET:
        package.setLevel(logging.INFO)
    if logging.getLogger().handlers:
        # Hydra's handlers already print and file Lightning's records: avoid printing them twice.
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lightning_logger = logging.getLogger(name)
            for handler in list(lightning_logger.handlers):
                lightning_logger.removeHandler(handler)
            lightning_logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdvertisement) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdvertisement())
    # The frozen backbone (and the eval-mode teacher parts) are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
