"""Plots a person reads: the matched confusion matrix and the per-class IoU of an evaluation
(protocol.md §5), and a sweep's metric against the setting it varies (mean ± std over repeats).

Each plot is a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no global figure state,
no backend switch, safe inside a notebook) and written as PNG beside the file it is drawn from:
``confusion_matrix.png`` and ``per_class_iou.png`` beside ``metrics.json``, ``summary.png``
beside ``summary.csv``. matplotlib is the optional extra ``cause-lightning[plots]``; without it
the writers log one line and write nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cause_lightning.artifacts.io import atomic_write
from cause_lightning.core.logs import get_logger

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "confusion_figure",
    "matched_confusion",
    "per_class_iou_figure",
    "report_plots",
    "sweep_figure",
    "sweep_plot",
]

log = get_logger(__name__)

_MISSING = "plots skipped: matplotlib is not installed (pip install 'cause-lightning[plots]')"
_DPI = 120
# Above this many classes the cells are too small for their values.
_ANNOTATED_CLASSES = 30
# A sweep over more combinations of the other settings than this is drawn one setting at a time.
_MAX_SERIES = 6


def _new_figure(**kwargs: Any) -> Figure | None:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log.info(_MISSING)
        return None
    return Figure(layout="constrained", **kwargs)


def _save(figure: Figure, directories: Sequence[str | Path], name: str) -> str:
    """Write ``figure`` as ``<directory>/<name>`` in every directory; the first path."""
    paths = [
        atomic_write(Path(d) / name, lambda tmp: figure.savefig(tmp, format="png", dpi=_DPI))
        for d in directories
    ]
    return str(paths[0])


def _font_size(count: int) -> float:
    return 9.0 if count <= 20 else max(4.0, 9.0 - count / 25)


def matched_confusion(
    confusion: np.ndarray | list[list[int]], assignment: np.ndarray | list[int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts by true class and matched predicted class.

    Args:
        confusion: ``[C, K]`` pixel counts, ground-truth class x cluster.
        assignment: ``[K]`` cluster -> class (``-1``: unmatched), or ``None`` for the identity.

    Returns:
        ``([C, C] counts, true class x predicted class, [C] counts of pixels whose cluster has
        no class)``; the latter are errors of the metric (protocol.md §5).
    """
    counts = np.asarray(confusion, dtype=np.float64)  # C K
    classes, clusters = counts.shape
    mapping = np.arange(clusters) if assignment is None else np.asarray(assignment, dtype=np.int64)
    matched = np.zeros((classes, classes), dtype=np.float64)  # C C
    unmatched = np.zeros(classes, dtype=np.float64)  # C
    for k in range(clusters):
        if 0 <= mapping[k] < classes:
            matched[:, mapping[k]] += counts[:, k]
        else:
            unmatched += counts[:, k]
    return matched, unmatched


def confusion_figure(
    confusion: np.ndarray | list[list[int]],
    assignment: np.ndarray | list[int] | None,
    class_names: Sequence[str],
    title: str = "",
) -> Figure | None:
    """The matched confusion matrix, rows normalised: the share of each true class's pixels that
    each class (after the Hungarian matching) predicts; the diagonal is the per-class recall.

    Classes label both axes in the same (matched) order. Pixels of clusters matched to no class
    get a last column, ``unmatched``, when there are any. Cells hold their percentage (up to 30
    classes), and a colour bar gives the scale.

    Args:
        confusion: ``[C, K]`` pixel counts, ground-truth class x cluster.
        assignment: ``[K]`` cluster -> class, or ``None`` for the identity (``K == C``).
        class_names: ``C`` names.
        title: Figure title.

    Returns:
        The figure, or ``None`` without matplotlib.
    """
    matched, unmatched = matched_confusion(confusion, assignment)
    classes = matched.shape[0]
    if len(class_names) != classes:
        raise ValueError(f"{len(class_names)} class names for a {classes}-class confusion matrix")
    columns = list(class_names)
    if unmatched.any():
        matched = np.concatenate([matched, unmatched[:, None]], axis=1)  # C C+1
        columns.append("unmatched")
    totals = matched.sum(axis=1, keepdims=True)  # C 1
    shares = np.divide(matched, totals, out=np.zeros_like(matched), where=totals > 0)  # C C(+1)
    side = min(30.0, max(4.5, 0.42 * classes + 2.5))
    figure = _new_figure(figsize=(side + 1.5, side))
    if figure is None:
        return None
    ax = figure.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's pixels")
    size = _font_size(classes)
    ax.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right", fontsize=size)
    ax.set_yticks(range(classes), labels=list(class_names), fontsize=size)
    ax.set_xlabel("predicted class (clusters matched by the Hungarian assignment)")
    ax.set_ylabel("true class")
    for row in np.flatnonzero(totals[:, 0] == 0):
        ax.text(len(columns) / 2 - 0.5, row, "no pixels of this class", ha="center", va="center")
    if classes <= _ANNOTATED_CLASSES:
        for (row, column), share in np.ndenumerate(shares):
            if totals[row, 0] > 0:
                ax.text(
                    column,
                    row,
                    f"{100 * share:.0f}",
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if share > 0.5 else "black",
                )
    ax.set_title(title or "confusion matrix (rows: % of the true class)")
    return figure


