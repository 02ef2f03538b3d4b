"""Evaluation (method.md §7, protocol.md §4-§5): four unsupervised variants, the linear-probe
diagnostic and two label-free baselines, all scored by one dataset-level Hungarian matching.

Variants of the cluster probe: ``raw`` (no flip, no CRF), ``flip`` (h-flip average on the token
grid), ``crf`` and ``flip_crf`` (the published protocol: ``log_softmax(alpha * cos)`` refined by
DenseCRF). The linear probe is supervised and reported as a labelled diagnostic (``raw``, ``crf``).
Baselines: k-means on the raw backbone features (fitted on the evaluated images, a second pass) and
the majority class.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cause_lightning.baselines import spherical_kmeans
from cause_lightning.metrics import UnsupervisedSegmentationMetrics
from cause_lightning.models import LinearProbe
from cause_lightning.modules.base import StageModule, upsample_to
from cause_lightning.modules.head import supervised_metrics

__all__ = ["EvalModule", "VARIANTS", "cosine_logits"]

VARIANTS = ("raw", "flip", "crf", "flip_crf")


def cosine_logits(
    features: torch.Tensor, centroids: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Cosine similarity of upsampled, per-pixel normalised features to normalised centroids.

    Args:
        features: ``[B, R, h, w]`` head (or backbone) features.
        centroids: ``[C, R]`` centroids (normalised here).
        size: Label size ``(H, W)``.

    Returns:
        ``[B, C, H, W]`` cosine similarities.
    """
    pixels = F.normalize(upsample_to(features, size), dim=1)  # B R H W
    return torch.einsum("brhw,cr->bchw", pixels, F.normalize(centroids, dim=1))


