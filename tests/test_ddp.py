"""DDP (2 CPU processes, gloo) equals one process on the same global batch (docs/scaling.md).

The DDP runs go through the CLI in a subprocess: ``strategy=ddp`` relaunches ``sys.argv`` for
rank 1, which inside pytest would re-run the tests; the single-process reference calls the same
``run`` in-process. The DDP run uses a per-device batch ``b`` and the single-process run ``2b``,
with the same seed, the dataset order (``data.module.shuffle=false``), no dropout (stage 3 rebuilds
the head with the dropout it was trained with),
``method.head.sync_bank=true`` and float64. Their artifacts must agree to ``ATOL``, while training
moved every trained tensor by far more than that (a DDP run without gradient averaging, or with
per-rank grid offsets, banks or candidates, lands ~1e-2 away). The evaluation of the same
artifacts under DDP (5 images: an uneven split) must give the single-process metrics exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cause_lightning.run import run
from tiny import artifact_file

pytestmark = [pytest.mark.slow, pytest.mark.ddp]

# In float64 the two runs differ only by the summation order of the all-reduce (~1e-15). (In
# float32 that order gives ~1e-8 differences, which Adam's normalisation can blow up to ~1e-5 for
# parameters whose gradient almost cancels, too close to a meaningful tolerance.)
ATOL = 1e-9
MOVED = 1e4 * ATOL  # every trained tensor moves ~1e-2 in the few steps

COMMON = [
    "backbone=tiny_vit",
    "head=mlp",
    "seed=3",
    "trainer.precision=64-true",
    "data.module.num_train=8",
    "data.module.num_val=5",
    "data.module.image_size=64",
    "data.recipe.resolution={train:64,test:64}",
    "data.module.shuffle=false",
    "head.module.dropout=0",
    "method.num_concepts=16",
    "method.head.projection_dim=32",
    "method.head.sync_bank=true",
    "method.head.ema_decay=0.5",  # the exported teacher follows the student closely
    "method.eval.variants=[raw,flip]",
    "method.eval.baselines=false",
    "method.eval.save_images=1",
    "callbacks=none",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_checkpointing=false",
]


def batch(size: int) -> list[str]:
    return [f"method.{s}.batch_size={size}" for s in ("mediator", "head", "probe", "eval")]


def cli(root: Path, *overrides: str, timeout: float = 240) -> str:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "cause_lightning",
        *overrides,
        f"paths.root_dir={root}",
        f"hydra.run.dir={root / 'run'}",
    ]
    done = subprocess.run(
        command, env=env, cwd=root, capture_output=True, text=True, timeout=timeout
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def copy_without_evaluations(source: Path, target: Path) -> None:
    """Copy a run's artifacts to another root, leaving out their evaluations."""
    shutil.copytree(
        source / "artifacts", target / "artifacts", ignore=shutil.ignore_patterns("eval-*")
    )


def tensors(path: Path) -> dict[str, torch.Tensor]:
    record = torch.load(path, weights_only=True)
    out = {}
    for key, value in record.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, dict) and key != "meta":
            out.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, torch.Tensor)})
    return out


