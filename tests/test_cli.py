"""The command line through subprocesses: entry point, errors, and a non-editable install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import TINY_DATA

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_DATA,
    "method.num_concepts=32",
    "method.eval.variants=[raw,flip]",
    "callbacks=none",
    "debug=limit",
]


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "cause_lightning", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.mark.slow
def test_stage_all_through_the_cli(tmp_path: Path) -> None:
    result = cli("stage=all", *TINY, cwd=tmp_path)
    # A batch-limited run writes under debug/, never beside real artifacts.
    (metrics,) = (tmp_path / "artifacts" / "debug" / "mosaic" / "tiny_vit").rglob("metrics.json")
    assert metrics.parent.parent.parent.name.startswith("tr-")  # clusterbook/tr/probe/eval
    report = json.loads(metrics.read_text())
    assert "test/cluster/flip/mIoU" in report["metrics"]
    assert "cluster (unsupervised)" in result.stdout  # the printed table
    runs = list((tmp_path / "logs" / "all" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "config_resolved.yaml").is_file()
    assert (runs[0] / ".hydra" / "config.yaml").is_file()


@pytest.mark.slow
def test_cli_errors_are_clear(tmp_path: Path) -> None:
    result = cli("stage=probe", *TINY, cwd=tmp_path, check=False)
    assert result.returncode != 0
    # Names the first stage to run: nothing has been made yet, so the mediator.
    assert "stage=mediator" in result.stderr and "clusterbook" in result.stderr
    result = cli("stage=eval", "data=cocostuff27", "backbone=tiny_vit", cwd=tmp_path, check=False)
    assert result.returncode != 0
    result = cli("method.num_concepts=abc", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "num_concepts" in result.stderr
    result = cli("method.num_concepts=0", "method.mediator.epochs=-1", cwd=tmp_path, check=False)
    assert result.returncode != 0 and "method.num_concepts=0 must be" in result.stderr
    assert "method.mediator.epochs=-1 must be" in result.stderr
    result = cli(
        "stage=prepare", "data=cocostuff27", "stage.download=false", cwd=tmp_path, check=False
    )
    assert result.returncode != 0
    assert "cocostuff" in (result.stderr + result.stdout)


@pytest.mark.slow
def test_packaged_config_is_found_after_a_wheel_install(tmp_path: Path) -> None:
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True,
        timeout=240,
    )
    wheel = next(wheel_dir.glob("*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
        timeout=240,
    )
    code = "from cause_lightning.__main__ import config_dir; print(config_dir())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(out) == target / "cause_lightning" / "conf"
    assert (Path(out) / "config.yaml").is_file()
