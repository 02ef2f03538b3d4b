"""Micro-benchmark of the DenseCRF post-processing (docs/method.md §7.3): serial vs process pool.

Times :func:`cause_lightning.crf.dense_crf` on one image and :class:`cause_lightning.crf.CRFRunner`
on a batch, serially and with a small worker pool, at the evaluation resolution (320x320, 27
COCO-Stuff classes by default). The logits mimic the evaluation pipeline: a coarse score grid
(one value per 8x8 patch) upsampled bilinearly, scaled like ``3 * cos``, then log-softmax.

Usage::

    python benchmarks/bench_crf.py --size 320 --classes 27 --batch 4 --workers 2
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
    parser.add_argument("--workers", type=int, default=2, help="pool size")
    parser.add_argument("--iterations", type=int, default=10, help="mean-field iterations")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--image", default="astronaut", choices=["astronaut", "noise"])
    parser.add_argument("--start-method", default=None, help="forkserver (default) or spawn")
    args = parser.parse_args(argv)
    if not crf_available():
        raise SystemExit('pydensecrf is missing: pip install "cause-lightning[crf]"')

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


if __name__ == "__main__":
    main()
