"""GPU measurements of CAUSE through the real training loop, and the projected wall time of the
COCO-Stuff-27 ViT-B/8 TR schedules: the published-row preset and the default.

Run through ``benchmarks/gpu.sh``. Every line starts with its section:

* ``[data]``: a synthetic COCO-sized crop set written to disk: photos that scikit-image ships,
  resized to COCO's 640 x 480, cut by the protocol's crop recipe (five crops at 0.5) and saved as
  JPEG with class-id masks, read by ``data=folder``;
* ``[stage]``: each stage run as users run it, ``cause_lightning.run.run(cfg)`` on a composed
  config with ``trainer=gpu`` (16-mixed and its gradient scaler), the stage's clipping, the
  ``callbacks`` group (checkpoint, progress bar) and the loaders' workers, timed from inside its
  loop by :class:`step_timer.StepTimer`: step time, its ratio to the backbone forward on the same
  batches, FLOPs and achieved TFLOP/s, validation, checkpoint write, start-up;
* ``[eval]``: the evaluation's forward pass and k-means pass per image (a real ``stage=eval``
  without its CRF variants), and one image's DenseCRFs on one lattice on one CPU process, on
  scikit-image's photos (``bench_crf.real_photo_crf_seconds``);
* ``[projection]``: the wall time of the preset's and the default's full schedule, evaluation
  included, from those figures, with the arithmetic;
* ``[features]``: bf16 feature extraction, eager and ``torch.compile``.

The head stage's concept bank is filled to capacity before its second step (the steady state of a
long run; ``StepTimer(fill_bank=True)``). Random weights throughout: nothing is downloaded.
``--tiny`` runs every section at toy sizes on whatever device is there (the test suite runs it on
the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch  # noqa: F401 - sets its loggers' levels on import, before main() does
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cause_lightning.models import build_backbone

PRESET = "cocostuff27_dino_vitb8_tr"
STAGES = ("mediator", "head", "probe")
# Settings of a stage that change how long it takes, not what one step costs.
SCHEDULE_KEYS = {"epochs", "lr", "cluster_lr"}
# scikit-image's own colour photos: real-photo statistics for the JPEG decoder.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


@dataclass(frozen=True)
class Sizes:
    """One mode's sizes: the measured runs and the feature section."""

    backbone: str
    photo: tuple[int, int]  # H W of the generated photos (COCO's 480 x 640)
    warmup: int  # training steps before the sample
    steps: int  # sampled training steps per stage
    val_batches: int  # validation batches of the head and probe stages
    test_batches: int  # evaluation batches
    crf_size: int
    overrides: tuple[str, ...] = ()
    feature_backbones: tuple[str, ...] = ("dino_vits16", "dino_vits8", "dino_vitb8")
    feature_resolution: int = 320
    feature_batch: int = 64
    iters: int = 10


FULL = Sizes(
    backbone="dino_vitb8", photo=(480, 640), warmup=10, steps=50, val_batches=4, test_batches=10,
    crf_size=320,
)  # fmt: skip
TINY = Sizes(
    backbone="tiny_vit", photo=(96, 128), warmup=2, steps=3, val_batches=2, test_batches=2,
    crf_size=64, feature_backbones=("tiny_vit",), feature_resolution=64, feature_batch=2, iters=2,
    overrides=(
        "data.recipe.resolution.test=64", "method.num_concepts=32",
        "method.head.projection_dim=32", "method.mediator.batch_size=4", "method.head.batch_size=4",
        "method.probe.batch_size=4", "method.eval.batch_size=4", "method.eval.save_images=2",
    ),
)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------


class Composer:
    """Composes the project's config as the command line does, every path under ``work``."""

    def __init__(self, work: Path) -> None:
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from cause_lightning.config import config_dir

        GlobalHydra.instance().clear()
        initialize_config_dir(config_dir=config_dir(), version_base="1.3")
        self.work = work

    def __call__(self, *overrides: str, name: str = "compose") -> DictConfig:
        from hydra import compose
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import open_dict

        paths = [
            f"paths.root_dir={self.work}",
            f"paths.data_dir={self.work / 'data'}",
            f"paths.output_dir={self.work / 'out' / name}",
        ]
        cfg = compose("config", overrides=[*paths, *overrides], return_hydra_config=True)
        HydraConfig().set_config(cfg)  # `hydra:` interpolations resolve, as under the CLI
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg


