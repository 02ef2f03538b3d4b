"""Micro-benchmark of the DenseCRF post-processing (docs/method.md §7.3): serial vs process pool,
separate CRFs vs one lattice per image, synthetic pictures vs real photos.

Times :func:`cause_lightning.inference.crf.dense_crf` on one image and
:class:`cause_lightning.inference.crf.CRFRunner` on a batch, serially and with a small worker pool,
at the evaluation resolution (320x320, 27 COCO-Stuff classes by default). The logits mimic the
evaluation pipeline: a coarse score grid (one value per 8x8 patch) upsampled bilinearly, scaled like
``3 * cos``, then log-softmax.

``--lattice`` times what the evaluation spends per image, serially: ``--crfs`` CRFs (the cluster
probe's ``crf`` and ``flip_crf`` and the linear probe's ``crf``) as separate ``dense_crf`` calls,
against :func:`cause_lightning.inference.crf.dense_crfs`, which builds the image's pairwise lattice
once. One row per picture: two synthetic ones (``smooth``: a 10x10 grid of random colours upsampled,
the former ``benchmarks/gpu.sh`` picture; ``noise``: every pixel random) and the photos scikit-image
ships (``PHOTOS``, centre-cropped and resized to the evaluation size). The two variants alternate
within each repeat, so both see the same load; the ratio is the figure to read on a shared machine.
:func:`real_photo_crf_seconds` gives other benchmarks the per-image figure on the photos.

``--eval`` times the evaluation loop's use instead: evaluated images per second spent on the CRF,
``--crfs`` CRFs per image, ``--batch`` images per submission, for

* the former default (``crf_workers: 0``): serial in the loop's process, one CRF per call,
  probabilities returned and the argmax taken afterwards;
* the default now (``crf_workers: null``): a pool sized from this process's cores (or
  ``--workers``), batches submitted without waiting (``CRFRunner.submit``), each image with all its
  unaries on one lattice, label maps returned.

Usage::

    python benchmarks/bench_crf.py --size 320 --classes 27 --batch 4 --workers 2
    python benchmarks/bench_crf.py --lattice --repeats 5
    python benchmarks/bench_crf.py --eval --images 8 --batch 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from cause_lightning.core.system import cores_per_rank
from cause_lightning.inference.crf import (
    CRFRunner,
    crf_available,
    default_crf_workers,
    dense_crf,
    dense_crfs,
)

# Photos that ship with scikit-image (no download); coins is grey, replicated to RGB.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "coins")
SYNTHETIC = ("smooth", "noise")
CRFS_PER_IMAGE = 3  # cluster crf, cluster flip_crf, linear crf


def picture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 ``[size, size, 3]`` picture: a scikit-image photo or a synthetic one.

    Args:
        kind: One of ``PHOTOS`` or ``SYNTHETIC``.
        size: Side in pixels.
        rng: Draws of the synthetic pictures.
    """
    if kind in PHOTOS:
        from skimage import data
        from skimage.color import gray2rgb
        from skimage.transform import resize

        photo = getattr(data, kind)()
        photo = gray2rgb(photo) if photo.ndim == 2 else photo[..., :3]
        height, width = photo.shape[:2]
        side = min(height, width)  # the centred square, as a square crop of the data sets
        top, left = (height - side) // 2, (width - side) // 2
        square = photo[top : top + side, left : left + side]
        resized = resize(square, (size, size), order=1, anti_aliasing=True, preserve_range=True)
        return np.ascontiguousarray(resized.round().astype(np.uint8))
    if kind == "smooth":  # photo-like smooth regions
        coarse = torch.from_numpy(rng.integers(0, 256, (1, 3, 10, 10)).astype(np.float32))
        smooth = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
        return np.ascontiguousarray(smooth[0].permute(1, 2, 0).round().to(torch.uint8).numpy())
    if kind == "noise":  # worst case for the bilateral lattice: every pixel a new colour
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    raise ValueError(f"unknown picture {kind!r}; use one of {PHOTOS + SYNTHETIC}.")


