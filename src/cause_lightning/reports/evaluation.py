"""The evaluation report: metrics.json, the printed table, prediction images, segmenter.pt.

Every row is labelled with what produced it (protocol.md §6, reporting rule): variant, probe,
cluster count, checkpoint rule and seed; the linear probe is a supervised diagnostic and the
reference-leak mode is flagged. Over-clustering rows (``overcluster_k<k>/...``) are scored with
many-to-one matching and printed with their cluster count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from cause_lightning.core.constants import HELDOUT_MODULARITY
from cause_lightning.core.files import write_json_atomic
from cause_lightning.core.logs import get_logger
from cause_lightning.metrics import (
    EVAL_VARIANTS,
    OVERCLUSTER_PREFIX,
    RECORD_PREFERENCE,
    overcluster_row,
    record_variant,
    remap_clusters,
)
from cause_lightning.reports.plots import report_plots
from cause_lightning.visualize import colorize, contact_sheet, default_palette, save_png

if TYPE_CHECKING:
    from omegaconf import DictConfig

__all__ = ["EvalOutcome", "clusters_used", "describe_probe", "write_report"]

log = get_logger(__name__)


@dataclass
class EvalOutcome:
    """What an evaluation hands its report: plain values only.

    Attributes:
        results: Every ``test/...`` metric and ``details/...`` record (confusion, assignment,
            per-class IoU) of the evaluation.
        examples: Kept examples: ``image`` (uint8 ``[H, W, 3]``), ``label`` and one prediction per
            cluster variant.
        variants: The cluster-probe variants computed, in protocol order.
        num_classes: C.
        overcluster_counts: The over-clustering counts scored (empty when off).
        class_names: The dataset's class names.
        palette: ``uint8 [C, 3]`` colours.
        data_description: The data module's description (plain values).
    """

    results: dict[str, Any]
    examples: list[dict[str, np.ndarray]]
    variants: tuple[str, ...]
    num_classes: int
    overcluster_counts: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    palette: np.ndarray | None = None
    data_description: dict[str, Any] = field(default_factory=dict)

    @property
    def record_variant(self) -> str:
        """The variant the report records: the published protocol (flip + CRF), or the best
        available one without pydensecrf."""
        return record_variant(self.variants)

    @property
    def assignment(self) -> list[int] | None:
        """Cluster -> class of the recorded variant."""
        return self.results.get(f"details/cluster/{self.record_variant}/assignment")


def write_report(
    cfg: DictConfig,
    outcome: EvalOutcome,
    leak: bool,
    *,
    directories: Sequence[Path],
    resolution: int,
    backbone_kwargs: dict[str, Any],
    probe: dict[str, Any] | None = None,
    overcluster: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write and print the evaluation report (rank 0 only).

    Args:
        cfg: The run config (names, seed, published figure).
        outcome: What the evaluation found.
        leak: Whether the probe stage ran with ``reference_leak``.
        directories: Where ``metrics.json`` goes (the evaluation's artifact directory, then the
            run directory, which also gets the prediction images).
        resolution: The test resolution.
        backbone_kwargs: The backbone's architecture keywords (recorded).
        probe: The ``fit`` record of ``probe.pt`` (init, restarts, held-out objectives, kept
            index); ``None`` for centroids of unknown origin (an imported release).
        overcluster: The ``fit`` record of each over-clustering probe by cluster count (empty
            or ``None`` when over-clustering is off).

    Returns:
        Paths of what was written, under ``artifacts/...`` keys (``metrics.json`` and, beside
        it, its plots), and the kept centroid set's held-out modularity under
        :data:`~cause_lightning.core.constants.HELDOUT_MODULARITY` when the probe recorded one.
    """
    results = outcome.results
    class_names = list(outcome.class_names) or [f"class_{i}" for i in range(outcome.num_classes)]
    palette = np.asarray(
        outcome.palette if outcome.palette is not None else default_palette(outcome.num_classes),
        dtype=np.uint8,
    )
    variant = outcome.record_variant
    report = {
        "experiment": cfg.experiment_name,
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "backbone_kwargs": backbone_kwargs,
        "head": cfg.head.name,
        "num_classes": int(cfg.data.num_classes),
        "num_clusters": int(cfg.data.num_classes),
        "test_resolution": int(resolution),
        "record_variant": variant,
        "checkpoint_rule": "last epoch of every stage (no selection on validation labels)",
        "seed": int(cfg.seed),
        "reference_leak": leak,
        "unsupervised": not leak,
        "class_names": class_names,
        "data_description": outcome.data_description,
        "published": _plain(cfg.get("published")),
        "metrics": {k: v for k, v in results.items() if k.startswith("test/")},
        "details": {k: v for k, v in results.items() if k.startswith("details/")},
        "clusters_used": clusters_used(results),
        "cluster_probe": probe,
    }
    counts = sorted(outcome.overcluster_counts)
    if counts:
        report["overcluster"] = {
            "counts": counts,
            "matching": "majority (many-to-one: each cluster to the class it overlaps most)",
            "rows": [f"{overcluster_row(k)}/..." for k in counts],
            "cluster_probe": {str(k): (overcluster or {}).get(k) for k in counts},
        }
    written: dict[str, Any] = {}
    for directory in directories:
        path = write_json_atomic(Path(directory) / "metrics.json", report)
        written.setdefault("artifacts/metrics", str(path))
    written.update(report_plots(report, list(directories)))
    if probe and probe["objectives"][probe["kept"]] is not None:
        written[HELDOUT_MODULARITY] = float(probe["objectives"][probe["kept"]])
    written.update(_write_examples(Path(directories[-1]), outcome, palette))
    print_table(report, class_names)
    return written