def schedules(trainer: str) -> dict[str, list[str]]:
    """The two projected configurations: the published-row preset and the default."""
    default = ["data=cocostuff27", "backbone=dino_vitb8", "head=tr"]
    return {
        f"published-row preset (experiment={PRESET})": [
            f"experiment={PRESET}",
            f"trainer={trainer}",
        ],
        f"default schedule ({' '.join(default)})": [*default, f"trainer={trainer}"],
    }


def step_settings(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """What decides the cost of one step of a stage: its settings less the schedule keys."""
    plain = OmegaConf.to_container(cfg.method[stage], resolve=True)
    assert isinstance(plain, dict)
    return {k: v for k, v in plain.items() if k not in SCHEDULE_KEYS}


# --------------------------------------------------------------------------------------------------
# the synthetic crop set
# --------------------------------------------------------------------------------------------------


@functools.cache
def _source(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()  # H W 3 uint8


def _photo(rng: np.random.Generator, size: tuple[int, int]) -> Any:
    from PIL import Image

    source = _source(PHOTOS[int(rng.integers(len(PHOTOS)))])  # H W 3
    height, width = source.shape[:2]
    scale = rng.uniform(0.6, 1.0)  # a random window of the photo, so that no two are alike
    h, w = int(height * scale), int(width * scale)
    top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
    photo = Image.fromarray(source[top : top + h, left : left + w])
    if rng.random() < 0.5:
        photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return photo.resize(size[::-1], Image.Resampling.BILINEAR)


def _mask(rng: np.random.Generator, size: tuple[int, int], classes: int) -> np.ndarray:
    from PIL import Image

    coarse = rng.integers(0, classes, (12, 16), dtype=np.uint8)
    coarse[rng.random((12, 16)) < 0.1] = 255  # some unlabelled regions, as in COCO-Stuff
    return np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.Resampling.NEAREST))


def write_crop_set(root: Path, crops: int, val: int, size: tuple[int, int], classes: int) -> str:
    """``data=folder`` files: ``crops`` training crops and ``val`` whole validation photos.

    Training crops are cut from photos of ``size`` by COCO-Stuff-27's crop recipe and saved as the
    crop writer saves them (JPEG, class-id PNG masks); validation photos stay whole.

    Returns:
        The recipe, in words.
    """
    from PIL import Image

    from cause_lightning.data.cocostuff import CocoStuff27DataModule
    from cause_lightning.data.crops.recipes import get_recipe, make_crops

    recipe = get_recipe(CocoStuff27DataModule.default_crops)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
    written = 0
    while written < crops:
        photo, mask = _photo(rng, size), _mask(rng, size, classes)
        for image, label in make_crops(photo, mask, recipe):
            if written < crops:
                image.save(root / "images" / "train" / f"{written:06d}.jpg", format="JPEG")
                Image.fromarray(label).save(root / "masks" / "train" / f"{written:06d}.png")
                written += 1
    for index in range(val):
        _photo(rng, size).save(root / "images" / "val" / f"{index:06d}.jpg", format="JPEG")
        Image.fromarray(_mask(rng, size, classes)).save(root / "masks" / "val" / f"{index:06d}.png")
    return f"{recipe.crops_per_image} crops per photo at {', '.join(map(str, recipe.ratios))}"