class EvalModule(StageModule):
    """Test-loop module producing every reported number of a trained CAUSE model.

    Args:
        backbone: Frozen backbone.
        head: Teacher head (eval mode).
        centroids: Cluster-probe centroids ``[C, R]``.
        linear: Linear probe (supervised diagnostic).
        num_classes: C.
        alpha: Softmax sharpness of the CRF unary (3 in the reference).
        variants: Cluster-probe variants to compute (subset of ``VARIANTS``).
        crf_runner: Callable ``(images, logits) -> probabilities`` (``crf.CRFRunner``) or None
            when CRF variants are not requested.
        baselines: Also compute the k-means and majority baselines.
        kmeans_iters: Lloyd iterations of the k-means baseline.
        kmeans_restarts: k-means++ seedings of the baseline; the best objective is kept.
        kmeans_max_tokens: Tokens sampled from the evaluated images to fit k-means.
        save_images: Number of images whose predictions are kept for the report.
        seed: Seed of the k-means token sampling and seeding.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        centroids: torch.Tensor,
        linear: LinearProbe,
        num_classes: int,
        alpha: float = 3.0,
        variants: tuple[str, ...] | list[str] = VARIANTS,
        crf_runner: Any = None,
        baselines: bool = True,
        kmeans_iters: int = 30,
        kmeans_restarts: int = 10,
        kmeans_max_tokens: int = 200_000,
        save_images: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(backbone)
        unknown = sorted(set(variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown eval variants {unknown}; choose from {list(VARIANTS)}")
        if centroids.shape != (num_classes, head.reduced_dim):
            raise ValueError(
                f"centroids have shape {tuple(centroids.shape)}, expected "
                f"({num_classes}, {head.reduced_dim}): probe.pt was trained for another class "
                "count or head; re-run stage=probe"
            )
        self.head = head.requires_grad_(False)
        self.linear = linear.requires_grad_(False)
        self.register_buffer("centroids", centroids.detach().float().clone())
        self.num_classes = num_classes
        self.alpha = alpha
        self.variants = tuple(v for v in VARIANTS if v in variants)
        self.crf_runner = crf_runner
        if crf_runner is None and any("crf" in v for v in self.variants):
            raise ValueError("CRF variants requested without a CRF runner")
        self.baselines = baselines
        self.kmeans_iters = kmeans_iters
        self.kmeans_restarts = kmeans_restarts
        self.kmeans_max_tokens = kmeans_max_tokens
        self.save_images = save_images
        self.seed = seed
        self.phase = "main"  # "main", then "kmeans" for the baseline's second pass
        self.cluster_metrics = nn.ModuleDict(
            {v: UnsupervisedSegmentationMetrics(num_classes) for v in self.variants}
        )
        self.linear_metrics = nn.ModuleDict(
            {
                "raw": supervised_metrics(num_classes, ""),
                **({"crf": supervised_metrics(num_classes, "")} if crf_runner else {}),
            }
        )
        self.baseline_metrics = nn.ModuleDict(
            {
                "majority": UnsupervisedSegmentationMetrics(num_classes),
                "kmeans": UnsupervisedSegmentationMetrics(num_classes),
            }
        )
        self.kmeans_centroids: torch.Tensor | None = None
        self._token_samples: list[torch.Tensor] = []
        self._sampled_tokens = 0
        self._generator = torch.Generator().manual_seed(seed)
        self.examples: list[dict[str, np.ndarray]] = []
        self.results: dict[str, Any] = {}

    def train(self, mode: bool = True) -> EvalModule:
        super().train(mode)
        self.head.eval()
        return self

    def _crf(self, images: torch.Tensor, log_probabilities: torch.Tensor) -> torch.Tensor:
        from cause_lightning.crf import denormalize_to_uint8

        pictures = [denormalize_to_uint8(image) for image in images]
        logits = [lp.float().cpu().numpy() for lp in log_probabilities]
        refined = self.crf_runner(pictures, logits)
        return torch.from_numpy(np.stack(refined)).to(log_probabilities.device).argmax(1)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.phase == "kmeans":
            self._kmeans_step(batch)
            return
        images, labels = batch["image"], batch["label"]
        size = tuple(labels.shape[-2:])
        features = self.extract(images)  # B D h w
        segment = self.head(features)  # B R h w
        if self.baselines:
            self._sample_tokens(features)
            self.baseline_metrics["majority"].update(torch.zeros_like(labels), labels)
        grids = {"": segment}
        if any(v.startswith("flip") for v in self.variants):
            flipped = self.head(self.extract(images.flip(-1))).flip(-1)  # B R h w
            grids["flip"] = (segment + flipped) / 2
        predictions: dict[str, torch.Tensor] = {}
        for variant in self.variants:
            grid = grids["flip" if variant.startswith("flip") else ""]
            cosine = cosine_logits(grid, self.centroids, size)  # B C H W
            if variant.endswith("crf"):
                prediction = self._crf(images, F.log_softmax(self.alpha * cosine, dim=1))
            else:
                prediction = cosine.argmax(1)  # B H W
            self.cluster_metrics[variant].update(prediction, labels)
            predictions[variant] = prediction
        linear_logits = upsample_to(self.linear(segment), size)  # B C H W
        self.linear_metrics["raw"].update(linear_logits.argmax(1), labels)
        if "crf" in self.linear_metrics:
            refined = self._crf(images, F.log_softmax(linear_logits, dim=1))
            self.linear_metrics["crf"].update(refined, labels)
        self._keep_examples(images, labels, predictions)

    def _keep_examples(
        self, images: torch.Tensor, labels: torch.Tensor, predictions: dict[str, torch.Tensor]
    ) -> None:
        from cause_lightning.crf import denormalize_to_uint8

        for i in range(images.shape[0]):
            if len(self.examples) >= self.save_images:
                return
            self.examples.append(
                {
                    "image": denormalize_to_uint8(images[i]),
                    "label": labels[i].cpu().numpy(),
                    **{v: p[i].cpu().numpy() for v, p in predictions.items()},
                }
            )

    def _sample_tokens(self, features: torch.Tensor) -> None:
        tokens = features.flatten(2).transpose(1, 2).flatten(0, 1)  # (B h w) D
        budget = self.kmeans_max_tokens - self._sampled_tokens
        if budget <= 0:
            return
        # A fixed share per batch keeps the sample spread over the whole split.
        share = max(1, min(budget, tokens.shape[0] // 4 or 1))
        pick = torch.randperm(tokens.shape[0], generator=self._generator)[:share]
        self._token_samples.append(tokens[pick.to(tokens.device)].float().cpu())
        self._sampled_tokens += share

    def _kmeans_step(self, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["label"]
        features = self.extract(batch["image"])
        cosine = cosine_logits(
            features, self.kmeans_centroids.to(features.device), labels.shape[-2:]
        )
        self.baseline_metrics["kmeans"].update(cosine.argmax(1), labels)

    def on_test_epoch_end(self) -> None:
        if self.phase == "kmeans":
            self._finish_metrics({"baseline/kmeans": self.baseline_metrics["kmeans"]})
            return
        metrics: dict[str, Any] = {f"cluster/{v}": m for v, m in self.cluster_metrics.items()}
        metrics.update({f"linear/{v}": m for v, m in self.linear_metrics.items()})
        if self.baselines:
            metrics["baseline/majority"] = self.baseline_metrics["majority"]
            self._fit_kmeans()
        self._finish_metrics(metrics)

    def _fit_kmeans(self) -> None:
        dim = int(self.backbone.embed_dim)
        samples = torch.cat(self._token_samples) if self._token_samples else torch.empty(0, dim)
        if self.trainer.world_size > 1:
            # Ranks may sample different counts: pad to the largest, gather, then trim.
            counts = self.all_gather(torch.tensor(samples.shape[0], device=self.device))  # W
            padded = torch.zeros(int(counts.max()), dim, device=self.device)
            padded[: samples.shape[0]] = samples.to(self.device)
            gathered = self.all_gather(padded)  # W n D
            samples = torch.cat([g[: int(n)] for g, n in zip(gathered, counts)]).cpu()
        self._token_samples.clear()
        self.kmeans_centroids = spherical_kmeans(
            samples,
            self.num_classes,
            iterations=self.kmeans_iters,
            seed=self.seed,
            restarts=self.kmeans_restarts,
        )

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
