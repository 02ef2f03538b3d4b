"""Evaluation (method.md §7, protocol.md §4-§5): four unsupervised variants, the linear-probe
diagnostic and three label-free baselines, all scored by one dataset-level Hungarian matching.

Variants of the cluster probe: ``raw`` (no flip, no CRF), ``flip`` (h-flip average on the token
grid), ``crf`` and ``flip_crf`` (the published protocol: ``log_softmax(alpha * cos)`` refined by
DenseCRF). The linear probe is supervised and reported as a labelled diagnostic (``raw``, and
``crf`` unless switched off). Baselines: spherical k-means on the raw backbone features
(``kmeans``) and on the trained head's features (``kmeans_head``), both fitted on tokens of the
evaluated images and scored in a second pass, and the majority class.

Over-clustering (``overcluster``, off by default): for each count ``k > C``, the k-centroid cluster
probe of stage 3 (``raw``, and ``flip`` when a flip variant is computed) and the two k-means
baselines with ``k`` clusters (when baselines are on), scored with many-to-one majority matching
under rows ``overcluster_k<k>/cluster/<variant>`` and ``overcluster_k<k>/baseline/<kmeans>``.

The CRF runs on the CPU, off the accelerator's critical path: each batch's unaries are handed to the
:class:`~cause_lightning.inference.crf.CRFRunner` pool, which returns label maps (the argmax is
taken in the workers), and the loop goes on with the next batches while the pool works. An image's
unaries (``crf``, ``flip_crf``, the linear probe's ``crf``) travel to a worker together with the
picture once, and are refined on one set of pairwise terms. The metrics are updated as results come
back (confusion counts do not depend on the order).

Under a spawning DDP strategy (``ddp_spawn``) the loop runs in child processes: global rank 0
writes what the report needs (metrics, examples, k-means centroids) to :attr:`EvalModule.handoff`
at the end of each test run, and the parent reads it back with :meth:`EvalModule.receive`.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from torch import nn

from cause_lightning.core.bounds import COUNT, NON_NEGATIVE_INT, POSITIVE, SEED
from cause_lightning.core.files import atomic_write
from cause_lightning.inference.dense import (
    cosine_argmax,
    cosine_logits,
    crf_labels,
    crf_pixels,
    crf_unaries,
    grid_features,
    upsampled_logits,
)
from cause_lightning.metrics import (
    EVAL_VARIANTS,
    UnsupervisedSegmentationMetrics,
    overcluster_row,
    supervised_metrics,
)
from cause_lightning.models import LinearProbe
from cause_lightning.modules.base import StageModule
from cause_lightning.ops.kmeans import spherical_kmeans

__all__ = [
    "EvalModule",
    "KMEANS_BASELINES",
    "cosine_logits",
    "cosine_argmax",
]

# k-means baselines: name -> which features they cluster.
KMEANS_BASELINES = {"kmeans": "backbone", "kmeans_head": "head"}


@dataclass
class _CRFRow:
    """One CRF-refined row of a batch: its metric, its unaries and the cluster variant (None for
    the linear probe) whose examples wait for its maps."""

    metric: Any
    unaries: np.ndarray  # B C H W
    variant: str | None = None


@dataclass
class _PendingCRF:
    """CRF label maps of one batch, every CRF row at once, still being computed by the pool."""

    rows: list[_CRFRow]  # in the order of each image's maps
    labels: torch.Tensor  # B H W, on the module's device
    futures: list[Future]  # one per image: its maps [U H W], U = len(rows)
    examples: list[int | None] = field(default_factory=list)  # example slot per image


class EvalModule(StageModule):
    """Test-loop module producing every reported number of a trained CAUSE model.

    Every setting comes from ``method.eval`` (conf/method/cause.yaml); none has a default here.

    Args:
        backbone: Frozen backbone.
        head: Teacher head (eval mode).
        centroids: Cluster-probe centroids ``[C, R]``.
        linear: Linear probe (supervised diagnostic).
        num_classes: C.
        alpha: Softmax sharpness of the CRF unary (3 in the reference).
        variants: Cluster-probe variants to compute (subset of ``EVAL_VARIANTS``).
        crf_runner: ``crf.CRFRunner`` or None when CRF variants are not requested.
        linear_crf: Also refine the linear probe with the CRF (a third CRF per image).
        crf_in_flight: CRFs (one image, one unary each) submitted but not collected before the
            loop waits for the oldest batch (bounds host memory; default: four per pool worker,
            at least 8).
        baselines: Also compute the k-means and majority baselines.
        kmeans_iters: Lloyd iterations of the k-means baselines.
        kmeans_restarts: k-means++ seedings of the baselines; the best objective is kept.
        kmeans_max_tokens: Tokens sampled from the evaluated images to fit k-means, over all
            processes (each samples its share).
        save_images: Number of images whose predictions are kept for the report.
        overcluster: Over-clustering probes, cluster count ``k > C`` -> centroids ``[k, R]``
            (``probe.pt``'s ``overcluster`` records); each k also gets k-means baselines with k
            clusters. None or empty = off.
        seed: Seed of the k-means token sampling and seeding.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        centroids: torch.Tensor,
        linear: LinearProbe,
        num_classes: Annotated[int, COUNT],
        alpha: Annotated[float, POSITIVE],
        variants: tuple[str, ...] | list[str],
        crf_runner: Any,
        linear_crf: bool,
        baselines: bool,
        kmeans_iters: Annotated[int, COUNT],
        kmeans_restarts: Annotated[int, COUNT],
        kmeans_max_tokens: Annotated[int, COUNT],
        save_images: Annotated[int, NON_NEGATIVE_INT],
        overcluster: dict[int, torch.Tensor] | None,
        seed: Annotated[int, SEED],
        crf_in_flight: int | None = None,
    ) -> None:
        super().__init__(backbone, seed=seed)
        unknown = sorted(set(variants) - set(EVAL_VARIANTS))
        if unknown:
            raise ValueError(f"unknown eval variants {unknown}; choose from {list(EVAL_VARIANTS)}")
        if centroids.shape != (num_classes, head.reduced_dim):
            raise ValueError(
                f"centroids have shape {tuple(centroids.shape)}, expected "
                f"({num_classes}, {head.reduced_dim}): probe.pt was trained for another class "
                "count or head; re-run stage=probe"
            )
        self.head = head.requires_grad_(False)
        self.linear = linear.requires_grad_(False)
        self.register_buffer("centroids", centroids.detach().float().clone())
        self.overcluster_counts = sorted(overcluster or {})
        for k in self.overcluster_counts:
            if k <= num_classes or overcluster[k].shape != (k, head.reduced_dim):
                raise ValueError(
                    f"over-clustering centroids for k={k} have shape "
                    f"{tuple(overcluster[k].shape)}, expected ({k}, {head.reduced_dim}) with "
                    f"k > {num_classes}: re-run stage=probe with method.eval.overcluster"
                )
            self.register_buffer(overcluster_row(k), overcluster[k].detach().float().clone())
        self.num_classes = num_classes
        self.alpha = alpha
        self.variants = tuple(v for v in EVAL_VARIANTS if v in variants)
        self.crf_runner = crf_runner
        if crf_runner is None and any("crf" in v for v in self.variants):
            raise ValueError("CRF variants requested without a CRF runner")
        workers = int(getattr(crf_runner, "num_workers", 0) or 0)
        self.crf_in_flight = int(crf_in_flight or max(8, 4 * workers))
        self.baselines = baselines
        self.kmeans_iters = kmeans_iters
        self.kmeans_restarts = kmeans_restarts
        self.kmeans_max_tokens = kmeans_max_tokens
        self.save_images = save_images
        self.phase = "main"  # "main", then "kmeans" for the baselines' second pass
        self.handoff: Path | None = None  # where rank 0 leaves its outcome for a spawning parent
        self.cluster_metrics = nn.ModuleDict(
            {v: UnsupervisedSegmentationMetrics(num_classes) for v in self.variants}
        )
        self.linear_metrics = nn.ModuleDict(
            {
                "raw": supervised_metrics(num_classes, ""),
                **(
                    {"crf": supervised_metrics(num_classes, "")}
                    if crf_runner and linear_crf
                    else {}
                ),
            }
        )
        self.baseline_metrics = nn.ModuleDict(
            {
                "majority": UnsupervisedSegmentationMetrics(num_classes),
                **{name: UnsupervisedSegmentationMetrics(num_classes) for name in KMEANS_BASELINES},
            }
        )
        # Many-to-one rows per k: "k<k>" -> {probe variant or k-means baseline: metric}.
        flip = any(v.startswith("flip") for v in self.variants)
        self.overcluster_variants = ("raw", "flip") if flip else ("raw",)
        names = (*self.overcluster_variants, *(KMEANS_BASELINES if baselines else ()))
        self.overcluster_metrics = nn.ModuleDict(
            {
                f"k{k}": nn.ModuleDict(
                    {
                        name: UnsupervisedSegmentationMetrics(num_classes, k, matching="majority")
                        for name in names
                    }
                )
                for k in self.overcluster_counts
            }
        )
        self.kmeans_centroids: dict[str, torch.Tensor] = {}
        self._token_samples: dict[str, list[torch.Tensor]] = {k: [] for k in KMEANS_BASELINES}
        self._sampled_tokens = 0
        # Built when a test run starts: a torch.Generator held here would be pickled into spawned
        # processes as a temporary tensor, which torch's file-descriptor sharing cannot pass on.
        self._generator: torch.Generator | None = None
        self._pending: list[_PendingCRF] = []
        self._ran_here = False
        self.examples: list[dict[str, np.ndarray]] = []
        self.results: dict[str, Any] = {}

    def train(self, mode: bool = True) -> EvalModule:
        super().train(mode)
        self.head.eval()
        return self

    # ------------------------------------------------------------------ batches
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.phase == "main" and isinstance(batch, dict) and self._needs_pixels():
            batch["crf_pixels"] = crf_pixels(batch["image"])  # stays on the host (numpy)
        return batch

    def _needs_pixels(self) -> bool:
        return self.crf_runner is not None or len(self.examples) < self.save_images

    def on_test_start(self) -> None:
        self._ran_here = True
        if self.phase == "main":
            self._generator = torch.Generator().manual_seed(self.seed)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.phase == "kmeans":
            self._kmeans_step(batch)
            return
        images, labels = batch["image"], batch["label"]
        pixels = batch.get("crf_pixels")
        if pixels is None and self._needs_pixels():
            pixels = crf_pixels(images)
        size = tuple(labels.shape[-2:])
        features = self.extract(images)  # B D h w
        segment = self.head(features)  # B R h w
        if self.baselines:
            self._sample_tokens(features, segment)
            self.baseline_metrics["majority"].update(torch.zeros_like(labels), labels)
        grids = {"": segment}
        if any(v.startswith("flip") for v in self.variants):
            grids["flip"] = grid_features(self._encode, images, flip=True, plain=segment)
        slots = self._example_slots(pixels, labels)
        crf_rows: list[_CRFRow] = []
        for variant in self.variants:
            grid = grids["flip" if variant.startswith("flip") else ""]
            cosine = cosine_logits(grid, self.centroids, size)  # B C H W
            metric = self.cluster_metrics[variant]
            if variant.endswith("crf"):
                crf_rows.append(_CRFRow(metric, crf_unaries(cosine, self.alpha), variant))
                continue
            prediction = cosine.argmax(1)  # B H W
            metric.update(prediction, labels)
            self._fill_examples(slots, variant, prediction)
        self._overcluster_step(grids, labels)
        linear_logits = upsampled_logits(self.linear(segment), size)  # B C H W
        self.linear_metrics["raw"].update(linear_logits.argmax(1), labels)
        if "crf" in self.linear_metrics:
            crf_rows.append(_CRFRow(self.linear_metrics["crf"], crf_unaries(linear_logits)))
        if crf_rows:
            self._submit_crf(crf_rows, pixels, labels, slots)
        self._drain(wait=False)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.extract(images))  # B R h w

    def _overcluster_step(self, grids: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """Score the k-centroid probes on the head grids of this batch (no CRF)."""
        size = tuple(labels.shape[-2:])
        for k in self.overcluster_counts:
            centroids = getattr(self, overcluster_row(k))  # k R
            for variant in self.overcluster_variants:
                grid = grids["flip" if variant == "flip" else ""]
                prediction = cosine_argmax(grid, centroids, size)  # B H W
                self.overcluster_metrics[f"k{k}"][variant].update(prediction, labels)

    def _overcluster_rows(self, kind: str) -> dict[str, Any]:
        """The over-clustering metrics of ``kind`` ("cluster" or "baseline") by row name."""
        rows = {}
        for k in self.overcluster_counts:
            for name, metric in self.overcluster_metrics[f"k{k}"].items():
                if (name in KMEANS_BASELINES) == (kind == "baseline"):
                    rows[f"{overcluster_row(k)}/{kind}/{name}"] = metric
        return rows

    # ------------------------------------------------------------------ CRF in the background
    def _submit_crf(
        self,
        rows: list[_CRFRow],
        pixels: np.ndarray,
        labels: torch.Tensor,
        slots: list[int | None],
    ) -> None:
        """Hand each image of the batch to the pool once, with its unary of every CRF row."""
        per_image = [[row.unaries[i] for row in rows] for i in range(len(pixels))]  # B x U x C H W
        futures = self.crf_runner.submit(list(pixels), per_image, argmax=True)
        self._pending.append(_PendingCRF(rows, labels, futures, list(slots)))
        self._drain(wait=False)

    def _drain(self, wait: bool) -> None:
        """Score finished CRF batches in submission order; block while too many CRFs are in
        flight (or on everything when ``wait``)."""
        while self._pending:
            in_flight = sum(len(p.futures) * len(p.rows) for p in self._pending)
            oldest = self._pending[0]
            if not (
                wait or in_flight > self.crf_in_flight or all(f.done() for f in oldest.futures)
            ):
                return
            maps = self.crf_runner.collect(oldest.futures)  # B x [U H W]
            self._pending.pop(0)
            for u, row in enumerate(oldest.rows):
                prediction = crf_labels([m[u] for m in maps], oldest.labels.device)  # B H W
                row.metric.update(prediction, oldest.labels)
                if row.variant is not None:
                    self._fill_examples(oldest.examples, row.variant, prediction)

    # ------------------------------------------------------------------ examples
    def _example_slots(self, pixels: np.ndarray, labels: torch.Tensor) -> list[int | None]:
        slots: list[int | None] = []
        for i in range(labels.shape[0]):
            if len(self.examples) >= self.save_images:
                slots.append(None)
                continue
            slots.append(len(self.examples))
            self.examples.append({"image": pixels[i], "label": labels[i].cpu().numpy()})
        return slots

    def _fill_examples(
        self, slots: list[int | None], variant: str, prediction: torch.Tensor
    ) -> None:
        for i, slot in enumerate(slots):
            if slot is not None:
                self.examples[slot][variant] = prediction[i].cpu().numpy()

    # ------------------------------------------------------------------ k-means baselines
    def _sample_tokens(self, features: torch.Tensor, segment: torch.Tensor) -> None:
        world, _ = self.world()
        # Each process samples its share of the budget from its own images.
        budget = math.ceil(self.kmeans_max_tokens / world) - self._sampled_tokens
        if budget <= 0:
            return
        tokens = features.flatten(2).transpose(1, 2).flatten(0, 1)  # (B h w) D
        # A fixed share per batch keeps the sample spread over the whole split.
        share = max(1, min(budget, tokens.shape[0] // 4 or 1))
        pick = torch.randperm(tokens.shape[0], generator=self._generator)[:share].to(tokens.device)
        head_tokens = segment.flatten(2).transpose(1, 2).flatten(0, 1)  # (B h w) R
        # The head runs on the backbone's grid: the same positions serve both baselines.
        self._token_samples["kmeans"].append(tokens[pick].float().cpu())
        self._token_samples["kmeans_head"].append(head_tokens[pick].float().cpu())
        self._sampled_tokens += share

    def _kmeans_step(self, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["label"]
        size = tuple(labels.shape[-2:])
        features = self.extract(batch["image"])  # B D h w
        inputs = {"backbone": features, "head": self.head(features)}
        for name, source in KMEANS_BASELINES.items():
            centroids = self.kmeans_centroids[name].to(features.device)
            prediction = cosine_argmax(inputs[source], centroids, size)  # B H W
            self.baseline_metrics[name].update(prediction, labels)
            for k in self.overcluster_counts:
                centroids = self.kmeans_centroids[f"{overcluster_row(k)}/{name}"]
                prediction = cosine_argmax(inputs[source], centroids.to(features.device), size)
                self.overcluster_metrics[f"k{k}"][name].update(prediction, labels)

    def _fit_kmeans(self) -> None:
        """Fit each k-means baseline once (C clusters, then every over-clustering count) on
        global rank 0's device, and broadcast it."""
        world, rank = self.world()
        dims = {"kmeans": int(self.backbone.embed_dim), "kmeans_head": int(self.head.reduced_dim)}
        for name in KMEANS_BASELINES:
            chunks = self._token_samples[name]
            samples = torch.cat(chunks) if chunks else torch.empty(0, dims[name])
            if world > 1:
                samples = self._gather_rows(samples)
            fits = {name: self.num_classes}
            fits.update({f"{overcluster_row(k)}/{name}": k for k in self.overcluster_counts})
            for key, num_clusters in fits.items():
                if samples.shape[0] < num_clusters:  # the same count on every process
                    raise ValueError(
                        f"the {key} baseline sampled {samples.shape[0]} tokens for "
                        f"{num_clusters} clusters: raise method.eval.kmeans_max_tokens, evaluate "
                        "more images, lower method.eval.overcluster or set "
                        "method.eval.baselines=false"
                    )
                centroids = None
                if rank == 0:
                    centroids = spherical_kmeans(
                        samples.to(self.device),
                        num_clusters,
                        iterations=self.kmeans_iters,
                        seed=self.seed,
                        restarts=self.kmeans_restarts,
                    ).cpu()
                if world > 1:
                    centroids = self.trainer.strategy.broadcast(centroids, src=0)
                self.kmeans_centroids[key] = centroids
            chunks.clear()
        self._sampled_tokens = 0

    def _gather_rows(self, samples: torch.Tensor) -> torch.Tensor:
        """All processes' sampled rows, in rank order (ranks may hold different counts)."""
        counts = self.all_gather(torch.tensor(samples.shape[0], device=self.device))  # W
        padded = torch.zeros(int(counts.max()), samples.shape[1], device=self.device)
        padded[: samples.shape[0]] = samples.to(self.device)
        gathered = self.all_gather(padded)  # W n D
        return torch.cat([g[: int(n)] for g, n in zip(gathered, counts)])

    # ------------------------------------------------------------------ epoch end
    def on_test_epoch_end(self) -> None:
        if self.phase == "kmeans":
            self._finish_metrics(
                {
                    **{f"baseline/{n}": self.baseline_metrics[n] for n in KMEANS_BASELINES},
                    **self._overcluster_rows("baseline"),
                }
            )
            return
        self._drain(wait=True)
        metrics: dict[str, Any] = {f"cluster/{v}": m for v, m in self.cluster_metrics.items()}
        metrics.update({f"linear/{v}": m for v, m in self.linear_metrics.items()})
        metrics.update(self._overcluster_rows("cluster"))
        if self.baselines:
            metrics["baseline/majority"] = self.baseline_metrics["majority"]
            self._fit_kmeans()
        self._finish_metrics(metrics)

    def on_test_end(self) -> None:
        self._generator = None
        if self.crf_runner is not None:
            self.crf_runner.close()  # a spawned process must not exit with a live pool
        if self.handoff is not None and self.trainer.is_global_zero:
            outcome = self.outcome()
            atomic_write(self.handoff, lambda tmp: torch.save(outcome, tmp))

    def _finish_metrics(self, metrics: dict[str, Any]) -> None:
        for name, metric in metrics.items():
            scores = metric.compute()
            for key in ("mIoU", "pAcc"):
                value = float(scores[key])
                self.results[f"test/{name}/{key}"] = value
                self.log(f"test/{name}/{key}", value, sync_dist=False)
            if "per_class_iou" in scores:
                self.results[f"details/{name}/per_class_iou"] = [
                    float(x) for x in scores["per_class_iou"]
                ]
                self.results[f"details/{name}/assignment"] = [int(x) for x in scores["assignment"]]
                self.results[f"details/{name}/confusion"] = scores["confusion"].tolist()
            metric.reset()

    # ------------------------------------------------------------------ hand-off
    def outcome(self) -> dict[str, Any]:
        """What the report and the k-means pass need from a test run, as plain content (tensors,
        numbers, strings, lists and dicts) that ``torch.load(weights_only=True)`` reads."""
        return {
            "results": dict(self.results),
            "examples": [
                {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in example.items()}
                for example in self.examples
            ],
            "kmeans_centroids": {k: v.cpu() for k, v in self.kmeans_centroids.items()},
        }

    def receive(self) -> None:
        """Take over the outcome of a test run that ran in other processes (``ddp_spawn``).

        Does nothing when the loop ran in this process. The hand-off file is removed.
        """
        if self.handoff is None or not self.handoff.is_file():
            return
        if not self._ran_here:
            state = torch.load(self.handoff, weights_only=True)
            self.results = state["results"]
            self.examples = [
                {k: v.numpy() for k, v in example.items()} for example in state["examples"]
            ]
            self.kmeans_centroids = state["kmeans_centroids"]
        self.handoff.unlink()