# --------------------------------------------------------------------------------------------------
# measured runs
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """A measured ``run(cfg)`` and what its :class:`step_timer.StepTimer` recorded."""

    label: str
    stage: str
    record: dict[str, Any]
    wall_s: float  # the whole run(cfg), building the backbone and writing artifacts included

    def sample(self) -> list[dict[str, Any]]:
        """The training steps after the warm-up."""
        return self.record["train"][self.record["warmup"] :]

    @property
    def step_s(self) -> float:
        """Mean seconds of a sampled training step: the rate of a long run."""
        return statistics.fmean(s["seconds"] for s in self.sample())

    @property
    def median_s(self) -> float:
        return statistics.median(s["seconds"] for s in self.sample())

    @property
    def backbone_s(self) -> float:
        return statistics.fmean(s["backbone_s"] for s in self.sample())

    @property
    def images(self) -> int:
        return int(self.sample()[0]["images"])

    @property
    def fixed_s(self) -> float:
        """Start-up (up to the end of the first step, less one step) and the end after the last
        epoch."""
        return max(0.0, self.record["first_step_end_s"] - self.step_s) + self.record["end_s"]

    @property
    def epoch_end_s(self) -> float:
        return float(self.record["epoch_end_s"][0])

    def val_batch_s(self) -> float | None:
        """Mean seconds of a validation batch (the first of each pass left out), if any."""
        batches = [b for loop in self.record["validate"] for b in _steady(loop["batches"])]
        return statistics.fmean(batches) if batches else None

    def test_pass(self, index: int) -> tuple[float, float]:
        """``(seconds per image, fixed seconds)`` of the evaluation's ``index``-th test pass."""
        loop = self.record["test"][index]
        batches = loop["batches"]
        per_batch = statistics.fmean(_steady(batches))
        per_image = per_batch / statistics.fmean(_steady(loop["images"]))
        # Outside the batches (start-up, the k-means fit at the end), and the first one's excess.
        fixed = loop["wall_s"] - sum(batches) + max(0.0, batches[0] - per_batch)
        return per_image, fixed


def _steady(values: list[Any]) -> list[Any]:
    """The values after the first (which starts the loop's workers), or all when alone."""
    return values[1:] or values


@contextlib.contextmanager
def _captured(log_file: Path) -> Iterator[None]:
    """Send a run's prints, warnings and progress bar to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with (
        log_file.open("w") as stream,
        contextlib.redirect_stdout(stream),
        contextlib.redirect_stderr(stream),
    ):
        yield


def measure(
    compose: Composer, label: str, stage: str, overrides: list[str], sizes: Sizes, work: Path
) -> Run:
    """Run one stage through ``run(cfg)`` with the step timer, and read what it recorded."""
    from cause_lightning.run import run

    name = label.replace(" ", "_").replace(",", "")
    timing = work / "timing" / f"{name}.json"
    timer = [
        "+callbacks.step_timer._target_=step_timer.StepTimer",
        f"+callbacks.step_timer.path={timing}",
        f"+callbacks.step_timer.warmup={sizes.warmup}",
        f"+callbacks.step_timer.fill_bank={str(stage == 'head').lower()}",
    ]
    cfg = compose(f"stage={stage}", *overrides, *timer, name=name)
    log_file = work / "logs" / f"{name}.log"
    start = time.perf_counter()
    try:
        with _captured(log_file):
            run(cfg)
    except Exception:
        tail = log_file.read_text().splitlines()[-15:] if log_file.is_file() else []
        for line in tail:
            print(f"[stage] {label}: | {line}", flush=True)
        raise
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return Run(label, stage, json.loads(timing.read_text()), time.perf_counter() - start)


def _gib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def report_training(run: Run) -> None:
    step, backbone = run.step_s, run.backbone_s
    flops, backbone_flops = run.record.get("step_flops", 0), run.record.get("backbone_flops", 0)
    print(
        f"[stage] {run.label}: step {step * 1e3:.1f} ms (median {run.median_s * 1e3:.1f}, "
        f"{len(run.sample())} steps of {run.images} images), backbone forward on the same "
        f"batches {backbone * 1e3:.1f} ms: {step / backbone:.2f}x the backbone; "
        f"{flops / 1e12:.3g} TFLOP per step = {flops / step / 1e12:.3g} TFLOP/s achieved "
        f"(backbone {backbone_flops / 1e12:.3g} TFLOP = {backbone_flops / backbone / 1e12:.3g} "
        f"TFLOP/s); peak memory {_gib(run.record.get('peak_memory_bytes'))}",
        flush=True,
    )
    val = run.val_batch_s()
    print(
        f"[stage] {run.label}: "
        + (f"validation {val * 1e3:.1f} ms per batch; " if val is not None else "")
        + f"epoch end (checkpoint write) {run.epoch_end_s:.2f} s; start-up and end "
        f"{run.fixed_s:.1f} s; run(cfg) {run.wall_s:.1f} s in all",
        flush=True,
    )


def report_eval(run: Run) -> None:
    names = ("forward pass (raw + flip)", "k-means baselines' pass")
    for index, loop in enumerate(run.record["test"]):
        per_image, fixed = run.test_pass(index)
        print(
            f"[eval] {names[index]}: {per_image * 1e3:.2f} ms per image, {fixed:.1f} s fixed "
            f"(start-up, k-means fit), peak memory {_gib(loop.get('peak_memory_bytes'))}"
            + (f"; run(cfg) {run.wall_s:.1f} s in all" if index else ""),
            flush=True,
        )


# --------------------------------------------------------------------------------------------------
# evaluation CRF
# --------------------------------------------------------------------------------------------------


def crf_image_seconds(size: int, classes: int, iterations: int, calls: int) -> float | None:
    """One CPU process's seconds per evaluated image on the CRF (``None`` without pydensecrf or
    without CRF variants):
    its ``calls`` CRFs on one lattice, as the evaluation runs them, on the photos scikit-image
    ships (``bench_crf.real_photo_crf_seconds``)."""
    from cause_lightning.inference.crf import crf_available

    if not crf_available() or calls == 0:
        return None
    import bench_crf

    return bench_crf.real_photo_crf_seconds(size, classes, iterations, crfs=calls)


def crf_calls_per_image(eval_cfg: DictConfig) -> int:
    """CRFs per evaluated image: one per cluster CRF variant, plus the linear probe's
    (``method.eval.linear_crf``), as :class:`~cause_lightning.modules.evaluate.EvalModule` runs
    them."""
    cluster = sum("crf" in variant for variant in eval_cfg.variants)
    return cluster + int(bool(eval_cfg.linear_crf) and cluster > 0)


def crf_processes(eval_cfg: DictConfig) -> int | None:
    """The CRF processes of a one-GPU evaluation on this machine, by the stage's own rule."""
    from cause_lightning.inference.crf import stage_crf_runner

    runner = stage_crf_runner(eval_cfg, 1)  # the pool starts on first use: nothing runs here
    if runner is None:
        return None
    workers = int(runner.num_workers)
    runner.close()
    return workers


