"""Plots a person reads: the numbers drawn are the report's, the axes name what they show, and
without matplotlib the writers say so in one line and write nothing."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cause_lightning.reports.plots import (
    confusion_figure,
    matched_confusion,
    per_class_iou_figure,
    report_plots,
    sweep_figure,
    sweep_plot,
)

pytest.importorskip("matplotlib")

# 3 classes x 4 clusters; clusters map to classes 2, 0, 1 and cluster 3 to none.
CONFUSION = np.array([[0, 6, 2, 5], [3, 1, 0, 0], [1, 0, 7, 0]])
ASSIGNMENT = [2, 0, 1, -1]
NAMES = ["sky", "road", "tree"]


def _labels(ticks: list) -> list[str]:
    return [t.get_text() for t in ticks]


def test_matched_confusion_moves_clusters_to_their_classes() -> None:
    matched, unmatched = matched_confusion(CONFUSION, ASSIGNMENT)
    np.testing.assert_array_equal(matched, [[6, 2, 0], [1, 0, 3], [0, 7, 1]])
    np.testing.assert_array_equal(unmatched, [5, 0, 0])


def test_confusion_figure_shows_row_shares_with_named_axes_values_and_colour_bar() -> None:
    figure = confusion_figure(CONFUSION, ASSIGNMENT, NAMES, title="t")
    ax, colour_bar = figure.axes
    shares = np.asarray(ax.images[0].get_array())
    # rows: true class; columns: matched class, then the pixels of the unmatched cluster
    expected = np.array([[6, 2, 0, 5], [1, 0, 3, 0], [0, 7, 1, 0]]) / np.array([[13], [4], [8]])
    np.testing.assert_allclose(shares, expected)
    assert _labels(ax.get_yticklabels()) == NAMES
    assert _labels(ax.get_xticklabels()) == [*NAMES, "unmatched"]
    assert "true class" in ax.get_ylabel() and "predicted" in ax.get_xlabel()
    assert colour_bar.get_ylabel()  # the colour bar says what the colour means
    values = {t.get_text() for t in ax.texts}
    assert {"46", "15", "38", "75", "88"} <= values  # 6/13, 2/13, 5/13, 3/4, 7/8 in %


def test_confusion_figure_marks_a_class_without_pixels_and_drops_no_column() -> None:
    figure = confusion_figure([[0, 0], [2, 3]], None, ["a", "b"])
    ax = figure.axes[0]
    assert _labels(ax.get_xticklabels()) == ["a", "b"]  # no unmatched cluster: no extra column
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), [[0, 0], [0.4, 0.6]])
    assert any("no pixels" in t.get_text() for t in ax.texts)


def test_per_class_iou_figure_draws_each_class_and_absent_ones() -> None:
    figure = per_class_iou_figure([0.5, float("nan"), 0.25], NAMES)
    ax = figure.axes[0]
    widths = [bar.get_width() for bar in ax.patches]
    np.testing.assert_allclose(widths, [50.0, 0.0, 25.0])
    assert _labels(ax.get_yticklabels()) == NAMES
    assert [t.get_text() for t in ax.texts] == ["50.0", "absent", "25.0"]
    assert "IoU" in ax.get_xlabel()


def _report() -> dict:
    prefix = "details/cluster/flip"
    return {
        "experiment": "demo",
        "record_variant": "flip",
        "class_names": NAMES,
        "metrics": {"test/cluster/flip/mIoU": 0.4},
        "details": {
            f"{prefix}/confusion": CONFUSION.tolist(),
            f"{prefix}/assignment": ASSIGNMENT,
            f"{prefix}/per_class_iou": [0.5, 0.0, 0.7],
        },
    }


def test_report_plots_are_written_beside_every_metrics_file(tmp_path: Path) -> None:
    directories = [tmp_path / "artifacts", tmp_path / "run"]
    written = report_plots(_report(), directories)
    assert set(written) == {"artifacts/plot/confusion_matrix", "artifacts/plot/per_class_iou"}
    for directory in directories:
        for name in ("confusion_matrix.png", "per_class_iou.png"):
            assert (directory / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["artifacts/plot/confusion_matrix"] == str(
        directories[0] / "confusion_matrix.png"
    )


def test_without_matplotlib_the_plots_are_skipped_with_one_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    with caplog.at_level(logging.INFO, logger="cause_lightning"):
        assert report_plots(_report(), [tmp_path]) == {}
        assert sweep_plot(_stats(), ["test/x/mIoU"], tmp_path / "summary.png") is None
    assert list(tmp_path.iterdir()) == []
    notes = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert notes and all("pip install 'cause-lightning[plots]'" in n for n in notes)


def _stats() -> list[dict]:
    stats = []
    for k, values in ((512, [0.30, 0.34]), (256, [0.20, 0.22, 0.24]), (1024, [0.40])):
        mean = sum(values) / len(values)
        std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
        group = f"method.num_concepts={k}"
        stats.append(
            {"group": group, "metric": "test/x/mIoU", "mean": mean, "std": std, "n": len(values)}
            | {"values": values}
        )
    return stats


def test_sweep_figure_plots_mean_and_std_against_the_varied_setting() -> None:
    figure = sweep_figure(_stats(), ["test/x/mIoU", "missing/metric"])
    (ax,) = figure.axes  # one panel: the metric nobody reports is left out
    line = ax.lines[0]
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [256, 512, 1024])  # sorted
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), [22.0, 32.0, 40.0])  # in %
    bars = ax.collections[0].get_segments()  # error bars: mean ± std
    np.testing.assert_allclose(
        [b[:, 1] for b in bars[:2]], [[20.0, 24.0], [29.1716, 34.8284]], rtol=1e-5
    )
    dots = np.concatenate([c.get_offsets() for c in ax.collections[1:]])  # every run
    assert len(dots) == 6
    assert ax.get_xlabel() == "method.num_concepts" and "%" in ax.get_ylabel()
    assert _labels(ax.get_xticklabels()) == ["256", "512", "1024"]  # the swept values


def test_sweep_figure_draws_a_grid_as_one_line_per_other_setting() -> None:
    stats = [
        {"group": f"a={a} b={b}", "metric": "m", "mean": float(a), "std": 0.1, "n": 2}
        for a in (1, 2, 3)
        for b in ("x", "y")
    ]
    ax = sweep_figure(stats, ["m"]).axes[0]
    assert ax.get_xlabel() == "a"  # the setting with the most values
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["b=x", "b=y"]


def test_sweep_figure_of_a_search_gets_a_panel_per_setting() -> None:
    rng = np.random.default_rng(0)
    stats = [
        {
            "group": f"lr={rng.uniform(1e-4, 1e-2):.5f} tau={rng.uniform(0, 1):.3f} k={k}",
            "metric": "m",
            "mean": float(rng.uniform()),
            "std": math.nan,
            "n": 1,
        }
        for k in (256, 512, 1024, 2048, 256, 512, 1024, 2048, 256)
    ]
    axes = [ax for ax in sweep_figure(stats, ["m"]).axes if ax.get_visible()]
    assert sorted(ax.get_xlabel() for ax in axes) == ["k", "lr", "tau"]