def test_ddp_equals_one_process_on_the_global_batch(
    compose, tmp_path: Path, shared_data_dir: Path
) -> None:
    data = f"data.module.root={shared_data_dir / 'mosaic'}"
    roots = {name: tmp_path / name for name in ("ddp", "single", "start", "ddp_eval")}
    for root in roots.values():
        root.mkdir()
    train = ["stage=all", "stage.steps=[mediator,head,probe]"]
    output = cli(roots["ddp"], *COMMON, data, *train, "trainer=ddp_cpu", *batch(2))
    assert "world size 2, batch 2 per device, global batch 4" in output
    # One process (in-process: the same `run` the CLI calls, without another interpreter start).
    run(compose(*COMMON, data, "stage=all", "trainer=cpu", *batch(4), paths=roots["single"]))
    # Starting points: the same steps without a single optimiser step.
    run(
        compose(
            *COMMON, data, *train, "trainer=cpu", *batch(4), "+trainer.limit_train_batches=0",
            paths=roots["start"],
        )
    )  # fmt: skip

    def artifact(name: str, file: str) -> Path:
        return artifact_file(roots[name], file)

    resolved = yaml.safe_load((roots["ddp"] / "run" / "config_resolved.yaml").read_text())
    assert resolved["derived"]["world_size"] == 2
    # The DDP run's global batch is the single run's batch: they share one identity.
    assert artifact("ddp", "probe.pt").relative_to(roots["ddp"]) == artifact(
        "single", "probe.pt"
    ).relative_to(roots["single"])
    head_start = tensors(artifact("single", "head.pt"))
    for file in ("clusterbook.pt", "head.pt", "probe.pt"):
        ddp, single = tensors(artifact("ddp", file)), tensors(artifact("single", file))
        start = tensors(artifact_file(roots["start"], file, smoke=True))  # no optimiser step
        if file == "probe.pt":  # the probe's linear layer continues from the head stage's
            start["linear_state.f.weight"] = head_start["linear_state.f.weight"]
            start["linear_state.f.bias"] = head_start["linear_state.f.bias"]
        assert ddp.keys() == single.keys() == start.keys()
        for key in single:
            gap = float((ddp[key] - single[key]).abs().max())
            moved = float((single[key] - start[key]).abs().max())
            assert gap <= ATOL, f"{file} {key}: DDP differs from one process by {gap:.3g}"
            assert moved >= MOVED, f"{file} {key}: moved only {moved:.3g} from its start"

    # Evaluation of the single-process artifacts under DDP: same confusion, same metrics.
    trained = artifact("single", "probe.pt").parent
    copy_without_evaluations(roots["single"], roots["ddp_eval"])
    cli(roots["ddp_eval"], *COMMON, data, "stage=eval", "trainer=ddp_cpu", *batch(2))
    evaluation = artifact("ddp_eval", "metrics.json")
    assert evaluation.parent.parent.relative_to(roots["ddp_eval"]) == trained.relative_to(
        roots["single"]
    )
    ddp_report = json.loads(evaluation.read_text())
    single_report = json.loads(artifact("single", "metrics.json").read_text())
    assert ddp_report["metrics"]["test/cluster/raw/mIoU"] > 0
    assert ddp_report["metrics"] == single_report["metrics"]
    for variant in ("raw", "flip"):
        key = f"details/cluster/{variant}/confusion"
        assert ddp_report["details"][key] == single_report["details"][key]
        assert sum(map(sum, single_report["details"][key])) == 5 * 64 * 64  # every pixel once


@pytest.mark.timeout(1500)
def test_ddp_spawn_evaluation_equals_one_process(
    compose, tmp_path: Path, shared_data_dir: Path
) -> None:
    """Under ``ddp_spawn`` the test loop runs in child processes; stage=all and stage=eval must
    still write the one-process metrics.json (k-means baselines sample tokens per rank, so their
    rows are compared between the two spawned runs only)."""
    data = f"data.module.root={shared_data_dir / 'mosaic'}"
    common = [o for o in COMMON if not o.startswith("method.eval.baselines")]
    common += ["method.eval.baselines=true", "method.eval.kmeans_restarts=2", *batch(2)]
    spawn = ["trainer=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2"]
    roots = {name: tmp_path / name for name in ("all", "eval", "single")}
    for root in roots.values():
        root.mkdir()
    # Every stage spawns its processes (and the k-means pass once more): slow on a shared CPU.
    output = cli(roots["all"], *common, data, "stage=all", *spawn, timeout=900)
    assert output.count("sharing strategy") <= 1  # the file_system fallback warns once at most

    for name in ("eval", "single"):
        copy_without_evaluations(roots["all"], roots[name])
    cli(roots["eval"], *common, data, "stage=eval", *spawn, timeout=600)
    # One process of the global batch: the same identity, so it finds the same artifacts.
    one = [o for o in common if "batch_size" not in o]
    run(compose(*one, *batch(4), data, "stage=eval", "trainer=cpu", paths=roots["single"]))
    reports = {n: json.loads(artifact_file(roots[n], "metrics.json").read_text()) for n in roots}
    kmeans = [k for k in reports["single"]["metrics"] if "kmeans" in k]
    assert kmeans and reports["all"]["metrics"] == reports["eval"]["metrics"]
    assert reports["all"]["details"] == reports["eval"]["details"]
    for name in ("all", "eval"):
        metrics = {k: v for k, v in reports[name]["metrics"].items() if k not in kmeans}
        single = {k: v for k, v in reports["single"]["metrics"].items() if k not in kmeans}
        assert metrics == single and metrics["test/cluster/raw/mIoU"] > 0
        for variant in ("raw", "flip"):
            key = f"details/cluster/{variant}/confusion"
            assert reports[name]["details"][key] == reports["single"]["details"][key]
    # Every report has its prediction images: the examples came back from rank 0.
    assert list((roots["eval"] / "run" / "predictions").glob("*.png"))
