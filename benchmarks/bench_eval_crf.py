"""CRF throughput of the evaluation loop: evaluated images per second spent on DenseCRF.

Every evaluated image needs two CRFs for the cluster probe (``crf``, ``flip_crf``) and one more for
the linear probe unless ``method.eval.linear_crf=false``. Two ways of running them are timed on the
same unaries (320x320, 27 classes, a natural image):

* ``serial``: the former default (``crf_workers: 0``): in the loop's process, probabilities
  returned and the argmax taken afterwards;
* ``pool``: the default now (``crf_workers: null``): a pool sized from the cores of this process,
  batches submitted without waiting (``CRFRunner.submit``) and label maps returned by the workers.

The pool figure is the rate at which the CRF can keep up; in the evaluation it runs while the
accelerator computes the next batches. The per-image CPU time of one CRF is printed as well: it
estimates the evaluation time of a dataset (images x CRFs per image x seconds / workers).

Usage::

    python benchmarks/bench_eval_crf.py --images 16 --batch 8
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from bench_crf import _image, _logits

from cause_lightning.crf import CRFRunner, crf_available
from cause_lightning.utils import cores_per_rank


def main(argv: list[str] | None = None) -> None:
    """Time the serial and the pooled CRF of the evaluation loop and print images/s.

    Args:
        argv: command-line arguments (defaults to ``sys.argv[1:]``).

    Raises:
        SystemExit: if pydensecrf is not installed.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--images", type=int, default=16, help="evaluated images timed")
    parser.add_argument("--batch", type=int, default=8, help="images per evaluation batch")
    parser.add_argument("--crfs", type=int, default=3, help="CRFs per image (2 without linear)")
    parser.add_argument("--workers", type=int, default=None, help="pool size (default: auto)")
    args = parser.parse_args(argv)
    if not crf_available():
        raise SystemExit('pydensecrf is missing: pip install "cause-lightning[crf]"')
    picture = _image("astronaut", args.size, np.random.default_rng(0))
    unary = [_logits(args.classes, args.size, seed) for seed in range(args.batch)]
    batches = args.images // args.batch
    jobs = [(picture, unary)] * (batches * args.crfs)  # one submission per batch and CRF

    serial = CRFRunner(num_workers=0)
    start = time.perf_counter()
    for pictures, logits in jobs:
        refined = serial([pictures] * len(logits), logits)
        torch.from_numpy(np.stack(refined)).argmax(1)
    t_serial = time.perf_counter() - start

    workers = args.workers if args.workers is not None else max(1, cores_per_rank() - 1)
    with CRFRunner(num_workers=workers) as pool:
        pool.collect(pool.submit([picture], unary[:1]))  # start the workers before timing
        start = time.perf_counter()
        futures = [pool.submit([p] * len(lg), lg, argmax=True) for p, lg in jobs]
        for batch_futures in futures:
            pool.collect(batch_futures)
        t_pool = time.perf_counter() - start

    images = batches * args.batch
    per_crf = t_serial / (images * args.crfs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"DenseCRF {args.size}x{args.size}, C={args.classes}, {args.crfs} CRFs per image, "
        f"{images} images; {cores_per_rank()} usable cores, 1-min load {load:.2f}"
    )
    print(f"serial (former default):  {images / t_serial:6.3f} images/s")
    print(f"pool of {workers} (default now): {images / t_pool:6.3f} images/s")
    print(f"one CRF: {per_crf:.3f} s per image (single core)")


if __name__ == "__main__":
    main()
