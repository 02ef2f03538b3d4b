"""Experiment tracking beyond scalar metrics: W&B runs, lineage, groups, plots and tables
(docs/scaling.md §5).

Scalar metrics reach every configured logger through Lightning (slash-named keys such as
``train/loss_front`` and ``test/cluster/flip_crf/mIoU``), and the resolved config is the W&B run
config. One W&B run per CAUSE step, named ``<experiment>-<step>``:

* its group is the experiment name and the run's settings (its command-line overrides) without
  the seed (:func:`run_group`), so the runs that differ only by seed form one group and the W&B UI
  shows their mean ± std;
* :class:`WandbLogger` declares each metric's summary before its first value: the best (max)
  mIoU, pAcc and held-out modularity, the lowest (min) loss (:func:`metric_summary`);
* after each step the pipeline calls :func:`publish_step`, which, on global rank 0 only, declares
  the artifact files the step read as the run's inputs (lineage: the head run used the
  clusterbook, ...), logs the files it wrote as artifacts of type ``clusterbook`` / ``head`` /
  ``probe`` / ``segmenter`` (named ``<experiment>-<kind>``), after ``eval`` the contact sheet,
  example predictions, the confusion-matrix and per-class IoU plots
  (:mod:`cause_lightning.reports.plots`) as images and the per-class IoU of every variant as a
  table, and then finishes the step's run (no run bleeds into the next step or multirun job,
  rule P2);
* ``stage=summarize`` logs one more run, ``summary-<sweep>``, with the sweep's job and statistics
  tables and its plot (:func:`publish_summary`).

The W&B mode is the ``WANDB_MODE`` environment variable (``online``, ``offline``, ``disabled``),
never a logger argument (rule P3).
"""

from __future__ import annotations

import hashlib
import json
import netrc
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from cause_lightning.core.constants import HELDOUT_MODULARITY
from cause_lightning.core.errors import SettingsError
from cause_lightning.core.logs import get_logger

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "finish_wandb",
    "require_wandb_login",
    "ARTIFACT_KINDS",
    "REPEAT_KEYS",
    "WandbLogger",
    "declare_input",
    "instantiate_logger",
    "is_repeat",
    "log_artifact",
    "log_evaluation",
    "metric_summary",
    "publish_step",
    "publish_summary",
    "run_group",
    "step_loggers",
    "wandb_loggers",
]

log = get_logger(__name__)

#: result key of an exported file -> W&B artifact type (the file is ``<type>.pt``)
ARTIFACT_KINDS: dict[str, str] = {
    "artifacts/clusterbook": "clusterbook",
    "artifacts/head": "head",
    "artifacts/probe": "probe",
    "artifacts/segmenter": "segmenter",
}

#: Overrides that repeat a setting rather than change it: runs that differ only in these are
#: repetitions (one W&B group; one mean ± std row in ``stage=summarize``).
REPEAT_KEYS = ("seed", "artifact_tag")
# Overrides that choose what to run, where to write or how to record it, not what is computed.
_RECORD_KEYS = (
    "stage",
    "logger",
    "callbacks",
    "paths",
    "sweep",
    "sweep_dir",
    "summary_metric",
    "hparams_search",
    "launcher",
    "ckpt_path",
    "tags",
    "notes",
    "data.module.root",
    "data.module.num_workers",
    "trainer.enable_progress_bar",
)
# W&B's limit on a group name.
_GROUP_LENGTH = 128

_MISSING_PACKAGES = {
    "TensorBoardLogger": (
        "logger=tensorboard needs the `tensorboard` (or `tensorboardX`) package, which is not "
        "installed: `pip install tensorboard`, or use logger=csv / logger=wandb instead"
    ),
    "WandbLogger": "logger=wandb needs the `wandb` package: `pip install wandb`",
}


