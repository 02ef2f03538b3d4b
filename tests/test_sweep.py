"""Hydra sweeps: the ``+sweep=<name>``, ``+launcher=<name>`` and ``hparams_search=<name>`` presets
compose; a CLI multirun with a failing job is summarised by ``stage=summarize`` (failed job
reported, best job picked, others unaffected); jobs run side by side by the local launcher equal
the same jobs run one after the other; the SLURM preset asks for the layout Lightning reads; an
Optuna search writes its best trial; the summary prints every varied setting in full."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from cause_lightning.__main__ import config_dir
from cause_lightning.config.identity import STAGES, digest
from cause_lightning.core.constants import HELDOUT_MODULARITY
from cause_lightning.reports.sweeps import collect_sweep
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
    # Each job trained into its own artifact directories: two clusterbooks, a probe in each.
    probes = sorted((tmp_path / "artifacts" / "mosaic" / "tiny_vit").rglob("probe.pt"))
    assert len(probes) == 2 and len({p.parents[2] for p in probes}) == 2
    assert all(p.parents[2].name.startswith("clusterbook-") for p in probes)

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


def fake_job(sweep_dir: Path, job: str, overrides: list[str], results: dict | None) -> None:
    """A job directory as a multirun leaves it: finished (``results``) or failed (``None``)."""
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
        fake_job(sweep_dir, str(job), overrides, metrics)
    fake_job(sweep_dir, "5", ["+sweep=seeds", "seed=3", "method.probe.init=reference"], None)
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


# --------------------------------------------------------------------------------------------------
# summaries: what the table shows, the label-free objective, submitit job folders, the plot
# --------------------------------------------------------------------------------------------------


def _threshold_sweep(sweep_dir: Path) -> dict[str, float]:
    """A 3 x 2 thresholds sweep with the mIoU rows of a full report (every variant, the linear
    probe, the k-means baselines); returns each job's flip_crf mIoU."""
    rows = [f"cluster/{v}" for v in ("raw", "flip", "crf")] + ["linear/raw", "linear/crf"]
    rows += ["baseline/kmeans", "baseline/kmeans_head"]
    scores = {}
    for job, (pos, neg) in enumerate((p, n) for p in (0.2, 0.3, 0.4) for n in (0.0, 0.1)):
        value = 0.3 + pos - neg
        metrics = {f"test/{row}/mIoU": 0.25 for row in rows}
        metrics |= {"test/cluster/flip_crf/mIoU": value, HELDOUT_MODULARITY: -pos}
        overrides = [f"method.head.pos_thresh={pos}", f"method.head.neg_thresh={neg}", "seed=0"]
        fake_job(sweep_dir, str(job), ["+sweep=thresholds", *overrides], metrics)
        scores[str(job)] = value
    return scores


def test_summary_table_shows_every_varied_setting_in_full(
    compose, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "80")  # a log file's width
    sweep_dir = tmp_path / "sweep"
    _threshold_sweep(sweep_dir)
    run(compose("stage=summarize", f"sweep_dir={sweep_dir}"))
    printed = capsys.readouterr().out
    jobs = printed[: printed.index("mean ± std")]  # the per-job part, before the statistics
    lines = jobs.splitlines()
    for job, (pos, neg) in enumerate((p, n) for p in (0.2, 0.3, 0.4) for n in ("0.0", "0.1")):
        settings = f"method.head.pos_thresh={pos} method.head.neg_thresh={neg}"
        assert f"{job}: {settings}" in [line.strip() for line in lines], jobs  # one line, uncut
    for value in ("50.0", "40.0", "70.0", "60.0"):  # flip_crf mIoU of each job: no column cut
        assert value in jobs
    assert "a diagnostic, not an unsupervised result" in printed  # the default metric has labels