def clusters_used(results: dict[str, Any]) -> dict[str, int]:
    """Clusters that predict at least one labelled pixel, per scored row (from its confusion).

    A modularity-trained cluster probe can leave centroids that win no pixel: two classes then
    share one cluster and the unmatched class scores IoU 0. The count makes that visible.

    Args:
        results: ``EvalModule.results`` (``details/<probe>/<variant>/confusion`` entries).

    Returns:
        ``{"<probe>/<variant>": used}`` for every row with a confusion matrix.
    """
    used = {}
    for key, confusion in results.items():
        if key.startswith("details/") and key.endswith("/confusion"):
            counts = np.asarray(confusion).sum(axis=0)  # per cluster
            used[key[len("details/") : -len("/confusion")]] = int((counts > 0).sum())
    return used


def describe_probe(probe: dict[str, Any] | None) -> str:
    """One line naming how the cluster probe's centroids were fitted (for the report)."""
    if not probe:
        return "centroids of unknown fitting (e.g. an imported release)"
    start = {
        "reference": "reference init (uniform ±1/C)",
        "kmeans++": "k-means++ seeds on head tokens",
    }.get(probe["init"], str(probe["init"]))
    if int(probe["restarts"]) == 1:
        return f"{start}, one centroid set"
    objectives = ", ".join("-" if v is None else f"{v:.4f}" for v in probe["objectives"])
    return (
        f"{start}, best of {probe['restarts']} centroid sets by held-out modularity: set "
        f"{probe['kept']} kept (objectives {objectives})"
    )


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _write_examples(output_dir: Path, outcome: EvalOutcome, palette: np.ndarray) -> dict[str, Any]:
    if not outcome.examples:
        return {}
    variant = outcome.record_variant
    assignment = np.asarray(outcome.assignment)
    directory = output_dir / "predictions"
    rows = []
    for i, example in enumerate(outcome.examples):
        prediction = remap_clusters(example[variant].astype(np.int64), assignment)
        predicted = colorize(prediction, palette)
        truth = colorize(example["label"], palette)
        save_png(predicted, directory / f"{i:04d}_{variant}.png")
        rows.append([example["image"], predicted, truth])
    titles = [f"{i}: image | prediction ({variant}) | ground truth" for i in range(len(rows))]
    sheet = contact_sheet(rows, titles=titles)
    sheet_path = save_png(sheet, directory / "contact_sheet.png")
    return {"artifacts/predictions": str(directory), "artifacts/contact_sheet": str(sheet_path)}


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * float(value):.1f}"


def _has_figure(published: dict[str, Any]) -> bool:
    """Whether a preset's ``published`` entry holds a figure (``mIoU: null`` marks none)."""
    return published.get("mIoU") is not None


def _published_text(published: dict[str, Any]) -> str:
    if not _has_figure(published):
        return "none published"
    return f"{published.get('mIoU', '-')} / {published.get('pAcc') or '-'}"


