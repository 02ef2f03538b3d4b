"""The benchmark scripts run end to end at toy sizes (their timings are not checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_script_runs_in_tiny_mode_on_the_cpu() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for label in (
        "[steps] head     step",
        "peak GPU memory",
        "[eval] forward + flip",
        "[projection] head",
        "[projection] TOTAL full schedule",
        "[features] tiny_vit @64 bf16 eager",
        "[features] tiny_vit @64 bf16 compile/eager",
        "[demo] stage=all trainer=cpu",
    ):
        assert label in out, (label, out[-3000:])
    assert "FAILED" not in out


@pytest.mark.slow
def test_cpu_bench_writes_rows_with_floors(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench
    finally:
        sys.path.pop(0)
    args = [
        "--backbone", "tiny_vit", "--resolution", "64", "--batch", "2", "--concepts", "16",
        "--projection", "16", "--reduced", "8", "--banks", "0,32", "--stage-bank", "32",
        "--data-images", "4", "--workers", "0", "--repeats", "1", "--name", "toy",
        "--out", str(tmp_path),
    ]  # fmt: skip
    rows = bench.main(args)
    written = json.loads((tmp_path / "toy.json").read_text())
    assert written == rows
    for row in rows:
        assert {"name", "time_s", "peak_mb", "backbone_ratio"} <= set(row)
    contrastive = [r for r in rows if r["name"].startswith("contrastive")]
    assert [r["bank_size"] for r in contrastive] == [0, 32]
    assert all("floor_time_s" in r for r in contrastive)
    assert any("floor_time_s" in r for r in rows if r["name"].startswith("modularity"))
    stages = [r for r in rows if r["name"].startswith("stage")]
    assert len(stages) == 3 and all("throughput_ratio" in r for r in stages)
    assert any(r["name"].startswith("data pipeline") and r["images_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_predict_memory_bench_measures_a_row(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_predict_memory
    finally:
        sys.path.pop(0)
    out = tmp_path / "row.json"
    row = bench_predict_memory.main(["--images", "2", "--side", "300", "--out", str(out)])
    assert json.loads(out.read_text()) == row
    assert row["outputs"] == 2 and row["peak_rss_mb"] >= row["floor_rss_mb"] > 0
