"""``stage=summarize``: one table of a multirun's jobs, mean ± std over seeds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cause_lightning.core.constants import HELDOUT_MODULARITY
from cause_lightning.core.files import atomic_write
from cause_lightning.core.logs import get_logger
from cause_lightning.metrics import RECORD_PREFERENCE
from cause_lightning.reports.tracking import is_repeat

__all__ = ["summarize", "collect_sweep", "sweep_statistics"]

log = get_logger(__name__)


def _is_metric(key: str) -> bool:
    """The results a sweep compares: every ``test/...`` metric and the label-free objective."""
    return key.startswith("test/") or key == HELDOUT_MODULARITY


def _submitit_logs(job: Path) -> Path | None:
    """The log folder of a job that a submitit launcher ran (``+launcher=slurm|local``): the
    launcher stores ``<sweep>/.submitit/<job id>/`` and Hydra records the id in the job."""
    hydra_file = job / ".hydra" / "hydra.yaml"
    if not hydra_file.is_file():
        return None
    job_id = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.job.id", default=None)
    folder = job.parent / ".submitit" / str(job_id)
    return folder if job_id is not None and folder.is_dir() else None


def collect_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job of a multirun directory: its overrides, status and metrics.

    Works on the directories of every launcher (basic, ``+launcher=local|slurm``) and sweeper
    (basic, Optuna): each job is a ``<sweep>/<job number>/`` folder holding ``.hydra/``.

    Args:
        sweep_dir: A Hydra multirun directory (``<sweep>/<job number>/...``).

    Returns:
        Rows with ``job``, ``overrides`` (all of the job's), ``varied`` (those not shared by
        every job), ``status`` (``ok`` / ``failed`` / ``missing``), ``error`` and every
        ``test/...`` metric and the held-out modularity of the job's ``results.json``. A job
        with neither ``results.json`` nor ``failure.json`` (still running, or killed, e.g. at a
        SLURM time limit) is ``missing``; its error names the submitit logs when there are any.
    """
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep_dir={sweep_dir} is not a directory")
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()),
        key=lambda p: (len(p.name), p.name),
    )
    if not jobs:
        raise FileNotFoundError(f"no Hydra job directories (with .hydra/) under {sweep_dir}")
    rows = []
    for job in jobs:
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = (
            OmegaConf.to_container(OmegaConf.load(overrides_file))
            if overrides_file.is_file()
            else []
        )
        row: dict[str, Any] = {
            "job": job.name,
            "overrides": " ".join(map(str, overrides)),
            "_override_list": [str(o) for o in overrides],
        }
        failure = job / "failure.json"
        results_file = job / "results.json"
        if failure.is_file():
            row.update(status="failed", error=json.loads(failure.read_text()).get("error", ""))
        elif results_file.is_file():
            results = json.loads(results_file.read_text())
            row.update(status="ok", error="", **{k: v for k, v in results.items() if _is_metric(k)})
        else:
            logs = _submitit_logs(job)
            error = "no results.json (job still running or killed)"
            row.update(status="missing", error=f"{error}; logs: {logs}" if logs else error)
        rows.append(row)
    # The overrides every job shares say nothing about the sweep: keep the ones that vary.
    shared = set.intersection(*(set(r["_override_list"]) for r in rows))
    for row in rows:
        varied = [o for o in row.pop("_override_list") if o not in shared]
        row["varied"] = " ".join(varied)
    return rows


def sweep_statistics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample standard deviation and count of every metric over repeated runs.

    Jobs whose varied overrides agree once the repeat keys (``seed``, ``artifact_tag``:
    :data:`cause_lightning.reports.tracking.REPEAT_KEYS`) are set aside form a group (a
    ``+sweep=seeds`` run is one group); only finished jobs (``status == "ok"``) count.

    Args:
        rows: The rows of :func:`collect_sweep`.

    Returns:
        One dict per group and metric: ``group`` (its overrides, ``""`` for all jobs),
        ``metric``, ``mean``, ``std`` (``n - 1`` in the denominator; NaN for one run), ``n`` and
        ``values`` (each run's), in group order then metric order.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        varied = [o for o in row["varied"].split() if not is_repeat(o)]
        groups.setdefault(" ".join(varied), []).append(row)
    stats = []
    for group, members in groups.items():
        metrics = sorted({k for row in members for k in row if _is_metric(k)})
        for metric in metrics:
            values = [
                float(row[metric])
                for row in members
                if isinstance(row.get(metric), (int, float)) and not math.isnan(row[metric])
            ]
            if not values:
                continue
            n = len(values)
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
            stats.append(
                {
                    "group": group,
                    "metric": metric,
                    "mean": mean,
                    "std": std,
                    "n": n,
                    "values": values,
                }
            )
    return stats


def _value(metric: str, value: Any) -> str:
    """Scores in % (one decimal), the held-out modularity as it is."""
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value:.4f}" if metric == HELDOUT_MODULARITY else f"{100 * value:.1f}"


def _settings_column(table: Any, title: str, texts: list[str]) -> None:
    """A column that shows settings in full: one override per line, as wide as the longest."""
    width = max((len(part) for text in texts for part in text.split()), default=len(title))
    table.add_column(title, overflow="fold", min_width=min(width, 60))


def _header(metric: str) -> str:
    """A narrow column title: one part of the metric's name per line."""
    if metric == HELDOUT_MODULARITY:
        return "held-out\nmodularity"
    if metric.startswith("test/cluster/") and metric.endswith("/mIoU"):
        return metric.split("/")[2]  # the variant: the title says cluster-probe mIoU
    return metric.removeprefix("test/").replace("/", "/\n")


