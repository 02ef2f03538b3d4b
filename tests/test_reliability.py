"""Reliability: resume equals the uninterrupted run, no silent loss of work, bad input refused
before work starts, artifacts checked on load (docs/reliability.md)."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from cause_lightning.artifacts import ArtifactError, load_artifact, save_artifact
from cause_lightning.config import validate
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


def fail_at(step: int, kill: bool = False) -> list[str]:
    return [
        "+callbacks.fault._target_=faults.FailAtStep",
        f"+callbacks.fault.step={step}",
        f"+callbacks.fault.kill={str(kill).lower()}",
    ]


def ckpt_dir(tmp_path: Path, step: str, tag: str = "") -> Path:
    leaf = f"tiny_vit-{tag}" if tag else "tiny_vit"
    root = tmp_path / "artifacts" / "mosaic" / leaf
    return (root if step == "mediator" else root / "tr") / "checkpoints" / step


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
    root = tmp_path / "artifacts" / "mosaic"
    a = load_artifact(root / "tiny_vit-a" / "clusterbook.pt", "clusterbook", "mediator")
    b = load_artifact(root / "tiny_vit-b" / "clusterbook.pt", "clusterbook", "mediator")
    assert (a["clusterbook"] - b["clusterbook"]).abs().max() <= 1e-6


def test_ckpt_path_last_takes_the_newest_checkpoint_and_says_which(
    tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run(tiny("stage=mediator", *SMALL, "method.mediator.epochs=1", base=BASE))
    folder = ckpt_dir(tmp_path, "mediator")
    finished = folder / "last.ckpt"
    shutil.copy2(finished, tmp_path / "finished.ckpt")
    # A new run of the stage is interrupted after step 6; its checkpoint has another name.
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
    run(tiny("stage=mediator"))
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
    differ = r"another configuration: .*method\.mediator\.lr: 0\.004 in the checkpoint, 0\.001 now"
    with pytest.raises(ValueError, match=differ):
        run(tiny("stage=mediator", *SMALL, "ckpt_path=last", "method.mediator.lr=1e-3", base=BASE))
    with pytest.raises(ValueError, match=r"data\.module\.num_train"):
        run(tiny("stage=mediator", *SMALL, "ckpt_path=last", "data.module.num_train=6", base=BASE))
    # More epochs of the same configuration is a resume, not another configuration.
    run(tiny("stage=mediator", *SMALL, "ckpt_path=last", base=BASE))


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


# Checkpoints at steps 3 and 6 (every 3) and 4 and 8 (epoch ends): the mediator and head resume
# mid-epoch from step 6 and redo step 7, the probe resumes from the end of epoch 1.
KILLED_AT = {"mediator": 7, "head": 7, "probe": 5}
OUTPUT = {"mediator": "clusterbook", "head": "head", "probe": "probe"}


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkilled_stages_resume_to_the_uninterrupted_result(
    shared_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_cli import cli as run_cli

    # The subprocesses import the fault callbacks from this folder.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )

    def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, cwd=cwd, check=False)

    common = [
        *TINY_DATA,
        "method.num_concepts=32",
        "trainer.enable_progress_bar=false",
        f"data.module.root={shared_data_dir / 'mosaic'}",
        *SMALL,
        EVERY_3,
    ]
    tree = tmp_path / "artifacts" / "mosaic"
    differences: dict[str, float] = {}
    for step, kill in KILLED_AT.items():
        done = cli(f"stage={step}", "artifact_tag=a", *common, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        killed = cli(f"stage={step}", "artifact_tag=b", *common, *fail_at(kill, True), cwd=tmp_path)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        resumed = cli(f"stage={step}", "artifact_tag=b", *common, "ckpt_path=last", cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resuming" in resumed.stderr + resumed.stdout
        name = f"{OUTPUT[step]}.pt" if step == "mediator" else f"tr/{OUTPUT[step]}.pt"
        a = load_artifact(tree / "tiny_vit-a" / name, OUTPUT[step], step)
        b = load_artifact(tree / "tiny_vit-b" / name, OUTPUT[step], step)
        differences[step] = _max_difference(a, b)
        # The next stage starts from the same input in both folders.
        shutil.copy2(tree / "tiny_vit-a" / name, tree / "tiny_vit-b" / name)
    assert all(d <= 1e-6 for d in differences.values()), differences


def _max_difference(a: object, b: object) -> float:
    if isinstance(a, torch.Tensor):
        return float((a.double() - b.double()).abs().max())  # type: ignore[union-attr]
    if isinstance(a, dict):
        keys = [k for k in a if k not in ("meta", "checksum")]
        return max([_max_difference(a[k], b[k]) for k in keys], default=0.0)  # type: ignore[index]
    return 0.0
