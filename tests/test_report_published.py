"""The printed table states the published figure of a preset, or that there is none."""

from __future__ import annotations

import pytest

from cause_lightning.reports.evaluation import print_table


def _report(published):
    metrics = {"test/cluster/flip_crf/mIoU": 0.25, "test/cluster/flip_crf/pAcc": 0.5}
    return {
        "experiment": "x",
        "data": "cocostuff27",
        "backbone": "dinov3_vitb16",
        "head": "tr",
        "num_clusters": 27,
        "seed": 0,
        "reference_leak": False,
        "record_variant": "flip_crf",
        "metrics": metrics,
        "details": {},
        "clusters_used": {"cluster/flip_crf": 27},
        "published": published,
    }


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def test_preset_without_a_published_figure_says_so(capsys):
    print_table(_report({"mIoU": None, "pAcc": None, "variant": "flip_crf", "source": "none"}), [])
    out = capsys.readouterr().out
    assert "none published" in out and "published figure: none" in out


def test_published_figure_printed_beside_the_row(capsys):
    print_table(_report({"mIoU": 45.3, "pAcc": 78.0, "variant": "flip_crf"}), [])
    out = capsys.readouterr().out
    assert "45.3 / 78.0" in out and "none" not in out


def test_no_preset_prints_no_published_column_text(capsys):
    print_table(_report(None), [])
    out = capsys.readouterr().out
    assert "none published" not in out and "published figure" not in out
