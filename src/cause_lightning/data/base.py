"""Base LightningDataModule for every dataset (docs/architecture.md §2, docs/protocol.md §1-§2).

A concrete data module fills the class attributes ``name``, ``num_classes``, ``class_names``,
``layout`` (the expected directory layout, shown when the data is missing) and optionally
``palette``, and implements :meth:`SegDataModule.build_dataset`. The base class gives:

* ``prepare_data()`` -> :meth:`SegDataModule.verify` (default: the root exists), raising
  :class:`DatasetNotFoundError` with the layout and the ``stage=prepare`` command;
* ``setup(stage)``: the train split at ``train_res`` and the val split at ``test_res`` (test = val
  split);
* loaders yielding ``{"image": uint8 [B,3,H,W], "label": uint8 [B,H,W], "index": long [B]}``
  (the stage modules normalise on the accelerator) with seeded shuffling, ``pin_memory`` only when
  CUDA exists and ``persistent_workers`` when ``num_workers > 0`` (rule P9); ``num_workers=None``
  takes the cores available to each process of the node, less one;
* ``train_labels = False`` (set by the mediator stage) skips reading training labels;
* a resumable training loader in a single-process run: the order of epoch ``e`` is a function of
  ``(seed, e)`` and the loader's state (epoch, batches served) goes into Lightning checkpoints, so a
  run resumed mid-epoch sees exactly the batches the interrupted run had left.

There is no ``predict_dataloader``: the predict stage builds its own loader from
:class:`~cause_lightning.data.datasets.ImageFolderDataset`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from cause_lightning.core.logs import get_logger
from cause_lightning.visualize import voc_palette

__all__ = [
    "DatasetNotFoundError",
    "ResumableLoader",
    "ResumableSampler",
    "SegDataModule",
]

log = get_logger(__name__)

SPLITS: tuple[str, ...] = ("train", "val")


class ResumableSampler(Sampler[int]):
    """Dataset order of one epoch, a function of ``(seed, epoch)`` alone.

    Lightning calls :meth:`set_epoch` at the start of every epoch, so the order of an epoch does
    not depend on how many epochs this process has run: a resumed run gets the same orders.

    Args:
        size: Number of samples.
        shuffle: Random order per epoch (seeded) or the dataset order.
        seed: Seed of the shuffle.
        replicas: ``V > 1`` keeps only rank 0's shard of a ``V``-process ``DistributedSampler``
            split of each epoch's order (padded to a multiple of ``V`` by wrapping around, every
            ``V``-th sample): the per-rank schedule of a ``V``-process run (method.md §8).
    """

    def __init__(self, size: int, shuffle: bool, seed: int, replicas: int = 1) -> None:
        if int(replicas) < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.size = int(size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.replicas = int(replicas)
        self.epoch = 0
        self.start = 0  # first position of the next pass (set when resuming mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """The sample order of an epoch."""
        if not self.shuffle:
            order = list(range(self.size))
        else:
            seed = np.random.SeedSequence([self.seed, int(epoch)]).generate_state(1, np.uint64)[0]
            generator = torch.Generator().manual_seed(int(seed))
            order = torch.randperm(self.size, generator=generator).tolist()
        if self.replicas == 1:
            return order
        padded = order * math.ceil(len(self) * self.replicas / max(self.size, 1))
        return padded[: len(self) * self.replicas : self.replicas]

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(self.order(self.epoch)[start:])

    def __len__(self) -> int:
        return math.ceil(self.size / self.replicas)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position Lightning checkpoints.

    Lightning saves ``state_dict()`` (the epoch and the batches served in it) with every
    checkpoint and hands it back through ``load_state_dict()`` when a run resumes; the next pass
    of that epoch then skips the batches already trained on. Iteration starts lazily, after
    Lightning has set the epoch, so a checkpoint written at an epoch end resumes with a full new
    epoch.
    """

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs a ResumableSampler")
        self._served = 0
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self._served)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        resume, self._resume = self._resume, None
        skip = resume["batches"] if resume and resume["epoch"] == self.sampler.epoch else 0
        self.sampler.start = skip * int(self.batch_size or 1)
        self._served = skip
        for batch in super().__iter__():
            self._served += 1
            yield batch


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing or incomplete.

    The message names the dataset, the root, what is wrong, the expected layout and the command that
    prepares the data. Raise it through :meth:`SegDataModule.not_found` to get all of that filled
    in.

    Args:
        detail: What is missing or wrong.
        name: Dataset (config) name, e.g. ``"cocostuff27"``.
        root: Dataset root that was searched.
        layout: Expected layout (the data module's ``layout`` attribute).
    """

    def __init__(
        self,
        detail: str,
        name: str | None = None,
        root: str | Path | None = None,
        layout: str | None = None,
    ) -> None:
        self.detail = detail
        self.name = name
        self.root = None if root is None else str(root)
        self.layout = layout
        head = f"Dataset '{name}'" if name else "Dataset"
        where = f" at {root}" if root is not None else ""
        parts = [f"{head} not found or incomplete{where}: {detail}"]
        if layout:
            parts.append("Expected layout:\n" + layout.rstrip())
        if name:
            parts.append(
                f"Prepare it with: python -m cause_lightning stage=prepare data={name} "
                f"(or point paths.data_dir / data.module.root at the files)."
            )
        super().__init__("\n".join(parts))


class SegDataModule(L.LightningDataModule):
    """Common data module: splits, resolutions, loaders, description.

    Subclasses set ``name``, ``num_classes``, ``class_names``, ``layout`` (and optionally
    ``palette``) and implement :meth:`build_dataset`.

    Args:
        root: Dataset root directory.
        train_res: Side of the training images (protocol: 320 TR / 224 MLP / 322 DINOv2 TR).
        test_res: Side of the validation/test images (320, or 322 for DINOv2).
        batch_size: Training batch size per device.
        num_workers: DataLoader workers per process; ``None``: the cores available to each
            process of the node, less one for the process itself.
        eval_batch_size: Val/test batch size (defaults to ``batch_size``).
        limit_train: Use only this many training samples (a seeded random subset), or all when
            ``None``.
        seed: Seeds the training shuffle and the ``limit_train`` subset.
        shuffle: Shuffle the training loader (seeded). ``False`` keeps the dataset order, so a
            DDP run (sequential ``DistributedSampler``) sees the same global batches as one
            process (docs/scaling.md).
    """

    name: str = "base"
    num_classes: int = 0
    class_names: list[str] = []
    layout: str = ""

    def __init__(
        self,
        root: str | Path,
        train_res: int = 320,
        test_res: int = 320,
        batch_size: int = 16,
        num_workers: int | None = 0,
        eval_batch_size: int | None = None,
        limit_train: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if root is None:
            raise ValueError(f"Data module '{self.name}' needs a root (data.module.root).")
        checks = (("train_res", train_res), ("test_res", test_res), ("batch_size", batch_size))
        for key, value in checks:
            if int(value) < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}.")
        if num_workers is not None and int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0 or null (automatic), got {num_workers!r}.")
        if limit_train is not None and int(limit_train) < 1:
            raise ValueError(f"limit_train must be a positive integer or None, got {limit_train!r}")
        self.root = Path(root).expanduser()
        self.train_res = int(train_res)
        self.test_res = int(test_res)
        self.batch_size = int(batch_size)
        self.num_workers = None if num_workers is None else int(num_workers)
        #: Read labels of the training split (stage 1 trains without them).
        self.train_labels = True
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else self.batch_size
        self.limit_train = None if limit_train is None else int(limit_train)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._palette: np.ndarray | None = None
        # Set by the pipeline for the reference's schedule (see `_distributed_sampler`).
        self.reference_world_size: int | None = None
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    # ------------------------------------------------------------------ attributes
    @property
    def palette(self) -> np.ndarray:
        """Colours per class, ``uint8 [num_classes, 3]`` (``voc_palette`` unless set)."""
        if self._palette is not None:
            return self._palette
        return voc_palette(self.num_classes)

    @palette.setter
    def palette(self, value: np.ndarray) -> None:
        arr = np.asarray(value, dtype=np.uint8)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"A palette must have shape [C,3], got {arr.shape}.")
        self._palette = arr

    # ------------------------------------------------------------------ hooks
    def build_dataset(self, split: str, res: int) -> Dataset:
        """Build one split at one resolution.

        Args:
            split: ``"train"`` or ``"val"``.
            res: Output side of the transform.

        Returns:
            A dataset yielding ``{"image", "label", "index"}`` items.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_dataset(split, res)")

    def verify(self) -> None:
        """Check that the data is in place (subclasses check lists, counts, caches).

        Raises:
            DatasetNotFoundError: If the root directory does not exist.
        """
        if not self.root.is_dir():
            raise self.not_found(f"the root directory {self.root} does not exist")

    def not_found(self, detail: str) -> DatasetNotFoundError:
        """Build a :class:`DatasetNotFoundError` with this module's name, root and layout.

        Args:
            detail: What is missing.

        Returns:
            The error, ready to ``raise``.
        """
        return DatasetNotFoundError(detail, name=self.name, root=self.root, layout=self.layout)

    def describe_extra(self) -> dict[str, Any]:
        """Dataset-specific facts for :meth:`describe` (lists, recipes, cache paths). Default:
        none."""
        return {}

    # ------------------------------------------------------------------ Lightning
    def prepare_data(self) -> None:
        """Verify the data (runs once per node, before ``setup``)."""
        self.verify()

    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")

    def _limit(self, dataset: Dataset) -> Dataset:
        n = len(dataset)  # type: ignore[arg-type]
        if self.limit_train is None or self.limit_train >= n:
            return dataset
        rng = np.random.default_rng(self.seed)
        keep = np.sort(rng.choice(n, size=self.limit_train, replace=False))
        return Subset(dataset, keep.tolist())

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets a Lightning stage needs.

        Args:
            stage: ``"fit"`` (train + val), ``"validate"`` (val), ``"test"`` (val split at
                ``test_res``), ``"predict"`` (nothing) or ``None`` (all).
        """
        if stage in ("fit", None) and self.train_dataset is None:
            self.train_dataset = self._limit(self.build_dataset("train", self.train_res))
            base = getattr(self.train_dataset, "dataset", self.train_dataset)  # through a Subset
            if hasattr(base, "load_labels"):
                base.load_labels = self.train_labels
        if stage in ("fit", "validate", None) and self.val_dataset is None:
            self.val_dataset = self.build_dataset("val", self.test_res)
        if stage in ("test", None) and self.test_dataset is None:
            self.test_dataset = (
                self.val_dataset
                if self.val_dataset is not None
                else self.build_dataset("val", self.test_res)
            )
        log.info("data %s set up for %s: %s", self.name, stage, self.counts())

    def counts(self) -> dict[str, int | None]:
        """Number of items per built split (``None`` for splits not built yet)."""
        return {
            split: (None if ds is None else len(ds))  # type: ignore[arg-type]
            for split, ds in (
                ("train", self.train_dataset),
                ("val", self.val_dataset),
                ("test", self.test_dataset),
            )
        }

    def _loader(
        self, dataset: Dataset | None, split: str, batch_size: int, shuffle: bool
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"The {split} dataset of '{self.name}' is not built; call setup() first "
                "(Lightning does this automatically)."
            )
        # A loader-owned generator: creating an iterator never draws from the global random state
        # (dropout's), so evaluating or resuming does not shift the training draws.
        generator = torch.Generator().manual_seed(self.seed)
        workers = self.workers()
        common: dict[str, Any] = {
            "batch_size": batch_size,
            "drop_last": False,
            "num_workers": workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": workers > 0,
            "generator": generator,
        }
        trainer = getattr(self, "trainer", None)
        if split == "train" and (trainer is None or int(trainer.world_size) <= 1):
            sampler = ResumableSampler(
                len(dataset),  # type: ignore[arg-type]
                shuffle,
                self.seed,
                replicas=self.reference_world_size or 1,
            )
            return ResumableLoader(dataset, sampler=sampler, **common)
        sampler = self._distributed_sampler(dataset, split)
        shuffle = shuffle and sampler is None  # a sampler shuffles by itself
        return DataLoader(dataset, shuffle=shuffle, sampler=sampler, **common)

    def workers(self) -> int:
        """DataLoader workers of this process (``num_workers``, or from the available cores)."""
        if self.num_workers is not None:
            return self.num_workers
        from cause_lightning.core.system import cores_per_rank

        trainer = getattr(self, "trainer", None)
        local = int(getattr(trainer, "num_devices", 1) or 1) if trainer is not None else 1
        return cores_per_rank(local) - 1

    def _distributed_sampler(self, dataset: Dataset, split: str) -> Sampler | None:
        """The samplers Lightning would not choose by itself (``None``: Lightning's default).

        * train with ``reference_world_size = V`` set, under DDP: a shuffled
          ``DistributedSampler`` over ``V`` replicas for rank ``r`` of this run, reshuffled every
          epoch (Lightning calls ``set_epoch``): each epoch iterates only the shard that rank ``r``
          of a ``V``-process reference run sees, with that run's per-rank step count (method.md
          §8; one process gets rank 0's shard from the resumable sampler);
        * train with ``shuffle=False``: a sequential ``DistributedSampler`` (Lightning shuffles
          every training sampler it injects, whatever the loader's flag), so local sample ``j`` of
          rank ``r`` is sample ``j * W + r`` of the dataset order;
        * val/test: split without padding, so each image is scored once (Lightning's default
          repeats images to even out the ranks, counting them twice in the confusion matrix).

        Raises:
            ValueError: When this run has more processes than the reference world it reproduces.
        """
        from torch.utils.data import DistributedSampler

        trainer = getattr(self, "trainer", None)
        world = 1 if trainer is None else int(trainer.world_size)
        rank = 0 if trainer is None else int(trainer.global_rank)
        if split == "train" and self.reference_world_size is not None:
            if world > self.reference_world_size:
                raise ValueError(
                    f"method.reference_schedule=true with {world} processes but "
                    f"method.reference_world_size={self.reference_world_size}: each process "
                    "iterates one shard of the reference world, so use at most that many "
                    "processes or set method.reference_schedule=false"
                )
            return DistributedSampler(
                dataset,
                num_replicas=self.reference_world_size,
                rank=rank,
                shuffle=self.shuffle,
                seed=self.seed,
            )
        if world <= 1 or (split == "train" and self.shuffle):
            return None
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        kind = DistributedSampler if split == "train" else UnrepeatedDistributedSampler
        return kind(dataset, num_replicas=world, rank=rank, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Training loader, shuffled (seeded) unless ``shuffle=False``."""
        return self._loader(self.train_dataset, "train", self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        """Validation loader (val split at ``test_res``)."""
        return self._loader(self.val_dataset, "val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test loader (the val split at ``test_res``, protocol.md §2.2)."""
        return self._loader(self.test_dataset, "test", self.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ reports
    def describe(self) -> dict[str, Any]:
        """Summary for reports and logs.

        Returns:
            ``{"name", "num_classes", "class_names", "root", "train_res", "test_res", "batch_size",
            "limit_train", "seed", "counts", ...describe_extra()}`` (primitives only).
        """
        info: dict[str, Any] = {
            "name": self.name,
            "num_classes": int(self.num_classes),
            "class_names": list(self.class_names),
            "root": str(self.root),
            "train_res": self.train_res,
            "test_res": self.test_res,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "limit_train": self.limit_train,
            "seed": self.seed,
            "counts": self.counts(),
        }
        info.update(self.describe_extra())
        return info
