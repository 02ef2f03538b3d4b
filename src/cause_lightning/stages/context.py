"""What every step of one run shares: the config, the frozen backbone, the derived values, the
process counts, and the artifacts this run's settings point to.

Nothing is built or written on construction or attribute access: :meth:`RunContext.setup` builds
the backbone, derives the values that need it and writes ``config_resolved.yaml``; the steps call it
first (it does nothing the second time).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cause_lightning.artifacts.io import artifact_root
from cause_lightning.artifacts.store import (
    KINDS,
    ArtifactStore,
    Entry,
    difference_text,
    normalised,
)
from cause_lightning.config import derive, to_plain
from cause_lightning.config.derive import Derived
from cause_lightning.config.identity import (
    LOOP_LIMITS,
    STAGE_INPUT,
    is_smoke_run,
    run_shape,
    stage_settings,
)
from cause_lightning.core.errors import ExpectedError
from cause_lightning.core.files import exclusive
from cause_lightning.core.logs import get_logger, is_global_zero

__all__ = ["RunContext", "SMOKE_FOLDER", "artifact_kind"]

log = get_logger(__name__)

#: Folder of ``paths.artifact_dir`` that smoke runs write to (never among real artifacts).
SMOKE_FOLDER = "debug"
#: Folder of a store's root with the locks of the artifacts being made (:meth:`RunContext.making`).
LOCKS = ".locks"


def artifact_kind(stage: str) -> str:
    """The kind of artifact a stage makes (``mediator`` -> ``clusterbook``)."""
    return next(name for name, kind in KINDS.items() if kind.stage == stage)


class RunContext:
    """The shared state of one run of the pipeline.

    Args:
        cfg: The composed (and validated) config.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.plain: dict[str, Any] = to_plain(cfg)
        self.world_size = _world_size(cfg.trainer)
        nodes = int(cfg.trainer.get("num_nodes", 1) or 1)
        #: Processes of this run on one node.
        self.local_processes = max(1, self.world_size // nodes)
        self.smoke = is_smoke_run(self.plain)
        paths = cfg.paths
        real = artifact_root(paths.artifact_dir, cfg.data.name, cfg.backbone.name)
        smoke = artifact_root(
            Path(paths.artifact_dir) / SMOKE_FOLDER, cfg.data.name, cfg.backbone.name
        )
        self.store = ArtifactStore(smoke, fallback=real) if self.smoke else ArtifactStore(real)
        self.tag = str(cfg.get("artifact_tag") or "")
        self._backbone: torch.nn.Module | None = None
        self._derived: Derived | None = None
        self._found: dict[str, Entry | None] = {}
        #: Whether the float32-on-a-GPU advice was given (once per run).
        self.warned_float32 = False

    def setup(self) -> RunContext:
        """Build the backbone, derive the values that need it, write ``config_resolved.yaml``.

        ``derived`` holds the resolutions, the query count and the effective learning rates from
        here on; later calls do nothing.
        """
        if self._backbone is None:
            backbone = instantiate(self.cfg.backbone)
            self._derived = derive(self.cfg, int(backbone.patch_size), self.world_size)
            self._backbone = backbone
            if is_global_zero():
                self.output_dir.mkdir(parents=True, exist_ok=True)
                resolved = OmegaConf.to_yaml(OmegaConf.create(self.plain))
                derived = OmegaConf.to_yaml(OmegaConf.create({"derived": self._derived.to_dict()}))
                (self.output_dir / "config_resolved.yaml").write_text(resolved + derived)
        return self

    @property
    def backbone(self) -> torch.nn.Module:
        """The frozen backbone built by :meth:`setup`."""
        if self._backbone is None:
            raise RuntimeError("RunContext.setup() builds the backbone: call it first")
        return self._backbone

    @property
    def derived(self) -> Derived:
        """The derived values of :meth:`setup`."""
        if self._derived is None:
            raise RuntimeError("RunContext.setup() derives the run's values: call it first")
        return self._derived

    @property
    def output_dir(self) -> Path:
        """The run folder (logs, resolved config, report)."""
        return Path(self.cfg.paths.output_dir)

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

    # ------------------------------------------------------------------ artifacts
    def settings(self, stage: str) -> dict[str, Any]:
        """The settings ``stage``'s result depends on (:func:`~cause_lightning.config.identity.
        stage_settings`)."""
        return stage_settings(self.plain, stage, self.world_size)

    def label(self, stage: str) -> str:
        """The readable part of a stage's artifact directory (the head's YAML name for stage 2)."""
        return str(self.cfg.head.name) if stage == "head" else artifact_kind(stage)

    def find(self, stage: str) -> Entry | None:
        """The artifact ``stage`` made with this run's settings (from this run's inputs), if any.

        A smoke run looks for one made with its own loop limits first, then for one made with
        the same settings otherwise: the real one (it reads real artifacts, and never writes
        among them), else another smoke run's. Last comes the one artifact made with these
        settings on other hardware (:func:`~cause_lightning.config.identity.run_shape`: another
        precision, process count or split of the same batch), so that a model trained on GPUs
        is evaluated on a CPU; among several such, none is picked and the error names them.
        """
        if stage not in self._found:
            parent_stage = STAGE_INPUT[stage]
            parent = None if parent_stage is None else self.require(parent_stage)
            kind = artifact_kind(stage)
            settings = self.settings(stage)
            found = self.store.find(kind, parent, settings, self.tag)
            limits = [f"trainer.{key}" for key in LOOP_LIMITS] if self.smoke else []
            if found is None and limits:
                found = self.store.find(kind, parent, settings, self.tag, limits)
            if found is None:
                # Made on other hardware (precision, process count): the one such artifact.
                shape = [*run_shape(stage), *limits]
                found = self.store.find(kind, parent, settings, self.tag, shape, unique=True)
                if found is not None:
                    log.info(
                        "using %s, made with the same settings on other hardware: %s",
                        found.path,
                        difference_text(found.settings, normalised(settings)),
                    )
            self._found[stage] = found
        return self._found[stage]

    def made(self, stage: str) -> Entry | None:
        """The artifact in the directory :meth:`target` names, when a run with these very
        settings finished it, or the labelled release import that stands in for it."""
        found = self.find(stage)
        if found is not None and found.imported:
            return found
        entry = self.store.entry(self.target(stage))
        if entry is not None and entry.settings == normalised(self.settings(stage)):
            return entry
        return None

    def require(self, stage: str) -> Entry:
        """Like :meth:`find`, but missing is an error naming the stage to run first."""
        found = self.find(stage)
        if found is not None:
            return found
        parent_stage = STAGE_INPUT[stage]
        parent = None if parent_stage is None else self.require(parent_stage)
        return self.store.require(artifact_kind(stage), parent, self.settings(stage), self.tag)

    def target(self, stage: str) -> Path:
        """The directory ``stage`` writes its artifact (and its resume checkpoints) to."""
        parent_stage = STAGE_INPUT[stage]
        parent = None if parent_stage is None else self.require(parent_stage)
        return self.store.directory(
            artifact_kind(stage), parent, self.settings(stage), self.label(stage), self.tag
        )

    @contextmanager
    def making(self, stage: str) -> Iterator[None]:
        """One process at a time makes a stage's artifact: a run that is about to make the
        artifact another running process is making waits for it (and a ``stage=all`` run then
        keeps it). Side-by-side jobs of a sweep that share a step so train it once.

        Single-process runs only: the processes of one DDP run must take the same decisions in
        step, so they never wait on one another's lock.
        """
        if self.world_size > 1 or stage not in STAGE_INPUT:
            yield
            return
        try:
            target = self.target(stage)
        except ExpectedError:  # a missing input: the step itself says so
            yield
            return
        name = str(self.store.relative(target)).replace("/", "__")
        lock = self.store.root / LOCKS / f"{name}.lock"

        def waiting() -> None:
            log.info("waiting for another run that makes %s", target)
            self._found.clear()  # what the other run writes is looked up afresh

        with exclusive(lock, waiting):
            yield

    def wrote(self, stage: str, entry: Entry) -> None:
        """Record what a step wrote; what was found from it before is looked up again."""
        index = list(STAGE_INPUT).index(stage)
        for later in list(STAGE_INPUT)[index:]:
            self._found.pop(later, None)
        self._found[stage] = entry


def _world_size(trainer: DictConfig) -> int:
    devices = trainer.get("devices", 1)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        count = len(devices)
    elif devices in (-1, "auto", "-1"):
        count = max(torch.cuda.device_count(), 1) if trainer.get("accelerator") != "cpu" else 1
    else:
        count = int(devices)
    return count * int(trainer.get("num_nodes", 1) or 1)