def test_summary_ranks_by_the_label_free_objective_and_plots_the_sweep(
    compose, tmp_path: Path
) -> None:
    sweep_dir = tmp_path / "sweep"
    scores = _threshold_sweep(sweep_dir)
    summary = run(
        compose("stage=summarize", f"sweep_dir={sweep_dir}", "summary_metric=" + HELDOUT_MODULARITY)
    )
    assert summary["summary/metric"] == HELDOUT_MODULARITY
    assert summary["summary/best_job"] == "0"  # the highest held-out modularity, -0.2
    assert summary["objective"] == pytest.approx(-0.2)
    assert max(scores, key=scores.get) != "0"  # not the job the labels would pick
    stats = {(s["group"], s["metric"]): s for s in summary["summary/stats"]}
    assert stats[("method.head.pos_thresh=0.3 method.head.neg_thresh=0.1", HELDOUT_MODULARITY)][
        "values"
    ] == pytest.approx([-0.3])
    if importlib.util.find_spec("matplotlib") is not None:
        assert Path(summary["summary/plot"]) == sweep_dir / "summary.png"
        assert (sweep_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_a_job_the_scheduler_killed_points_to_its_submitit_logs(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    fake_job(sweep_dir, "0", ["seed=0"], {"test/cluster/raw/mIoU": 0.5})
    killed = sweep_dir / "1" / ".hydra"
    killed.mkdir(parents=True)
    (killed / "overrides.yaml").write_text("- seed=1\n")
    OmegaConf.save({"hydra": {"job": {"id": "4242_1"}}}, killed / "hydra.yaml")  # as Hydra does
    logs = sweep_dir / ".submitit" / "4242_1"
    logs.mkdir(parents=True)  # what the submitit launchers keep per job: never a job row
    rows = collect_sweep(sweep_dir)
    assert [r["job"] for r in rows] == ["0", "1"]
    assert rows[1]["status"] == "missing" and str(logs) in rows[1]["error"]


# --------------------------------------------------------------------------------------------------
# launchers and search
# --------------------------------------------------------------------------------------------------


def _hydra_compose(*overrides: str, base: Path) -> Any:
    """The composed config with its ``hydra`` node, as the launcher sees it."""
    from hydra import compose

    return compose(
        "config",
        overrides=[f"paths.root_dir={base}", f"hydra.sweep.dir={base / 'sweep'}", *overrides],
        return_hydra_config=True,
    )


def test_launcher_and_search_presets_compose(compose, tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.types import RunMode

    local = _hydra_compose("+launcher=local", base=tmp_path)
    assert local.hydra.launcher._target_.endswith("LocalLauncher")
    assert local.hydra.mode == RunMode.MULTIRUN
    assert local.hydra.launcher.gpus_per_node == 0 and local.hydra.launcher.timeout_min >= 600
    search = _hydra_compose("hparams_search=cause_optuna", "+launcher=local", base=tmp_path)
    assert search.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert search.hydra.sweeper.direction == "maximize"
    assert search.summary_metric == HELDOUT_MODULARITY  # label-free by default
    params = set(search.hydra.sweeper.params)
    assert {"method.head.temperature", "method.num_concepts", "method.head.bank_keep"} <= params
    assert {"method.mediator.lr", "method.head.lr"} <= params


def test_slurm_preset_asks_for_the_task_layout_lightning_reads(
    compose, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitit = pytest.importorskip("submitit")
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra.utils import instantiate
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only as lightning_rank_zero
    from lightning_utilities.core.rank_zero import rank_zero_only as utilities_rank_zero

    defaults = _hydra_compose("+launcher=slurm", base=tmp_path).hydra.launcher
    assert (defaults.nodes, defaults.gpus_per_node, defaults.cpus_per_task) == (1, 1, 8)
    cfg = _hydra_compose(  # the example of docs/scaling.md §4.3
        "+launcher=slurm",
        "+sweep=seeds",
        "experiment=cocostuff27_dino_vits8_tr",
        "trainer.num_nodes=2",
        "trainer.devices=4",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.timeout_min=720",
        "hydra.launcher.cpus_per_task=10",
        "hydra.launcher.account=proj42",
        "logger=wandb",
        f"paths.output_dir={tmp_path / 'out'}",
        base=tmp_path,
    )
    assert cfg.trainer.strategy == "ddp"

    # Submit nothing: capture the sbatch script submitit would hand to sbatch. Its executor
    # only checks that `srun` exists, so a stand-in is put on the PATH.
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")

    class Submitted(Exception):
        pass

    def capture(executor: Any, submissions: list) -> None:
        raise Submitted(executor._make_submission_file_text("<command>", "<uid>"))

    monkeypatch.setattr(submitit.SlurmExecutor, "_internal_process_submissions", capture)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["seed=0"], ["seed=1"]], initial_job_idx=0)
    sbatch = str(submitted.value).splitlines()
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",  # one task per GPU
        "--gpus-per-node=4",
        "--cpus-per-task=10",  # per GPU: loaders and the CRF pool
        "--partition=gpu",
        "--time=720",
        "--job-name=cause-all",
        "--account=proj42",
    ):
        assert f"#SBATCH {line}" in sbatch, line

    # In task 5 of that job (node 1, local rank 1) Lightning takes its rank from SLURM, and
    # the world size it finds is the one the learning rates were derived for.
    slurm = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2"}
    slurm |= {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    slurm |= {"SLURM_JOB_NAME": "cause-all", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "n[1-2]"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    # The DDP strategy records the rank in Lightning's process-wide rank-zero switches: restore
    # them afterwards, or every later test of this process logs as rank 5, that is, not at all.
    for switch in (lightning_rank_zero, utilities_rank_zero):
        monkeypatch.setattr(switch, "rank", switch.rank)
    trainer = instantiate(cfg.trainer, accelerator="cpu", precision="32-true", logger=False)
    assert isinstance(trainer.strategy.cluster_environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank) == (8, 5, 1)
    assert trainer.node_rank == 1
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # as a job receives it
    assert RunContext(job).world_size == 8
    assert "MASTER_ADDR" not in os.environ  # nothing process-wide was left behind


def _tiny_cli(*overrides: str, base: Path, data: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "cause_lightning",
        *TINY,
        f"data.module.root={data / 'mosaic'}",
        f"paths.root_dir={base}",
        f"hydra.sweep.dir={base / 'sweep'}",
        *overrides,
    ]
    done = subprocess.run(command, env=env, cwd=base, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_jobs_side_by_side_equal_the_same_jobs_one_after_the_other(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = ["+sweep=num_concepts", "method.num_concepts=16,32,0"]  # K = 0 fails: recorded
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    for base in (serial, parallel):
        base.mkdir()
    _tiny_cli(*sweep, base=serial, data=shared_data_dir)  # also writes the shared data
    _tiny_cli(  # two jobs at a time, then the third
        *sweep,
        "+launcher=local",
        "hydra.sweeper.max_batch_size=2",
        base=parallel,
        data=shared_data_dir,
    )
    job_ids = set()
    for job in ("0", "1"):
        expected = json.loads((serial / "sweep" / job / "metrics.json").read_text())
        found = json.loads((parallel / "sweep" / job / "metrics.json").read_text())
        assert found == expected
        assert found["metrics"]["test/cluster/flip/mIoU"] >= 0
        hydra = OmegaConf.load(parallel / "sweep" / job / ".hydra" / "hydra.yaml")
        job_ids.add(str(hydra.hydra.job.id))
    # each job ran in a process of its own, started by the local executor (its id is the pid)
    assert len(job_ids) == 2 and all(i.isdigit() for i in job_ids)  # basic: "job_id_for_0"
    assert all((parallel / "sweep" / ".submitit" / i).is_dir() for i in job_ids)
    failure = json.loads((parallel / "sweep" / "2" / "failure.json").read_text())
    assert "method.num_concepts=0" in failure["error"]
    assert [r["status"] for r in collect_sweep(parallel / "sweep")] == ["ok", "ok", "failed"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_optuna_search_writes_its_best_trial(tmp_path: Path, shared_data_dir: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    _tiny_cli(
        "hparams_search=cause_optuna",
        "hydra.sweeper.n_trials=3",
        "method.num_concepts=choice(16,32)",  # the search space, narrowed for tiny data
        base=tmp_path,
        data=shared_data_dir,
    )
    sweep_dir = tmp_path / "sweep"
    best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    objectives = {}
    for job in ("0", "1", "2"):
        results = json.loads((sweep_dir / job / "results.json").read_text())
        objectives[job] = results[HELDOUT_MODULARITY]  # the label-free objective, returned
        assert results["objective"] == objectives[job]
    assert best.best_value == pytest.approx(max(objectives.values()))
    winner = max(objectives, key=objectives.get)
    overrides = OmegaConf.load(sweep_dir / winner / ".hydra" / "overrides.yaml")
    for key, value in best.best_params.items():
        assert f"{key}={value}" in overrides
    assert {"method.head.temperature", "method.num_concepts"} <= set(best.best_params)
    rows = collect_sweep(sweep_dir)
    assert [r["status"] for r in rows] == ["ok"] * 3