def eval_logits(classes: int, size: int, seed: int) -> np.ndarray:
    """Scores as the evaluation makes them: a coarse grid upsampled, ``3 * cos``, log-softmax.

    Args:
        classes: C.
        size: Side in pixels (the grid has one cell per 8x8 patch).
        seed: Seed of the grid.

    Returns:
        float32 ``[C, size, size]``.
    """
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(1, classes, size // 8, size // 8, generator=g) * 2 - 1  # 1 C h w
    up = F.interpolate(cos, size=(size, size), mode="bilinear", align_corners=False)
    return torch.log_softmax(3.0 * up[0], 0).numpy()  # C H W


def lattice_rows(
    kinds: tuple[str, ...],
    size: int = 320,
    classes: int = 27,
    iterations: int = 10,
    crfs: int = CRFS_PER_IMAGE,
    repeats: int = 3,
) -> list[dict[str, float | str]]:
    """Per-image seconds of ``crfs`` separate CRFs and of ``crfs`` CRFs on one lattice, serially.

    The two alternate within each repeat (the same load for both); medians over the repeats of
    the wall time and of this process's CPU time (on a shared machine the CPU time is the better
    estimate of what a process with a core of its own takes).

    Args:
        kinds: Pictures (``PHOTOS`` / ``SYNTHETIC``).
        size: Side in pixels.
        classes: C.
        iterations: Mean-field iterations.
        crfs: Unaries per image.
        repeats: Timed repeats per picture.

    Returns:
        One dict per picture: ``picture``, ``separate_s``, ``shared_s`` (wall) and
        ``separate_cpu_s``, ``shared_cpu_s``.
    """
    rng = np.random.default_rng(0)
    unaries = [eval_logits(classes, size, seed) for seed in range(crfs)]
    warm = picture("noise", 16, np.random.default_rng(1))
    dense_crf(warm, eval_logits(classes, 16, 0), 1)  # the import and first call, untimed
    rows = []
    for kind in kinds:
        image = picture(kind, size, rng)
        variants: dict[str, Callable[[], object]] = {
            "separate": lambda: [dense_crf(image, u, iterations) for u in unaries],  # noqa: B023
            "shared": lambda: dense_crfs(image, unaries, iterations),  # noqa: B023
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for _ in range(repeats):
            for name, fn in variants.items():
                times[name].append(_timed(fn))
        row: dict[str, float | str] = {"picture": kind}
        for name, pairs in times.items():
            row[f"{name}_s"] = statistics.median(wall for wall, _ in pairs)
            row[f"{name}_cpu_s"] = statistics.median(cpu for _, cpu in pairs)
        rows.append(row)
    return rows


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """Wall and CPU seconds of one call (the CPU time of this process only)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def real_photo_crf_seconds(
    size: int = 320,
    classes: int = 27,
    iterations: int = 10,
    crfs: int = CRFS_PER_IMAGE,
    repeats: int = 1,
) -> float:
    """One process's seconds per evaluated image on the CRF: ``crfs`` CRFs on one lattice.

    The mean over ``PHOTOS`` of each photo's median (:func:`lattice_rows`' ``shared_s``).

    Args:
        size: Side in pixels.
        classes: C.
        iterations: Mean-field iterations.
        crfs: Unaries per image (the evaluation's three by default).
        repeats: Timed repeats per photo.
    """
    rows = lattice_rows(PHOTOS, size, classes, iterations, crfs, repeats)
    return statistics.fmean(float(row["shared_s"]) for row in rows)


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (pool workers' CPU not included)."""
    pairs = [_timed(fn) for _ in range(repeats)]
    return statistics.median(w for w, _ in pairs), statistics.median(c for _, c in pairs)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a table of timings.

    Args:
        argv: command-line arguments (defaults to ``sys.argv[1:]``).

    Raises:
        SystemExit: if pydensecrf is not installed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=27, help="number of classes C")
    parser.add_argument("--batch", type=int, default=4, help="images per runner call")
    parser.add_argument(
        "--workers", type=int, default=None, help="pool size (default 2; --eval: auto)"
    )
    parser.add_argument("--lattice", action="store_true", help="separate CRFs vs one lattice")
    parser.add_argument("--eval", action="store_true", help="time the evaluation loop's CRF")
    parser.add_argument("--images", type=int, default=16, help="--eval: evaluated images timed")
    parser.add_argument("--crfs", type=int, default=CRFS_PER_IMAGE, help="CRFs per image")
    parser.add_argument("--iterations", type=int, default=10, help="mean-field iterations")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--image", default="astronaut", choices=[*PHOTOS, *SYNTHETIC])
    parser.add_argument("--start-method", default=None, help="forkserver (default) or spawn")
    args = parser.parse_args(argv)
    if not crf_available():
        raise SystemExit('pydensecrf is missing: pip install "cause-lightning[crf]"')

    if args.lattice:
        _lattice_table(args)
        return
    if args.eval:
        _eval_throughput(args)
        return
    args.workers = 2 if args.workers is None else args.workers
    rng = np.random.default_rng(0)
    image = picture(args.image, args.size, rng)
    n = args.batch
    images = [image] * n
    logits = [eval_logits(args.classes, args.size, seed) for seed in range(n)]

    rows: list[tuple[str, float, float, float]] = []
    one, one_cpu = _median_time(lambda: dense_crf(image, logits[0], args.iterations), args.repeats)
    rows.append(("dense_crf, 1 image", one, one, one_cpu))
    serial = CRFRunner(num_workers=0, iterations=args.iterations)
    t_serial, cpu_serial = _median_time(lambda: serial(images, logits), args.repeats)
    rows.append((f"runner serial, {n} images", t_serial, t_serial / n, cpu_serial / n))
    with CRFRunner(
        num_workers=args.workers, iterations=args.iterations, start_method=args.start_method
    ) as pool:
        start, start_cpu = time.perf_counter(), time.process_time()
        pool(images[:1], logits[:1])
        t_first, cpu_first = time.perf_counter() - start, time.process_time() - start_cpu
        pool(images, logits)  # let every worker start before timing
        t_pool, cpu_pool = _median_time(lambda: pool(images, logits), args.repeats)
        method = pool.start_method
    rows.append((f"pool start + 1 image ({method})", t_first, t_first, cpu_first))
    rows.append((f"runner pool of {args.workers}, {n} images", t_pool, t_pool / n, cpu_pool / n))

    print(
        f"DenseCRF {args.size}x{args.size}, C={args.classes}, {args.iterations} iterations, "
        f"image={args.image}, median of {args.repeats}; {_machine()}"
    )
    print(f"{'case':<36} {'wall s':>8} {'wall/img':>9} {'parent cpu/img':>15}")
    for name, total, per_image, cpu in rows:
        print(f"{name:<36} {total:>8.3f} {per_image:>9.3f} {cpu:>15.3f}")
    print(f"pool speed-up over serial (wall): {t_serial / t_pool:.2f}x")


def _machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} CPUs, 1-min load average {load:.2f}"


