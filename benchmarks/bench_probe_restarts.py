"""The cluster probe on the demo: default (k-means++ seeds, best of 4) against the reference init.

For every seed, trains the whole demo pipeline once (``stage=all``, default config,
``artifact_tag=seed<s>``), then fits and evaluates the reference probe
(``method.probe.init=reference method.probe.restarts=1``) on a copy of the same head artifacts.
Then times the probe stage alone on the seed-0 head for ``restarts`` 4 and 1 (both k-means++)
and for the reference probe (wall seconds, in-process, median of ``--repeats``).

    python benchmarks/bench_probe_restarts.py                      # seeds 0-3 under ./bench_probe
    python benchmarks/bench_probe_restarts.py --seeds 0 --repeats 1 --root /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from cause_lightning.__main__ import config_dir
from cause_lightning.run import run

REFERENCE = ["method.probe.init=reference", "method.probe.restarts=1"]
QUIET = ["trainer.enable_progress_bar=false", "method.eval.save_images=0"]


def run_stage(root: Path, name: str, *overrides: str) -> dict[str, Any]:
    """Compose the project config (paths under ``root``) and run it in this process."""
    output = f"paths.output_dir={root / 'logs' / name}"  # no Hydra job: an explicit directory
    return run(compose("config", overrides=[f"paths.root_dir={root}", output, *QUIET, *overrides]))


def probe_row(root: Path, tag: str) -> dict[str, Any]:
    """flip_crf mIoU, raw-variant clusters used and the probe record of one artifact dir."""
    report = json.loads(
        (root / "artifacts" / "mosaic" / f"filterbank-{tag}" / "tr" / "metrics.json").read_text()
    )
    metrics = report["metrics"]
    variant = report["record_variant"]
    return {
        "mIoU": metrics[f"test/cluster/{variant}/mIoU"],
        "variant": variant,
        "clusters_used_raw": report["clusters_used"]["cluster/raw"],
        "kmeans_mIoU": metrics.get("test/baseline/kmeans/mIoU"),
        "linear_mIoU": metrics.get("test/linear/raw/mIoU"),
        "probe": report.get("cluster_probe"),
    }


def copy_head(root: Path, source: str, target: str) -> None:
    """A fresh artifact dir holding only the clusterbook and head of ``source``."""
    base = root / "artifacts" / "mosaic"
    src, dst = base / f"filterbank-{source}", base / f"filterbank-{target}"
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "tr").mkdir(parents=True)
    shutil.copy(src / "clusterbook.pt", dst)
    shutil.copy(src / "tr" / "head.pt", dst / "tr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--root", type=Path, default=Path("bench_probe"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("cause_lightning").setLevel(logging.WARNING)
    root = args.root.resolve()
    initialize_config_dir(config_dir=config_dir(), version_base="1.3")

    rows = []
    for seed in args.seeds:
        tag = f"seed{seed}"
        run_stage(root, tag, "stage=all", f"seed={seed}", f"artifact_tag={tag}")
        copy_head(root, tag, f"{tag}-ref")
        for stage in ("probe", "eval"):
            run_stage(
                root, f"{tag}-ref", f"stage={stage}", f"seed={seed}",
                f"artifact_tag={tag}-ref", *REFERENCE,
            )  # fmt: skip
        rows.append(
            {
                "seed": seed,
                "default": probe_row(root, tag),
                "reference": probe_row(root, f"{tag}-ref"),
            }
        )

    timings: dict[str, list[float]] = {}
    variants = {
        "kmeans++ x4 (default)": [],
        "kmeans++ x1": ["method.probe.restarts=1"],
        "reference x1": REFERENCE,
    }
    for _ in range(args.repeats):
        for name, overrides in variants.items():
            copy_head(root, f"seed{args.seeds[0]}", "timing")
            start = time.perf_counter()
            run_stage(
                root, "timing", "stage=probe", f"seed={args.seeds[0]}", "artifact_tag=timing",
                *overrides,
            )  # fmt: skip
            timings.setdefault(name, []).append(time.perf_counter() - start)

    print("\nseed | default flip_crf mIoU (clusters used, raw) | reference init x1")
    for row in rows:
        d, r = row["default"], row["reference"]
        print(
            f"{row['seed']:4d} | {100 * d['mIoU']:5.1f} ({d['clusters_used_raw']}) "
            f"kept set {d['probe']['kept']} | {100 * r['mIoU']:5.1f} ({r['clusters_used_raw']})"
        )
    for key in ("default", "reference"):
        values = [100 * row[key]["mIoU"] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        print(f"{key}: mean {statistics.mean(values):.1f} ± {spread:.1f} (n={len(values)})")
    for key in ("kmeans_mIoU", "linear_mIoU"):
        values = [100 * row["default"][key] for row in rows if row["default"][key] is not None]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            print(f"{key}: mean {statistics.mean(values):.1f} ± {spread:.1f} (n={len(values)})")
    medians = {name: statistics.median(times) for name, times in timings.items()}
    for name, seconds in medians.items():
        print(f"probe stage {name}: {seconds:.1f} s")
    ratio = medians["kmeans++ x4 (default)"] / medians["kmeans++ x1"]
    print(f"restarts 4 / 1 wall-time ratio: {ratio:.2f}")
    (root / "bench_probe_restarts.json").write_text(
        json.dumps({"rows": rows, "timings": timings, "ratio": ratio}, indent=2)
    )


if __name__ == "__main__":
    main()
