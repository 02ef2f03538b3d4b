"""Non-training stages: ``prepare`` (datasets), ``import`` (release), ``summarize`` (sweeps)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from cause_lightning.core.files import atomic_write
from cause_lightning.logs import get_logger
from cause_lightning.specs import tr_grid_error

__all__ = ["prepare", "import_release", "summarize", "collect_sweep", "sweep_statistics"]

log = get_logger(__name__)


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """``stage=prepare``: download (where possible), verify and crop the dataset of ``data.module``.

    The configured data module (its ``_target_``, ``root``, lists and crop recipe) is what gets
    prepared, so training later finds exactly what was written. Its ``num_workers`` cut the crops.
    """
    from hydra.utils import instantiate

    from cause_lightning.data.prepare import prepare_module

    def build() -> Any:
        return instantiate(cfg.data.module)

    try:
        report = prepare_module(
            build,
            download=cfg.stage.get("download"),
            num_workers=int(cfg.data.module.get("num_workers", 0) or 0),
        )
    except TypeError as err:
        raise ValueError(f"data={cfg.data.name}: {err}") from err
    return {"prepare": report}


def _class_names(cfg: DictConfig) -> list[str] | None:
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


def import_release(cfg: DictConfig) -> dict[str, Any]:
    """``stage=import``: turn the reference release files into this project's stage artifacts."""
    from cause_lightning.interop import import_official
    from cause_lightning.steps import Pipeline

    source = cfg["import"]
    missing = [key for key in ("segment", "cluster", "clusterbook") if not source.get(key)]
    if missing:
        raise ValueError(
            "stage=import needs "
            + ", ".join(f"import.{k}=<file>" for k in missing)
            + " (segment_{tr,mlp}.pth, cluster_{tr,mlp}.pth and modular.npy of the release)"
        )
    bundle = import_official(source.segment, source.cluster, source.clusterbook, head=cfg.head.name)
    if bundle.num_classes != int(cfg.data.num_classes):
        raise ValueError(
            f"the release has {bundle.num_classes} classes but data={cfg.data.name} has "
            f"{cfg.data.num_classes}: pick the matching data= option"
        )
    pipeline = Pipeline(cfg).setup()
    if bundle.dim != pipeline.backbone.embed_dim:
        raise ValueError(
            f"the release head expects {bundle.dim}-d features but backbone={cfg.backbone.name} "
            f"gives {pipeline.backbone.embed_dim}: pick the backbone the release was trained on"
        )
    resolution = int(pipeline.derived.resolution.test)
    patch = int(pipeline.backbone.patch_size)
    error = bundle.head_type == "tr" and tr_grid_error(
        int(bundle.num_queries or 0), resolution, patch
    )
    if error:
        # The TR position queries fix the token grid: eval would fail on the first batch.
        raise ValueError(
            f"release for data={cfg.data.name}: {error} (set data.recipe.resolution.test to it)"
        )
    paths = bundle.save(
        pipeline.root,
        backbone=cfg.backbone.name,
        backbone_weights=cfg.backbone.weights,
        backbone_kwargs=pipeline.backbone_kwargs(),
        backbone_target=str(cfg.backbone._target_),
        resolution=resolution,
        class_names=_class_names(cfg),
        head_name=cfg.head.name,
        patch_size=int(pipeline.backbone.patch_size),
    )
    # A self-contained model right away (and no stale segmenter.pt of an earlier run left behind);
    # stage=eval rewrites it with the cluster -> class assignment.
    from cause_lightning.segmenter import Segmenter

    segmenter = Segmenter.from_artifacts(pipeline.root, cfg.head.name, backbone=pipeline.backbone)
    paths["segmenter"] = pipeline.head_root / "segmenter.pt"
    segmenter.save(paths["segmenter"])
    log.info(
        "imported the reference release into %s; run stage=eval or stage=predict next",
        pipeline.root,
    )
    return {f"artifacts/{k}": str(v) for k, v in paths.items()}