def metric_summary(key: str) -> str | None:
    """The W&B summary of a metric.

    Args:
        key: A slash-named metric (``test/cluster/flip_crf/mIoU``, ``train/loss_front``).

    Returns:
        ``max`` for scores (mIoU, pAcc, the held-out modularity), ``min`` for losses, ``None``
        (W&B keeps the last value) for anything else, e.g. counts such as ``train/bank_size``.
    """
    name = key.rsplit("/", 1)[-1]
    if name in ("mIoU", "pAcc") or key == HELDOUT_MODULARITY:
        return "max"
    if name.startswith("loss") or key == "train/modularity":  # the modularity loss (method.md §4)
        return "min"
    return None


class WandbLogger(LightningWandbLogger):
    """Lightning's W&B logger that declares each metric's summary (:func:`metric_summary`)
    before the metric's first value, so the run shows the best mIoU and the lowest loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._declared: set[str] = set()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key in metrics.keys() - self._declared:
            summary = metric_summary(key)
            if summary is not None:
                # A metric's own definition replaces the "*" one Lightning makes, so it repeats
                # Lightning's x-axis.
                self.experiment.define_metric(
                    key, summary=summary, step_metric="trainer/global_step", step_sync=True
                )
            self._declared.add(key)
        super().log_metrics(metrics, step)


def instantiate_logger(node: DictConfig, **overrides: Any) -> Any:
    """Instantiate one ``logger`` node, naming the missing package when its backend is absent.

    The node is flat (``_target_`` plus constructor arguments); it is built directly rather than
    through ``hydra.utils.instantiate``, whose first parameter is called ``config`` and would
    swallow ``WandbLogger(config=...)``, and which would recurse into the ``_target_`` nodes of
    the resolved run config passed as ``config``.

    Args:
        node: A logger config node with ``_target_``.
        **overrides: Constructor arguments that replace the node's.

    Returns:
        The Lightning logger.

    Raises:
        ValueError: When the node has no ``_target_``.
        ModuleNotFoundError: When the logger's backend package is not installed (with the
            ``pip install`` command and the alternatives).
    """
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    params: dict[str, Any] = OmegaConf.to_container(node, resolve=True)  # type: ignore[assignment]
    target = str(params.pop("_target_", "") or "")
    if not target:
        raise ValueError(f"logger node {params} has no _target_")
    params.update(overrides)
    try:
        return get_class(target)(**params)
    except ModuleNotFoundError as err:
        hint = next((text for name, text in _MISSING_PACKAGES.items() if name in target), None)
        if hint is None:
            raise
        raise ModuleNotFoundError(f"{hint} ({err})") from err


def _override_key(override: str) -> str:
    """``"+method.num_concepts=16"`` -> ``"method.num_concepts"``."""
    return override.split("=", 1)[0].lstrip("+~")


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def is_repeat(override: str) -> bool:
    """Whether a ``key=value`` override only repeats a setting (:data:`REPEAT_KEYS`)."""
    return _under(_override_key(override), REPEAT_KEYS)


def run_group(experiment: str, overrides: Sequence[str]) -> str:
    """The W&B group of a run: the experiment name and its settings without the seed.

    The settings are the run's command-line overrides (a sweep job's include its swept values)
    less the repeat keys (:data:`REPEAT_KEYS`) and those that only say what to run or where to
    record it (stage, logger, paths, ...), sorted by key. A name longer than W&B allows keeps
    its start and ends with a digest of the whole, so different settings never share a group.

    Args:
        experiment: ``cfg.experiment_name``.
        overrides: The run's overrides (``HydraConfig.get().overrides.task``).

    Returns:
        For example ``"mosaic_filterbank_tr method.head.temperature=0.1"``.
    """
    ignored = (*REPEAT_KEYS, *_RECORD_KEYS)
    settings = sorted(
        (o for o in overrides if not _under(_override_key(o), ignored)), key=_override_key
    )
    group = " ".join([experiment, *settings])
    if len(group) > _GROUP_LENGTH:
        digest = hashlib.sha1(group.encode()).hexdigest()[:8]
        group = f"{group[: _GROUP_LENGTH - len(digest) - 4]}... {digest}"
    return group


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def step_loggers(cfg: DictConfig, step: str) -> list[Any]:
    """The loggers of ``cfg.logger`` for one step; a W&B run per step, named after it, grouped
    by :func:`run_group` (unless ``logger.wandb.group`` is set), with the config attached."""
    from cause_lightning.config import to_plain

    loggers = []
    for node in (cfg.get("logger") or {}).values():
        overrides: dict[str, Any] = {}
        if "WandbLogger" in str(node.get("_target_", "")):
            overrides = {
                "name": f"{cfg.experiment_name}-{step}",
                "job_type": step,
                "group": node.get("group") or run_group(cfg.experiment_name, _task_overrides()),
                "config": to_plain(cfg),
            }
        loggers.append(instantiate_logger(node, **overrides))
    return loggers


def require_wandb_login(cfg: DictConfig) -> None:
    """Refuse a W&B logger in online mode when no API key can be found, before any work.

    W&B would ask for a key at its ``Enter your choice:`` prompt and wait there for ever (or fail
    after training has started where no terminal is attached). A key is found where W&B looks:
    ``WANDB_API_KEY`` (or ``WANDB_IDENTITY_TOKEN_FILE``) or the ``.netrc`` entry ``wandb login``
    writes for the W&B host.

    Raises:
        SettingsError: Saying how to log in or to log offline.
    """
    targets = [str(n.get("_target_", "")) for n in (cfg.get("logger") or {}).values()]
    if not any("WandbLogger" in t for t in targets):
        return
    if os.environ.get("WANDB_MODE", "online") not in ("online", "run"):
        return  # offline, disabled (rule P3: the mode is the environment's)
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    import wandb

    host = urlsplit(os.environ.get("WANDB_BASE_URL") or wandb.Settings().base_url).hostname
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(host or "")
    except (OSError, netrc.NetrcParseError):
        entry = None
    if entry and entry[2]:
        return
    raise SettingsError(
        f"logger=wandb logs online (WANDB_MODE={os.environ.get('WANDB_MODE', 'unset')}) but no "
        f"W&B API key was found (no WANDB_API_KEY, no .netrc entry for {host}): nothing was run. "
        "Run `wandb login` once, or set WANDB_API_KEY, or log offline with WANDB_MODE=offline "
        "(and `wandb sync` the run folder later)"
    )


def wandb_loggers(trainer: pl.Trainer | None) -> list[LightningWandbLogger]:
    """The trainer's W&B loggers on global rank 0 (empty elsewhere, or without W&B)."""
    if trainer is None or not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, LightningWandbLogger)]


