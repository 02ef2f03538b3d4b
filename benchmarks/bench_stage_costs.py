"""Cost of each CAUSE component beside the frozen backbone, at the reference sizes.

Times (median of ``--repeats`` after one warm-up) one forward of the backbone on a batch, and on
the tokens of that batch: the modularity loss (forward + backward, K concepts), the concept-wise
contrastive loss with a bank of M entries (forward + backward), the bank update and view, and the
metric update. The backbone runs with random weights: its cost does not depend on them.

    python benchmarks/bench_stage_costs.py                 # ViT-S/8 at 320, B=16 (reference)
    python benchmarks/bench_stage_costs.py --backbone dino_vits16 --batch 8 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import torch

from cause_lightning.metrics import UnsupervisedSegmentationMetrics
from cause_lightning.models import ConceptBank, build_backbone
from cause_lightning.ops import (
    concept_contrastive_loss,
    grid_sample_tokens,
    modularity_loss,
    nearest_concept,
)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in milliseconds (device-synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="dino_vits8")
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--concepts", type=int, default=2048)
    parser.add_argument("--projection", type=int, default=2048)
    parser.add_argument("--bank", type=int, default=51_200, help="bank entries M")
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.getLogger("cause_lightning").setLevel(logging.ERROR)  # random-weights warning
    device = torch.device(args.device)
    torch.manual_seed(0)

    backbone = build_backbone(args.backbone).to(device)
    images = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    with torch.inference_mode():
        features = backbone(images)  # B D h w
    tokens, index = grid_sample_tokens(features, window=4)  # B N D
    dim = features.shape[1]
    clusterbook = torch.randn(args.concepts, dim, device=device, requires_grad=True)
    student = torch.randn(*tokens.shape[:2], args.projection, device=device, requires_grad=True)
    teacher = torch.randn_like(student)
    bank = ConceptBank(args.concepts, capacity=100, dim=args.projection)
    concepts = nearest_concept(tokens, clusterbook.detach())
    while len(bank) < args.bank:
        fill = torch.randint(args.concepts, (8192,), device=device)
        bank.update(fill, torch.randn(8192, args.projection, device=device))
    bank_view, bank_concepts = bank.view()
    metric = UnsupervisedSegmentationMetrics(args.classes).to(device)
    size = (args.batch, args.resolution, args.resolution)
    preds = torch.randint(args.classes, size, device=device)
    labels = torch.randint(args.classes, preds.shape, device=device)

    def backbone_step() -> None:
        with torch.inference_mode():
            backbone(images)

    def modularity_step() -> None:
        modularity_loss(tokens, clusterbook).backward()

    def contrastive_step() -> None:
        concept_contrastive_loss(
            tokens, student, teacher, clusterbook.detach(), bank_view, bank_concepts
        ).backward()

    def bank_step() -> None:
        bank.update(concepts.flatten(), teacher.flatten(0, 1))
        bank.view()

    rows = [
        (f"backbone {args.backbone} @{args.resolution}", backbone_step),
        (f"modularity_loss fwd+bwd (K={args.concepts}, N={tokens.shape[1]})", modularity_step),
        (f"concept_contrastive_loss fwd+bwd (M={len(bank)})", contrastive_step),
        ("bank update + view", bank_step),
        ("metric update", lambda: metric.update(preds, labels)),
    ]
    print(f"device {device}, batch {args.batch}, threads {torch.get_num_threads()}")
    base = None
    for name, fn in rows:
        ms = timed(fn, args.repeats, device)
        base = base or ms
        print(f"{name:<58} {ms:10.1f} ms  {ms / base:6.2f}x backbone")


if __name__ == "__main__":
    main()