# --------------------------------------------------------------------------------------------------
# projection
# --------------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def coco_counts(cfg: DictConfig) -> tuple[int, int]:
    """Training crops and validation images of the configured COCO-Stuff data (published counts
    of its lists, the crops its recipe cuts per image)."""
    from cause_lightning.data.cocostuff import COCO_LIST_COUNTS

    data = instantiate(cfg.data.module, train_res=320, test_res=320, batch_size=1, seed=0)
    images = COCO_LIST_COUNTS[("train2017", data.train_list)]
    return images * data.recipe.crops_per_image, COCO_LIST_COUNTS[("val2017", data.val_list)]


def steps_per_epoch(cfg: DictConfig, crops: int, batch_size: int) -> int:
    """Optimiser steps of one epoch by the training sampler's own rule (one process)."""
    from cause_lightning.data.base import ResumableSampler

    method = cfg.method
    replicas = int(method.reference_world_size) if method.reference_schedule else 1
    return math.ceil(len(ResumableSampler(crops, True, 0, replicas=replicas)) / batch_size)


def project(
    title: str, cfg: DictConfig, runs: dict[str, Run], crf: float | None, crf_workers: int | None
) -> float:
    """Print the projected wall time of one configuration's full schedule; return it (s)."""
    crops, val_images = coco_counts(cfg)
    print(f"[projection] {title}: {crops:,} training crops, {val_images:,} evaluation images")
    total = 0.0
    callbacks = cfg.get("callbacks") or {}
    interval = (callbacks.get("stage_checkpoint") or {}).get("train_time_interval")
    for stage in STAGES:
        run = runs[stage]
        stage_cfg = cfg.method[stage]
        epochs, batch = int(stage_cfg.epochs), int(stage_cfg.batch_size)
        steps = steps_per_epoch(cfg, crops, batch)
        train = epochs * steps * run.step_s
        parts = [f"{epochs} x {steps:,} steps x {run.step_s * 1e3:.1f} ms = {_duration(train)}"]
        seconds = train
        val = run.val_batch_s()
        if val is not None:
            batches = math.ceil(val_images / batch)
            seconds += epochs * batches * val
            parts.append(
                f"validation {epochs} x {batches} batches x {val * 1e3:.1f} ms = "
                f"{_duration(epochs * batches * val)}"
            )
        writes = epochs + (int(train // float(interval)) if interval else 0)
        seconds += writes * run.epoch_end_s + run.fixed_s
        parts.append(f"checkpoints {writes} x {run.epoch_end_s:.2f} s")
        parts.append(f"start-up and end {run.fixed_s:.1f} s")
        total += seconds
        print(f"[projection]   {stage:<8} {'; '.join(parts)}: {_duration(seconds)}")
    eval_cfg, evaluation = cfg.method.eval, runs["eval"]
    forward_image, forward_fixed = evaluation.test_pass(0)
    forward = val_images * forward_image + forward_fixed
    line = f"forward pass {val_images:,} x {forward_image * 1e3:.2f} ms + {forward_fixed:.1f} s"
    busy = forward
    if crf is not None and crf_workers:
        crf_total = val_images * crf / crf_workers
        line += (
            f"; CRF {val_images:,} x {crf:.3f} s ({crf_calls_per_image(eval_cfg)} CRFs per "
            f"image on one lattice, real photos) / {crf_workers} processes = "
            f"{_duration(crf_total)}, beside it"
        )
        busy = max(forward, crf_total)  # the loop goes on while the pool refines earlier batches
    else:
        line += "; no CRF (no CRF variant, or pydensecrf missing)"
    seconds = busy
    if eval_cfg.baselines and len(evaluation.record["test"]) > 1:
        kmeans_image, kmeans_fixed = evaluation.test_pass(1)
        kmeans = val_images * kmeans_image + kmeans_fixed
        seconds += kmeans
        line += (
            f"; k-means pass {val_images:,} x {kmeans_image * 1e3:.2f} ms + {kmeans_fixed:.1f} s"
        )
    total += seconds
    print(f"[projection]   eval     {line}: {_duration(seconds)}")
    print(f"[projection]   TOTAL {_duration(total)}", flush=True)
    return total


# --------------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def features(sizes: Sizes, device: torch.device) -> None:
    for name in sizes.feature_backbones:
        backbone = build_backbone(name).to(device)
        size = sizes.feature_resolution
        images = torch.randn(sizes.feature_batch, 3, size, size, device=device)
        for compiled in (False, True):
            # On the CPU (tiny mode) dynamo traces without inductor's minutes-long C++ build.
            backend = "inductor" if device.type == "cuda" else "eager"
            model = torch.compile(backbone, backend=backend) if compiled else backbone
            label = f"compile/{backend}" if compiled else "eager"

            def forward(model: Any = model, images: torch.Tensor = images) -> None:
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
                    model(images)

            try:
                start = time.perf_counter()
                forward()  # compiles on the first call
                first = time.perf_counter() - start
                seconds = timed(forward, device, 1, sizes.iters)
                print(
                    f"[features] {name} @{size} bf16 {label:<13} batch {sizes.feature_batch}: "
                    f"{sizes.feature_batch / seconds:9.1f} img/s (first call {first:.1f} s)",
                    flush=True,
                )
            except Exception as err:  # noqa: BLE001 - report and go on with the next case
                print(f"[features] {name} {label}: FAILED {type(err).__name__}: {err}", flush=True)
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def stages(sizes: Sizes, device: torch.device, work: Path) -> bool:
    """Measure every stage through ``run(cfg)`` and print the projections; False on a failure."""
    compose = Composer(work)
    trainer = "gpu" if device.type == "cuda" else "cpu"
    configs = {title: compose(*o) for title, o in schedules(trainer).items()}
    (preset_title, preset), (default_title, default) = configs.items()
    common = [
        "data=folder", f"data.num_classes={int(preset.data.num_classes)}",
        f"backbone={sizes.backbone}", "head=tr", f"trainer={trainer}",
        f"+trainer.limit_train_batches={sizes.warmup + sizes.steps}",
        f"+trainer.limit_val_batches={sizes.val_batches}",
        f"+trainer.limit_test_batches={sizes.test_batches}",
        *(f"method.{stage}.epochs=1" for stage in STAGES),
        # Its CRF is measured on its own (crf_seconds); the k-means pass stays.
        "method.eval.variants=[raw,flip]",
        *sizes.overrides,
    ]  # fmt: skip
    # The preset as measured: its settings, but one epoch of the whole (small) crop set.
    as_preset = [f"experiment={PRESET}", *common, "method.reference_schedule=false"]
    measured = compose(*as_preset)
    batch = max(int(measured.method[stage].batch_size) for stage in STAGES)
    crops = (sizes.warmup + sizes.steps) * batch
    val = max(sizes.val_batches * batch, sizes.test_batches * int(measured.method.eval.batch_size))
    start = time.perf_counter()
    classes = int(preset.data.num_classes)
    recipe = write_crop_set(work / "data" / "folder", crops, val, sizes.photo, classes)
    workers = instantiate(measured.data.module, train_res=1, test_res=1, batch_size=1).workers()
    print(
        f"[data] {crops} training crops ({sizes.photo[1]}x{sizes.photo[0]} photos, {recipe}, "
        f"JPEG) and {val} validation photos, with masks, written in "
        f"{time.perf_counter() - start:.1f} s; {workers} loader workers per loader (the data "
        "config's rule)",
        flush=True,
    )
    # A stage is measured once when both configurations give its steps the same settings.
    runs: dict[str, dict[str, Run]] = {preset_title: {}, default_title: {}}
    try:
        for stage in (*STAGES, "eval"):
            shared = step_settings(preset, stage) == step_settings(default, stage)
            wanted = [(preset_title, as_preset)]
            if not shared:  # the preset last: the next stage reads its artifact
                wanted.insert(0, (default_title, common))
            for title, overrides in wanted:
                label = stage if shared else f"{stage}, {title.split(' (')[0]}"
                run = measure(compose, label, stage, overrides, sizes, work)
                for key in runs if shared else (title,):
                    runs[key][stage] = run
                if stage == "eval":
                    report_eval(run)
                else:
                    report_training(run)
    except Exception as err:  # noqa: BLE001 - the later stages need this one's artifact
        print(f"[stage] FAILED {type(err).__name__}: {err}", flush=True)
        traceback.print_exc()
        return False
    eval_cfg = preset.method.eval
    calls = crf_calls_per_image(eval_cfg)
    crf = crf_image_seconds(
        sizes.crf_size, int(preset.data.num_classes), int(eval_cfg.crf_iterations), calls
    )
    workers = crf_processes(eval_cfg)
    if crf is None:
        print("[eval] DenseCRF: not run (no CRF variant, or pydensecrf missing)", flush=True)
    else:
        print(
            f"[eval] DenseCRF {sizes.crf_size}px, {int(preset.data.num_classes)} classes, "
            f"{int(eval_cfg.crf_iterations)} iterations, {calls} CRFs per image on one lattice, "
            f"real photos (bench_crf.py), one CPU process: {crf:.3f} s per image; "
            f"CRF processes of a one-GPU evaluation on this machine: {workers}",
            flush=True,
        )
    for title, cfg in configs.items():
        project(title, cfg, runs[title], crf, workers)
    return True


def main(argv: list[str] | None = None) -> int:
    """Run the sections and print their lines.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The exit status: 0 when every section ran.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes, any device")
    parser.add_argument("--skip", default="", help="comma list of: stages,features")
    args = parser.parse_args(argv)
    skip = {part for part in args.skip.split(",") if part}
    unknown = skip - {"stages", "features"}
    if unknown:
        parser.error(f"--skip takes stages and features, got {sorted(unknown)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        parser.error("the full sizes need a CUDA GPU; use --tiny to run every section on a CPU")
    sizes = TINY if args.tiny else FULL
    for name in ("cause_lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # the random-weights warning, the banner
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"[setup] device {name}, torch {torch.__version__}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, {'tiny' if args.tiny else 'full'} mode",
        flush=True,
    )
    ok = True
    if "stages" not in skip:  # first: the projection matters most if time runs out
        with tempfile.TemporaryDirectory(prefix="cause-gpu-bench-") as work:
            ok = stages(sizes, device, Path(work))
    if "features" not in skip:
        features(sizes, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