def _lattice_table(args: argparse.Namespace) -> None:
    rows = lattice_rows(
        (*SYNTHETIC, *PHOTOS), args.size, args.classes, args.iterations, args.crfs, args.repeats
    )
    photos = [r for r in rows if r["picture"] in PHOTOS]
    mean: dict[str, float | str] = {"picture": "photos, mean"}
    for key in ("separate_s", "shared_s", "separate_cpu_s", "shared_cpu_s"):
        mean[key] = statistics.fmean(float(r[key]) for r in photos)
    print(
        f"DenseCRF {args.size}x{args.size}, C={args.classes}, {args.iterations} iterations, "
        f"{args.crfs} CRFs per image, one process, median of {args.repeats}; {_machine()}"
    )
    print(
        f"{'picture':<22} {'separate':>9} {'one lattice':>12} {'ratio':>6}   "
        f"{'separate':>9} {'one lattice':>12} {'ratio':>6}"
    )
    print(f"{'(seconds per image)':<22} {'wall':>9} {'wall':>12} {'':>6}   {'cpu':>9} {'cpu':>12}")
    for row in (*rows, mean):
        kind = str(row["picture"])
        label = kind if row is mean else f"{kind} ({'photo' if kind in PHOTOS else 'synthetic'})"
        cells = []
        for suffix in ("_s", "_cpu_s"):
            separate, shared = float(row[f"separate{suffix}"]), float(row[f"shared{suffix}"])
            cells.append(f"{separate:>9.3f} {shared:>12.3f} {shared / separate:>6.3f}")
        print(f"{label:<22} {'   '.join(cells)}")


def _eval_throughput(args: argparse.Namespace) -> None:
    image = picture(args.image, args.size, np.random.default_rng(0))
    unaries = [eval_logits(args.classes, args.size, seed) for seed in range(args.crfs)]
    batches = args.images // args.batch

    serial = CRFRunner(num_workers=0, iterations=args.iterations)
    start = time.perf_counter()
    for _ in range(batches):
        for unary in unaries:  # one submission per batch and CRF, as formerly
            torch.from_numpy(np.stack(serial([image] * args.batch, [unary] * args.batch))).argmax(1)
    t_serial = time.perf_counter() - start

    workers = args.workers if args.workers is not None else default_crf_workers()
    with CRFRunner(num_workers=workers, iterations=args.iterations) as pool:
        pool.collect(pool.submit([image], unaries[:1]))  # start the workers before timing
        start = time.perf_counter()
        # One submission per batch, each image with all its unaries (the evaluation now).
        futures = [
            pool.submit([image] * args.batch, [unaries] * args.batch, argmax=True)
            for _ in range(batches)
        ]
        for batch_futures in futures:
            pool.collect(batch_futures)
        t_pool = time.perf_counter() - start

    images = batches * args.batch
    print(
        f"DenseCRF {args.size}x{args.size}, C={args.classes}, {args.crfs} CRFs per image, "
        f"{images} images, image={args.image}; {cores_per_rank()} usable cores; {_machine()}"
    )
    print(f"serial, separate CRFs (former default):   {images / t_serial:6.3f} images/s")
    print(f"pool of {workers}, one lattice (default now):  {images / t_pool:6.3f} images/s")
    print(f"one CRF, separate: {t_serial / (images * args.crfs):.3f} s per image (one core)")


if __name__ == "__main__":
    main()
