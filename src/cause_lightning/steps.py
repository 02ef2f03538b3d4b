"""The CAUSE steps as one pipeline object: build data, modules and trainers, hand artifacts on.

Every step reads its inputs from the deterministic artifact directory
(``<artifact_dir>/<data>/<backbone>[-<tag>]``) and writes its output there on rank 0, so steps run
alone, chained by ``stage=all``, inside a multirun, or on another machine find each other.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
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
from omegaconf import DictConfig, OmegaConf

from cause_lightning import __version__
from cause_lightning.artifacts import (
    ArtifactError,
    artifact_root,
    describe_load_error,
    ensure_writable,
    head_dir,
    load_artifact,
    save_artifact,
)
from cause_lightning.callbacks import StageCheckpoint
from cause_lightning.config import check_overcluster, derive, to_plain
from cause_lightning.logs import get_logger, is_global_zero
from cause_lightning.models import LinearProbe, build_head, head_spec
from cause_lightning.modules.base import CHECKPOINT_KEY, NonFiniteLossError
from cause_lightning.precision import apply_stage_precision, float32_warning
from cause_lightning.sharing import ensure_tensor_sharing
from cause_lightning.specs import BackboneRef, HeadSpec, ModelSpec, Resolution, SpecError
from cause_lightning.tracking import instantiate_logger, publish_step
from cause_lightning.utils import cores_per_rank, instantiate_group

__all__ = ["Pipeline", "STEPS"]

log = get_logger(__name__)

STEPS = ("mediator", "head", "probe", "eval")
PRODUCER = {"clusterbook": "mediator", "head": "head", "probe": "probe"}
# The artifact a training step reads: its checksum is part of the step's configuration.
STEP_INPUT = {"head": "clusterbook", "probe": "head"}
# Trainer options that change what a training step computes (the others only change how).
RESULT_TRAINER_KEYS = ("precision", "accumulate_grad_batches", "limit_train_batches")


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

    # ------------------------------------------------------------------ shared pieces
    @cached_property
    def backbone(self) -> torch.nn.Module:
        backbone = instantiate(self.cfg.backbone)
        derive(self.cfg, int(backbone.patch_size), self.world_size)
        self._save_run_config()
        return backbone

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
        _ = self.backbone  # derived values need the patch size
        return self.cfg.derived

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

    def _save_run_config(self) -> None:
        if not is_global_zero():
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "config_resolved.yaml").write_text(
            OmegaConf.to_yaml(self.cfg, resolve=True)
        )

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
            "git": _git_hash(),
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
        loggers = self.loggers(step)
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

    def loggers(self, step: str) -> list[Any]:
        group = self.cfg.get("logger")
        if not group:
            return []
        loggers = []
        for node in group.values():
            overrides: dict[str, Any] = {}
            if "WandbLogger" in str(node.get("_target_", "")):
                # One W&B run per step, grouped by experiment and named by the step.
                overrides = {
                    "name": f"{self.cfg.experiment_name}-{step}",
                    "job_type": step,
                    "config": to_plain(self.cfg),
                }
            loggers.append(instantiate_logger(node, **overrides))
        return loggers

    def checkpoint_dir(self, step: str) -> Path:
        base = self.root if step == "mediator" else self.head_root
        return base / "checkpoints" / step

    def signature(self, step: str) -> dict[str, Any]:
        """The settings that determine what a training step computes, as flat ``key: value``.

        Data, backbone, head, the step's hyper-parameters (its epoch count excepted: a finished
        run may be trained on), the seed, result-changing trainer options and the checksum of
        the artifact the step starts from. Written into every checkpoint and compared on resume.
        """
        _ = self.derived  # the resolutions and learning rates the step uses
        cfg = to_plain(self.cfg)
        method = cfg["method"]
        data = dict(cfg["data"])
        data["module"] = {k: v for k, v in data["module"].items() if k != "num_workers"}
        sections: dict[str, Any] = {
            "seed": cfg["seed"],
            "data": data,
            "backbone": cfg["backbone"],
            "method": {
                "num_concepts": method["num_concepts"],
                "window": method["window"],
                "scale_lr_with_world_size": method["scale_lr_with_world_size"],
                step: {k: v for k, v in method[step].items() if k != "epochs"},
            },
            "trainer": {k: cfg["trainer"].get(k) for k in RESULT_TRAINER_KEYS},
            "derived": {"resolution": cfg["derived"]["resolution"], step: cfg["derived"][step]},
        }
        if step == "probe" and method["eval"].get("overcluster"):
            # The probe stage fits the over-clustering centroids too (absent when off, so
            # checkpoints written without the setting still resume).
            sections["method"]["eval.overcluster"] = sorted(method["eval"]["overcluster"])
        if step != "mediator":
            sections["head"] = {k: v for k, v in cfg["head"].items() if k != "probe_epochs"}
            kind = STEP_INPUT[step]
            sections[f"input.{kind}"] = self._input_checksums.get(kind)
        return _flatten(sections)

    def resume_path(self, step: str) -> str | None:
        """The checkpoint a training step resumes from (``ckpt_path``), checked and logged.

        ``ckpt_path=last`` is the newest readable checkpoint in the step's checkpoint folder;
        unreadable ones (a write cut short) are skipped with a warning.

        Raises:
            ValueError: The checkpoint was written by a run of another configuration (the
                differing settings are named) or cannot be read.
            FileNotFoundError: An explicit ``ckpt_path`` does not exist.
        """
        requested = self.cfg.get("ckpt_path")
        if requested in (None, "", "null"):
            return None
        if requested == "last":
            folder = self.checkpoint_dir(step)
            for path in _newest_first(folder):
                try:
                    checkpoint = _read_checkpoint(path)
                except ValueError as err:
                    log.warning("skipping %s", err)
                    continue
                return self._checked(step, path, checkpoint)
            log.info("no checkpoint in %s to resume %s from: starting fresh", folder, step)
            return None
        if len(self.cfg.stage.steps) > 1:
            raise ValueError(
                "ckpt_path=<file> needs a single training stage; use ckpt_path=last with stage=all"
            )
        path = Path(requested)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path={requested} does not exist")
        return self._checked(step, path, _read_checkpoint(path))

    def _checked(self, step: str, path: Path, checkpoint: dict[str, Any]) -> str:
        stored = (checkpoint.get(CHECKPOINT_KEY) or {}).get("signature")
        if not stored:
            raise ValueError(
                f"checkpoint {path} carries no record of the configuration that wrote it, so "
                f"resuming from it could silently mix two runs: start stage={step} afresh "
                "(ckpt_path=null)"
            )
        current = self.signature(step)
        differ = sorted(
            k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k)
        )
        if differ:
            unset = "<unset>"
            shown = "; ".join(
                f"{k}: {stored.get(k, unset)!r} in the checkpoint, {current.get(k, unset)!r} now"
                for k in differ[:8]
            )
            more = f" (and {len(differ) - 8} more)" if len(differ) > 8 else ""
            raise ValueError(
                f"checkpoint {path} was written by a run of another configuration: {shown}{more}. "
                f"Resume with the same settings, or start stage={step} afresh (ckpt_path=null) "
                "or in another artifact directory (artifact_tag=...)"
            )
        log.info(
            "resuming %s from %s at global step %d (epoch %d)",
            step,
            path,
            int(checkpoint.get("global_step", 0)),
            int(checkpoint.get("epoch", 0)),
        )
        return str(path)

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
            raise NonFiniteLossError(f"{err}. {self._good_checkpoint(step)}") from None

    def _good_checkpoint(self, step: str) -> str:
        folder = self.checkpoint_dir(step)
        for path in _newest_first(folder):
            try:
                checkpoint = _read_checkpoint(path)
            except ValueError:
                continue
            state = checkpoint.get("state_dict", {})
            if all(
                bool(torch.isfinite(v).all())
                for v in state.values()
                if isinstance(v, torch.Tensor) and v.is_floating_point()
            ):
                return (
                    f"The newest checkpoint with finite weights is {path} (global step "
                    f"{int(checkpoint.get('global_step', 0))}): fix the cause, then resume with "
                    f"ckpt_path={path}"
                )
        return (
            f"No checkpoint with finite weights exists in {folder}: fix the cause and run "
            f"stage={step} again from the start"
        )

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
            _ = self.backbone
            pl.seed_everything(int(self.cfg.seed), workers=True, verbose=False)
            step_results = getattr(self, f"step_{step}")()
            results.update(step_results)
            # W&B: the step's artifacts and report, then close its run (rank 0, W&B loggers only).
            trainer = self.trainers[-1] if self.trainers else None
            publish_step(trainer, step, step_results, str(self.cfg.experiment_name))
        return results

    def step_mediator(self) -> dict[str, Any]:
        from cause_lightning.modules.mediator import MediatorModule

        method = self.cfg.method
        module = MediatorModule(
            self.backbone,
            num_concepts=method.num_concepts,
            lr=self.derived.mediator.lr,
            temperature=method.mediator.temperature,
            window=method.window,
            step_size=method.mediator.step_size,
            gamma=method.mediator.gamma,
            chunk_size=method.mediator.chunk_size,
            seed=int(self.cfg.seed),
        )
        trainer = self.trainer("mediator", max_epochs=method.mediator.epochs)
        self.log_scaling("mediator", trainer)
        data = self.datamodule("mediator", method.mediator.batch_size)
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
        from cause_lightning.modules.head import HeadModule

        method, head_cfg = self.cfg.method, self.cfg.method.head
        clusterbook = self.clusterbook()
        module = HeadModule(
            self.backbone,
            head_factory=instantiate(self.cfg.head.module),
            clusterbook=clusterbook,
            num_classes=int(self.cfg.data.num_classes),
            head_type=self.cfg.head.name,
            num_queries=int(self.derived.num_queries),
            lr=self.derived.head.lr,
            weight_decay=head_cfg.weight_decay,
            window=method.window,
            ema_decay=head_cfg.ema_decay,
            projection_dim=head_cfg.projection_dim,
            temperature=head_cfg.temperature,
            pos_thresh=head_cfg.pos_thresh,
            neg_thresh=head_cfg.neg_thresh,
            bank_capacity=head_cfg.bank_capacity,
            bank_keep=head_cfg.bank_keep,
            sync_bank=bool(head_cfg.sync_bank),
            contrastive_memory_mb=int(head_cfg.contrastive_memory_mb),
            debug_checks=self.debug_checks,
            seed=int(self.cfg.seed),
        )
        trainer = self.trainer("head", max_epochs=head_cfg.epochs, clip=head_cfg.clip)
        self.log_scaling("head", trainer)
        data = self.datamodule("head", head_cfg.batch_size)
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
        from cause_lightning.modules.probe import ProbeModule

        probe_cfg = self.cfg.method.probe
        record = self.load("head", self.head_root / "head.pt")
        head, linear = self.trained_head(record)
        module = ProbeModule(
            self.backbone,
            head=head,
            linear=linear,
            num_classes=int(self.cfg.data.num_classes),
            lr=self.derived.probe.lr,
            cluster_lr=self.derived.probe.cluster_lr,
            weight_decay=probe_cfg.weight_decay,
            temperature=probe_cfg.temperature,
            window=self.cfg.method.window,
            step_size=probe_cfg.step_size,
            gamma=probe_cfg.gamma,
            clip=probe_cfg.clip,
            head_dropout=probe_cfg.head_dropout,
            reference_leak=probe_cfg.reference_leak,
            init=str(probe_cfg.init),
            restarts=int(probe_cfg.restarts),
            sample_images=int(probe_cfg.sample_images),
            sample_batch_size=int(probe_cfg.batch_size),
            overcluster=self.overcluster_counts(),
            seed=int(self.cfg.seed),
        )
        trainer = self.trainer("probe", max_epochs=probe_cfg.epochs)
        self.log_scaling("probe", trainer)
        data = self.datamodule("probe", probe_cfg.batch_size)
        self.fit("probe", trainer, module, data)
        path = self.head_root / "probe.pt"
        if trainer.is_global_zero:
            meta = {
                **record["meta"],
                "spec": record["spec"].to_dict(),
                # A head imported from the release carries the leak whatever this stage does.
                "reference_leak": bool(
                    probe_cfg.reference_leak or record["meta"].get("reference_leak", False)
                ),
                "config": to_plain(self.cfg),
            }
            save_artifact(path, "probe", {**module.export(), "meta": meta})
            log.info("wrote %s", path)
        self.barrier(trainer)
        return {"artifacts/probe": str(path)}

    def step_eval(self) -> dict[str, Any]:
        from cause_lightning.report import write_report

        eval_cfg = self.cfg.method.eval
        head_record = self.load("head", self.head_root / "head.pt")
        probe_record = self.load("probe", self.head_root / "probe.pt")
        if "head_state" in probe_record:  # reference_leak: the probe stage changed the head
            head_record = {**head_record, "head_state": probe_record["head_state"]}
        head, _ = self.trained_head(head_record)
        linear = LinearProbe(head.reduced_dim, int(self.cfg.data.num_classes))
        linear.load_state_dict(probe_record["linear_state"])
        crf_runner = self._crf_runner(eval_cfg)
        variants = [v for v in eval_cfg.variants if crf_runner is not None or "crf" not in v]
        from cause_lightning.modules.evaluate import EvalModule

        module = EvalModule(
            self.backbone,
            head=head,
            centroids=probe_record["centroids"],
            linear=linear,
            num_classes=int(self.cfg.data.num_classes),
            alpha=eval_cfg.alpha,
            variants=variants,
            crf_runner=crf_runner,
            linear_crf=bool(eval_cfg.linear_crf),
            baselines=eval_cfg.baselines,
            kmeans_iters=eval_cfg.kmeans_iters,
            kmeans_restarts=eval_cfg.kmeans_restarts,
            kmeans_max_tokens=eval_cfg.kmeans_max_tokens,
            save_images=eval_cfg.save_images,
            overcluster=self.overcluster_centroids(probe_record),
            seed=int(self.cfg.seed),
        )
        trainer = self.trainer("eval")
        data = self.datamodule("eval", eval_cfg.batch_size)
        # A spawning strategy runs the loop in child processes: rank 0 leaves its outcome here.
        module.handoff = Path(tempfile.mkdtemp(prefix="cause-eval-")) / "outcome.pt"
        try:
            trainer.test(module, datamodule=data, verbose=False)
            module.receive()
            if eval_cfg.baselines:
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

    def _crf_runner(self, eval_cfg: DictConfig) -> Any:
        if not any("crf" in v for v in eval_cfg.variants):
            return None
        from cause_lightning.crf import CRFRunner, crf_available

        if not crf_available():
            log.warning(
                "pydensecrf is not installed: CRF variants skipped "
                '(pip install "cause-lightning[crf]" to report the published protocol)'
            )
            return None
        workers = eval_cfg.crf_workers
        if workers is None:  # the cores of this process, less one for the loop itself
            workers = max(1, cores_per_rank(self.local_processes) - 1)
        return CRFRunner(
            num_workers=int(workers),
            timeout=float(eval_cfg.crf_timeout),
            iterations=int(eval_cfg.crf_iterations),
        )

    # ------------------------------------------------------------------ predict
    def predict(self) -> dict[str, Any]:
        from cause_lightning.predict import predict_images

        return predict_images(self.cfg)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _newest_first(folder: Path) -> list[Path]:
    """The checkpoint files of a folder, newest first."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint read without running code from it (``weights_only=True``)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for damaged or foreign files
        raise ValueError(f"unreadable checkpoint {path} ({describe_load_error(err)})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint")
    return checkpoint


@functools.lru_cache(maxsize=1)
def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
