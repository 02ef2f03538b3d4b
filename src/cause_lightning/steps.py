"""The CAUSE steps as one pipeline object: build data, modules and trainers, hand artifacts on.

Every step reads its inputs from the deterministic artifact directory
(``<artifact_dir>/<data>/<backbone>[-<tag>]``) and writes its output there on rank 0, so steps run
alone, chained by ``stage=all``, inside a multirun, or on another machine find each other.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict

from cause_lightning import __version__
from cause_lightning.artifacts import (
    ArtifactError,
    artifact_root,
    ensure_writable,
    head_dir,
    load_artifact,
    save_artifact,
)
from cause_lightning.callbacks import StageCheckpoint
from cause_lightning.config import check_overcluster, derive, to_plain
from cause_lightning.crf import stage_crf_runner
from cause_lightning.logs import get_logger, is_global_zero
from cause_lightning.models import LinearProbe, build_head, head_spec
from cause_lightning.modules.base import NonFiniteLossError
from cause_lightning.precision import apply_stage_precision, float32_warning
from cause_lightning.resume import finite_advice, resume_checkpoint, step_signature
from cause_lightning.sharing import ensure_tensor_sharing
from cause_lightning.specs import BackboneRef, HeadSpec, ModelSpec, Resolution, SpecError
from cause_lightning.tracking import publish_step, step_loggers
from cause_lightning.utils import git_hash, instantiate_group

__all__ = ["Pipeline", "STEPS"]

log = get_logger(__name__)

STEPS = ("mediator", "head", "probe", "eval")
PRODUCER = {"clusterbook": "mediator", "head": "head", "probe": "probe"}
# The artifact a training step reads: its checksum is part of the step's configuration.
STEP_INPUT = {"head": "clusterbook", "probe": "head"}


class Pipeline:
    """Runs CAUSE steps for one composed config.

    Args:
        cfg: The composed config.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.trainers: list[pl.Trainer] = []
        self._input_checksums: dict[str, str | None] = {}
        self._warned_float32 = False
        self._backbone: torch.nn.Module | None = None

    def setup(self) -> Pipeline:
        """Build the backbone, derive the values that need it, write ``config_resolved.yaml``.

        The first thing every caller does (``run`` does it itself); later calls do nothing.
        ``cfg.derived`` (resolutions, TR query count, effective learning rates, debug checks)
        exists from here on.
        """
        if self._backbone is None:
            backbone = instantiate(self.cfg.backbone)
            derive(self.cfg, int(backbone.patch_size), self.world_size)
            with open_dict(self.cfg):  # the stage modules read it (method.<step>.module)
                self.cfg.derived.debug_checks = self.debug_checks
            self._backbone = backbone
            if is_global_zero():
                self.output_dir.mkdir(parents=True, exist_ok=True)
                resolved = OmegaConf.to_yaml(self.cfg, resolve=True)
                (self.output_dir / "config_resolved.yaml").write_text(resolved)
        return self

    # ------------------------------------------------------------------ shared pieces
    @property
    def backbone(self) -> torch.nn.Module:
        """The frozen backbone built by :meth:`setup`."""
        if self._backbone is None:
            raise RuntimeError("Pipeline.setup() builds the backbone: call it first")
        return self._backbone

    @cached_property
    def world_size(self) -> int:
        trainer = self.cfg.trainer
        devices = trainer.get("devices", 1)
        if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
            count = len(devices)
        elif devices in (-1, "auto", "-1"):
            count = max(torch.cuda.device_count(), 1) if trainer.get("accelerator") != "cpu" else 1
        else:
            count = int(devices)
        return count * int(trainer.get("num_nodes", 1) or 1)

    @property
    def local_processes(self) -> int:
        """Processes of this run on one node (the world size divided by the nodes)."""
        return max(1, self.world_size // int(self.cfg.trainer.get("num_nodes", 1) or 1))

    @property
    def debug_checks(self) -> bool:
        """``method.debug_checks``, or when unset: on for CPU runs, off on accelerators."""
        setting = self.cfg.method.get("debug_checks")
        if setting is not None:
            return bool(setting)
        accelerator = str(self.cfg.trainer.get("accelerator", "auto"))
        if accelerator == "auto":
            return not (torch.cuda.is_available() or torch.backends.mps.is_available())
        return accelerator == "cpu"

    @property
    def derived(self) -> DictConfig:
        """``cfg.derived``, written by :meth:`setup` (the values need the patch size)."""
        if self._backbone is None:
            raise RuntimeError("Pipeline.setup() derives the run's values: call it first")
        return self.cfg.derived

    def stage_module(self, step: str, **runtime: Any) -> pl.LightningModule:
        """The step's module from ``method.<step>.module`` (``_target_``), its hyper-parameters,
        optimiser and schedule read from the config; ``runtime`` holds what exists only now
        (trained weights, effective learning rates, the CRF pool)."""
        build = instantiate(self.cfg.method[step].module, _partial_=True)
        return build(self.backbone, **runtime)

    @cached_property
    def root(self) -> Path:
        cfg = self.cfg
        return artifact_root(
            cfg.paths.artifact_dir, cfg.data.name, cfg.backbone.name, cfg.artifact_tag
        )

    @property
    def head_root(self) -> Path:
        return head_dir(self.root, self.cfg.head.name)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.paths.output_dir)

    def backbone_kwargs(self) -> dict[str, Any]:
        """The ``build_backbone`` keywords of the config beyond name and weights."""
        return {
            k: v
            for k, v in to_plain(self.cfg.backbone).items()
            if k not in ("_target_", "name", "weights")
        }

    def spec(self, head: HeadSpec | None = None, num_concepts: int | None = None) -> ModelSpec:
        """The model spec of this run's artifacts (see :mod:`cause_lightning.specs`).

        Args:
            head: The trained head's spec (``None`` for the clusterbook).
            num_concepts: K of the clusterbook in use; default ``method.num_concepts``.
        """
        cfg, backbone = self.cfg, self.backbone
        return ModelSpec(
            backbone=BackboneRef(
                name=str(cfg.backbone.name),
                weights=cfg.backbone.weights,
                kwargs=self.backbone_kwargs(),
                dim=int(backbone.embed_dim),
                patch_size=int(backbone.patch_size),
            ),
            num_classes=int(cfg.data.num_classes),
            num_concepts=int(cfg.method.num_concepts if num_concepts is None else num_concepts),
            resolution=Resolution(
                train=int(self.derived.resolution.head), test=int(self.derived.resolution.test)
            ),
            head=head,
        )

    def meta(self, spec: ModelSpec, **extra: Any) -> dict[str, Any]:
        """Metadata stored in every artifact: the model spec plus provenance (plain values)."""
        return {
            "spec": spec.to_dict(),
            "data": self.cfg.data.name,
            "version": __version__,
            "git": git_hash(),
            "config": to_plain(self.cfg),
            **extra,
        }

    def datamodule(self, step: str, batch_size: int) -> pl.LightningDataModule:
        resolution = self.derived.resolution
        train_res = resolution["mediator" if step == "mediator" else "head"]
        data = instantiate(
            self.cfg.data.module,
            train_res=int(train_res),
            test_res=int(resolution.test),
            batch_size=int(batch_size),
            seed=int(self.cfg.seed),
        )
        if step == "mediator" and hasattr(data, "train_labels"):
            data.train_labels = False  # stage 1 is label-free: do not decode them
        if step != "eval" and self.cfg.method.reference_schedule:
            data.reference_world_size = int(self.cfg.method.reference_world_size)
        return data

    def trainer(
        self, step: str, max_epochs: int | None = None, clip: float | None = None
    ) -> pl.Trainer:
        callbacks = instantiate_group(self.cfg.get("callbacks"))
        if self.cfg.trainer.get("enable_progress_bar") is False:
            # Lightning refuses a progress-bar callback on a trainer without one.
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        for callback in callbacks:
            if (
                isinstance(callback, (ModelCheckpoint, StageCheckpoint))
                and callback.dirpath is None
            ):
                callback.dirpath = str(self.checkpoint_dir(step))
        if "spawn" in str(self.cfg.trainer.get("strategy") or ""):
            ensure_tensor_sharing()
        if step != "eval" and self.cfg.trainer.get("strategy") == "ddp_spawn":
            from cause_lightning.callbacks import DestroyProcessGroup

            callbacks.append(DestroyProcessGroup())
        loggers = step_loggers(self.cfg, step)
        kwargs: dict[str, Any] = {"callbacks": callbacks, "logger": loggers or False}
        if any(isinstance(c, StageCheckpoint) for c in callbacks):
            # The stage's own checkpoint replaces Lightning's default one in the run folder.
            kwargs["enable_checkpointing"] = False
        if max_epochs is not None:
            kwargs["max_epochs"] = int(max_epochs)
        if clip is not None:
            kwargs["gradient_clip_val"] = float(clip)
            kwargs["gradient_clip_algorithm"] = "norm"
        trainer = instantiate(self.cfg.trainer, **kwargs)
        on_gpu = isinstance(trainer.accelerator, CUDAAccelerator)
        apply_stage_precision(step, on_gpu)
        advice = float32_warning(on_gpu, trainer.precision)
        if advice is not None and not self._warned_float32:
            self._warned_float32 = True
            log.warning(advice)
        self.trainers.append(trainer)
        return trainer

    def checkpoint_dir(self, step: str) -> Path:
        base = self.root if step == "mediator" else self.head_root
        return base / "checkpoints" / step

    def signature(self, step: str) -> dict[str, Any]:
        """The settings that determine what a training step computes (written into every
        checkpoint, compared on resume; :func:`cause_lightning.resume.step_signature`)."""
        cfg = {**to_plain(self.cfg), "derived": to_plain(self.derived)}  # derived: after setup()
        checksum = self._input_checksums.get(STEP_INPUT[step]) if step in STEP_INPUT else None
        return step_signature(cfg, step, STEP_INPUT.get(step), checksum)

    def resume_path(self, step: str) -> str | None:
        """The checkpoint a training step resumes from (``ckpt_path``), checked against this
        run's signature (:func:`cause_lightning.resume.resume_checkpoint`)."""
        return resume_checkpoint(
            self.cfg.get("ckpt_path"),
            self.checkpoint_dir(step),
            step,
            self.signature(step),
            single_stage=len(self.cfg.stage.steps) == 1,
        )

    def fit(self, step: str, trainer: pl.Trainer, module: pl.LightningModule, data: Any) -> None:
        """``trainer.fit`` of a training step: resume checked, no code from checkpoint files.

        Raises:
            NonFiniteLossError: The loss diverged; the message names the newest checkpoint with
                finite weights to resume from, or says that none exists.
        """
        module.signature = self.signature(step)
        ckpt_path = self.resume_path(step)
        try:
            # weights_only=True whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says: a checkpoint file
            # never runs code.
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        except NonFiniteLossError as err:
            advice = finite_advice(self.checkpoint_dir(step), step)
            raise NonFiniteLossError(f"{err}. {advice}") from None

    def log_scaling(self, step: str, trainer: pl.Trainer) -> None:
        """Log world size, batch sizes and the effective lr of a training step (rank 0, rule P13).

        Raises:
            ValueError: When ``method.scale_lr_with_world_size`` is on and the trainer's process
                count differs from the one the learning rate was derived for.
        """
        derived = self.derived[step]
        if int(trainer.world_size) != int(self.derived.world_size):
            message = (
                f"the trainer runs {trainer.world_size} processes but the config derived "
                f"{self.derived.world_size} from trainer.devices/num_nodes: set trainer.devices "
                "and trainer.num_nodes explicitly (e.g. under torchrun or srun)"
            )
            if self.cfg.method.scale_lr_with_world_size:
                raise ValueError(message)
            log.warning("%s; the logged global batch is wrong", message)
        if not is_global_zero():
            return
        lrs = f"lr {derived.lr:g}" + (
            f", cluster lr {derived.cluster_lr:g}" if "cluster_lr" in derived else ""
        )
        log.info(
            "%s: world size %d, batch %d per device, global batch %d, effective %s "
            "(method.scale_lr_with_world_size=%s)",
            step,
            int(self.derived.world_size),
            int(derived.batch_size_per_device),
            int(derived.global_batch_size),
            lrs,
            bool(self.cfg.method.scale_lr_with_world_size),
        )

    def barrier(self, trainer: pl.Trainer) -> None:
        trainer.strategy.barrier()

    # ------------------------------------------------------------------ artifacts
    def load(self, kind: str, path: Path) -> dict[str, Any]:
        record = load_artifact(path, kind, PRODUCER[kind])
        self._input_checksums[kind] = record.get("checksum")
        try:
            spec = ModelSpec.from_meta(record.get("meta", {}))
        except (SpecError, KeyError, TypeError, ValueError) as err:
            raise ArtifactError(
                f"{path} has no readable model spec ({err}): re-run stage={PRODUCER[kind]}"
            ) from err
        record["spec"] = spec
        found = {"backbone": spec.backbone.name, "dim": spec.backbone.dim}
        expected = {"backbone": self.cfg.backbone.name, "dim": int(self.backbone.embed_dim)}
        if kind != "clusterbook":
            found.update(num_classes=spec.num_classes, head_type=spec.head and spec.head.kind)
            expected.update(
                num_classes=int(self.cfg.data.num_classes), head_type=self.cfg.head.name
            )
        for key, value in expected.items():
            if found[key] != value:
                raise ArtifactError(
                    f"{path} was made with {key}={found[key]!r} but this run has {key}={value!r}: "
                    f"re-run stage={PRODUCER[kind]} for this configuration (or set artifact_tag)"
                )
        # Same name and width can still mean other features (the 12-head DINO ViT-S of the
        # release has the 6-head model's shapes), so the architecture overrides must match too.
        stored, current = spec.backbone.kwargs, self.backbone_kwargs()
        differ = sorted(
            k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k)
        )
        if differ:
            wanted = ", ".join(
                f"+backbone.{k}={stored[k]}" if k in stored else f"no backbone.{k}" for k in differ
            )
            raise ArtifactError(
                f"{path} was made with backbone options {stored} but this run has {current} "
                f"(differing: {', '.join(differ)}): pass the same options ({wanted}) or "
                f"re-run stage={PRODUCER[kind]} for this configuration"
            )
        return record

    def clusterbook(self) -> torch.Tensor:
        record = self.load("clusterbook", self.root / "clusterbook.pt")
        clusterbook = record["clusterbook"]
        if clusterbook.shape[1] != self.backbone.embed_dim:
            raise ArtifactError(
                f"clusterbook width {clusterbook.shape[1]} != backbone width "
                f"{self.backbone.embed_dim}: re-run stage=mediator"
            )
        return clusterbook

    def trained_head(self, record: dict[str, Any]) -> tuple[torch.nn.Module, LinearProbe]:
        """Rebuild the teacher head and linear probe stored in a head (or probe) artifact.

        Args:
            record: An artifact read by :meth:`load` (its ``spec`` key holds the model spec).
        """
        spec: ModelSpec = record["spec"]
        if spec.head is None:
            raise ArtifactError("the artifact's model spec has no head: re-run stage=head")
        head = build_head(spec.head)
        head.load_state_dict(record["head_state"])
        linear = LinearProbe(spec.head.reduced_dim, spec.num_classes)
        linear.load_state_dict(record["linear_state"])
        return head, linear

    def segmenter_kwargs(self, head: torch.nn.Module, centroids: torch.Tensor) -> dict[str, Any]:
        """``Segmenter`` arguments of an evaluated head (class names, palette, assignment aside)."""
        clusterbook_path = self.root / "clusterbook.pt"
        clusterbook = self.clusterbook() if clusterbook_path.is_file() else None
        spec = self.spec(head_spec(head), None if clusterbook is None else len(clusterbook))
        meta = self.meta(spec)
        return {
            "backbone": self.backbone,
            "head": head,
            "centroids": centroids.detach().cpu(),
            "backbone_name": spec.backbone.name,
            "backbone_weights": spec.backbone.weights,
            "backbone_kwargs": spec.backbone.kwargs,
            "clusterbook": clusterbook,
            "resolution": spec.resolution.test,
            "config": meta.pop("config"),
            "meta": meta,
        }

    # ------------------------------------------------------------------ steps
    def run(self, steps: list[str]) -> dict[str, Any]:
        for step in steps:
            if step not in STEPS:
                raise ValueError(f"unknown step {step!r}; steps are {STEPS}")
        # Every folder a step writes to is proven writable before any step starts working.
        if is_global_zero():
            for folder in {self.root if s == "mediator" else self.head_root for s in steps}:
                ensure_writable(folder, "paths.artifact_dir")
        self.setup()
        results: dict[str, Any] = {}
        for step in steps:
            log.info(
                "=== stage %s: %s / %s / %s ===",
                step,
                self.cfg.data.name,
                self.cfg.backbone.name,
                self.cfg.head.name,
            )
            # Every step starts from the run seed once the backbone exists, so its initial weights
            # do not depend on what ran before it in this process (stage=all vs one stage, or a
            # DDP strategy that re-seeds when a fit starts).
            pl.seed_everything(int(self.cfg.seed), workers=True, verbose=False)
            step_results = getattr(self, f"step_{step}")()
            results.update(step_results)
            # W&B: the step's artifacts and report, then close its run (rank 0, W&B loggers only).
            trainer = self.trainers[-1] if self.trainers else None
            publish_step(trainer, step, step_results, str(self.cfg.experiment_name))
        return results

    def step_mediator(self) -> dict[str, Any]:
        stage = self.cfg.method.mediator
        module = self.stage_module("mediator", lr=self.derived.mediator.lr)
        trainer = self.trainer("mediator", max_epochs=stage.epochs)
        self.log_scaling("mediator", trainer)
        data = self.datamodule("mediator", stage.batch_size)
        with warnings.catch_warnings():
            # The shared datamodule offers a val loader; stage 1 has nothing to validate.
            warnings.filterwarnings("ignore", message=r".*val_dataloader.*validation_step")
            self.fit("mediator", trainer, module, data)
        path = self.root / "clusterbook.pt"
        if trainer.is_global_zero:
            meta = self.meta(self.spec())
            save_artifact(path, "clusterbook", {**module.export(), "meta": meta})
            log.info("wrote %s", path)
        self.barrier(trainer)
        return {"artifacts/clusterbook": str(path)}

    def step_head(self) -> dict[str, Any]:
        stage = self.cfg.method.head
        clusterbook = self.clusterbook()
        module = self.stage_module(
            "head",
            clusterbook=clusterbook,
            num_queries=int(self.derived.num_queries),
            lr=self.derived.head.lr,
        )
        trainer = self.trainer("head", max_epochs=stage.epochs, clip=stage.clip)
        self.log_scaling("head", trainer)
        data = self.datamodule("head", stage.batch_size)
        self.fit("head", trainer, module, data)
        path = self.head_root / "head.pt"
        if trainer.is_global_zero:
            spec = self.spec(head_spec(module.head), num_concepts=int(clusterbook.shape[0]))
            meta = self.meta(spec)
            save_artifact(path, "head", {**module.export(), "meta": meta})
            log.info("wrote %s", path)
        self.barrier(trainer)
        return {"artifacts/head": str(path)}

    def step_probe(self) -> dict[str, Any]:
        stage = self.cfg.method.probe
        record = self.load("head", self.head_root / "head.pt")
        head, linear = self.trained_head(record)
        module = self.stage_module(
            "probe",
            head=head,
            linear=linear,
            lr=self.derived.probe.lr,
            cluster_lr=self.derived.probe.cluster_lr,
            overcluster=self.overcluster_counts(),
        )
        trainer = self.trainer("probe", max_epochs=stage.epochs)
        self.log_scaling("probe", trainer)
        data = self.datamodule("probe", stage.batch_size)
        self.fit("probe", trainer, module, data)
        path = self.head_root / "probe.pt"
        if trainer.is_global_zero:
            meta = {
                **record["meta"],
                "spec": record["spec"].to_dict(),
                # A head imported from the release carries the leak whatever this stage does.
                "reference_leak": bool(
                    stage.reference_leak or record["meta"].get("reference_leak", False)
                ),
                "config": to_plain(self.cfg),
            }
            save_artifact(path, "probe", {**module.export(), "meta": meta})
            log.info("wrote %s", path)
        self.barrier(trainer)
        return {"artifacts/probe": str(path)}

    def step_eval(self) -> dict[str, Any]:
        from cause_lightning.report import write_report

        stage = self.cfg.method.eval
        head_record = self.load("head", self.head_root / "head.pt")
        probe_record = self.load("probe", self.head_root / "probe.pt")
        if "head_state" in probe_record:  # reference_leak: the probe stage changed the head
            head_record = {**head_record, "head_state": probe_record["head_state"]}
        head, _ = self.trained_head(head_record)
        linear = LinearProbe(head.reduced_dim, int(self.cfg.data.num_classes))
        linear.load_state_dict(probe_record["linear_state"])
        crf_runner = stage_crf_runner(stage, self.local_processes)
        module = self.stage_module(
            "eval",
            head=head,
            centroids=probe_record["centroids"],
            linear=linear,
            variants=[v for v in stage.variants if crf_runner is not None or "crf" not in v],
            crf_runner=crf_runner,
            overcluster=self.overcluster_centroids(probe_record),
        )
        trainer = self.trainer("eval")
        data = self.datamodule("eval", stage.batch_size)
        # A spawning strategy runs the loop in child processes: rank 0 leaves its outcome here.
        module.handoff = Path(tempfile.mkdtemp(prefix="cause-eval-")) / "outcome.pt"
        try:
            trainer.test(module, datamodule=data, verbose=False)
            module.receive()
            if stage.baselines:
                module.phase = "kmeans"
                trainer.test(module, datamodule=data, verbose=False)
                module.receive()
        finally:
            if crf_runner is not None:
                crf_runner.close()
            shutil.rmtree(module.handoff.parent, ignore_errors=True)
        results = dict(module.results)
        if trainer.is_global_zero:
            results.update(
                write_report(
                    self.cfg,
                    module,
                    data,
                    leak=bool(probe_record["meta"].get("reference_leak", False)),
                    head_root=self.head_root,
                    output_dir=self.output_dir,
                    segmenter_kwargs=self.segmenter_kwargs(module.head, module.centroids),
                    probe=probe_record.get("fit"),
                    overcluster={
                        int(r["num_clusters"]): r["fit"]
                        for r in probe_record.get("overcluster", [])
                    },
                )
            )
        self.barrier(trainer)
        return results

    def overcluster_counts(self) -> list[int]:
        """``method.eval.overcluster``, checked and sorted (empty when off)."""
        return check_overcluster(
            self.cfg.method.eval.get("overcluster"), int(self.cfg.data.num_classes)
        )

    def overcluster_centroids(self, probe_record: dict[str, Any]) -> dict[int, torch.Tensor]:
        """The k-centroid probes of ``probe.pt`` for every configured over-clustering count.

        Raises:
            ArtifactError: When ``probe.pt`` was fitted without one of the counts.
        """
        stored = {
            int(r["num_clusters"]): r["centroids"] for r in probe_record.get("overcluster", [])
        }
        wanted = self.overcluster_counts()
        missing = [k for k in wanted if k not in stored]
        if missing:
            raise ArtifactError(
                f"method.eval.overcluster={wanted}, but {self.head_root / 'probe.pt'} holds "
                f"over-clustering probes for {sorted(stored) or 'no count'} (missing {missing}): "
                f"re-run stage=probe with method.eval.overcluster={wanted}, or drop the missing "
                "counts"
            )
        return {k: stored[k] for k in wanted}

    # ------------------------------------------------------------------ predict
    def predict(self) -> dict[str, Any]:
        from cause_lightning.predict import predict_images

        return predict_images(self.cfg)