def per_class_iou_figure(
    ious: Sequence[float | None], class_names: Sequence[str], title: str = ""
) -> Figure | None:
    """Horizontal bars of the IoU of every class (in %), classes top to bottom in their order.

    Args:
        ious: ``C`` IoUs in [0, 1]; NaN or ``None`` for a class absent from labels and
            predictions (drawn as ``absent``).
        class_names: ``C`` names.
        title: Figure title.

    Returns:
        The figure, or ``None`` without matplotlib.
    """
    values = np.array([np.nan if v is None else float(v) for v in ious], dtype=np.float64)  # C
    if len(class_names) != len(values):
        raise ValueError(f"{len(class_names)} class names for {len(values)} IoU values")
    figure = _new_figure(figsize=(7.0, min(40.0, max(2.5, 0.3 * len(values) + 1.2))))
    if figure is None:
        return None
    ax = figure.add_subplot()
    positions = np.arange(len(values))
    bars = ax.barh(positions, 100 * np.nan_to_num(values), color="tab:blue")
    size = _font_size(len(values))
    for bar, value in zip(bars, values):
        text = "absent" if math.isnan(value) else f"{100 * value:.1f}"
        ax.annotate(
            text,
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=size,
        )
    ax.set_yticks(positions, labels=list(class_names), fontsize=size)
    ax.invert_yaxis()  # first class on top, as in the confusion matrix
    ax.set_xlim(0, 110)
    ax.set_xlabel("IoU (%)")
    ax.set_title(title or "per-class IoU")
    return figure


def report_plots(report: dict[str, Any], directories: Sequence[str | Path]) -> dict[str, str]:
    """Write ``confusion_matrix.png`` and ``per_class_iou.png`` of an evaluation report.

    Both show the cluster probe's recorded variant (``report["record_variant"]``).

    Args:
        report: The content of ``metrics.json``
            (:func:`cause_lightning.reports.evaluation.write_report`).
        directories: Where to write them (beside each copy of ``metrics.json``).

    Returns:
        ``artifacts/plot/confusion_matrix`` and ``artifacts/plot/per_class_iou``: the path in the
        first directory of each plot written (empty without matplotlib).
    """
    variant = report["record_variant"]
    prefix = f"details/cluster/{variant}"
    details: dict[str, Any] = report.get("details", {})
    names = list(report["class_names"])
    miou = report.get("metrics", {}).get(f"test/cluster/{variant}/mIoU")
    heading = f"{report.get('experiment', '')}: cluster probe, {variant}"
    if miou is not None:
        heading += f" (mIoU {100 * miou:.1f})"
    written: dict[str, str] = {}
    confusion = details.get(f"{prefix}/confusion")
    if confusion is not None:
        figure = confusion_figure(confusion, details.get(f"{prefix}/assignment"), names, heading)
        if figure is None:
            return written
        written["artifacts/plot/confusion_matrix"] = _save(
            figure, directories, "confusion_matrix.png"
        )
    ious = details.get(f"{prefix}/per_class_iou")
    if ious is not None:
        figure = per_class_iou_figure(ious, names, heading)
        if figure is None:
            return written
        written["artifacts/plot/per_class_iou"] = _save(figure, directories, "per_class_iou.png")
    return written


# ------------------------------------------------------------------------------------ sweeps
def _settings(group: str) -> dict[str, str]:
    """``"a=1 b=x"`` -> ``{"a": "1", "b": "x"}`` (Hydra's ``+``/``~`` prefixes dropped)."""
    pairs = (item.lstrip("+~").split("=", 1) for item in group.split())
    return {key: value for key, value in pairs}


