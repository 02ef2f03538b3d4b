"""Peak memory of ``stage=predict`` on large images, against its floor.

Writes ``--images`` photographs of ``--side`` x ``--side`` pixels (JPEG, smooth gradients with
noise), then runs the command line on them in a child process and reads the child's peak resident
memory from the kernel (``os.wait4``: ``ru_maxrss``, as ``/usr/bin/time -v`` reports it). The
floor is another child that imports the package, loads the same model and decodes one of the
images (what any predict needs); the difference is what segmenting and writing the outputs cost.
The model is ``tiny_vit`` with an MLP head and random weights, at ``--resolution``: the images are
resized to it before the network, so its size does not change what scales with the image.

    python benchmarks/bench_predict_memory.py                 # 8 images of 6000 x 6000
    python benchmarks/bench_predict_memory.py --images 2 --side 512 --out /tmp/row.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cause_lightning.core.specs import builtin_head_spec
from cause_lightning.models import build_backbone, build_head
from cause_lightning.segmenter import Segmenter

CLASSES = 27
REDUCED = 16


def write_model(path: Path, resolution: int) -> None:
    """A segmenter file: tiny_vit, an MLP head, random centroids and a class assignment."""
    torch.manual_seed(0)
    backbone = build_backbone("tiny_vit")
    head = build_head(builtin_head_spec("mlp", int(backbone.embed_dim), REDUCED, 0.1)).eval()
    segmenter = Segmenter(
        backbone,
        head,
        torch.randn(CLASSES, REDUCED),
        resolution=resolution,
        assignment=list(range(CLASSES)),
    )
    segmenter.save(path)


def write_images(folder: Path, count: int, side: int) -> None:
    """``count`` JPEG photographs of ``side`` x ``side``, built one band of rows at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for i in range(count):
        picture = Image.new("RGB", (side, side))
        for top in range(0, side, 512):
            rows = min(512, side - top)
            band = np.empty((rows, side, 3), dtype=np.float32)
            band[..., 0] = ramp[None, :]
            band[..., 1] = ramp[top : top + rows, None]
            band[..., 2] = (i * 31) % 256
            band += rng.normal(0, 12, band.shape).astype(np.float32)
            picture.paste(Image.fromarray(np.clip(band, 0, 255).astype(np.uint8)), (0, top))
        picture.save(folder / f"photo_{i}.jpg", quality=90)


def peak_rss_mb(command: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``command`` and return its peak resident memory (MiB) and wall seconds."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = child.stdout.read() if child.stdout else b""
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({child.returncode}):\n{output.decode()[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


FLOOR = """
import sys
from cause_lightning.data.datasets import open_image
from cause_lightning.segmenter import Segmenter
model = Segmenter.load(sys.argv[1])
picture = open_image(sys.argv[2])
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="also write the row to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.root) as tmp:
        root = Path(tmp)
        model = root / "segmenter.pt"
        write_model(model, args.resolution)
        write_images(root / "photos", args.images, args.side)
        floor_mb, _ = peak_rss_mb(
            [sys.executable, "-c", FLOOR, str(model), str(root / "photos" / "photo_0.jpg")], root
        )
        predict = [
            sys.executable, "-m", "cause_lightning", "stage=predict", "trainer.accelerator=cpu",
            f"predict.input={root / 'photos'}", f"predict.segmenter={model}",
            f"predict.output_dir={root / 'predictions'}", f"hydra.run.dir={root / 'run'}",
        ]  # fmt: skip
        peak_mb, seconds = peak_rss_mb(predict, root)
        outputs = root / "predictions"
        sheet = outputs / "contact_sheet.png"
        row = {
            "name": f"predict peak memory ({args.images} images of {args.side}x{args.side})",
            "peak_rss_mb": round(peak_mb, 1),
            "floor_rss_mb": round(floor_mb, 1),
            "above_floor_mb": round(peak_mb - floor_mb, 1),
            "time_s": round(seconds, 2),
            "outputs": len(list((outputs / "overlay").glob("*.png"))),
            "contact_sheet_mb": round(sheet.stat().st_size / 2**20, 2),
        }
    print(json.dumps(row, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2) + "\n")
    return row


if __name__ == "__main__":
    main()