def _print_jobs(
    rows: list[dict[str, Any]], shown: list[str], best: dict | None, title: str
) -> None:
    """The metrics of every job, then a legend: each job's varied settings (and a failed job's
    error) in full, one job a line, never cut to the terminal's width."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("job")
    table.add_column("status")
    for column in shown:
        table.add_column(_header(column), justify="right")
    for row in rows:
        table.add_row(
            row["job"],
            row["status"],
            *(_value(m, row.get(m)) for m in shown),
            style="bold green" if row is best else None,
        )
    console = Console()
    console.print(table)
    console.print("settings varied per job:")
    for row in rows:
        error = "" if row["status"] == "ok" else f"  [{row['status']}: {row['error']}]"
        console.print(
            f"  {row['job']}: {row['varied'] or '(none)'}{error}",
            style="bold green" if row is best else None,
            soft_wrap=True,
            markup=False,
            highlight=False,
        )


def _print_statistics(stats: list[dict[str, Any]], sweep_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {sweep_dir}: mean ± std over runs (scores x100)", show_lines=True)
    _settings_column(table, "group", [s["group"] for s in stats])
    table.add_column("metric", overflow="fold")  # long names wrap instead of being cut
    table.add_column("mean ± std", justify="right")
    table.add_column("n", justify="right")
    for stat in stats:
        spread = "-" if math.isnan(stat["std"]) else _value(stat["metric"], stat["std"])
        table.add_row(
            "\n".join(stat["group"].split()) or "(all jobs)",
            stat["metric"].replace("test/", ""),
            f"{_value(stat['metric'], stat['mean'])} ± {spread}",
            str(stat["n"]),
        )
    Console().print(table)


def _summary_metric(rows: list[dict[str, Any]], requested: str) -> str:
    """``requested`` when some job reports it, else the best available cluster-probe variant.

    Without pydensecrf the CRF variants are skipped, so the default ``.../flip_crf/mIoU`` may be
    absent; the fallback follows the report's order
    (:data:`~cause_lightning.metrics.RECORD_PREFERENCE`).
    """
    available = {k for row in rows for k in row if _is_metric(k)}
    if requested in available or not available:
        return requested
    for variant in RECORD_PREFERENCE:
        candidate = f"test/cluster/{variant}/mIoU"
        if candidate in available:
            log.warning("no job reports %s; ranking jobs by %s", requested, candidate)
            return candidate
    return requested


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def summarize(cfg: DictConfig) -> dict[str, Any]:
    """``stage=summarize``: tabulate a multirun (``sweep_dir=...``), best row highlighted, then
    mean ± std and n of every metric over the runs that differ only by seed; write
    ``summary.csv``, ``summary_stats.csv`` and ``summary.png`` (the sweep plot) into the sweep
    directory, and log them as a W&B run when ``logger=wandb``."""
    from rich.console import Console

    from cause_lightning.reports.plots import sweep_plot
    from cause_lightning.reports.tracking import publish_summary

    if not cfg.get("sweep_dir"):
        raise ValueError("stage=summarize needs sweep_dir=<multirun directory>")
    sweep_dir = Path(cfg.sweep_dir)
    rows = collect_sweep(sweep_dir)
    metric = _summary_metric(rows, str(cfg.summary_metric))
    metric_keys = sorted({k for row in rows for k in row if _is_metric(k)})
    scored = [
        r for r in rows if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])
    ]
    best = max(scored, key=lambda r: r[metric]) if scored else None
    columns = ["job", "status", "varied", *metric_keys, "error", "overrides"]
    out = _write_csv(sweep_dir / "summary.csv", columns, rows)
    # Per job: the cluster probe's mIoU of every variant, the label-free objective and the
    # ranking metric; summary.csv and the statistics below hold every metric.
    reported = dict.fromkeys(k for row in rows for k in row if _is_metric(k))  # report order
    cluster = [m for m in reported if m.startswith("test/cluster/") and m.endswith("/mIoU")]
    objective = [HELDOUT_MODULARITY] if HELDOUT_MODULARITY in metric_keys else []
    shown = list(
        dict.fromkeys([*cluster, *objective, *([metric] if metric in metric_keys else [])])
    )
    title = f"sweep {sweep_dir}: cluster-probe mIoU (%) per job, best by {metric}"
    _print_jobs(rows, shown, best, title)
    if metric.startswith("test/"):
        Console().print(
            f"best by {metric}: chosen with the evaluation labels, a diagnostic, not an "
            f"unsupervised result (label-free: summary_metric={HELDOUT_MODULARITY})",
            soft_wrap=True,
            highlight=False,
        )
    stats = sweep_statistics(rows)
    stats_out = _write_csv(
        sweep_dir / "summary_stats.csv", ["group", "metric", "mean", "std", "n"], stats
    )
    _print_statistics(stats, str(sweep_dir))
    plotted = list(dict.fromkeys([metric, HELDOUT_MODULARITY]))
    plot = sweep_plot(
        stats,
        plotted,
        sweep_dir / "summary.png",
        title=f"sweep {sweep_dir.parent.name}/{sweep_dir.name}",
    )
    summary = {
        "summary/csv": str(out),
        "summary/stats_csv": str(stats_out),
        "summary/plot": plot,
        "summary/stats": stats,
        "summary/best_job": best["job"] if best else None,
        "summary/metric": metric,
        "objective": best[metric] if best else None,
        "summary/failed": [r["job"] for r in rows if r["status"] != "ok"],
    }
    publish_summary(cfg, rows, columns, stats, summary)
    return summary
