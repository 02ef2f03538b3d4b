"""Reliability: resume equals the uninterrupted run, no silent loss of work, bad input refused
before work starts, artifacts checked on load (docs/reliability.md)."""

from __future__ import annotations

import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image

import faults
from cause_lightning.artifacts.io import ArtifactError, load_artifact, save_artifact
from cause_lightning.config import validate
from cause_lightning.core.errors import DiskFullError, SettingsError
from cause_lightning.core.files import atomic_write, ensure_writable
from cause_lightning.data.base import ResumableLoader, ResumableSampler
from cause_lightning.modules.base import NonFiniteLossError
from cause_lightning.run import run
from cause_lightning.visualize import save_png
from tiny import TINY, TINY_DATA

TESTS = Path(__file__).resolve().parent
# Tiny runs with the default checkpoint callback and 4 batches (8 images of 2) per epoch.
BASE = [o for o in TINY if not o.startswith(("callbacks=", "+trainer.limit_train_batches"))]
SMALL = [
    "method.mediator.batch_size=2",
    "method.head.batch_size=2",
    "method.probe.batch_size=2",
    "method.mediator.epochs=2",
    "method.head.epochs=2",
    "method.probe.epochs=2",
    "method.probe.step_size=1",
]
EVERY_3 = "callbacks.stage_checkpoint.every_n_train_steps=3"


def fail_at(step: int, kill: bool = False, module: str | None = None) -> list[str]:
    only = [] if module is None else [f"+callbacks.fault.module={module}"]
    return [
        "+callbacks.fault._target_=faults.FailAtStep",
        f"+callbacks.fault.step={step}",
        f"+callbacks.fault.kill={str(kill).lower()}",
        *only,
    ]


# The label of each stage's artifact directories (the head's is its YAML name).
LABELS = {"mediator": "clusterbook", "head": "tr", "probe": "probe"}
OUTPUT = {"mediator": "clusterbook", "head": "head", "probe": "probe"}


def stage_dirs(tmp_path: Path, step: str, tag: str = "") -> list[Path]:
    """The directories of ``step`` labelled ``tag`` (or unlabelled) in the real artifact root."""
    prefix = f"{LABELS[step]}-{tag}-" if tag else f"{LABELS[step]}-"
    parts = 3 if tag else 2
    root = tmp_path / "artifacts" / "mosaic" / "tiny_vit"
    return sorted(
        p for p in root.rglob(f"{prefix}*") if p.is_dir() and len(p.name.split("-")) == parts
    )


def stage_dir(tmp_path: Path, step: str, tag: str = "") -> Path:
    found = stage_dirs(tmp_path, step, tag)
    assert len(found) == 1, found
    return found[0]


def ckpt_dir(tmp_path: Path, step: str, tag: str = "") -> Path:
    return stage_dir(tmp_path, step, tag) / "checkpoints"


def artifact(tmp_path: Path, step: str, tag: str = "") -> dict:
    path = stage_dir(tmp_path, step, tag) / f"{OUTPUT[step]}.pt"
    return load_artifact(path, OUTPUT[step], step)


