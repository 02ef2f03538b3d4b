"""``run(cfg)``: dispatch a composed config to its stage(s).

Training stages (mediator, head, probe) run ``trainer.fit`` and export their artifact on rank 0;
``eval`` runs the test loop(s) and writes the report; ``predict``, ``prepare``, ``import`` and
``summarize`` are plain tasks. ``stage=all`` chains mediator -> head -> probe -> eval in one
process, reusing the backbone.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning.pytorch as pl
from omegaconf import DictConfig

from cause_lightning.logs import get_logger
from cause_lightning.utils import finish_wandb

__all__ = ["run"]

log = get_logger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage(s) selected by ``cfg.stage``.

    Args:
        cfg: Composed config (``python -m cause_lightning`` or ``hydra.compose``).

    Returns:
        A dict of results: the metrics of ``eval`` (``test/...`` keys), artifact paths, and
        ``objective`` (the sweep objective, ``cfg.summary_metric`` when available).
    """
    from cause_lightning.config import validate
    from cause_lightning.tracking import require_wandb_login

    validate(cfg)
    require_wandb_login(cfg)
    _configure_logging()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    action = cfg.stage.action
    exit_code = 1
    try:
        if action in ("fit", "test", "pipeline"):
            from cause_lightning.steps import Pipeline

            results = Pipeline(cfg).run(list(cfg.stage.steps))
        elif action == "predict":
            from cause_lightning.steps import Pipeline

            results = Pipeline(cfg).predict()
        elif action == "prepare":
            from cause_lightning.tasks import prepare

            results = prepare(cfg)
        elif action == "import":
            from cause_lightning.tasks import import_release

            results = import_release(cfg)
        elif action == "summarize":
            from cause_lightning.tasks import summarize

            results = summarize(cfg)
        else:
            raise ValueError(f"unknown stage action {action!r} (stage={cfg.stage.name})")
        exit_code = 0
    finally:
        finish_wandb(exit_code)
    if "objective" not in results:
        results["objective"] = results.get(str(cfg.summary_metric))
    _write_results(cfg, results)
    return results


class _DropAdvertisement(logging.Filter):
    """Drops Lightning's product tip, printed once per trainer (four times in stage=all)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _write_results(cfg: DictConfig, results: dict[str, Any]) -> None:
    """Save the results of the run in its output directory (rank 0), for sweep summaries."""
    from pathlib import Path

    from cause_lightning.core.files import write_json_atomic
    from cause_lightning.utils import is_global_zero

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
