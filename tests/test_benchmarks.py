"""The benchmarks: the GPU script's tiny mode and `make bench` run end to end (their timings are
not checked), the step timer records a real run, and the projection counts follow the configs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cause_lightning.models import ConceptBank
from cause_lightning.run import run
from tiny import TINY

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch: pytest.MonkeyPatch) -> Path:
    """``benchmarks/`` importable, as when its scripts run (and for ``_target_: step_timer...``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return BENCHMARKS


@pytest.mark.slow
def test_gpu_script_runs_in_tiny_mode_on_the_cpu() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu.sh"), "--tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    for label in (
        "[data] ",
        "[stage] mediator: step",
        "[stage] head: step",
        "[stage] probe, published-row preset: step",
        "[stage] probe, default schedule: step",
        "TFLOP/s achieved",
        "epoch end (checkpoint write)",
        "[eval] forward pass (raw + flip)",
        "[eval] k-means baselines' pass",
        "[eval] DenseCRF",
        "[projection] published-row preset (experiment=cocostuff27_dino_vitb8_tr)",
        "[projection] default schedule",
        "[projection]   TOTAL",
        "[features] tiny_vit @64 bf16 eager",
        "[features] tiny_vit @64 bf16 compile/eager",
        "[demo] stage=all trainer=cpu",
    ):
        assert label in out, (label, out[-3000:])
    ratios = [float(r) for r in re.findall(r"([0-9.]+)x the backbone", out)]
    assert len(ratios) == 4 and all(r > 0 for r in ratios)
    assert "FAILED" not in out


@pytest.mark.slow
def test_make_bench_runs_as_from_a_fresh_clone(tmp_path: Path) -> None:
    """The Makefile's own command with the data config's workers (no --workers: what crashed)."""
    args = (
        "--backbone tiny_vit --resolution 64 --batch 2 --concepts 16 --projection 16 --reduced 8 "
        f"--banks 0,32 --stage-bank 32 --data-images 4 --repeats 1 --name toy --out {tmp_path}"
    )
    # -o: the install stamp counts as up to date, so make uses this interpreter as it is.
    command = ["make", "-C", str(ROOT), "-o", ".venv/.installed", "bench", f"PY={sys.executable}"]
    result = subprocess.run(
        [*command, f"ARGS={args}"], capture_output=True, text=True, timeout=900, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((tmp_path / "toy.json").read_text())
    for row in rows:
        assert {"name", "time_s", "peak_mb", "backbone_ratio"} <= set(row)
    contrastive = [r for r in rows if r["name"].startswith("contrastive")]
    assert [r["bank_size"] for r in contrastive] == [0, 32]
    assert all("floor_time_s" in r for r in contrastive)
    assert any("floor_time_s" in r for r in rows if r["name"].startswith("modularity"))
    stages = [r for r in rows if r["name"].startswith("stage")]
    assert len(stages) == 3 and all("throughput_ratio" in r for r in stages)
    assert any(r["name"].startswith("data pipeline") and r["images_per_s"] > 0 for r in rows)


def test_fill_bank_fills_every_slot_in_the_bank_dtype(benchmarks: Path) -> None:
    from step_timer import fill_bank

    bank = ConceptBank(6, capacity=5, dim=4, keep_fraction=0.3)
    with pytest.raises(ValueError, match="not allocated"):
        fill_bank(bank)
    bank.update(torch.tensor([0, 0, 0, 0]), torch.randn(4, 4).to(torch.bfloat16))
    fill_bank(bank)
    assert bank.count.tolist() == [5] * 6
    entries, _ = bank.view()
    assert entries.dtype == torch.bfloat16 and entries.shape == (30, 4)
    torch.testing.assert_close(entries.float().norm(dim=1), torch.ones(30), atol=1e-2, rtol=0)


def test_step_timer_times_a_real_head_run(tiny, tmp_path: Path, benchmarks: Path) -> None:
    run(tiny("stage=mediator"))
    timing = tmp_path / "timing.json"
    with_checkpoints = [o for o in TINY if not o.startswith("callbacks=")]
    run(
        tiny(
            "stage=head",
            "method.head.batch_size=2",
            "method.head.epochs=1",
            "++trainer.limit_train_batches=4",
            "+callbacks.step_timer._target_=step_timer.StepTimer",
            f"+callbacks.step_timer.path={timing}",
            "+callbacks.step_timer.warmup=2",
            "+callbacks.step_timer.fill_bank=true",
            base=with_checkpoints,
        )
    )
    record = json.loads(timing.read_text())
    steps = record["train"]
    assert [s["backbone_s"] is None for s in steps] == [True, True, False, False]
    assert all(s["seconds"] > 0 and s["images"] == 2 for s in steps)
    assert all(s["backbone_s"] > 0 for s in steps[2:])
    assert record["step_flops"] > record["backbone_flops"] > 0
    assert len(record["epoch_end_s"]) == 1 and record["fit_s"] >= sum(s["seconds"] for s in steps)
    assert [len(loop["batches"]) for loop in record["validate"]] == [1]
    # The bank the checkpoint holds was filled before the second step and stayed full.
    last = tmp_path / "artifacts" / "mosaic" / "tiny_vit" / "tr" / "checkpoints" / "head"
    state = torch.load(last / "last.ckpt", map_location="cpu")["state_dict"]
    count = state["bank._extra_state"]["count"]
    assert count.min() == count.max() == 100  # method.head.bank_capacity


def test_step_timer_refuses_a_bank_fill_without_a_bank(tiny, benchmarks: Path) -> None:
    with pytest.raises(ValueError, match="no concept bank"):
        run(
            tiny(
                "stage=mediator",
                "method.mediator.batch_size=2",
                "+callbacks.step_timer._target_=step_timer.StepTimer",
                "+callbacks.step_timer.path=unused.json",
                "+callbacks.step_timer.warmup=2",
                "+callbacks.step_timer.fill_bank=true",
            )
        )


def test_projection_counts_follow_the_configs(tmp_path: Path, benchmarks: Path) -> None:
    import bench_gpu
    from hydra.core.global_hydra import GlobalHydra

    try:
        compose = bench_gpu.Composer(tmp_path)
        (preset, default) = (compose(*o) for o in bench_gpu.schedules("cpu").values())
    finally:
        GlobalHydra.instance().clear()
    assert bench_gpu.coco_counts(preset) == (97_702 * 5, 2_175)  # five crops per image
    # The preset keeps the per-rank steps of the reference's 4 processes (method.md §8).
    assert bench_gpu.steps_per_epoch(preset, 488_510, 16) == 7_633
    assert bench_gpu.steps_per_epoch(default, 488_510, 16) == 30_532
    assert bench_gpu.crf_calls_per_image(preset.method.eval) == 3


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