def print_table(report: dict[str, Any], class_names: list[str]) -> None:
    """Print the metrics table (and the published figure, when known) to the terminal."""
    metrics = report["metrics"]
    published = report.get("published") or {}
    title = (
        f"{report['experiment']}: {report['data']} / {report['backbone']} / {report['head']} "
        f"({report['num_clusters']} clusters, seed {report['seed']})"
    )
    if report["reference_leak"]:
        title += "  [REFERENCE LEAK: not unsupervised]"
    table = Table(title=title)
    for column in ("probe", "variant", "mIoU", "pAcc", "published mIoU / pAcc"):
        table.add_column(column, justify="left" if column in ("probe", "variant") else "right")
    rows = sorted({k.rsplit("/", 1)[0] for k in metrics})
    order = {"cluster": 0, "baseline": 1, "linear": 2}
    variant_order = {v: i for i, v in enumerate(EVAL_VARIANTS)}

    def parse(row: str) -> tuple[int, str, str]:
        # test/<probe>/<variant>, or test/overcluster_k<k>/<probe>/<variant>: (k or 0, ...)
        parts = row.split("/")[1:]
        k = int(parts.pop(0)[len(OVERCLUSTER_PREFIX) :]) if len(parts) == 3 else 0
        return k, parts[0], parts[1]

    rows.sort(
        key=lambda r: (
            parse(r)[0],
            order.get(parse(r)[1], 9),
            variant_order.get(parse(r)[2], 9),
            r,
        )
    )
    for row in rows:
        k, probe, variant = parse(row)
        label = {
            "cluster": "cluster (unsupervised)",
            "linear": "linear (supervised)",
            "baseline": "baseline",
        }[probe]
        if k:
            label = f"{probe}, k={k} (many-to-one)"
        published_text = ""
        if (
            not k
            and probe == "cluster"
            and variant == published.get("variant", RECORD_PREFERENCE[0])
            and published
        ):
            published_text = _published_text(published)
        table.add_row(
            label,
            variant,
            _pct(metrics.get(f"{row}/mIoU")),
            _pct(metrics.get(f"{row}/pAcc")),
            published_text,
        )
    console = Console()
    console.print(table)
    console.print(f"cluster probe: {describe_probe(report.get('cluster_probe'))}")
    overcluster = report.get("overcluster")
    if overcluster:
        console.print(
            f"over-clustering rows ({', '.join(map(str, overcluster['counts']))} clusters): each "
            "cluster is matched to the class it overlaps most (several clusters may share a "
            "class): not comparable to the one-to-one rows"
        )
        for k, fit in overcluster["cluster_probe"].items():
            console.print(f"cluster probe, k={k}: {describe_probe(fit)}")
    if published and not _has_figure(published):
        console.print(
            "published figure: none (no published result for this configuration; "
            f"{published.get('source') or 'none'})"
        )
    variant = report["record_variant"]
    used, total = report["clusters_used"], report["num_clusters"]
    probe_used = used[f"cluster/{variant}"]
    kmeans = "".join(
        f", {label} {used[key]}"
        for key, label in (
            ("baseline/kmeans", "k-means (backbone)"),
            ("baseline/kmeans_head", "k-means (head)"),
        )
        if key in used
    )
    console.print(f"clusters predicting any pixel: cluster probe {probe_used}{kmeans} (of {total})")
    for k in (overcluster or {}).get("counts", []):
        counts = ", ".join(
            f"{name} {n}" for name, n in used.items() if name.startswith(f"{overcluster_row(k)}/")
        )
        console.print(f"  k={k}: {counts.replace(f'{overcluster_row(k)}/', '')} (of {k})")
    if probe_used < total:
        log.warning(
            "the cluster probe leaves %d of %d centroids without a pixel: the modularity "
            "training merged classes (their IoU is 0); docs/method.md §6.1",
            total - probe_used,
            total,
        )
    ious = report["details"].get(f"details/cluster/{variant}/per_class_iou")
    if ious:
        per_class = Table(title=f"per-class IoU (cluster, {variant})")
        per_class.add_column("class")
        per_class.add_column("IoU", justify="right")
        for name, value in zip(class_names, ious):
            per_class.add_row(name, _pct(value))
        console.print(per_class)
