"""Experiment tracking: W&B offline runs (one per step, grouped by settings, lineage, metric
summaries, images, tables, artifacts; a summary run per sweep), CSV, TensorBoard, and the
throughput shown by the progress bar.

The W&B run files are read back with a small reader of their record log (the LevelDB log format
W&B uses: 32 KiB blocks of checksummed FULL/FIRST/MIDDLE/LAST fragments after a 7-byte header)
and the ``wandb.proto`` record definitions, so the assertions see exactly what ``wandb sync``
would upload.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cause_lightning.reports.tracking import metric_summary, run_group
from cause_lightning.run import run
from tiny import QUIET, TINY_BATCHES, TINY_DATA

TINY = [
    *TINY_DATA,
    *TINY_BATCHES,
    *QUIET,
    "head=mlp",
    "method.num_concepts=16",
    "method.head.epochs=1",
    "method.eval.save_images=2",
    "method.eval.variants=[raw,flip]",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_checkpointing=false",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
]


@pytest.fixture
def tiny(tiny):  # the conftest fixture, on this module's settings
    return functools.partial(tiny, base=TINY)


# --------------------------------------------------------------------------------------------------
# reading W&B run files
# --------------------------------------------------------------------------------------------------

_BLOCK = 32768


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:  # block trailer: padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk
            pending = b""


def read_run(directory: Path) -> dict[str, Any]:
    """Name, group, job type, config keys, history items, logged artifacts, input artifacts
    (used once committed), metric summaries and exit code of a run."""
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = directory.glob("*.wandb")
    out: dict[str, Any] = {"history": {}, "artifacts": [], "inputs": [], "summaries": {}}
    out.update(config=set(), exit=None)
    for raw in _records(run_file):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(name=record.run.display_name, group=record.run.run_group)
            out["job_type"] = record.run.job_type
            out["config"] |= {item.key for item in record.run.config.update}
        elif kind == "config":
            out["config"] |= {item.key for item in record.config.update}
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                out["history"][key] = json.loads(item.value_json)
        elif kind == "artifact":
            used = "inputs" if record.artifact.use_after_commit else "artifacts"
            out[used].append((record.artifact.type, record.artifact.name))
        elif kind == "metric" and record.metric.name:
            summary = record.metric.summary
            out["summaries"][record.metric.name] = (
                "max" if summary.max else ("min" if summary.min else None)
            )
            out["step_metric"] = record.metric.step_metric
        elif kind == "exit":
            out["exit"] = record.exit.exit_code
    return out


def offline_runs(save_dir: Path, expected: int, timeout: float = 30.0) -> dict[str, dict[str, Any]]:
    """The offline runs by job type, once ``expected`` runs have their exit record on disk.

    ``wandb.finish`` returns when the run is closed; the W&B service process may still be
    flushing the file, so the reader waits (bounded) for the records to land.
    """
    deadline = time.monotonic() + timeout
    while True:
        runs = [read_run(d) for d in sorted((save_dir / "wandb").glob("offline-run-*"))]
        complete = [r for r in runs if "job_type" in r and r["exit"] is not None]
        if len(complete) >= expected or time.monotonic() > deadline:
            return {r.get("job_type", "?"): r for r in runs}
        time.sleep(0.2)


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


def test_metric_summaries_keep_the_best_score_and_the_lowest_loss() -> None:
    assert metric_summary("test/cluster/flip_crf/mIoU") == "max"
    assert metric_summary("val/linear/pAcc") == "max"
    assert metric_summary("fit/cluster/heldout_modularity") == "max"
    assert metric_summary("train/loss_front") == "min"
    assert metric_summary("train/modularity") == "min"  # the mediator's and probe's loss
    assert metric_summary("train/bank_size") is None  # a count: its last value


def test_run_group_is_the_experiment_and_its_settings_without_the_seed() -> None:
    job = ["+sweep=seeds", "method.head.temperature=0.1", "logger=wandb", "stage=all"]
    seeds = {run_group("exp", [*job, f"seed={s}", f"artifact_tag=seed{s}"]) for s in range(3)}
    assert seeds == {"exp method.head.temperature=0.1"}  # one group for the repeats
    other = run_group("exp", ["method.head.temperature=0.2", "seed=0"])
    assert other == "exp method.head.temperature=0.2"
    assert run_group("exp", ["paths.root_dir=/x", "data.module.root=/y"]) == "exp"
    long = [f"method.head.option_{i}={i}" for i in range(20)]
    named = {run_group("exp", [*long, f"method.num_concepts={k}"]) for k in (256, 512)}
    assert len(named) == 2 and all(len(n) <= 128 and n.startswith("exp ") for n in named)


@pytest.fixture
def wandb_offline_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B in offline mode (no network), quiet; returns the runs' save directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb_runs"


@pytest.mark.slow
def test_wandb_offline_runs_per_step_with_media_table_and_artifacts(
    tiny, wandb_offline_dir: Path
) -> None:
    import wandb

    save_dir = wandb_offline_dir
    results = run(tiny("stage=all", "logger=wandb", f"logger.wandb.save_dir={save_dir}"))
    assert wandb.run is None
    assert results["test/cluster/raw/mIoU"] >= 0
    runs = offline_runs(save_dir, expected=4)
    assert set(runs) == {"mediator", "head", "probe", "eval"}  # one run per step
    (group,) = {record["group"] for record in runs.values()}  # the steps share one group
    assert group.startswith("mosaic_tiny_vit_mlp backbone=tiny_vit ")  # settings, by key
    assert "seed" not in group and len(group) <= 128
    for step, record in runs.items():
        assert record["name"] == f"mosaic_tiny_vit_mlp-{step}"
        assert record["exit"] == 0  # finished
        assert {"method", "data", "backbone", "seed"} <= record["config"]
    # lineage: each step declares the artifacts it read
    clusterbook = ("clusterbook", "mosaic_tiny_vit_mlp-clusterbook")
    head = ("head", "mosaic_tiny_vit_mlp-head")
    probe = ("probe", "mosaic_tiny_vit_mlp-probe")
    assert runs["mediator"]["inputs"] == []
    assert runs["head"]["inputs"] == [clusterbook]
    assert runs["probe"]["inputs"] == [head]
    assert sorted(runs["eval"]["inputs"]) == sorted([clusterbook, head, probe])
    # metric summaries: the best score, the lowest loss, on Lightning's step axis
    assert runs["head"]["summaries"]["train/loss_front"] == "min"
    assert runs["mediator"]["summaries"]["train/modularity"] == "min"
    assert runs["eval"]["summaries"]["test/cluster/flip/mIoU"] == "max"
    assert runs["eval"]["summaries"]["fit/cluster/heldout_modularity"] == "max"
    assert runs["eval"]["step_metric"] == "trainer/global_step"
    assert "train/modularity" in runs["mediator"]["history"]
    assert {"train/loss_front", "train/empty_pos_terms"} <= set(runs["head"]["history"])
    assert ("clusterbook", "mosaic_tiny_vit_mlp-clusterbook") in runs["mediator"]["artifacts"]
    assert ("head", "mosaic_tiny_vit_mlp-head") in runs["head"]["artifacts"]
    assert ("probe", "mosaic_tiny_vit_mlp-probe") in runs["probe"]["artifacts"]
    evaluation = runs["eval"]
    assert ("segmenter", "mosaic_tiny_vit_mlp-segmenter") in evaluation["artifacts"]
    history = evaluation["history"]
    assert 0 <= history["test/cluster/flip/mIoU"] <= 1
    assert history["eval/contact_sheet/_type"] == "image-file"
    assert history["eval/confusion_matrix/_type"] == "image-file"
    assert history["eval/per_class_iou_plot/_type"] == "image-file"
    assert history["fit/cluster/heldout_modularity"] == results["fit/cluster/heldout_modularity"]
    assert history["eval/examples/count"] == 2
    assert history["eval/per_class_iou/_type"] == "table-file"
    assert history["eval/per_class_iou/nrows"] == 6  # one row per class
    assert history["eval/per_class_iou/ncols"] == 3  # class, raw IoU, flip IoU
    (eval_dir,) = [
        d for d in (save_dir / "wandb").glob("offline-run-*") if (d / "files" / "media").is_dir()
    ]
    table_file = eval_dir / "files" / history["eval/per_class_iou/path"]
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["class", "cluster/flip IoU", "cluster/raw IoU"]
    report = json.loads(Path(results["artifacts/metrics"]).read_text())
    ious = report["details"]["details/cluster/flip/per_class_iou"]
    assert [row[0] for row in table["data"]] == report["class_names"]
    np.testing.assert_allclose([row[1] for row in table["data"]], ious, equal_nan=True)
    assert (eval_dir / "files" / history["eval/confusion_matrix/path"]).is_file()


@pytest.mark.slow
def test_summarize_logs_the_sweep_as_a_run_with_its_tables(
    compose, tmp_path: Path, wandb_offline_dir: Path
) -> None:
    import wandb

    from test_sweep import fake_job

    sweep_dir = tmp_path / "sweep"
    for job, (k, seed) in enumerate((k, s) for k in (16, 32) for s in (0, 1)):
        metrics = {"test/cluster/flip/mIoU": 0.1 * (job + 1), "test/cluster/flip/pAcc": 0.5}
        fake_job(sweep_dir, str(job), [f"method.num_concepts={k}", f"seed={seed}"], metrics)
    save_dir = wandb_offline_dir
    summary = run(
        compose(
            "stage=summarize",
            f"sweep_dir={sweep_dir}",
            "logger=wandb",
            f"logger.wandb.save_dir={save_dir}",
        )
    )
    assert wandb.run is None
    record = offline_runs(save_dir, expected=1)["summarize"]
    assert record["name"] == "summary-sweep" and record["exit"] == 0
    history = record["history"]
    assert history["summary/jobs/_type"] == "table-file"
    assert history["summary/jobs/nrows"] == 4
    (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
    table = json.loads((run_dir / "files" / history["summary/statistics/path"]).read_text())
    assert table["columns"] == ["group", "metric", "mean", "std", "n"]
    assert len(table["data"]) == len(summary["summary/stats"]) == 4  # 2 settings x 2 metrics
    rows = {(row[0], row[1]): row for row in table["data"]}
    k32 = rows[("method.num_concepts=32", "test/cluster/flip/mIoU")]
    assert k32[2] == pytest.approx(0.35) and k32[4] == 2  # mean of 0.3 and 0.4, two seeds
    if summary["summary/plot"]:
        assert history["summary/plot/_type"] == "image-file"


@pytest.mark.slow
def test_wandb_run_is_finished_when_a_step_fails(tiny, wandb_offline_dir: Path) -> None:
    import wandb

    save_dir = wandb_offline_dir
    cfg = tiny(
        "stage=mediator",
        "logger=wandb",
        f"logger.wandb.save_dir={save_dir}",
        "+callbacks.fault._target_=faults.FailAtStep",  # a failure once fitting has started
        "+callbacks.fault.step=0",
    )
    with pytest.raises(RuntimeError, match="injected failure in step 1"):
        run(cfg)
    assert wandb.run is None
    runs = offline_runs(save_dir, expected=1)
    assert set(runs) == {"mediator"} and runs["mediator"]["exit"] == 1


def test_csv_logger_writes_slash_named_metrics(tiny, tmp_path: Path) -> None:
    run(tiny("stage=mediator", "logger=csv"))
    (metrics,) = (tmp_path / "out" / "csv").glob("version_*/metrics.csv")
    header = metrics.read_text().splitlines()[0].split(",")
    assert "train/modularity" in header


def test_tensorboard_logger_or_a_clear_missing_package_error(tiny, tmp_path: Path) -> None:
    installed = any(importlib.util.find_spec(n) for n in ("tensorboard", "tensorboardX"))
    cfg = tiny("stage=mediator", "logger=tensorboard")
    if not installed:
        with pytest.raises(ModuleNotFoundError, match="pip install tensorboard.*logger=csv"):
            run(cfg)
        return
    run(cfg)
    assert list((tmp_path / "out" / "tensorboard").glob("version_*/events.out.tfevents.*"))


def test_throughput_progress_bar_reports_images_per_second() -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from cause_lightning.stages.callbacks import ThroughputProgressBar

    class Toy(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return (self.weight - batch["image"].mean()) ** 2

        def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            return None

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([self.weight], lr=0.1)

    bar = ThroughputProgressBar()
    seen: dict[str, Any] = {}
    train_end, test_end = bar.on_train_batch_end, bar.on_test_batch_end

    def on_train_batch_end(trainer, module, *args: Any) -> None:
        train_end(trainer, module, *args)
        seen["train"] = bar.get_metrics(trainer, module)

    def on_test_batch_end(*args: Any) -> None:
        test_end(*args)
        seen["test"] = bar.progress.tasks[bar.test_progress_bar_id].description

    bar.on_train_batch_end = on_train_batch_end  # type: ignore[method-assign]
    bar.on_test_batch_end = on_test_batch_end  # type: ignore[method-assign]
    loader = DataLoader([{"image": torch.randn(3, 4, 4)} for _ in range(6)], batch_size=2)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Toy(), loader)
    trainer.test(trainer.lightning_module, loader, verbose=False)
    assert float(seen["train"]["img/s"]) > 0
    assert seen["test"].startswith("Testing (") and seen["test"].endswith(" img/s)")
