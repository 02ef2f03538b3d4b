"""GPU measurements of CAUSE and the projected wall time of the full COCO-Stuff-27 schedule.

Run through ``benchmarks/gpu.sh``. Sections (each line starts with its label in brackets):

* ``[features]``: bf16 feature extraction, images/s, ViT-S/16, ViT-S/8 and ViT-B/8 at 320, eager
  and ``torch.compile``;
* ``[steps]``: one training step of each stage (backbone included, bf16 autocast, bf16 products)
  for ViT-B/8 TR at the reference shapes; the head step with the full bank of 204,800 entries,
  ms per step and peak GPU memory;
* ``[eval]``: per image, the forward with its flip on the GPU and, on one CPU process, its three
  DenseCRFs on one lattice, timed on scikit-image's photos (``bench_crf.real_photo_crf_seconds``);
* ``[projection]``: the full schedule's wall time from those figures.

Random weights throughout: nothing is downloaded. ``--tiny`` runs every section at toy sizes on
whatever device is there (the test suite runs it on the CPU).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from cause_lightning.crf import default_crf_workers
from cause_lightning.models import ConceptBank, LinearProbe, TRHead, build_backbone
from cause_lightning.modules.head import HeadModule
from cause_lightning.modules.mediator import MediatorModule
from cause_lightning.modules.probe import ProbeModule

# The full COCO-Stuff-27 schedule (docs/protocol.md, conf/method/cause.yaml).
CROPS = 488_510
VAL_IMAGES = 2_175
EPOCHS = {"mediator": 1, "head": 2, "probe": 5}


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


def _peak_gib(device: torch.device) -> float:
    return (
        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    )


def _autocast(device: torch.device) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16)


def features(args: argparse.Namespace, device: torch.device) -> None:
    for name in args.backbones:
        backbone = build_backbone(name).to(device)
        images = torch.randn(args.feature_batch, 3, args.resolution, args.resolution, device=device)
        for compiled in (False, True):
            # On the CPU (tiny mode) dynamo traces without inductor's minutes-long C++ build.
            backend = "inductor" if device.type == "cuda" else "eager"
            model = torch.compile(backbone, backend=backend) if compiled else backbone
            label = f"compile/{backend}" if compiled else "eager"

            def forward(model: Any = model, images: torch.Tensor = images) -> None:
                with torch.inference_mode(), _autocast(device):
                    model(images)

            try:
                start = time.perf_counter()
                forward()  # compiles on the first call
                first = time.perf_counter() - start
                seconds = timed(forward, device, 1, args.iters)
                print(
                    f"[features] {name} @{args.resolution} bf16 {label:<13} batch "
                    f"{args.feature_batch}: {args.feature_batch / seconds:9.1f} img/s "
                    f"(first call {first:.1f} s)",
                    flush=True,
                )
            except Exception as err:  # noqa: BLE001 - report and go on with the next case
                print(f"[features] {name} {label}: FAILED {type(err).__name__}: {err}", flush=True)
        del backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _step(module: Any, batch: dict[str, torch.Tensor], optimizer: Any, device: Any) -> None:
    with _autocast(device):
        loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if isinstance(module, HeadModule):
        module.on_train_batch_end(None, batch, 0)


def _optimizer(module: Any) -> torch.optim.Optimizer:
    config = module.configure_optimizers()
    return config["optimizer"] if isinstance(config, dict) else config


def steps(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    torch.manual_seed(0)
    backbone = build_backbone(args.step_backbone).to(device)
    size = args.resolution
    batch = {
        "image": torch.randn(args.batch, 3, size, size, device=device),
        "label": torch.randint(0, args.classes, (args.batch, size, size), device=device),
    }
    dim = int(backbone.embed_dim)
    grid = size // int(backbone.patch_size)
    clusterbook = torch.randn(args.concepts, dim, device=device)
    capacity = args.bank // args.concepts
    head_factory = functools.partial(TRHead, reduced_dim=args.reduced, dropout=0.1)
    results: dict[str, float] = {}

    def backbone_only() -> None:
        with torch.inference_mode(), _autocast(device):
            backbone(batch["image"])

    seconds = timed(backbone_only, device, 2, args.iters)
    results["backbone"] = seconds
    print(
        f"[steps] {args.step_backbone} forward alone, batch {args.batch}: "
        f"{seconds * 1e3:8.1f} ms/step",
        flush=True,
    )

    def build(stage: str) -> Any:
        if stage == "mediator":
            return MediatorModule(backbone, num_concepts=args.concepts)
        if stage == "head":
            module = HeadModule(
                backbone,
                head_factory,
                clusterbook,
                num_classes=args.classes,
                head_type="tr",
                num_queries=grid * grid,
                projection_dim=args.projection,
                bank_capacity=capacity,
                debug_checks=False,
            )
            # bf16 products and a bf16 bank, as under trainer.precision=bf16-mixed.
            module._matmul_dtype = lambda: torch.bfloat16  # type: ignore[method-assign]
            return module
        head = TRHead(
            dim, reduced_dim=args.reduced, num_queries=grid * grid, clusterbook=clusterbook
        )
        return ProbeModule(
            backbone, head, LinearProbe(args.reduced, args.classes), num_classes=args.classes
        )

    for stage in ("mediator", "head", "probe"):
        try:
            module = build(stage).to(device)
            module.train()
            if stage == "head":
                fill_bank(module.bank, capacity, device, torch.bfloat16)
            optimizer = _optimizer(module)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(
                functools.partial(_step, module, batch, optimizer, device), device, 2, args.iters
            )
            results[stage] = seconds
            extra = f", bank {len(module.bank)} entries bf16" if stage == "head" else ""
            print(
                f"[steps] {stage:<8} step, batch {args.batch}{extra}: {seconds * 1e3:8.1f} "
                f"ms/step, {args.batch / seconds:8.1f} img/s, peak GPU memory "
                f"{_peak_gib(device):.2f} GiB",
                flush=True,
            )
            del module, optimizer
        except Exception as err:  # noqa: BLE001
            print(f"[steps] {stage}: FAILED {type(err).__name__}: {err}", flush=True)
    results.update(eval_figures(args, device, backbone, clusterbook))
    return results


def fill_bank(bank: ConceptBank, capacity: int, device: torch.device, dtype: torch.dtype) -> None:
    """Every slot used: ``2 * capacity`` normalised entries per concept, half kept."""
    concepts = torch.arange(bank.num_concepts, device=device).repeat_interleave(2 * capacity)
    for part in range(0, concepts.shape[0], 65536):
        ids = concepts[part : part + 65536]
        entries = F.normalize(torch.randn(ids.shape[0], bank.dim, device=device), dim=-1)
        bank.update(ids, entries.to(dtype), validate=False)


def eval_figures(
    args: argparse.Namespace, device: torch.device, backbone: Any, clusterbook: torch.Tensor
) -> dict[str, float]:
    size = args.resolution
    grid = size // int(backbone.patch_size)
    head = (
        TRHead(
            int(backbone.embed_dim),
            reduced_dim=args.reduced,
            num_queries=grid * grid,
            clusterbook=clusterbook,
        )
        .to(device)
        .eval()
    )
    centroids = F.normalize(torch.randn(args.classes, args.reduced, device=device), dim=-1)
    images = torch.randn(args.eval_batch, 3, size, size, device=device)

    def forward_flip() -> None:
        with torch.inference_mode():
            for view in (images, images.flip(-1)):
                with _autocast(device):
                    segment = head(backbone(view))  # B R h w
                cos = torch.einsum("brhw,cr->bchw", F.normalize(segment.float(), dim=1), centroids)
                F.interpolate(cos, size=(size, size), mode="bilinear").argmax(1).cpu()

    per_image = timed(forward_flip, device, 1, args.iters) / args.eval_batch
    print(f"[eval] forward + flip on {device.type}: {per_image * 1e3:8.2f} ms/image", flush=True)
    out = {"eval_forward": per_image}
    from bench_crf import CRFS_PER_IMAGE, real_photo_crf_seconds

    from cause_lightning.crf import crf_available

    if crf_available():
        crf = real_photo_crf_seconds(size, args.classes)
        print(
            f"[eval] DenseCRF {size}px real photos, {args.classes} classes, 10 iterations, "
            f"{CRFS_PER_IMAGE} CRFs per image on one lattice, one CPU process: {crf:.3f} s/image",
            flush=True,
        )
        out["crf_image"] = crf
    else:
        print("[eval] DenseCRF: pydensecrf2 missing, CRF left out of the projection", flush=True)
    return out


def projection(figures: dict[str, float], args: argparse.Namespace) -> None:
    steps_per_epoch = -(-CROPS // args.schedule_batch)
    scale = args.schedule_batch / args.batch  # figures measured at --batch
    total = 0.0
    print(
        f"[projection] COCO-Stuff-27 {args.step_backbone} TR, {CROPS:,} crops, batch "
        f"{args.schedule_batch}: {steps_per_epoch:,} steps per epoch"
        + (f" (per-step figures measured at batch {args.batch}, scaled)" if scale != 1 else "")
    )
    for stage, epochs in EPOCHS.items():
        if stage not in figures:
            print(f"[projection] {stage}: no measurement, left out")
            continue
        seconds = figures[stage] * scale * steps_per_epoch * epochs
        total += seconds
        print(f"[projection] {stage:<8} {epochs} epoch(s): {seconds / 3600:7.2f} h")
    workers = args.crf_processes or default_crf_workers()  # the eval's default pool
    if "eval_forward" in figures:
        forward = figures["eval_forward"] * VAL_IMAGES
        crf = figures.get("crf_image", 0.0) * VAL_IMAGES
        # The CRF runs on the CPU beside the GPU forward: the slower of the two sets the pace.
        overlapped = max(forward, crf / workers)
        total += overlapped
        print(
            f"[projection] eval {VAL_IMAGES:,} images: forward {forward / 60:.1f} min, CRF "
            f"(real photos, one lattice per image) {crf / 3600:.2f} h in one process, "
            f"{crf / workers / 60:.1f} min over {workers} worker processes; eval "
            f"{overlapped / 60:.1f} min with the CRF overlapped"
        )
    print(f"[projection] TOTAL full schedule on this machine: {total / 3600:.2f} h", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run the sections and print their lines.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes, any device")
    parser.add_argument("--skip", default="", help="comma list of: features,steps")
    args = parser.parse_args(argv)
    logging.getLogger("cause_lightning").setLevel(logging.ERROR)  # random-weights warning
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = dict(
        backbones=["dino_vits16", "dino_vits8", "dino_vitb8"],
        step_backbone="dino_vitb8",
        resolution=320,
        feature_batch=64,
        batch=16,
        schedule_batch=16,
        eval_batch=8,
        concepts=2048,
        bank=204_800,
        projection=2048,
        reduced=90,
        classes=27,
        iters=10,
        crf_processes=None,
    )
    tiny = dict(
        full,
        backbones=["tiny_vit"],
        step_backbone="tiny_vit",
        resolution=64,
        feature_batch=2,
        batch=2,
        eval_batch=2,
        concepts=32,
        bank=128,
        projection=32,
        reduced=16,
        iters=2,
    )
    for key, value in (tiny if args.tiny else full).items():
        setattr(args, key, value)
    skip = set(args.skip.split(","))
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu"
    print(
        f"[setup] device {name}, torch {torch.__version__}, python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs, {'tiny' if args.tiny else 'full'} mode",
        flush=True,
    )
    if "steps" not in skip:  # first: the projection matters most if time runs out
        figures = steps(args, device)
        projection(figures, args)
    if "features" not in skip:
        features(args, device)


if __name__ == "__main__":
    main()
