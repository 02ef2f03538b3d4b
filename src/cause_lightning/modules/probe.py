"""Stage 3 (fine-tuning): cluster probe by modularity and the linear probe (method.md §6).

The head is frozen and the probe input is detached, which fixes the reference's label leak
(method.md §6.3). ``reference_leak=True`` reproduces the released behaviour for comparison: the
linear-probe loss then trains the teacher head, and every report is labelled accordingly.

The centroids start either as the reference's uniform(±1/C) draw or as spherical k-means++ seeds
on the frozen head's grid-sampled tokens of a fixed sample of training images (no labels).
``restarts`` centroid sets are fitted side by side from the same forward passes, and the set with
the highest modularity on the tokens of other fixed training images is exported (method.md §6.1).

Over-clustering (``method.eval.overcluster``): for each count ``k`` an extra ``[S, k, R]`` centroid
parameter is fitted in the same forward passes, with the same loss, start and restart selection,
and exported under ``overcluster`` in ``probe.pt``. The extra sets draw from their own generators
and have their own Adam state, so the C-centroid probe is the same with or without them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

import torch
from torch import Tensor, nn

from cause_lightning.core.bounds import (
    COUNT,
    OPTIONAL_POSITIVE,
    POSITIVE,
    SEED,
    check_overcluster,
)
from cause_lightning.core.logs import get_logger
from cause_lightning.inference.dense import cosine_argmax
from cause_lightning.metrics import UnsupervisedSegmentationMetrics, supervised_metrics
from cause_lightning.models import LinearProbe
from cause_lightning.modules.base import (
    INIT_STREAM,
    OptimizerFactory,
    SchedulerFactory,
    StageModule,
    linear_probe_loss,
    step_generator,
    upsample_to,
)
from cause_lightning.ops import grid_sample_index, grid_sample_tokens, modularity_loss
from cause_lightning.ops.kmeans import spherical_kmeans_plus_plus

__all__ = ["ProbeInit", "ProbeModule", "restart_losses", "restart_objectives", "sample_split"]

log = get_logger(__name__)

#: Where the centroids start (method.md §6.1): uniform(±1/C), or k-means++ seeds on head tokens.
ProbeInit = Literal["reference", "kmeans++"]

# Keys of the INIT_STREAM draws: the grid offsets of the two fixed samples, then one per restart,
# then the over-clustering sets' starts (keyed further by their cluster count).
_SEEDING_GRID, _SELECTION_GRID, _RESTART, _OVERCLUSTER = 0, 1, 2, 3


def restart_losses(tokens: Tensor, centroids: Tensor, temperature: float) -> Tensor:
    """The modularity loss of every centroid set on the same tokens.

    Args:
        tokens: ``[B, N, R]`` grid-sampled head tokens (constants).
        centroids: ``[S, C, R]`` centroid sets.
        temperature: Modularity temperature.

    Returns:
        ``[S]`` losses (``modularity_loss`` per set; each set's gradient is that of a lone run).
    """
    return torch.stack([modularity_loss(tokens, c, temperature=temperature) for c in centroids])


@torch.no_grad()
def restart_objectives(
    tokens: Tensor, centroids: Tensor, temperature: float, chunk: int = 16
) -> Tensor:
    """Mean modularity ``Q`` of every centroid set over the images of a token sample.

    Args:
        tokens: ``[M, N, R]`` tokens of ``M`` images (each image is its own graph).
        centroids: ``[S, C, R]`` centroid sets.
        temperature: Modularity temperature.
        chunk: Images per block (bounds the ``[chunk, N, N]`` graphs).

    Returns:
        ``[S]`` float64 objectives; higher is better (minus the mean modularity loss).
    """
    total = torch.zeros(centroids.shape[0], dtype=torch.float64)
    for block in tokens.split(chunk):
        losses = restart_losses(block, centroids.to(block.device), temperature)  # S
        total -= losses.double().cpu() * block.shape[0]
    return total / tokens.shape[0]


def sample_split(num_images: int, per_purpose: int, seed: int) -> tuple[list[int], list[int]]:
    """Two disjoint fixed samples of training images: seeding and restart selection.

    A seeded permutation of the dataset gives ``per_purpose`` images to each; a dataset smaller
    than ``2 * per_purpose`` is halved. The samples depend only on the dataset size and the seed,
    so every process draws the same.

    Args:
        num_images: Size of the training set.
        per_purpose: Images wanted per sample (``method.probe.sample_images``).
        seed: Run seed.

    Returns:
        ``(seeding indices, selection indices)``; with a single image both are ``[0]``.
    """
    if num_images < 1:
        raise ValueError("the probe stage needs at least one training image")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    if num_images == 1:
        return order, order
    size = min(per_purpose, (num_images + 1) // 2)
    return order[:size], order[size : size + min(per_purpose, num_images - size)]


class ProbeModule(StageModule):
    """Fits the class centroids ``[C, R]`` and the linear probe on a frozen teacher head.

    Every hyper-parameter comes from ``method.probe`` (conf/method/cause.yaml); none has a default
    here.

    Args:
        backbone: Frozen backbone.
        head: The stage-2 teacher head (loaded).
        linear: The stage-2 linear probe (training continues from it).
        num_classes: C.
        lr: Learning rate of the linear probe (and of the head with ``reference_leak``).
        cluster_lr: Learning rate of the centroids.
        temperature: Modularity temperature.
        window: Grid-sampling window.
        clip: Grad-norm clip of the segment parameters (None = none).
        head_dropout: Keep the frozen head's dropout active while the centroids are fitted.
        reference_leak: Reproduce the released label leak into the head (labelled).
        init: ``"reference"`` (uniform(±1/C)) or ``"kmeans++"`` (seeds on head tokens).
        restarts: Centroid sets S fitted side by side; the best on held-out tokens is exported.
        sample_images: Training images of each fixed sample (seeding, selection).
        sample_batch_size: Images per forward pass over the fixed samples.
        overcluster: Extra cluster counts ``k > C`` fitted side by side (over-clustering
            evaluation); empty = none.
        debug_checks: Check the grid-sampling offsets and the loss's finiteness at every step
            (each check reads a value back from the device). Off: the step never waits for the
            device, and the loss is checked at the end of each epoch and before each checkpoint.
        optimizer: Optimiser factory (``method.probe.optimizer``; its weight decay applies to the
            segment parameters, never to the centroids; default Adam).
        scheduler: Per-epoch schedule factory (``method.probe.scheduler``; None = constant).
        seed: Seed of the per-step grid sampling, the fixed samples and the seeding.

    Raises:
        ValueError: On an unknown ``init``, ``restarts < 1`` or an over-clustering count that
            is not above ``num_classes``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        linear: LinearProbe,
        num_classes: Annotated[int, COUNT],
        lr: float,
        cluster_lr: float,
        temperature: Annotated[float, POSITIVE],
        window: Annotated[int, COUNT],
        clip: Annotated[float | None, OPTIONAL_POSITIVE],
        head_dropout: bool,
        reference_leak: bool,
        init: ProbeInit,
        restarts: Annotated[int, COUNT],
        sample_images: Annotated[int, COUNT],
        sample_batch_size: Annotated[int, COUNT],
        overcluster: list[int] | tuple[int, ...],
        debug_checks: bool,
        optimizer: OptimizerFactory | None,
        scheduler: SchedulerFactory | None,
        seed: Annotated[int, SEED],
    ) -> None:
        overcluster = check_overcluster(list(overcluster), num_classes)
        if init not in get_args(ProbeInit):
            raise ValueError(f"method.probe.init={init!r}: expected one of {get_args(ProbeInit)}")
        if restarts < 1 or sample_images < 1:
            raise ValueError(
                f"method.probe.restarts={restarts} and method.probe.sample_images={sample_images} "
                "must both be >= 1"
            )
        super().__init__(backbone, seed=seed, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(ignore=["backbone", "head", "linear", "optimizer", "scheduler"])
        self.head = head.requires_grad_(reference_leak)
        self.linear = linear
        # All sets in one parameter: the drawn numbers of set 0 are the reference's [C, R] draw,
        # and Adam, being element-wise, updates each set as if it were fitted alone.
        bound = 1.0 / num_classes
        self.centroids = nn.Parameter(
            torch.empty(restarts, num_classes, head.reduced_dim).uniform_(-bound, bound)
        )  # S C R
        # Held-out modularity of each set, filled when training ends (`scored` says whether it
        # was). Finite placeholders: checkpoints refuse non-finite tensors.
        self.register_buffer("objectives", torch.zeros(restarts, dtype=torch.float64))  # S
        self.register_buffer("scored", torch.tensor(False))
        # k -> [S, k, R]; drawn from seeded generators, not the global state, so that turning
        # over-clustering on leaves every other draw of the stage where it was.
        self.overcluster = nn.ParameterDict(
            {
                _set_name(k): torch.empty(restarts, k, head.reduced_dim).uniform_(
                    -1.0 / k, 1.0 / k, generator=step_generator(seed, INIT_STREAM, _OVERCLUSTER, k)
                )
                for k in overcluster
            }
        )
        self.register_buffer(
            "overcluster_objectives", torch.zeros(len(overcluster), restarts, dtype=torch.float64)
        )  # K S
        if reference_leak:
            log.warning(
                "reference_leak=true: the linear-probe loss trains the head, as the released "
                "code does; results are NOT unsupervised and are labelled as such"
            )
        self.val_cluster = nn.ModuleList(
            UnsupervisedSegmentationMetrics(num_classes) for _ in range(restarts)
        )
        self.val_linear = supervised_metrics(num_classes, "val/linear/")

    def train(self, mode: bool = True) -> ProbeModule:
        super().train(mode)
        # The head's dropout is a stage option, not a side effect of Lightning's train().
        self.head.train(mode and (self.hparams.head_dropout or self.hparams.reference_leak))
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning starts fitting with the modes the modules were built in (it never calls
        # train()), so the head-dropout option is applied here.
        self.train(True)

    # ------------------------------------------------------------------ fixed samples
    def _samples(self) -> tuple[list[int], list[int]]:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        dataset = getattr(datamodule, "train_dataset", None)
        if dataset is None:
            raise RuntimeError(
                "the probe's k-means++ seeding and restart selection read fixed training images "
                "from the datamodule's train_dataset: fit with a datamodule"
            )
        return sample_split(len(dataset), int(self.hparams.sample_images), self.seed)

    @torch.no_grad()
    def sample_tokens(self, indices: list[int], key: int) -> Tensor:
        """Grid-sampled tokens ``[M, N, R]`` of the eval-mode head on fixed training images.

        The offsets come from a generator fixed by the seed and ``key``, so every process (and
        every run with that seed) gets the same tokens for the same images.
        """
        dataset = self.trainer.datamodule.train_dataset
        generator = step_generator(self.seed, INIT_STREAM, key)
        was_training = self.head.training
        self.head.eval()  # dropout would make the sample depend on the global random state
        chunks = []
        try:
            for start in range(0, len(indices), int(self.hparams.sample_batch_size)):
                rows = indices[start : start + int(self.hparams.sample_batch_size)]
                images = torch.stack([torch.as_tensor(dataset[i]["image"]) for i in rows])
                # The loaders' own path: uint8 pixels normalised and cast on the device.
                batch = self.on_after_batch_transfer({"image": images.to(self.device)}, 0)
                segment = self.head(self.extract(batch["image"].to(self.dtype)))  # B R h w
                batch, _, height, width = segment.shape
                window = self.hparams.window
                index = grid_sample_index(batch, height, width, window, generator=generator)
                tokens, _ = grid_sample_tokens(segment, window=window, index=index.to(self.device))
                chunks.append(tokens.float().cpu())  # B N R
        finally:
            self.head.train(was_training)
        return torch.cat(chunks)

    def kmeans_seeds(self, tokens: Tensor | None = None, num_clusters: int | None = None) -> Tensor:
        """Spherical k-means++ seeds ``[S, k, R]`` on the head tokens of the seeding sample.

        Args:
            tokens: ``[M, N, R]`` seeding-sample tokens (sampled here when ``None``).
            num_clusters: k; default C. Another count draws from its own generators.

        Raises:
            ValueError: When the sample holds fewer tokens than clusters.
        """
        if tokens is None:
            tokens = self.sample_tokens(self._samples()[0], _SEEDING_GRID)
        flat = tokens.flatten(0, 1)  # (M N) R
        num_classes = int(self.hparams.num_classes)
        k = num_classes if num_clusters is None else int(num_clusters)
        if flat.shape[0] < k:
            setting = "" if k == num_classes else f" (method.eval.overcluster count {k})"
            raise ValueError(
                f"method.probe.init=kmeans++ sampled {flat.shape[0]} tokens ({tokens.shape[0]} "
                f"images, window {self.hparams.window}) for {k} clusters{setting}: raise "
                "method.probe.sample_images or the training set size, lower method.window, or "
                "use method.probe.init=reference"
            )
        # The C-cluster sets keep their original generators; the others are keyed by k as well.
        extra = () if k == num_classes else (_OVERCLUSTER, k)
        seeds = [
            spherical_kmeans_plus_plus(
                flat, k, step_generator(self.seed, INIT_STREAM, _RESTART, restart, *extra)
            )
            for restart in range(int(self.hparams.restarts))
        ]
        return torch.stack(seeds)  # S k R

    def on_fit_start(self) -> None:
        if self.hparams.init != "kmeans++" or self.trainer.ckpt_path:
            return  # a resumed fit keeps its checkpoint's centroids
        tokens = self.sample_tokens(self._samples()[0], _SEEDING_GRID)  # M N R
        targets = [(self.centroids, None)]
        targets += [(self.overcluster[_set_name(k)], k) for k in self.overcluster_counts]
        for parameter, num_clusters in targets:
            # Rank 0's seeds everywhere, whatever floating-point differences between devices.
            seeds = self.trainer.strategy.broadcast(self.kmeans_seeds(tokens, num_clusters), src=0)
            with torch.no_grad():
                parameter.copy_(seeds.to(parameter))
        log.info(
            "cluster probe: %d centroid set(s) per cluster count %s seeded by spherical "
            "k-means++ on head tokens",
            int(self.hparams.restarts),
            [int(self.hparams.num_classes), *self.overcluster_counts],
        )

    @property
    def overcluster_counts(self) -> list[int]:
        """The over-clustering counts k fitted beside the C-centroid probe (ascending)."""
        return check_overcluster(list(self.hparams.overcluster), int(self.hparams.num_classes))

    def on_train_end(self) -> None:
        _, selection = self._samples()
        tokens = self.sample_tokens(selection, _SELECTION_GRID).to(self.device)  # M N R
        objectives = restart_objectives(
            tokens.to(self.dtype), self.centroids.detach(), self.hparams.temperature,
            chunk=int(self.hparams.sample_batch_size),
        )  # fmt: skip
        objectives = self.trainer.strategy.broadcast(objectives, src=0)
        self.objectives.copy_(objectives.to(self.objectives))
        for row, k in enumerate(self.overcluster_counts):
            scores = restart_objectives(
                tokens.to(self.dtype), self.overcluster[_set_name(k)].detach(),
                self.hparams.temperature, chunk=int(self.hparams.sample_batch_size),
            )  # fmt: skip
            scores = self.trainer.strategy.broadcast(scores, src=0)
            self.overcluster_objectives[row].copy_(scores.to(self.overcluster_objectives))
        self.scored.fill_(True)

    def kept(self, row: int | None = None) -> int:
        """Index of the centroid set with the best held-out objective (0 before any training).

        Args:
            row: Position of an over-clustering count in :attr:`overcluster_counts`; ``None``
                for the C-centroid sets.
        """
        if not bool(self.scored):
            return 0
        objectives = self.objectives if row is None else self.overcluster_objectives[row]
        return int(objectives.argmax())

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features = self.extract(batch["image"])  # B D h w
        with torch.set_grad_enabled(self.hparams.reference_leak):
            segment = self.head(features)  # B R h w
        window = self.hparams.window
        check = bool(self.hparams.debug_checks)
        index = self.grid_index(segment, window, batch_idx)  # B N, whatever the world size
        tokens, _ = grid_sample_tokens(segment.detach(), window, index, validate=check)  # B N R
        # Summed over sets, so each set gets the gradient of a run of its own.
        losses = restart_losses(tokens, self.centroids, self.hparams.temperature)  # S
        loss_cluster = losses.sum()
        for centroids in self.overcluster.values():  # own parameters: C-probe gradients unchanged
            loss_cluster = (
                loss_cluster + restart_losses(tokens, centroids, self.hparams.temperature).sum()
            )
        probe_input = segment if self.hparams.reference_leak else segment.detach()
        loss_linear = linear_probe_loss(
            self.linear(probe_input), batch["label"], self.hparams.num_classes
        )
        loss = loss_cluster + loss_linear
        if check:
            self.check_finite(loss, loss_cluster=loss_cluster, loss_linear=loss_linear)
        else:
            self.defer_finite_check(loss)
        batch_size = tokens.shape[0]
        self.log_progress("train/modularity", losses.mean(), batch_size=batch_size)
        self.log("train/loss_linear", loss_linear, batch_size=batch_size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        features = self.extract(batch["image"])
        segment = self.head(features)  # B R h w
        size = tuple(batch["label"].shape[-2:])
        for metric, centroids in zip(self.val_cluster, self.centroids):
            # float32 cosines, as the evaluation scores them
            metric.update(cosine_argmax(segment, centroids, size), batch["label"])
        logits = upsample_to(self.linear(segment), size)
        self.val_linear.update(logits.argmax(1), batch["label"])

    def on_validation_epoch_end(self) -> None:
        # Labelled diagnostics: the mean over the centroid sets, and each set when there are more.
        scores = [metric.compute() for metric in self.val_cluster]
        for name in ("mIoU", "pAcc"):
            values = [float(s[name]) for s in scores]
            self.log(f"val/cluster/{name}", sum(values) / len(values), prog_bar=name == "mIoU")
            if len(values) > 1:
                for restart, value in enumerate(values):
                    self.log(f"val/cluster/restart{restart}/{name}", value)
        self.log_dict(self.val_linear.compute())
        for metric in self.val_cluster:
            metric.reset()
        self.val_linear.reset()

    def _segment_parameters(self) -> list[nn.Parameter]:
        parameters = list(self.linear.parameters())
        if self.hparams.reference_leak:
            parameters += list(self.head.parameters())
        return parameters

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        # One Adam with two groups equals the reference's two Adams (Adam is per parameter); the
        # centroids are never decayed, whatever the optimiser's weight decay.
        return self.build_optimization(
            [
                {"params": self._segment_parameters(), "lr": self.hparams.lr},
                {
                    "params": [self.centroids, *self.overcluster.values()],
                    "lr": self.hparams.cluster_lr,
                    "weight_decay": 0.0,
                },
            ]
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # The reference clips the segment parameters only, never the centroids.
        if self.hparams.clip is not None:
            torch.nn.utils.clip_grad_norm_(self._segment_parameters(), self.hparams.clip)

    def export(self) -> dict[str, Any]:
        """Artifact payload of ``probe.pt`` (without meta): the kept centroid set ``[C, R]``, the
        linear probe, and under ``fit`` how the centroids started, every set's held-out objective
        (``None`` when no training step ran) and the kept index. With over-clustering counts,
        ``overcluster`` lists one record per k: ``num_clusters``, the kept ``centroids [k, R]``
        and its ``fit`` (same fields)."""
        kept = self.kept()
        payload: dict[str, Any] = {
            "centroids": self.centroids[kept].detach().clone(),
            "fit": self._fit_record(self.objectives, kept),
            "linear_state": {k: v.detach().clone() for k, v in self.linear.state_dict().items()},
        }
        if self.overcluster_counts:
            payload["overcluster"] = [
                {
                    "num_clusters": k,
                    "centroids": self.overcluster[_set_name(k)][self.kept(row)].detach().clone(),
                    "fit": self._fit_record(self.overcluster_objectives[row], self.kept(row)),
                }
                for row, k in enumerate(self.overcluster_counts)
            ]
        if self.hparams.reference_leak:
            payload["head_state"] = {
                k: v.detach().clone() for k, v in self.head.state_dict().items()
            }
        return payload

    def _fit_record(self, objectives: Tensor, kept: int) -> dict[str, Any]:
        return {
            "init": str(self.hparams.init),
            "restarts": int(self.hparams.restarts),
            "objectives": (
                [float(v) for v in objectives.tolist()]
                if bool(self.scored)
                else [None] * int(self.hparams.restarts)
            ),
            "kept": kept,
        }


def _set_name(num_clusters: int) -> str:
    """Key of an over-clustering centroid parameter (module names cannot be plain numbers)."""
    return f"k{num_clusters}"
