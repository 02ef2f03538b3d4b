"""Micro-benchmark of the DenseCRF post-processing (docs/method.md §7.3): serial vs process pool.

Times :func:`cause_lightning.crf.dense_crf` on one image and :class:`cause_lightning.crf.CRFRunner`
on a batch, serially and with a small worker pool, at the evaluation resolution (320x320, 27
COCO-Stuff classes by default). The logits mimic the evaluation pipeline: a coarse score grid
(one value per 8x8 patch) upsampled bilinearly, scaled like ``3 * cos``, then log-softmax.

``--eval`` times the evaluation loop's use instead: evaluated images per second spent on the CRF,
``--crfs`` CRFs per image (two for the cluster probe, one more for the linear probe unless
``method.eval.linear_crf=false``), ``--batch`` images per submission, for

* the former default (``crf_workers: 0``): serial in the loop's process, probabilities returned
  and the argmax taken afterwards;
* the default now (``crf_workers: null``): a pool sized from this process's cores (or
  ``--workers``), batches submitted without waiting (``CRFRunner.submit``) and label maps returned.

The per-image time of one CRF it prints estimates a dataset's evaluation time (images x CRFs per
image x seconds / workers; docs/performance.md).

Usage::

    python benchmarks/bench_crf.py --size 320 --classes 27 --batch 4 --workers 2
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

from cause_lightning.crf import CRFRunner, crf_available, dense_crf
from cause_lightning.utils import cores_per_rank


def _image(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "astronaut":
        from skimage import data
        from skimage.transform import resize

        photo = data.astronaut()  # 512 x 512 RGB, ships with scikit-image
        resized = resize(photo, (size, size), order=1, anti_aliasing=True, preserve_range=True)
        return np.ascontiguousarray(resized.astype(np.uint8))
    if kind == "noise":  # worst case for the bilateral lattice: every pixel a new colour
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    raise ValueError(f"unknown image kind {kind!r}; use 'astronaut' or 'noise'.")


def _logits(classes: int, size: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    cos = torch.rand(1, classes, size // 8, size // 8, generator=g) * 2 - 1  # 1 C h w
    up = F.interpolate(cos, size=(size, size), mode="bilinear", align_corners=False)
    return torch.log_softmax(3.0 * up[0], 0).numpy()  # C H W


def _median_time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (pool workers' CPU not included)."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


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
    parser.add_argument("--eval", action="store_true", help="time the evaluation loop's CRF")
    parser.add_argument("--images", type=int, default=16, help="--eval: evaluated images timed")
    parser.add_argument("--crfs", type=int, default=3, help="--eval: CRFs per image")
    parser.add_argument("--iterations", type=int, default=10, help="mean-field iterations")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--image", default="astronaut", choices=["astronaut", "noise"])
    parser.add_argument("--start-method", default=None, help="forkserver (default) or spawn")
    args = parser.parse_args(argv)
    if not crf_available():
        raise SystemExit('pydensecrf is missing: pip install "cause-lightning[crf]"')

    if args.eval:
        _eval_throughput(args)
        return
    args.workers = 2 if args.workers is None else args.workers
    rng = np.random.default_rng(0)
    image = _image(args.image, args.size, rng)
    n = args.batch
    images = [image] * n
    logits = [_logits(args.classes, args.size, seed) for seed in range(n)]

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

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"DenseCRF {args.size}x{args.size}, C={args.classes}, {args.iterations} iterations, "
        f"image={args.image}, median of {args.repeats}; {os.cpu_count()} CPUs, "
        f"1-min load average {load:.2f}"
    )
    print(f"{'case':<36} {'wall s':>8} {'wall/img':>9} {'parent cpu/img':>15}")
    for name, total, per_image, cpu in rows:
        print(f"{name:<36} {total:>8.3f} {per_image:>9.3f} {cpu:>15.3f}")
    print(f"pool speed-up over serial (wall): {t_serial / t_pool:.2f}x")


def _eval_throughput(args: argparse.Namespace) -> None:
    picture = _image(args.image, args.size, np.random.default_rng(0))
    unary = [_logits(args.classes, args.size, seed) for seed in range(args.batch)]
    batches = args.images // args.batch
    jobs = [[picture] * args.batch] * (batches * args.crfs)  # one submission per batch and CRF

    serial = CRFRunner(num_workers=0, iterations=args.iterations)
    start = time.perf_counter()
    for pictures in jobs:
        torch.from_numpy(np.stack(serial(pictures, unary))).argmax(1)
    t_serial = time.perf_counter() - start

    workers = args.workers if args.workers is not None else max(1, cores_per_rank() - 1)
    with CRFRunner(num_workers=workers, iterations=args.iterations) as pool:
        pool.collect(pool.submit([picture], unary[:1]))  # start the workers before timing
        start = time.perf_counter()
        futures = [pool.submit(pictures, unary, argmax=True) for pictures in jobs]
        for batch_futures in futures:
            pool.collect(batch_futures)
        t_pool = time.perf_counter() - start

    images = batches * args.batch
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"DenseCRF {args.size}x{args.size}, C={args.classes}, {args.crfs} CRFs per image, "
        f"{images} images; {cores_per_rank()} usable cores, 1-min load {load:.2f}"
    )
    print(f"serial (former default):   {images / t_serial:6.3f} images/s")
    print(f"pool of {workers} (default now):  {images / t_pool:6.3f} images/s")
    print(f"one CRF: {t_serial / (images * args.crfs):.3f} s per image (one core)")


if __name__ == "__main__":
    main()