def collect_sweep(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job of a multirun directory: its overrides, status and metrics.

    Args:
        sweep_dir: A Hydra multirun directory (``<sweep>/<job number>/...``).

    Returns:
        Rows with ``job``, ``overrides`` (all of the job's), ``varied`` (those not shared by
        every job), ``status`` (``ok`` / ``failed`` / ``missing``), ``error`` and every
        ``test/...`` metric of the job's ``results.json``.
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
            row.update(
                status="ok", error="", **{k: v for k, v in results.items() if k.startswith("test/")}
            )
        else:
            row.update(status="missing", error="no results.json (job still running or killed)")
        rows.append(row)
    # The overrides every job shares say nothing about the sweep: keep the ones that vary.
    shared = set.intersection(*(set(r["_override_list"]) for r in rows))
    for row in rows:
        varied = [o for o in row.pop("_override_list") if o not in shared]
        row["varied"] = " ".join(varied)
    return rows


# Overrides that tell repeated runs of one setting apart (stripped when grouping for mean ± std).
_REPEAT_KEYS = ("seed=", "artifact_tag=")


def sweep_statistics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean, sample standard deviation and count of every metric over repeated runs.

    Jobs whose varied overrides agree once ``seed`` and ``artifact_tag`` are set aside form a
    group (a ``+sweep=seeds`` run is one group); only finished jobs (``status == "ok"``) count.

    Args:
        rows: The rows of :func:`collect_sweep`.

    Returns:
        One dict per group and ``test/...`` metric: ``group`` (its overrides, ``""`` for all
        jobs), ``metric``, ``mean``, ``std`` (``n - 1`` in the denominator; NaN for one run)
        and ``n``, in group order then metric order.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] != "ok":
            continue
        varied = [o for o in row["varied"].split() if not o.startswith(_REPEAT_KEYS)]
        groups.setdefault(" ".join(varied), []).append(row)
    stats = []
    for group, members in groups.items():
        metrics = sorted({k for row in members for k in row if k.startswith("test/")})
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
            stats.append({"group": group, "metric": metric, "mean": mean, "std": std, "n": n})
    return stats


def _print_statistics(stats: list[dict[str, Any]], sweep_dir: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sweep {sweep_dir}: mean ± std over runs (x100)")
    for column in ("group", "metric", "mean ± std", "n"):
        table.add_column(column, justify="right" if column in ("mean ± std", "n") else "left")
    for stat in stats:
        spread = "-" if math.isnan(stat["std"]) else f"{100 * stat['std']:.1f}"
        table.add_row(
            stat["group"] or "(all jobs)",
            stat["metric"].replace("test/", ""),
            f"{100 * stat['mean']:.1f} ± {spread}",
            str(stat["n"]),
        )
    Console().print(table)


def _summary_metric(rows: list[dict[str, Any]], requested: str) -> str:
    """``requested`` when some job reports it, else the best available cluster-probe variant.

    Without pydensecrf the CRF variants are skipped, so the default ``.../flip_crf/mIoU`` may be
    absent; the fallback follows the report's order (flip_crf, flip, crf, raw).
    """
    available = {k for row in rows for k in row if k.startswith("test/")}
    if requested in available or not available:
        return requested
    for variant in ("flip_crf", "flip", "crf", "raw"):
        candidate = f"test/cluster/{variant}/mIoU"
        if candidate in available:
            log.warning("no job reports %s; ranking jobs by %s", requested, candidate)
            return candidate
    return requested


def summarize(cfg: DictConfig) -> dict[str, Any]:
    """``stage=summarize``: tabulate a multirun (``sweep_dir=...``), best row highlighted, then
    mean ± std and n of every metric over the runs that differ only by seed."""
    from rich.console import Console
    from rich.table import Table

    if not cfg.get("sweep_dir"):
        raise ValueError("stage=summarize needs sweep_dir=<multirun directory>")
    rows = collect_sweep(cfg.sweep_dir)
    metric = _summary_metric(rows, str(cfg.summary_metric))
    metric_keys = sorted({k for row in rows for k in row if k.startswith("test/")})
    scored = [
        r for r in rows if isinstance(r.get(metric), (int, float)) and not math.isnan(r[metric])
    ]
    best = max(scored, key=lambda r: r[metric]) if scored else None
    columns = ["job", "status", "varied", *metric_keys, "error", "overrides"]
    out = Path(cfg.sweep_dir) / "summary.csv"

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(out, write)
    table = Table(title=f"sweep {cfg.sweep_dir} (best by {metric})")
    shown = [m for m in metric_keys if m.endswith("mIoU")] or metric_keys
    for column in ["job", "status", "varied", *shown]:
        table.add_column(column.replace("test/", ""))
    for row in rows:
        values = [
            f"{100 * row[m]:.1f}" if isinstance(row.get(m), (int, float)) else "-" for m in shown
        ]
        status = row["status"] if row["status"] == "ok" else f"{row['status']}: {row['error'][:60]}"
        table.add_row(
            row["job"],
            status,
            row["varied"],
            *values,
            style="bold green" if row is best else None,
        )
    Console().print(table)
    stats = sweep_statistics(rows)
    stats_out = Path(cfg.sweep_dir) / "summary_stats.csv"

    def write_stats(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["group", "metric", "mean", "std", "n"])
            writer.writeheader()
            writer.writerows(stats)

    atomic_write(stats_out, write_stats)
    _print_statistics(stats, str(cfg.sweep_dir))
    return {
        "summary/csv": str(out),
        "summary/stats_csv": str(stats_out),
        "summary/stats": stats,
        "summary/best_job": best["job"] if best else None,
        "summary/metric": metric,
        "objective": best[metric] if best else None,
        "summary/failed": [r["job"] for r in rows if r["status"] != "ok"],
    }