def _numbers(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _scale(metric: str) -> tuple[float, str]:
    """Scores in [0, 1] are drawn in %."""
    return (100.0, f"{metric} (%)") if metric.endswith(("mIoU", "pAcc")) else (1.0, metric)


def _draw_against(
    ax: Axes,
    entries: list[dict[str, Any]],
    settings: list[dict[str, str]],
    key: str,
    series_keys: list[str],
    scale: float,
    joined: bool,
) -> None:
    """Mean ± std of ``entries`` against setting ``key``, one series per value of
    ``series_keys``; each run's value as a small dot behind."""
    values = [s.get(key, "-") for s in settings]
    numbers = _numbers(values)
    order = list(dict.fromkeys(values))
    positions = numbers if numbers is not None else [order.index(v) for v in values]
    series: dict[str, list[int]] = {}
    for index, setting in enumerate(settings):
        label = " ".join(f"{k}={setting.get(k, '-')}" for k in series_keys)
        series.setdefault(label, []).append(index)
    for label, members in series.items():
        members = sorted(members, key=lambda i: positions[i])
        x = [positions[i] for i in members]
        mean = [scale * entries[i]["mean"] for i in members]
        std = [0.0 if math.isnan(entries[i]["std"]) else scale * entries[i]["std"] for i in members]
        shown = ax.errorbar(
            x,
            mean,
            yerr=std,
            marker="o",
            capsize=4,
            linestyle="-" if joined else "none",
            label=label or None,
        )
        for i in members:
            runs = entries[i].get("values") or []
            ax.scatter(
                [positions[i]] * len(runs),
                [scale * v for v in runs],
                s=10,
                alpha=0.4,
                color=shown[0].get_color(),
            )
    if numbers is None:
        ax.set_xticks(range(len(order)), labels=order, rotation=30, ha="right")
    else:
        if min(numbers) > 0 and max(numbers) / min(numbers) >= 8:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # not 10^-3
            ax.xaxis.set_minor_formatter(NullFormatter())
        # A grid, or values drawn from a short list: the values themselves as ticks.
        if len(order) <= 12 and (joined or len(order) < len(values)):
            ticks = sorted(order, key=float)
            ax.set_xticks([float(v) for v in ticks], labels=ticks)
            ax.minorticks_off()
    ax.set_xlabel(key)
    if any(series):
        ax.legend(fontsize=8)


def sweep_figure(
    stats: list[dict[str, Any]], metrics: Sequence[str], title: str = ""
) -> Figure | None:
    """A sweep's metrics against the settings it varies: mean ± std (error bars) over the runs
    of each setting, each run as a dot.

    With one varied setting (or a grid of up to six combinations of the others, one line each)
    every metric is one panel against the setting with the most values; otherwise (e.g. an Optuna
    search) every metric gets one panel per varied setting.

    Args:
        stats: The rows of :func:`cause_lightning.reports.sweeps.sweep_statistics` (``group``,
            ``metric``, ``mean``, ``std``, ``n`` and ``values``).
        metrics: The metrics to draw, one row of panels each (skipped when no run has them).
        title: Figure title.

    Returns:
        The figure, or ``None`` without matplotlib or when no metric has a value.
    """
    panels = [(m, [s for s in stats if s["metric"] == m]) for m in metrics]
    panels = [(m, entries) for m, entries in panels if entries]
    if not panels:
        return None
    layouts = []
    for _, entries in panels:
        settings = [_settings(e["group"]) for e in entries]
        keys = list(dict.fromkeys(k for s in settings for k in s))
        varied = [k for k in keys if len({s.get(k) for s in settings}) > 1]
        varied.sort(key=lambda k: -len({s.get(k) for s in settings}))
        combos = {tuple(s.get(k) for k in varied[1:]) for s in settings}
        grid = len(combos) <= _MAX_SERIES
        layouts.append((settings, varied, grid))
    columns = max(1 if grid or not varied else len(varied) for _, varied, grid in layouts)
    figure = _new_figure(figsize=(5.5 * columns, 3.8 * len(panels)))
    if figure is None:
        return None
    axes = figure.subplots(len(panels), columns, squeeze=False)
    for row, ((metric, entries), (settings, varied, grid)) in enumerate(zip(panels, layouts)):
        scale, label = _scale(metric)
        if not varied:  # one setting, repeated
            groups = [e["group"] or "(all jobs)" for e in entries]
            _draw_against(
                axes[row, 0], entries, [{"setting": g} for g in groups], "setting", [], scale, False
            )
            targets = [(axes[row, 0], "setting")]
        elif grid:
            _draw_against(axes[row, 0], entries, settings, varied[0], varied[1:], scale, True)
            targets = [(axes[row, 0], varied[0])]
        else:
            targets = list(zip(axes[row], varied))
            for ax, key in targets:
                _draw_against(ax, entries, settings, key, [], scale, False)
        for ax, _ in targets:
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        for ax in axes[row, len(targets) :]:
            ax.set_visible(False)
    counts = sorted({int(e["n"]) for _, entries in panels for e in entries})
    runs = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    figure.suptitle(f"{title}\nmean ± std over {runs} run(s) per setting".strip())
    return figure


def sweep_plot(
    stats: list[dict[str, Any]], metrics: Sequence[str], path: str | Path, title: str = ""
) -> str | None:
    """Write :func:`sweep_figure` as a PNG.

    Args:
        stats: The rows of :func:`cause_lightning.reports.sweeps.sweep_statistics`.
        metrics: The metrics to draw.
        path: The PNG file (``<sweep dir>/summary.png``).
        title: Figure title.

    Returns:
        The path, or ``None`` when nothing was drawn (no matplotlib, no values).
    """
    figure = sweep_figure(stats, metrics, title)
    if figure is None:
        return None
    return _save(figure, [Path(path).parent], Path(path).name)