def _file_artifact(path: Path, kind: str, experiment: str) -> Any:
    """A W&B artifact ``<experiment>-<kind>`` holding one file. The producing and the consuming
    step build it identically, so W&B finds one version (by content digest) for both."""
    import wandb

    # W&B artifact names allow letters, digits, '-', '_' and '.'.
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{experiment}-{kind}")
    metadata = {"file": path.name, "bytes": path.stat().st_size}
    artifact = wandb.Artifact(name, type=kind, metadata=metadata)
    artifact.add_file(str(path), name=path.name)
    return artifact


def log_artifact(
    logger: LightningWandbLogger, path: str | Path, kind: str, experiment: str
) -> None:
    """Upload (or, offline, stage for ``wandb sync``) one exported file as a W&B artifact.

    Args:
        logger: The step's W&B logger.
        path: The file (``clusterbook.pt``, ``head.pt``, ``probe.pt``, ``segmenter.pt``).
        kind: Artifact type (the file's kind).
        experiment: Experiment name; the artifact is ``<experiment>-<kind>``.
    """
    artifact = _file_artifact(Path(path), kind, experiment)
    logger.experiment.log_artifact(artifact)
    log.info("W&B artifact %s (%s) from %s", artifact.name, kind, path)


def declare_input(logger: LightningWandbLogger, path: str | Path, experiment: str) -> None:
    """Declare an artifact file a step read as an input of its W&B run (lineage).

    The artifact is built from the local file exactly as the producing step logged it, so W&B
    links the version that step logged (or creates it, when that step logged nothing).
    ``Run.use_artifact`` does this for such an artifact online but refuses any artifact
    offline, where looking a name up is impossible; a local artifact needs no look-up, so both
    modes record it the way ``use_artifact`` does, as used once committed, and ``wandb sync``
    links it later.

    Args:
        logger: The step's W&B logger.
        path: ``clusterbook.pt``, ``head.pt`` or ``probe.pt`` (the type is the file's stem).
        experiment: Experiment name; the artifact is ``<experiment>-<type>``.

    Raises:
        ValueError: When the file is not one of the artifact kinds.
    """
    path = Path(path)
    if path.stem not in ARTIFACT_KINDS.values():
        raise ValueError(f"{path} is not a stage artifact ({sorted(ARTIFACT_KINDS.values())})")
    artifact = _file_artifact(path, path.stem, experiment)
    logger.experiment._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    log.info("W&B input %s (%s) from %s", artifact.name, path.stem, path)


