"""Cost of every CAUSE component at the reference shapes, against its floor (``make bench``).

Reference shapes: batch 16, ViT-S/8 at 320 (a 40x40 grid; one token per 4x4 cell -> N = 100),
D = 384, K = 2048 concepts, R = 90 (TR head), P = 2048. Every row is timed in this run (median of
the repeats after a warm-up; a call longer than ``--long`` seconds is timed once, in the profiled
call that also gives its peak memory), and so is its floor where one exists:

* modularity fwd+bwd: floor = the ``[B, N, K]`` cosine product and its gradient;
* contrastive fwd+bwd with a bank of M entries: floor = the four unavoidable products, logits
  ``[B·N, P] @ [P, M]`` and the student gradient ``[B·N, M] @ [M, P]``, plus the in-batch pair;
* stage rows: one full training step (backbone included) against the backbone alone on the same
  batch, as images/s.

Peak memory is that of the tensors allocated by the call (the CPU allocator's events, or CUDA's
peak statistics). The backbone has random weights: its cost does not depend on them.

    python benchmarks/bench.py              # everything, writes benchmarks/results/cpu.json
    python benchmarks/bench.py --batch 4 --banks 0,20480 --name quick
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cause_lightning.config import stage_module
from cause_lightning.models import ConceptBank, LinearProbe, MLPHead, TRHead, build_backbone
from cause_lightning.modules.head import HeadModule
from cause_lightning.modules.probe import ProbeModule
from cause_lightning.ops import (
    concept_contrastive_loss,
    grid_sample_tokens,
    modularity_loss,
    nearest_concept,
)

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak MiB of the tensors that ``fn`` allocates above what exists when it starts."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = top = 0
    events = prof.profiler.kineto_results.events() if prof.profiler else []
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            current += event.nbytes()
            top = max(top, current)
    return top / 2**20


def measure(
    fns: dict[str, Callable[[], object]], repeats: int, long_s: float, device: torch.device
) -> dict[str, tuple[float, float]]:
    """``{key: (median seconds, peak MiB)}``; the calls of several keys are interleaved, so that
    a measurement and its floor see the same load on a shared machine."""
    peaks: dict[str, float] = {}
    times: dict[str, list[float]] = {key: [] for key in fns}
    for key, fn in fns.items():  # warm-up, profiled for memory
        start = time.perf_counter()
        peaks[key] = peak_mb(fn, device)
        times[key].append(time.perf_counter() - start)
    if max(t[0] for t in times.values()) > long_s:
        # Seconds-long calls: one-time costs are negligible, the profiled call is the measurement.
        return {key: (times[key][0], peaks[key]) for key in fns}
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {key: (statistics.median(times[key]), peaks[key]) for key in fns}


# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------


class Setup:
    """Backbone, batch, features and the reference-shaped inputs shared by the rows."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        torch.manual_seed(0)
        self.args = args
        self.device = device
        self.backbone = build_backbone(args.backbone).to(device)
        size = (args.batch, 3, args.resolution, args.resolution)
        self.images = torch.randn(size, device=device)
        self.labels = torch.randint(0, args.classes, (args.batch, *size[2:]), device=device)
        with torch.inference_mode():
            self.features = self.backbone(self.images)  # B D h w
        self.features = self.features.clone()
        self.dim = int(self.features.shape[1])
        self.grid = int(self.features.shape[-1])
        self.tokens, _ = grid_sample_tokens(self.features, window=args.window)  # B N D
        gen = torch.Generator().manual_seed(1)
        self.clusterbook = torch.randn(args.concepts, self.dim, generator=gen).to(device)

    @property
    def batch(self) -> dict[str, torch.Tensor]:
        return {"image": self.images, "label": self.labels}

    def backbone_step(self) -> None:
        with torch.inference_mode():
            self.backbone(self.images)

    def new_head(self, kind: str) -> torch.nn.Module:
        if kind == "tr":
            grid = self.grid * self.grid
            return TRHead(
                self.dim, self.args.reduced, num_queries=grid, clusterbook=self.clusterbook
            )
        return MLPHead(self.dim, reduced_dim=self.args.reduced)

    def head_module(self, kind: str, bank_size: int) -> HeadModule:
        capacity = max(1, bank_size // self.args.concepts)
        module = stage_module(
            "head",
            self.backbone,
            head=self.new_head(kind),
            clusterbook=self.clusterbook,
            num_classes=self.args.classes,
            lr=4e-3,
            projection_dim=self.args.projection,
            bank_capacity=capacity,
            debug_checks=False,
        ).to(self.device)
        if bank_size:
            fill_bank(module.bank, capacity, self.device)
        return module

    def probe_module(self) -> ProbeModule:
        head = self.new_head("tr")
        linear = LinearProbe(self.args.reduced, self.args.classes)
        return stage_module(
            "probe",
            self.backbone,
            head=head,
            linear=linear,
            num_classes=self.args.classes,
            lr=4e-3,
            cluster_lr=4e-3,
            debug_checks=False,
        ).to(self.device)


def fill_bank(bank: ConceptBank, capacity: int, device: torch.device) -> None:
    """Every slot used: ``2 * capacity`` normalised entries per concept, half of them kept."""
    concepts = torch.arange(bank.num_concepts, device=device).repeat_interleave(2 * capacity)
    entries = F.normalize(torch.randn(concepts.shape[0], bank.dim, device=device), dim=-1)
    for part in range(0, concepts.shape[0], 65536):
        stop = part + 65536
        bank.update(concepts[part:stop], entries[part:stop], validate=False)


def _step(module: Any, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if hasattr(module, "on_train_batch_end"):
        module.on_train_batch_end(None, batch, 0)


def _optimizer(module: Any) -> torch.optim.Optimizer:
    config = module.configure_optimizers()
    return config["optimizer"] if isinstance(config, dict) else config


# --------------------------------------------------------------------------------------------------
# rows
# --------------------------------------------------------------------------------------------------


def row(name: str, time_s: float, peak: float, backbone_s: float, **extra: Any) -> dict[str, Any]:
    out = {
        "name": name,
        "time_s": round(time_s, 5),
        "peak_mb": round(peak, 1),
        "backbone_ratio": round(time_s / backbone_s, 4),
    }
    out.update(extra)
    return out


def bench_backbone(s: Setup) -> dict[str, Any]:
    ((time_s, peak),) = measure(
        {"b": s.backbone_step}, s.args.repeats, s.args.long, s.device
    ).values()
    return row(
        f"backbone {s.args.backbone} @{s.args.resolution} fwd",
        time_s,
        peak,
        time_s,
        images_per_s=round(s.args.batch / time_s, 3),
    )


def bench_modularity(s: Setup, backbone_s: float) -> dict[str, Any]:
    prototypes = s.clusterbook.clone().requires_grad_(True)
    flat = s.tokens.reshape(-1, s.dim)

    def ours() -> None:
        prototypes.grad = None
        modularity_loss(s.tokens, prototypes).backward()

    def floor() -> None:
        similarity = flat @ prototypes.detach().T  # BN K
        similarity.T @ flat  # K D: the gradient of the prototypes

    result = measure({"ours": ours, "floor": floor}, s.args.repeats, s.args.long, s.device)
    return row(
        f"modularity fwd+bwd (B{s.args.batch} N{s.tokens.shape[1]} K{s.args.concepts})",
        *result["ours"],
        backbone_s,
        floor_time_s=round(result["floor"][0], 5),
        floor_peak_mb=round(result["floor"][1], 1),
    )


def bench_head(s: Setup, kind: str, backbone_s: float) -> dict[str, Any]:
    module = s.head_module(kind, 0)

    def step() -> None:
        module.zero_grad(set_to_none=True)
        _, _, student, _, _ = module._student_teacher(s.features, 0)
        student.float().square().mean().backward()

    ((time_s, peak),) = measure({"h": step}, s.args.repeats, s.args.long, s.device).values()
    return row(
        f"head {kind.upper()} fwd+bwd (student, teacher, projections)", time_s, peak, backbone_s
    )


def bench_contrastive(s: Setup, bank_size: int, backbone_s: float) -> dict[str, Any]:
    batch, num = s.tokens.shape[:2]
    gen = torch.Generator().manual_seed(2)
    shape = (batch, num, s.args.projection)
    student = torch.randn(shape, generator=gen).to(s.device).requires_grad_(True)
    teacher = torch.randn(shape, generator=gen).to(s.device)
    kwargs: dict[str, Any] = {}
    if bank_size:
        capacity = bank_size // s.args.concepts
        bank = ConceptBank(s.args.concepts, capacity=capacity, dim=s.args.projection)
        fill_bank(bank, capacity, s.device)
        entries, concepts, valid = bank.slots()  # type: ignore[misc]
        kwargs = {"bank": entries, "bank_concepts": concepts, "bank_valid": valid}
    anchors = F.normalize(torch.randn(batch * num, s.args.projection, generator=gen), dim=-1)
    anchors = anchors.to(s.device)
    targets = F.normalize(teacher.reshape(batch * num, -1), dim=-1)

    def ours() -> None:
        student.grad = None
        concept_contrastive_loss(
            s.tokens, student, teacher, s.clusterbook, validate=False, **kwargs
        ).backward()

    def floor() -> None:
        (anchors @ targets.T) @ targets  # in-batch logits and their gradient
        if bank_size:
            (anchors @ kwargs["bank"].T) @ kwargs["bank"]

    result = measure({"ours": ours, "floor": floor}, s.args.repeats, s.args.long, s.device)
    return row(
        f"contrastive fwd+bwd, bank {bank_size}",
        *result["ours"],
        backbone_s,
        bank_size=bank_size,
        floor_time_s=round(result["floor"][0], 5),
        floor_peak_mb=round(result["floor"][1], 1),
        floor_ratio=round(result["ours"][0] / result["floor"][0], 3),
    )


def bench_bank(s: Setup, bank_size: int, backbone_s: float) -> dict[str, Any]:
    capacity = max(1, bank_size // s.args.concepts)
    bank = ConceptBank(s.args.concepts, capacity=capacity, dim=s.args.projection)
    fill_bank(bank, capacity, s.device)
    concepts = nearest_concept(s.tokens, s.clusterbook).flatten()
    entries = F.normalize(torch.randn(concepts.shape[0], s.args.projection), dim=-1).to(s.device)
    gen = torch.Generator().manual_seed(3)

    def step() -> None:
        bank.update(concepts, entries, generator=gen, validate=False)
        bank.slots()

    ((time_s, peak),) = measure({"b": step}, s.args.repeats, s.args.long, s.device).values()
    return row(
        f"bank update + slots, bank {bank_size}", time_s, peak, backbone_s, bank_size=bank_size
    )


def bench_stages(s: Setup, backbone_s: float, bank_size: int) -> list[dict[str, Any]]:
    rows = []
    mediator = stage_module(
        "mediator", s.backbone, num_concepts=s.args.concepts, lr=4e-3, debug_checks=False
    )
    mediator = mediator.to(s.device)
    head_tr = s.head_module("tr", bank_size)
    probe = s.probe_module()
    modules = {"mediator": mediator, f"head TR, bank {bank_size}": head_tr, "probe": probe}
    for name, module in modules.items():
        module.train()
        optimizer = _optimizer(module)
        fns = {
            "stage": functools.partial(_step, module, s.batch, optimizer),
            "backbone": s.backbone_step,
        }
        result = measure(fns, s.args.repeats, s.args.long, s.device)
        stage_s, backbone_same = result["stage"][0], result["backbone"][0]
        rows.append(
            row(
                f"stage {name}: one training step",
                stage_s,
                result["stage"][1],
                backbone_s,
                images_per_s=round(s.args.batch / stage_s, 3),
                backbone_images_per_s=round(s.args.batch / backbone_same, 3),
                throughput_ratio=round(backbone_same / stage_s, 3),
                **({"bank_size": bank_size} if name.startswith("head") else {}),
            )
        )
    return rows


def bench_probe(s: Setup, backbone_s: float) -> dict[str, Any]:
    probe = s.probe_module()
    probe.train()
    probe.extract = lambda images: s.features  # the step without its backbone forward
    optimizer = _optimizer(probe)
    fn = functools.partial(_step, probe, s.batch, optimizer)
    ((time_s, peak),) = measure({"p": fn}, s.args.repeats, s.args.long, s.device).values()
    return row(
        "probe step without the backbone (head fwd, probe + centroids fwd+bwd)",
        time_s,
        peak,
        backbone_s,
    )


def bench_eval(s: Setup, backbone_s: float) -> list[dict[str, Any]]:
    head = (
        TRHead(s.dim, reduced_dim=s.args.reduced, num_queries=s.grid**2, clusterbook=s.clusterbook)
        .to(s.device)
        .eval()
    )
    centroids = F.normalize(torch.randn(s.args.classes, s.args.reduced), dim=-1).to(s.device)
    per_image_backbone = backbone_s / s.args.batch
    count = min(4, s.args.batch)  # per-image figures: a few images are enough
    images = s.images[:count]

    def forward_flip() -> None:
        with torch.inference_mode():
            for view in (images, images.flip(-1)):
                segment = head(s.backbone(view))  # B R h w
                cos = torch.einsum("brhw,cr->bchw", F.normalize(segment, dim=1), centroids)
                F.interpolate(cos, size=view.shape[-2:], mode="bilinear").argmax(1)

    ((time_s, peak),) = measure({"e": forward_flip}, s.args.repeats, s.args.long, s.device).values()
    rows = [
        row(
            "eval per image: forward + flip (backbone, head, cosine, upsample)",
            time_s / count,
            peak,
            per_image_backbone,
        )
    ]
    from cause_lightning.inference.crf import crf_available, dense_crf

    if crf_available():
        rng = np.random.default_rng(0)
        # A photo-like image (smooth regions): per-pixel noise is DenseCRF's worst case.
        coarse = torch.from_numpy(rng.integers(0, 256, (1, 3, 10, 10)).astype(np.float32))
        smooth = F.interpolate(
            coarse, size=(s.args.resolution, s.args.resolution), mode="bilinear"
        )[0]
        image = smooth.permute(1, 2, 0).round().to(torch.uint8).numpy()  # H W 3
        # Scores as the eval pipeline makes them: one per patch, upsampled, 3 x cosine.
        cos = torch.rand(1, s.args.classes, s.grid, s.grid) * 2 - 1
        up = F.interpolate(cos, size=image.shape[:2], mode="bilinear")[0]
        logits = torch.log_softmax(3.0 * up, 0).numpy()
        fn = functools.partial(dense_crf, image, logits, 10)
        ((crf_s, crf_peak),) = measure({"c": fn}, s.args.repeats, s.args.long, s.device).values()
        rows.append(
            row(
                f"eval per image: DenseCRF {s.args.resolution}px, {s.args.classes} "
                "classes, 10 iterations (one call; eval runs it per CRF variant)",
                crf_s,
                crf_peak,
                per_image_backbone,
            )
        )
    return rows


def default_workers() -> int | None:
    """``num_workers`` of the COCO-Stuff data config, the default of a real run (``None``: the
    data module's own rule, :meth:`SegDataModule.workers`)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(ROOT / "conf" / "data" / "cocostuff27.yaml").module.num_workers


def bench_data(s: Setup, backbone_s: float, images: int, workers: int | None) -> dict[str, Any]:
    from PIL import Image

    from cause_lightning.data.folder import FolderDataModule

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        (root / "masks").mkdir()
        rng = np.random.default_rng(0)
        for index in range(images):  # COCO-sized JPEGs with smooth content and class-id masks
            coarse = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            photo = Image.fromarray(coarse).resize((640, 480), Image.BILINEAR)
            photo.save(root / "images" / f"{index:05d}.jpg", quality=90)
            mask = rng.integers(0, s.args.classes, (12, 16), dtype=np.uint8)
            Image.fromarray(mask).resize((640, 480), Image.NEAREST).save(
                root / "masks" / f"{index:05d}.png"
            )
        data = FolderDataModule(
            root,
            num_classes=s.args.classes,
            train_res=s.args.resolution,
            test_res=s.args.resolution,
            batch_size=s.args.batch,
            num_workers=workers,
        )
        data.setup("fit")

        def epoch() -> None:
            for _ in data.train_dataloader():
                pass

        epoch()  # workers start, files cached
        start = time.perf_counter()
        epoch()
        elapsed = time.perf_counter() - start
        used = data.workers()  # the data module's rule when the config leaves it to it
    per_batch = elapsed * s.args.batch / images
    return row(
        f"data pipeline: decode + crop + transform, {used} workers",
        per_batch,
        0.0,
        backbone_s,
        images_per_s=round(images / elapsed, 2),
        backbone_images_per_s=round(s.args.batch / backbone_s, 3),
        throughput_ratio=round(images / elapsed / (s.args.batch / backbone_s), 3),
    )


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the benchmark, print the table and write the results file.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        The rows written.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dino_vits8")
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concepts", type=int, default=2048)
    parser.add_argument("--projection", type=int, default=2048)
    parser.add_argument("--reduced", type=int, default=90)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--banks", default="0,20480,102400,204800", help="bank sizes M")
    parser.add_argument("--stage-bank", type=int, default=20480, help="bank of the head stage row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--long",
        type=float,
        default=4.0,
        help="seconds above which a call is timed once after its warm-up",
    )
    parser.add_argument("--data-images", type=int, default=96)
    parser.add_argument(
        "--workers", type=int, default=None, help="data loader workers (default: the data config's)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--skip", default="", help="comma list of: stages,data,eval,contrastive")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default=None, help="results/<name>.json (default: the device)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    logging.getLogger("cause_lightning").setLevel(logging.ERROR)  # random-weights warning
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    skip = {part for part in args.skip.split(",") if part}
    banks = [int(b) for b in args.banks.split(",") if b != ""]
    # Read before the long rows, so that a config it cannot use stops the run at once.
    workers = default_workers() if args.workers is None else args.workers
    started = time.perf_counter()
    s = Setup(args, device)
    rows: list[dict[str, Any]] = []

    def emit(new: dict[str, Any] | list[dict[str, Any]]) -> None:
        for item in new if isinstance(new, list) else [new]:
            rows.append(item)
            extra = ""
            if "floor_time_s" in item:
                extra = f"  floor {item['floor_time_s']:.3f} s / {item['floor_peak_mb']:.0f} MiB"
                extra += f"  ({item['time_s'] / item['floor_time_s']:.2f}x time)"
            if "images_per_s" in item:
                extra += f"  {item['images_per_s']:.2f} img/s"
            if "throughput_ratio" in item:
                extra += f" = {item['throughput_ratio']:.2f}x the backbone alone"
            print(
                f"{item['name']:<72} {item['time_s']:9.3f} s {item['peak_mb']:9.0f} MiB "
                f"{item['backbone_ratio']:7.3f}x bb{extra}",
                flush=True,
            )

    print(
        f"device {device}, batch {args.batch}, {args.backbone} @{args.resolution}, "
        f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    emit(bench_backbone(s))
    backbone_s = rows[0]["time_s"]
    emit(bench_modularity(s, backbone_s))
    for kind in ("tr", "mlp"):
        emit(bench_head(s, kind, backbone_s))
    if "contrastive" not in skip:
        for bank_size in banks:
            emit(bench_contrastive(s, bank_size, backbone_s))
    emit(bench_bank(s, max(banks or [args.concepts]), backbone_s))
    emit(bench_probe(s, backbone_s))
    if "eval" not in skip:
        emit(bench_eval(s, backbone_s))
    if "stages" not in skip:
        emit(bench_stages(s, backbone_s, args.stage_bank))
    if "data" not in skip:
        emit(bench_data(s, backbone_s, args.data_images, workers))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name or device.type}.json"
    path.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
