"""The evaluation report: metrics.json, the printed table, prediction images, segmenter.pt.

Every row is labelled with what produced it (protocol.md §6, reporting rule): variant, probe,
cluster count, checkpoint rule and seed; the linear probe is a supervised diagnostic and the
reference-leak mode is flagged. Over-clustering rows (``overcluster_k<k>/...``) are scored with
many-to-one matching and printed with their cluster count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from cause_lightning.core.files import write_json_atomic
from cause_lightning.logs import get_logger
from cause_lightning.metrics import remap_clusters
from cause_lightning.modules.evaluate import OVERCLUSTER_PREFIX, overcluster_row
from cause_lightning.visualize import colorize, contact_sheet, default_palette, save_png

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from cause_lightning.modules.evaluate import EvalModule

__all__ = ["write_report", "RECORD_VARIANT", "clusters_used", "describe_probe"]

log = get_logger(__name__)

# The published protocol (flip + CRF); without pydensecrf the best available variant is used.
RECORD_VARIANT = ("flip_crf", "flip", "crf", "raw")


def _record_variant(module: EvalModule) -> str:
    return next(v for v in RECORD_VARIANT if v in module.variants)


def write_report(
    cfg: DictConfig,
    module: EvalModule,
    data: Any,
    leak: bool,
    *,
    head_root: Path,
    output_dir: Path,
    segmenter_kwargs: dict[str, Any],
    probe: dict[str, Any] | None = None,
    overcluster: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write and print the evaluation report (rank 0 only).

    Args:
        cfg: The run config.
        module: The evaluated module, holding ``results`` and example predictions.
        data: The evaluated datamodule (class names and palette).
        leak: Whether the probe stage ran with ``reference_leak``.
        head_root: The head's artifact directory (``metrics.json``, ``segmenter.pt``).
        output_dir: The run directory (``metrics.json``, prediction images).
        segmenter_kwargs: ``Segmenter`` arguments of the evaluated model besides class names,
            palette and assignment, which the report adds.
        probe: The ``fit`` record of ``probe.pt`` (init, restarts, held-out objectives, kept
            index); ``None`` for centroids of unknown origin (an imported release).
        overcluster: The ``fit`` record of each over-clustering probe by cluster count (empty
            or ``None`` when over-clustering is off).

    Returns:
        Paths of what was written, under ``artifacts/...`` keys.
    """
    results = module.results
    class_names = list(
        getattr(data, "class_names", None) or [f"class_{i}" for i in range(module.num_classes)]
    )
    palette = np.asarray(
        getattr(data, "palette", None)
        if getattr(data, "palette", None) is not None
        else default_palette(module.num_classes),
        dtype=np.uint8,
    )
    variant = _record_variant(module)
    assignment = results.get(f"details/cluster/{variant}/assignment")
    report = {
        "experiment": cfg.experiment_name,
        "data": cfg.data.name,
        "backbone": cfg.backbone.name,
        "backbone_kwargs": segmenter_kwargs["backbone_kwargs"],
        "head": cfg.head.name,
        "num_classes": int(cfg.data.num_classes),
        "num_clusters": int(cfg.data.num_classes),
        "test_resolution": int(segmenter_kwargs["resolution"]),
        "record_variant": variant,
        "checkpoint_rule": "last epoch of every stage (no selection on validation labels)",
        "seed": int(cfg.seed),
        "reference_leak": leak,
        "unsupervised": not leak,
        "class_names": class_names,
        "data_description": _describe(data),
        "published": _plain(cfg.get("published")),
        "metrics": {k: v for k, v in results.items() if k.startswith("test/")},
        "details": {k: v for k, v in results.items() if k.startswith("details/")},
        "clusters_used": clusters_used(results),
        "cluster_probe": probe,
    }
    counts = sorted(getattr(module, "overcluster_counts", []))
    if counts:
        report["overcluster"] = {
            "counts": counts,
            "matching": "majority (many-to-one: each cluster to the class it overlaps most)",
            "rows": [f"{overcluster_row(k)}/..." for k in counts],
            "cluster_probe": {str(k): (overcluster or {}).get(k) for k in counts},
        }
    written: dict[str, Any] = {}
    for directory in (head_root, output_dir):
        path = write_json_atomic(Path(directory) / "metrics.json", report)
        written.setdefault("artifacts/metrics", str(path))
    written.update(_write_examples(Path(output_dir), module, variant, palette))
    from cause_lightning.segmenter import Segmenter

    segmenter = Segmenter(
        **segmenter_kwargs, class_names=class_names, palette=palette, assignment=assignment
    )
    written["artifacts/segmenter"] = str(segmenter.save(Path(head_root) / "segmenter.pt"))
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


def _describe(data: Any) -> dict[str, Any]:
    describe = getattr(data, "describe", None)
    if callable(describe):
        try:
            return _plain(describe())
        except Exception as err:  # the report must not fail on a description
            log.debug("datamodule.describe() failed: %s", err)
    return {"name": getattr(data, "name", None)}


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _write_examples(
    output_dir: Path, module: EvalModule, variant: str, palette: np.ndarray
) -> dict[str, Any]:
    if not module.examples:
        return {}
    results = module.results
    assignment = np.asarray(results[f"details/cluster/{variant}/assignment"])
    directory = output_dir / "predictions"
    rows = []
    for i, example in enumerate(module.examples):
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
    variant_order = {v: i for i, v in enumerate(("raw", "flip", "crf", "flip_crf"))}

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
            and variant == published.get("variant", "flip_crf")
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