def log_evaluation(logger: LightningWandbLogger, results: dict[str, Any]) -> None:
    """Log the evaluation's images, plots, per-class IoU table and held-out objective to W&B.

    Args:
        logger: The eval step's W&B logger.
        results: The eval step's results: ``artifacts/metrics`` (``metrics.json``),
            ``artifacts/predictions`` (prediction PNGs), ``artifacts/plot/...`` (plots) and
            the held-out modularity when the probe recorded one.
    """
    import wandb

    report = json.loads(Path(results["artifacts/metrics"]).read_text())
    details: dict[str, Any] = report.get("details", {})
    class_names: list[str] = list(report.get("class_names") or [])
    variant = report.get("record_variant")
    payload: dict[str, Any] = {}

    predictions = results.get("artifacts/predictions")
    if predictions and Path(predictions).is_dir():
        directory = Path(predictions)
        sheet = directory / "contact_sheet.png"
        if sheet.is_file():
            payload["eval/contact_sheet"] = wandb.Image(str(sheet), caption=sheet.stem)
        examples = sorted(p for p in directory.glob("*.png") if p != sheet)
        if examples:
            payload["eval/examples"] = [wandb.Image(str(p), caption=p.stem) for p in examples]

    prefix, suffix = "details/cluster/", "/per_class_iou"
    variants = sorted(
        k[len(prefix) : -len(suffix)]
        for k in details
        if k.startswith(prefix) and k.endswith(suffix)
    )
    if variants:
        columns = ["class", *(f"cluster/{v} IoU" for v in variants)]
        count = len(details[f"{prefix}{variants[0]}{suffix}"])
        names = class_names if len(class_names) == count else [f"class_{i}" for i in range(count)]
        rows = [
            [name, *(details[f"{prefix}{v}{suffix}"][i] for v in variants)]
            for i, name in enumerate(names)
        ]
        payload["eval/per_class_iou"] = wandb.Table(columns=columns, data=rows)

    plots = {  # W&B key: (result key, caption)
        "eval/confusion_matrix": (
            "artifacts/plot/confusion_matrix",
            f"cluster/{variant}: rows true class (normalised), columns matched prediction",
        ),
        "eval/per_class_iou_plot": ("artifacts/plot/per_class_iou", f"cluster/{variant}"),
    }
    for key, (result, caption) in plots.items():
        if results.get(result) and Path(results[result]).is_file():
            payload[key] = wandb.Image(str(results[result]), caption=caption)
    if payload:
        logger.experiment.log(payload)
    if results.get(HELDOUT_MODULARITY) is not None:
        logger.log_metrics({HELDOUT_MODULARITY: float(results[HELDOUT_MODULARITY])})