def read(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------- resume and checkpoints


def test_resumed_stage_equals_the_uninterrupted_run(tiny, tmp_path: Path) -> None:
    run(tiny("stage=mediator", "artifact_tag=a", *SMALL, EVERY_3, base=BASE))
    with pytest.raises(RuntimeError, match="injected failure"):
        run(tiny("stage=mediator", "artifact_tag=b", *SMALL, EVERY_3, *fail_at(7), base=BASE))
    # Written at step 6, mid-way through the second epoch; step 7 is lost and redone.
    assert read(ckpt_dir(tmp_path, "mediator", "b") / "last.ckpt")["global_step"] == 6
    run(tiny("stage=mediator", "artifact_tag=b", *SMALL, EVERY_3, "ckpt_path=last", base=BASE))
    a, b = artifact(tmp_path, "mediator", "a"), artifact(tmp_path, "mediator", "b")
    assert (a["clusterbook"] - b["clusterbook"]).abs().max() <= 1e-6


def test_ckpt_path_last_takes_the_newest_checkpoint_and_says_which(
    tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(tiny("stage=mediator", *SMALL, base=BASE))
    folder = ckpt_dir(tmp_path, "mediator")
    finished = folder / "last.ckpt"
    shutil.copy2(finished, tmp_path / "finished.ckpt")
    # A new run of the stage is interrupted after step 6; its checkpoint gets another name.
    with pytest.raises(RuntimeError):
        run(tiny("stage=mediator", *SMALL, EVERY_3, *fail_at(6), base=BASE))
    finished.rename(folder / "last-v1.ckpt")
    shutil.copy2(tmp_path / "finished.ckpt", finished)
    os.utime(finished, (1, 1))  # the finished run's file is the older one
    with caplog.at_level(logging.INFO, logger="cause_lightning"):
        run(tiny("stage=mediator", *SMALL, "ckpt_path=last", base=BASE))
    assert f"{folder / 'last-v1.ckpt'} at global step 6" in caplog.text
    assert read(finished)["global_step"] == 8


def test_killed_stage_keeps_the_work_of_its_last_epoch(tiny, tmp_path: Path) -> None:
    run(tiny("stage=mediator", *SMALL, base=BASE))
    with pytest.raises(RuntimeError):
        run(tiny("stage=head", *SMALL, *fail_at(6), base=BASE))
    # Default settings: written at the end of epoch 1 (step 4) although no step count was due.
    assert read(ckpt_dir(tmp_path, "head") / "last.ckpt")["global_step"] == 4
    interval = "callbacks.stage_checkpoint.train_time_interval=1e-6"
    with pytest.raises(RuntimeError):
        run(tiny("stage=head", *SMALL, interval, *fail_at(6), base=BASE))
    assert read(ckpt_dir(tmp_path, "head") / "last.ckpt")["global_step"] == 6


def test_checkpoint_of_another_configuration_is_refused(tiny, tmp_path: Path) -> None:
    run(tiny("stage=mediator", *SMALL, "method.mediator.epochs=1", base=BASE))
    # Other settings have another directory (ckpt_path=last finds nothing there): a named file.
    last = f"ckpt_path={ckpt_dir(tmp_path, 'mediator') / 'last.ckpt'}"
    differ = r"another configuration: .*method\.mediator\.lr: 0\.004 in the checkpoint, 0\.001 now"
    with pytest.raises(ValueError, match=differ):
        run(tiny("stage=mediator", *SMALL, last, "method.mediator.lr=1e-3", base=BASE))
    with pytest.raises(ValueError, match=r"data\.module\.num_train"):
        run(tiny("stage=mediator", *SMALL, last, "data.module.num_train=6", base=BASE))
    # More epochs of the same configuration is a resume, not another configuration.
    run(tiny("stage=mediator", *SMALL, last, base=BASE))


def test_non_finite_loss_names_an_existing_checkpoint_with_finite_weights(
    tiny, tmp_path: Path
) -> None:
    every = "callbacks.stage_checkpoint.every_n_train_steps=1"
    poison = ["+callbacks.fault._target_=faults.PoisonGradients", "+callbacks.fault.step=2"]
    with pytest.raises(NonFiniteLossError, match="global step 3") as caught:
        run(tiny("stage=mediator", *SMALL, every, *poison, base=BASE))
    message = str(caught.value)
    assert "newest checkpoint with finite weights is" in message
    named = Path(message.split("finite weights is ")[1].split(" (global step")[0])
    checkpoint = read(named)
    # Step 3's weights were NaN: never written, the file holds step 2.
    assert checkpoint["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    with pytest.raises(NonFiniteLossError, match="No checkpoint with finite weights exists"):
        run(tiny("stage=mediator", "artifact_tag=none", *SMALL, *poison))


def test_resume_never_runs_code_from_a_checkpoint(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(str(marker))}, crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="unreadable checkpoint") as caught:
        run(tiny("stage=mediator", f"ckpt_path={crafted}"))
    assert not marker.exists() and "weights_only" not in str(caught.value)


def test_fit_loads_checkpoints_with_weights_only(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list = []
    original = pl.Trainer.fit

    def spy(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(kwargs.get("weights_only"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", spy)
    run(tiny("stage=mediator"))
    assert seen == [True]


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: ANN204
        return (Path.touch, (Path(self.path),))


def test_training_loader_resumes_mid_epoch() -> None:
    data = list(range(10))

    def loader() -> ResumableLoader:
        return ResumableLoader(data, sampler=ResumableSampler(10, True, 3), batch_size=3)

    first = loader()
    first.sampler.set_epoch(1)
    iterator = iter(first)
    seen = [next(iterator).tolist() for _ in range(2)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    rest = [b.tolist() for b in iterator]
    second = loader()
    second.load_state_dict(state)
    second.sampler.set_epoch(1)
    assert [b.tolist() for b in second] == rest
    assert sorted(sum(seen + rest, [])) == data
    # An epoch-end state resumes with the whole next epoch, in the order of that epoch.
    third = loader()
    third.load_state_dict({"epoch": 1, "batches": 4})
    third.sampler.set_epoch(2)
    assert sum((b.tolist() for b in third), []) == third.sampler.order(2) != third.sampler.order(1)


# --------------------------------------------------------------------------- bad input, refused


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ("method.mediator.epochs=-1", "method.mediator.epochs"),
        ("method.num_concepts=-5", "method.num_concepts"),
        ("method.num_concepts=0", "method.num_concepts"),
        ("method.head.temperature=0", "method.head.temperature"),
        ("method.head.ema_decay=1.5", "method.head.ema_decay"),
        ("method.probe.lr=inf", "method.probe.lr"),
        ("data.recipe.resolution.test=0", "data.recipe.resolution.test"),
        ("+trainer.max_epochs=-1", "trainer.max_epochs"),
        ("method.head.neg_thresh=0.5", "method.head.neg_thresh"),
        ("method.eval.overcluster=[3]", "method.eval.overcluster"),
        # A count with a few zeros too many: the concept bank would not fit the machine.
        ("method.num_concepts=1000000000000", "make a concept bank of"),
    ],
)
def test_out_of_range_settings_are_refused_before_work(tiny, override: str, setting: str) -> None:
    with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
        validate(tiny(override))
    with pytest.raises(ValueError, match="nothing was run"):
        run(tiny("stage=mediator", override))


def test_every_numeric_setting_has_a_range(compose) -> None:
    """Numbers of the pipeline's schema, and of every argument a stage module takes from
    conf/method, are bounded where they are declared."""
    import typing

    from hydra.utils import get_class

    from cause_lightning.config.schema import SCHEMA, Setting
    from cause_lightning.core.bounds import Bound

    def numeric(annotation: object) -> bool:
        if typing.get_origin(annotation) is list:  # lists have rules of their own (overcluster)
            return False
        return any(t in (int, float) for t in (annotation, *typing.get_args(annotation)))

    def walk(schema: dict, prefix: str) -> list[str]:
        found = []
        for key, rule in schema.items():
            if isinstance(rule, dict):
                found += walk(rule, f"{prefix}{key}.")
            elif isinstance(rule, Setting) and numeric(rule.type) and rule.bound is None:
                found.append(prefix + key)
        return found

    missing = walk(SCHEMA, "")
    cfg = compose()
    for stage in ("mediator", "head", "probe", "eval"):
        node = cfg.method[stage].module
        hints = typing.get_type_hints(get_class(node._target_).__init__, include_extras=True)
        for key in node:
            if key.startswith("_") or key not in hints:
                continue
            hint = hints[key]
            bounded = typing.get_origin(hint) is typing.Annotated and any(
                isinstance(m, Bound) for m in hint.__metadata__
            )
            inner = (
                typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            )
            if numeric(inner) and not bounded:
                missing.append(f"method.{stage}.module.{key}")
    assert not missing


def test_every_preset_passes_validation(compose) -> None:
    conf = Path(__file__).resolve().parents[1] / "conf" / "experiment"
    for preset in sorted(conf.glob("*.yaml")):
        validate(compose(f"experiment={preset.stem}"))


def test_unwritable_artifact_directory_is_refused_before_training(tiny, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    for stage in ("mediator", "eval"):
        with pytest.raises(PermissionError, match="paths.artifact_dir"):
            run(tiny(f"stage={stage}", f"paths.artifact_dir={blocker / 'artifacts'}"))
    assert not (tmp_path / "out" / "config_resolved.yaml").exists()  # no backbone was built


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_artifact_directory_is_refused_before_training(tiny, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="paths.artifact_dir"):
            run(tiny("stage=mediator", f"paths.artifact_dir={folder}"))
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------ artifacts


def test_artifact_damaged_inside_an_intact_zip_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "head.pt"
    save_artifact(path, "head", {"head_state": {"w": torch.ones(64)}, "meta": {}})
    # Flip one value of the stored tensor in place: the zip structure stays valid.
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        data_name = next(n for n in names if n.endswith("/data/0"))
        entries = {n: archive.read(n) for n in names}
    entries[data_name] = b"\x00\x00\xc0\x7f" + entries[data_name][4:]  # a NaN
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    assert torch.isnan(torch.load(path, weights_only=True)["head_state"]["w"][0])
    with pytest.raises(ArtifactError, match=rf"{path}.*damaged.*stage=head"):
        load_artifact(path, "head", "head")


def test_foreign_artifact_error_gives_no_unsafe_advice(tmp_path: Path) -> None:
    path = tmp_path / "head.pt"
    torch.save({"kind": "head", "payload": _RunsCode(str(tmp_path / "x"))}, path)
    with pytest.raises(ArtifactError) as caught:
        load_artifact(path, "head", "head")
    message = str(caught.value)
    assert str(path) in message and "stage=head" in message
    assert "weights_only" not in message and "could run code" in message
    path.write_bytes(pickle.dumps({"not": "a zip"}))
    with pytest.raises(ArtifactError, match="stage=head") as caught:
        load_artifact(path, "head", "head")
    assert "weights_only" not in str(caught.value)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        artifact = save_artifact(tmp_path / "a.pt", "head", {"meta": {}})
        picture = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "p.png")
    finally:
        os.umask(previous)
    assert artifact.stat().st_mode & 0o777 == mode
    assert picture.stat().st_mode & 0o777 == mode


def test_checkpoint_files_follow_the_umask(tiny, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        run(tiny("stage=mediator", base=BASE))
    finally:
        os.umask(previous)
    assert (ckpt_dir(tmp_path, "mediator") / "last.ckpt").stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------ killed subprocesses


@pytest.fixture
def faults_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command-line runs of a test import the fault callbacks from this folder."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )


def cli_settings(shared_data_dir: Path) -> list[str]:
    """The command-line runs of the fault tests: tiny data, 2 epochs of 4 steps per stage."""
    return [
        *TINY_DATA,
        "method.num_concepts=32",
        "trainer.enable_progress_bar=false",
        f"data.module.root={shared_data_dir / 'mosaic'}",
        *SMALL,
    ]


# Checkpoints at steps 3 and 6 (every 3) and 4 and 8 (epoch ends): the mediator and head resume
# mid-epoch from step 6 and redo step 7, the probe resumes from the end of epoch 1.
KILLED_AT = {"mediator": 7, "head": 7, "probe": 5}


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.usefixtures("faults_on_path")
def test_sigkilled_stages_resume_to_the_uninterrupted_result(
    shared_data_dir: Path, tmp_path: Path
) -> None:
    from test_cli import cli as run_cli

    def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=cwd, check=False)

    common = [*cli_settings(shared_data_dir), EVERY_3]
    differences: dict[str, float] = {}
    for step, kill in KILLED_AT.items():
        done = cli(f"stage={step}", "artifact_tag=a", *common, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        killed = cli(f"stage={step}", "artifact_tag=b", *common, *fail_at(kill, True), cwd=tmp_path)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        resumed = cli(f"stage={step}", "artifact_tag=b", *common, "ckpt_path=last", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming" in resumed.stderr + resumed.stdout
        a, b = artifact(tmp_path, step, "a"), artifact(tmp_path, step, "b")
        differences[step] = _max_difference(a, b)
        # The next stage's runs each start from their own run's result (the store prefers the
        # run's label): equal results give equal inputs.
    assert all(d <= 1e-6 for d in differences.values()), differences


@pytest.mark.slow
@pytest.mark.parametrize(("module", "kill"), [("HeadModule", 7), ("ProbeModule", 5)])
@pytest.mark.usefixtures("faults_on_path")
def test_killed_stage_all_resumes_to_the_uninterrupted_pipeline_keeping_finished_steps(
    shared_data_dir: Path, tmp_path: Path, module: str, kill: int
) -> None:
    from test_cli import cli as run_cli

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("stage=all", "stage.steps=[mediator,head,probe]", *args, cwd=tmp_path,
                       check=False)  # fmt: skip

    common = [*cli_settings(shared_data_dir), EVERY_3]
    done = cli("artifact_tag=a", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = cli("artifact_tag=b", *common, *fail_at(kill, True, module))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    finished = ["mediator"] if module == "HeadModule" else ["mediator", "head"]
    before = {s: (stage_dir(tmp_path, s, "b") / f"{OUTPUT[s]}.pt").stat().st_mtime_ns
              for s in finished}  # fmt: skip
    resumed = cli("artifact_tag=b", *common, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    for step in finished:  # kept, not run again
        assert f"=== stage {step}: kept" in output
        assert (stage_dir(tmp_path, step, "b") / f"{OUTPUT[step]}.pt").stat().st_mtime_ns == (
            before[step]
        )
    assert "resuming" in output
    for step in ("mediator", "head", "probe"):
        gap = _max_difference(artifact(tmp_path, step, "a"), artifact(tmp_path, step, "b"))
        assert gap == 0.0, f"{step}: {gap}"


def _max_difference(a: object, b: object) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max())  # type: ignore[union-attr]
    if isinstance(a, dict):
        keys = [k for k in a if k not in ("meta", "checksum")]
        return max([_max_difference(a[k], b[k]) for k in keys], default=0.0)  # type: ignore[index]
    return 0.0


# ------------------------------------------------------------------- pre-emption (signals)


def signal_at(step: int, signum: str = "SIGTERM") -> list[str]:
    return [
        "+callbacks.fault._target_=faults.SignalAtStep",
        f"+callbacks.fault.step={step}",
        f"+callbacks.fault.signum={signum}",
    ]


# SIGTERM in the middle of epoch 2 (steps 0-3 are epoch 1); the warning signal in the epoch's last
# step, which Lightning stops after without running the epoch's end.
@pytest.mark.parametrize(("signum", "step"), [("SIGTERM", 5), ("SIGUSR1", 3)])
def test_signalled_stage_writes_a_checkpoint_and_resumes_to_the_uninterrupted_run(
    tiny, tmp_path: Path, signum: str, step: int
) -> None:
    run(tiny("stage=mediator", "artifact_tag=a", *SMALL, base=BASE))
    with pytest.raises(SIGTERMException):
        run(tiny("stage=mediator", "artifact_tag=b", *SMALL, *signal_at(step, signum), base=BASE))
    # The step that was running when the signal came is finished and kept.
    assert read(ckpt_dir(tmp_path, "mediator", "b") / "last.ckpt")["global_step"] == step + 1
    assert not (stage_dir(tmp_path, "mediator", "b") / "clusterbook.pt").exists()
    # Lightning's handlers, ours among them, are gone once the fit has ended.
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    run(tiny("stage=mediator", "artifact_tag=b", *SMALL, "ckpt_path=last", base=BASE))
    a, b = artifact(tmp_path, "mediator", "a"), artifact(tmp_path, "mediator", "b")
    assert float((a["clusterbook"] - b["clusterbook"]).abs().max()) == 0.0


def test_stage_all_stops_at_the_signalled_stage(tiny, tmp_path: Path) -> None:
    with pytest.raises(SIGTERMException):
        run(tiny("stage=all", *SMALL, *signal_at(2), base=BASE))
    assert (ckpt_dir(tmp_path, "mediator") / "last.ckpt").is_file()
    assert not (stage_dir(tmp_path, "mediator") / "clusterbook.pt").exists()
    assert not stage_dirs(tmp_path, "head")  # the head stage never started


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.usefixtures("faults_on_path")
def test_sigterm_through_the_cli_exits_non_zero_and_resumes_exactly(
    shared_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_cli import cli as run_cli

    monkeypatch.delenv("HYDRA_FULL_ERROR")  # the user's view: one message, no traceback

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=tmp_path, check=False)

    common = cli_settings(shared_data_dir)
    # One clusterbook, unlabelled: both head runs below find it by its settings.
    assert cli("stage=mediator", *common).returncode == 0
    done = cli("stage=head", "artifact_tag=a", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    # The shape of `make pipeline`: a chained loop stops at the interrupted stage.
    args = " ".join(f"'{a}'" for a in ["artifact_tag=b", *common, *signal_at(5)])
    chain = (
        f"for s in head probe; do {sys.executable} -m cause_lightning stage=$s {args} || exit; done"
    )
    # The thread count of the other runs (test_cli.cli): BLAS sums in another order with another.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    stopped = subprocess.run(
        ["bash", "-c", chain], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "Error: stopped by SIGTERM" in stopped.stderr and "Traceback" not in stopped.stderr
    assert read(ckpt_dir(tmp_path, "head", "b") / "last.ckpt")["global_step"] == 6
    assert not (stage_dir(tmp_path, "head", "b") / "head.pt").exists()
    assert not stage_dirs(tmp_path, "probe", "b")  # the probe stage never started
    resumed = cli("stage=head", "artifact_tag=b", *common, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _max_difference(artifact(tmp_path, "head", "a"), artifact(tmp_path, "head", "b")) == 0.0


# ----------------------------------------------------------------- what the command line prints


def test_expected_errors_print_one_message_without_traceback(tmp_path: Path) -> None:
    from test_cli import cli

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    settings = ["backbone=tiny_vit", "method.num_concepts=0"]
    for full in (False, True):
        result = subprocess.run(
            [sys.executable, "-m", "cause_lightning", *settings],
            cwd=tmp_path,
            env={**env, "HYDRA_FULL_ERROR": "1"} if full else env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1
        assert "Error: invalid settings (nothing was run):" in result.stderr
        assert ("Traceback" in result.stderr) is full, result.stderr
    missing = cli("stage=probe", *TINY_DATA, "method.num_concepts=32", cwd=tmp_path, check=False)
    assert missing.returncode == 1  # the test environment asks for tracebacks: still exit 1
    assert "MissingArtifactError" in missing.stderr and "stage=mediator" in missing.stderr


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("sed=1", "seed"),
        ("ckpt-path=last", "ckpt_path"),
        ("method.mediator.epoch=2", "method.mediator.epochs"),
        ("data.module.num_trian=4", "data.module.num_train"),
    ],
)
def test_a_misspelt_override_is_refused_with_the_closest_setting(override: str, meant: str) -> None:
    from cause_lightning.config.files import config_dir
    from cause_lightning.config.overrides import unknown_override

    problem = unknown_override(config_dir(), ["backbone=tiny_vit", "seed=0,1", override])
    assert problem is not None and problem.startswith(override.split("=")[0] + " is not a setting")
    assert f"did you mean {meant}" in problem
    # Swept values, group choices and appended keys are the run's business, not typos.
    assert unknown_override(config_dir(), ["head=mlp", "seed=0,1", "+notes_extra=1"]) is None


def test_the_command_line_names_a_misspelt_setting_before_any_work(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cause_lightning", "-m", "sed=1,2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "did you mean seed" in result.stderr
    assert not (tmp_path / "logs").exists()  # no run folder: nothing started


def test_command_line_overrides_leave_out_flags_and_their_values() -> None:
    from cause_lightning.config.overrides import command_line_overrides

    assert command_line_overrides(["-m", "--cfg", "job", "a=1", "--info=all", "b=2"]) == [
        "a=1",
        "b=2",
    ]
    assert command_line_overrides(["--config-name", "other", "a=1"]) is None


# --------------------------------------------------------------------- diverged stage outputs


def test_non_finite_or_overflowing_artifacts_are_never_written(tmp_path: Path) -> None:
    path = tmp_path / "clusterbook.pt"
    huge = torch.full((4, 8), 2.9e30)  # finite values whose float32 row norms overflow
    with pytest.raises(ArtifactError, match=r"rows whose norm overflows float32") as caught:
        save_artifact(path, "clusterbook", {"clusterbook": huge, "meta": {}})
    message = str(caught.value)
    assert str(path) in message and "stage=mediator" in message and "method.mediator.lr" in message
    nan = {"head_state": {"proj.weight": torch.tensor([[1.0, float("nan")]])}, "meta": {}}
    with pytest.raises(ArtifactError, match=r"'head_state\.proj\.weight' holds 1 NaN") as caught:
        save_artifact(tmp_path / "head.pt", "head", nan)
    assert "method.head.lr" in str(caught.value) and "method.head.clip" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # neither file, nor a temporary one


def test_diverged_stage_fails_without_exporting(tiny, tmp_path: Path) -> None:
    diverged = r"clusterbook\.pt: .*stage=mediator .*lower method\.mediator\.lr, then run"
    with pytest.raises(ArtifactError, match=diverged):
        run(tiny("stage=mediator", "method.mediator.lr=1e30"))
    assert not (tmp_path / "artifacts" / "mosaic" / "tiny_vit" / "clusterbook.pt").exists()


# ------------------------------------------------------------------------- load-error messages


def _torch_file(path: Path) -> Path:
    torch.save({"w": torch.ones(256)}, path)
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: torch.save({"x": _RunsCode(str(p) + ".ran")}, p), "could run code"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not a file written by"),
        (lambda p: np.save(p.with_suffix(".npy"), np.ones(3)) or p.with_suffix(".npy").rename(p),
         r"not a file written by torch\.save \(a NumPy array file\)"),
        (lambda p: p.write_bytes(_torch_file(p).read_bytes()[:500]), "cut short"),
        (lambda p: p.write_bytes(b""), "the file is empty"),
    ],
)  # fmt: skip
def test_load_errors_tell_objects_foreign_and_truncated_files_apart(
    tmp_path: Path, make: object, reason: str
) -> None:
    from cause_lightning.interop import import_official

    path = tmp_path / "segment_tr.pth"
    make(path)  # type: ignore[operator]
    with pytest.raises(ArtifactError) as as_artifact:
        load_artifact(path, "head", "head")
    with pytest.raises(ValueError) as as_release:
        import_official(path, path, path, head="tr")
    for message in (str(as_artifact.value), str(as_release.value)):
        assert re.search(reason, message), message
        assert "weights_only" not in message and str(path) in message
    assert not Path(str(path) + ".ran").exists()


def test_release_file_with_non_finite_values_is_refused(tmp_path: Path) -> None:
    from cause_lightning.core.errors import UnreadableFileError
    from cause_lightning.interop import import_official

    path = tmp_path / "segment_tr.pth"
    torch.save({"head_ema.f.weight": torch.tensor([[1.0, float("inf")]])}, path)
    with pytest.raises(UnreadableFileError, match=r"contains NaN or Inf .*head_ema\.f\.weight"):
        import_official(path, path, path, head="tr")


# --------------------------------------------------------------------------- predict outputs


def test_output_folder_inside_the_input_folder_is_refused_before_work(tiny, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    save_png(np.zeros((8, 8, 3), np.uint8), photos / "a.png")
    for output in (photos / "predictions", photos):
        cfg = tiny("stage=predict", f"predict.input={photos}", f"predict.output_dir={output}")
        with pytest.raises(SettingsError, match=r"predict\.output_dir=.*inside predict\.input"):
            run(cfg)
    assert sorted(p.name for p in photos.iterdir()) == ["a.png"]  # nothing written


# --------------------------------------------------------------------------------- disk full


def test_artifact_write_on_a_full_disk_says_so_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults.fill_disk(monkeypatch, free=3 * 2**20, flush_fails=False)
    # torch's own writer reports a full disk without errno: "enforce fail ... unexpected pos".
    monkeypatch.setattr(torch, "save", faults.torch_save_on_full_disk)
    payload = {"clusterbook": torch.ones(2048, 1024), "meta": {}}  # 8 MB
    with pytest.raises(DiskFullError, match=r"needs about 8\.0 MB, 3\.0 MB free in ") as caught:
        save_artifact(tmp_path / "clusterbook.pt", "clusterbook", payload)
    assert "no space left on device" in str(caught.value) and "enforce" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_write_on_a_full_disk_removes_its_temporary_file(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    faults.fill_disk(monkeypatch, free=0, flush_fails=False)
    monkeypatch.setattr(
        "lightning.fabric.plugins.io.torch_io._atomic_save", faults.atomic_save_on_full_disk
    )
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*last\.ckpt"):
        run(tiny("stage=mediator", base=BASE))
    folder = ckpt_dir(tmp_path, "mediator")
    assert list(folder.iterdir()) == []  # no hidden temporary file keeps the disk full


def test_writability_check_writes_bytes_and_refuses_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as full:
        faults.fill_disk(full, free=0)  # an empty file could still be created
        with pytest.raises(DiskFullError, match=r"paths\.artifact_dir.*nothing was run"):
            ensure_writable(tmp_path / "b", "paths.artifact_dir")
    assert list((tmp_path / "b").iterdir()) == []
    ensure_writable(tmp_path / "a", "paths.artifact_dir", need=1)
    faults.fill_disk(monkeypatch, free=2**20, flush_fails=False)
    with pytest.raises(DiskFullError, match=r"in predict\.output_dir=.*needs about 5\.0 MB, 1\.0"):
        ensure_writable(tmp_path / "a", "predict.output_dir", need=5 * 2**20)


# ---------------------------------------------------------------------------- atomic writes


def test_atomic_writes_use_unique_temporary_names_and_flush_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src: str, dst: str) -> None:
        events.append(("rename", str(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    target = tmp_path / "last.ckpt"
    names: list[str] = []

    def outer(tmp: str) -> None:
        names.append(tmp)
        Path(tmp).write_text("outer")
        atomic_write(target, inner)  # a second writer of the same file meanwhile

    def inner(tmp: str) -> None:
        names.append(tmp)
        Path(tmp).write_text("inner")

    atomic_write(target, outer)
    assert names[0] != names[1] and target.read_text() == "outer"
    tmp = names[0]
    assert events.index(("fsync", tmp)) < events.index(("rename", tmp))
    assert events[events.index(("rename", tmp)) + 1] == ("fsync", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ------------------------------------------------------------------------------- W&B login


def test_wandb_online_without_a_key_is_refused_before_work(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError, match=r"(?s)no W&B API key.*wandb login.*WANDB_MODE=offline"):
        run(tiny("stage=mediator", "logger=wandb"))
    assert not (tmp_path / "out" / "config_resolved.yaml").exists()  # nothing was built


# ----------------------------------------------------------------- the evaluation's hand-off


def test_evaluation_hand_off_is_plain_content_read_without_code(tmp_path: Path) -> None:
    from test_evaluate import batches, evaluate, module

    ran = module()
    evaluate(ran, batches(count=1))
    ran.kmeans_centroids = {"kmeans": torch.ones(4, 3)}
    handoff = tmp_path / "outcome.pt"
    torch.save(ran.outcome(), handoff)
    torch.load(handoff, weights_only=True)  # tensors, numbers, lists and dicts only
    parent = module()
    parent.handoff = handoff
    parent.receive()
    for mine, theirs in zip(parent.examples, ran.examples, strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert isinstance(mine[key], np.ndarray) and mine[key].dtype == value.dtype
            np.testing.assert_array_equal(mine[key], value)


# --------------------------------------------------------------- predict in bounded memory


def test_predict_contact_sheet_holds_thumbnails(tiny, tmp_path: Path) -> None:
    from cause_lightning.core.specs import builtin_head_spec
    from cause_lightning.models import build_backbone, build_head
    from cause_lightning.segmenter import Segmenter
    from cause_lightning.visualize import TITLE_HEIGHT

    backbone = build_backbone("tiny_vit")
    head = build_head(builtin_head_spec("mlp", int(backbone.embed_dim), 8, 0.1)).eval()
    model = Segmenter(backbone, head, torch.randn(3, 8), resolution=32).save(tmp_path / "s.pt")
    photos = tmp_path / "photos"
    save_png(np.full((300, 700, 3), 90, np.uint8), photos / "wide.png")
    output = tmp_path / "predictions"
    run(
        tiny(
            "stage=predict",
            f"predict.input={photos}",
            f"predict.segmenter={model}",
            f"predict.output_dir={output}",
        )
    )
    sheet = np.asarray(Image.open(output / "contact_sheet.png"))
    assert sheet.shape[1] < 700  # narrower than the image: not full-size cells
    from cause_lightning.stages.predict import SHEET_SIDE

    thumb = (round(300 * SHEET_SIDE / 700), SHEET_SIDE)  # aspect kept, longer side bounded
    assert sheet.shape[:2] == (4 + TITLE_HEIGHT + thumb[0] + 4, 4 + 2 * (thumb[1] + 4))
    assert np.asarray(Image.open(output / "overlay" / "00000_wide.png")).shape[:2] == (300, 700)
