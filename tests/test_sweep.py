"""Hydra sweeps: the ``+sweep=<name>`` presets compose, and a CLI multirun with a failing job is
summarised by ``stage=summarize`` (failed job reported, best job picked, others unaffected)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from cause_lightning.__main__ import config_dir
from cause_lightning.config.identity import STAGES, digest
from cause_lightning.run import run
from cause_lightning.stages.context import RunContext
from tiny import QUIET, TINY_BATCHES, TINY_DATA

SWEEPS = sorted(p.stem for p in (Path(config_dir()) / "sweep").glob("*.yaml"))

TINY = [
    *TINY_DATA,
    *TINY_BATCHES,
    *QUIET,
    "head=mlp",
    "method.head.epochs=1",
    "method.eval.save_images=1",
    "method.eval.variants=[raw,flip]",
    "method.eval.baselines=false",
    "+trainer.enable_checkpointing=false",
]


def test_every_sweep_preset_composes_as_a_multirun(compose) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    assert {"backbones_heads", "num_concepts", "thresholds", "temperature", "seeds"} <= set(SWEEPS)
    for name in SWEEPS:
        compose(f"+sweep={name}")
        hydra_cfg = HydraConfig.get()
        assert hydra_cfg.mode == RunMode.MULTIRUN, name
        params = OmegaConf.to_container(hydra_cfg.sweeper.params)
        assert params, f"sweep {name} has no hydra.sweeper.params"
        for key, values in params.items():
            choices = str(values).split(",")
            assert len(choices) > 1, f"{name}: {key} sweeps a single value"
            identities = set()
            for value in choices:  # every value is a valid override of the real config
                context = RunContext(compose(f"+sweep={name}", f"{key}={value}"))
                where = (context.cfg.data.name, context.cfg.backbone.name, context.label("head"))
                settings = tuple(digest(context.settings(stage)) for stage in STAGES)
                identities.add((*where, *settings))
            # No two jobs share an artifact: their settings name different directories.
            assert len(identities) == len(choices), f"{name}: jobs would share artifacts"


@pytest.mark.slow
def test_cli_sweep_reports_the_failed_job_and_the_best_one(
    compose, tmp_path: Path, shared_data_dir: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "cause_lightning",
        "+sweep=num_concepts",
        "method.num_concepts=16,32,0",  # K = 0 is refused by the settings check; the sweep goes on
        *TINY,
        f"data.module.root={shared_data_dir / 'mosaic'}",
        f"paths.root_dir={tmp_path}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["0", "1", "2"]
    scores = {}
    for job in ("0", "1"):
        results = json.loads((sweep_dir / job / "results.json").read_text())
        scores[job] = results["test/cluster/flip/mIoU"]
        assert not (sweep_dir / job / "failure.json").exists()
    failure = json.loads((sweep_dir / "2" / "failure.json").read_text())
    assert "method.num_concepts=0" in failure["error"] and "Traceback" in failure["traceback"]
    # Each job trained into its own artifact directory (artifact_tag of the preset).
    for tag in ("k16", "k32"):
        assert (
            tmp_path / "artifacts" / "mosaic" / f"tiny_vit-{tag}" / "mlp" / "probe.pt"
        ).is_file()

    summary = run(compose("stage=summarize", f"sweep_dir={sweep_dir}"))
    best = max(scores, key=scores.get)
    assert summary["summary/best_job"] == best
    assert summary["summary/metric"] == "test/cluster/flip/mIoU"  # no CRF: best variant present
    assert summary["objective"] == pytest.approx(scores[best])
    assert summary["summary/failed"] == ["2"]
    with open(summary["summary/csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert [r["varied"] for r in rows] == [f"method.num_concepts={k}" for k in (16, 32, 0)]
    assert rows[2]["error"] == failure["error"]


def _fake_job(sweep_dir: Path, job: str, overrides: list[str], results: dict | None) -> None:
    hydra_dir = sweep_dir / job / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is None:
        (sweep_dir / job / "failure.json").write_text(json.dumps({"error": "boom"}))
    else:
        (sweep_dir / job / "results.json").write_text(json.dumps(results))


def test_summary_reports_mean_std_and_n_over_the_seeds_of_each_setting(
    compose, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    miou = {("kmeans++", 0): 0.40, ("kmeans++", 1): 0.46, ("kmeans++", 2): 0.43}
    miou |= {("reference", 0): 0.30, ("reference", 1): 0.26}
    for job, ((init, seed), value) in enumerate(miou.items()):
        overrides = ["+sweep=seeds", f"seed={seed}", f"method.probe.init={init}"]
        metrics = {"test/cluster/flip_crf/mIoU": value, "test/cluster/flip_crf/pAcc": 2 * value}
        _fake_job(sweep_dir, str(job), overrides, metrics)
    _fake_job(sweep_dir, "5", ["+sweep=seeds", "seed=3", "method.probe.init=reference"], None)
    summary = run(compose("stage=summarize", f"sweep_dir={sweep_dir}"))
    stats = {(s["group"], s["metric"]): s for s in summary["summary/stats"]}
    assert len(stats) == 4  # 2 settings x 2 metrics; the failed job counts in no group
    default = stats[("method.probe.init=kmeans++", "test/cluster/flip_crf/mIoU")]
    assert default["n"] == 3
    assert default["mean"] == pytest.approx(0.43)
    assert default["std"] == pytest.approx(0.03)  # sample standard deviation (n - 1)
    reference = stats[("method.probe.init=reference", "test/cluster/flip_crf/pAcc")]
    assert reference["n"] == 2 and reference["mean"] == pytest.approx(0.56)
    assert reference["std"] == pytest.approx(0.08 / 2**0.5)
    with open(summary["summary/stats_csv"], newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