def publish_step(
    trainer: pl.Trainer | None,
    step: str,
    results: dict[str, Any],
    experiment: str,
    inputs: Sequence[str | Path | None] = (),
) -> None:
    """Declare a finished step's inputs, log its artifacts (and eval report) to W&B, then finish
    its W&B run.

    Does nothing unless ``trainer`` has a W&B logger and this is global rank 0.

    Args:
        trainer: The step's trainer (the last one the pipeline built).
        step: ``mediator``, ``head``, ``probe`` or ``eval``.
        results: The step's results (``artifacts/...`` paths, metrics).
        experiment: ``cfg.experiment_name`` (artifact names).
        inputs: The artifact files the step read (``clusterbook.pt`` for ``head``, ...); those
            that do not exist (or ``None``) are skipped.
    """
    loggers = wandb_loggers(trainer)
    for logger in loggers:
        for path in inputs:
            if path is not None and Path(path).is_file():
                declare_input(logger, path, experiment)
        for key, kind in ARTIFACT_KINDS.items():
            path = results.get(key)
            if path and Path(path).is_file():
                log_artifact(logger, path, kind, experiment)
        if step == "eval" and results.get("artifacts/metrics"):
            log_evaluation(logger, results)
    for logger in loggers:
        run = getattr(logger, "_experiment", None)
        if run is not None and hasattr(run, "finish"):
            run.finish()


def publish_summary(
    cfg: DictConfig,
    rows: list[dict[str, Any]],
    columns: list[str],
    stats: list[dict[str, Any]],
    summary: dict[str, Any],
) -> None:
    """Log a sweep's summary as its own W&B run, ``summary-<sweep directory name>`` (job type
    ``summarize``), for every W&B logger of ``cfg.logger``: the jobs and the mean ± std tables
    (``summary/jobs``, ``summary/statistics``), the sweep plot (``summary/plot``) and, in the
    run summary, the best job and its metric.

    Args:
        cfg: The ``stage=summarize`` config (``sweep_dir``, ``logger``).
        rows: One row per job (:func:`cause_lightning.reports.sweeps.collect_sweep`).
        columns: The columns of ``summary.csv``.
        stats: :func:`cause_lightning.reports.sweeps.sweep_statistics`.
        summary: The summarize results (``summary/plot``, ``summary/best_job``, ...).
    """
    from cause_lightning.config import to_plain

    nodes = [
        n for n in (cfg.get("logger") or {}).values() if "WandbLogger" in str(n.get("_target_"))
    ]
    if not nodes:
        return
    import wandb

    name = f"summary-{Path(str(cfg.sweep_dir)).name}"
    statistics = ["group", "metric", "mean", "std", "n"]
    for node in nodes:
        logger = instantiate_logger(
            node, name=name, job_type="summarize", group=node.get("group"), config=to_plain(cfg)
        )
        run = logger.experiment
        payload: dict[str, Any] = {
            "summary/jobs": wandb.Table(
                columns=columns, data=[[row.get(c) for c in columns] for row in rows]
            ),
            "summary/statistics": wandb.Table(
                columns=statistics, data=[[s[c] for c in statistics] for s in stats]
            ),
        }
        if summary.get("summary/plot"):
            payload["summary/plot"] = wandb.Image(summary["summary/plot"])
        run.log(payload)
        for key in ("summary/best_job", "summary/metric", "objective"):
            run.summary[key] = summary.get(key)
        run.finish()


def finish_wandb(exit_code: int = 0) -> None:
    """Close any W&B run left open, so runs never bleed into the next multirun job."""
    try:
        import wandb
    except ImportError:  # pragma: no cover - wandb is a dependency, but stay tolerant
        return
    if wandb.run is not None:
        wandb.finish(exit_code=exit_code)
