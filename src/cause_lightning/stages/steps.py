"""The four CAUSE steps, each a function of the run: find its input by this run's settings, build
module, trainer and data, fit (resuming when asked) or evaluate, hand its artifact on.

Every step writes on global rank 0 after a barrier, into the directory its settings name
(:class:`~cause_lightning.artifacts.store.ArtifactStore`), and never over an artifact of other
settings.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from cause_lightning import __version__
from cause_lightning.artifacts.io import ArtifactError
from cause_lightning.artifacts.store import SEGMENTER_FILE, Entry
from cause_lightning.config.identity import resume_signature
from cause_lightning.core.bounds import check_overcluster
from cause_lightning.core.files import ensure_writable
from cause_lightning.core.logs import get_logger
from cause_lightning.core.specs import BackboneRef, HeadSpec, ModelSpec, Resolution
from cause_lightning.core.system import git_hash
from cause_lightning.inference.crf import stage_crf_runner
from cause_lightning.models import head_spec
from cause_lightning.modules.base import NonFiniteLossError
from cause_lightning.reports.evaluation import EvalOutcome
from cause_lightning.reports.tracking import publish_step
from cause_lightning.stages.build import datamodule, log_scaling, new_head, stage_module, trainer
from cause_lightning.stages.context import RunContext
from cause_lightning.stages.resume import finite_advice, resume_checkpoint

__all__ = ["STEPS", "evaluate", "fit_probe", "train_head", "train_mediator"]

log = get_logger(__name__)


# ---------------------------------------------------------------------------------- shared
def model_spec(run: RunContext, head: HeadSpec | None = None, num_concepts: int | None = None):
    """The model spec of this run's artifacts (see :mod:`cause_lightning.core.specs`)."""
    cfg, backbone = run.cfg, run.backbone
    node = {k: v for k, v in run.plain["backbone"].items() if k not in ("_target_", "name")}
    weights = node.pop("weights", None)
    return ModelSpec(
        backbone=BackboneRef(
            name=str(cfg.backbone.name),
            weights=weights,
            kwargs=node,
            dim=int(backbone.embed_dim),
            patch_size=int(backbone.patch_size),
            target=str(cfg.backbone._target_),
        ),
        num_classes=int(cfg.data.num_classes),
        num_concepts=int(cfg.method.num_concepts if num_concepts is None else num_concepts),
        resolution=Resolution(
            train=run.derived.resolution["head"], test=run.derived.resolution["test"]
        ),
        head=head,
    )


def provenance(run: RunContext, spec: ModelSpec) -> dict[str, Any]:
    """``meta`` of an artifact: the model spec plus provenance (plain values)."""
    return {
        "spec": spec.to_dict(),
        "data": run.cfg.data.name,
        "version": __version__,
        "git": git_hash(),
        "config": run.plain,
    }


def fit(
    run: RunContext,
    step: str,
    built: pl.Trainer,
    module: pl.LightningModule,
    data: Any,
    target: Path,
    inputs: dict[str, str],
) -> None:
    """``trainer.fit`` of a training step: resume checked, no code from checkpoint files.

    Raises:
        NonFiniteLossError: The loss diverged; the message names the newest checkpoint with
            finite weights to resume from, or says that none exists.
    """
    module.signature = resume_signature(run.settings(step), inputs)
    ckpt_path = resume_checkpoint(
        run.cfg.get("ckpt_path"),
        target / "checkpoints",
        step,
        module.signature,
        single_stage=len(run.cfg.stage.steps) == 1,
    )
    try:
        # weights_only=True whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says: a checkpoint file
        # never runs code.
        built.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLossError as err:
        advice = finite_advice(target / "checkpoints", step)
        raise NonFiniteLossError(f"{err}. {advice}") from None


def _handed_on(
    run: RunContext,
    step: str,
    built: pl.Trainer,
    target: Path,
    payload: dict[str, Any] | None,
    inputs: dict[str, str],
) -> Entry:
    """Write a step's artifact on rank 0, wait for it everywhere, and record it for the run."""
    if built.is_global_zero:
        run.store.save(
            _kind(step),
            target,
            payload,
            settings=run.settings(step),
            inputs=inputs,
            label=run.label(step),
            tag=run.tag,
        )
        log.info("wrote %s", target)
    built.strategy.barrier()
    entry = run.store.entry(target)
    if entry is None:
        raise ArtifactError(f"{target} holds no artifact after the {step} step wrote it")
    run.wrote(step, entry)
    return entry


def _kind(step: str) -> str:
    from cause_lightning.stages.context import artifact_kind

    return artifact_kind(step)


def _start(run: RunContext, step: str) -> Path:
    """Find the step's inputs and prove its directory writable, then set the run up: a missing
    input or an unwritable folder is found before any model is built."""
    target = run.target(step)
    run.store.claim(target, run.settings(step))
    ensure_writable(target, "paths.artifact_dir")
    run.setup()
    cfg = run.cfg
    log.info(
        "=== stage %s: %s / %s / %s -> %s ===",
        step,
        cfg.data.name,
        cfg.backbone.name,
        cfg.head.name,
        target,
    )
    return target


# ---------------------------------------------------------------------------------- steps
def train_mediator(run: RunContext) -> dict[str, Any]:
    """Stage 1: the clusterbook by soft modularity (method.md §4)."""
    target = _start(run, "mediator")
    stage = run.cfg.method.mediator
    module = stage_module(run, "mediator", lr=run.derived.lr["mediator"])
    built = trainer(run, "mediator", target / "checkpoints", max_epochs=stage.epochs)
    log_scaling(run, "mediator", built)
    data = datamodule(run, "mediator", stage.batch_size)
    with warnings.catch_warnings():
        # The shared datamodule offers a val loader; stage 1 has nothing to validate.
        warnings.filterwarnings("ignore", message=r".*val_dataloader.*validation_step")
        fit(run, "mediator", built, module, data, target, inputs={})
    payload = {**module.export(), "meta": provenance(run, model_spec(run))}
    entry = _handed_on(run, "mediator", built, target, payload, inputs={})
    results = {"artifacts/clusterbook": str(entry.file)}
    publish_step(built, "mediator", results, str(run.cfg.experiment_name))
    return results


def _clusterbook(run: RunContext, entry: Entry) -> torch.Tensor:
    clusterbook = run.store.load(entry)["clusterbook"]
    if clusterbook.shape[1] != run.backbone.embed_dim:
        raise ArtifactError(
            f"clusterbook width {clusterbook.shape[1]} != backbone width "
            f"{run.backbone.embed_dim}: re-run stage=mediator"
        )
    return clusterbook


def train_head(run: RunContext) -> dict[str, Any]:
    """Stage 2: the concept-wise contrastive head with its EMA teacher (method.md §5)."""
    target = _start(run, "head")
    stage = run.cfg.method.head
    book = run.require("mediator")
    clusterbook = _clusterbook(run, book)
    module = stage_module(
        run,
        "head",
        head=new_head(run, clusterbook),
        clusterbook=clusterbook,
        lr=run.derived.lr["head"],
    )
    built = trainer(run, "head", target / "checkpoints", stage.epochs, clip=stage.clip)
    log_scaling(run, "head", built)
    data = datamodule(run, "head", stage.batch_size)
    inputs = {"clusterbook": book.content}
    fit(run, "head", built, module, data, target, inputs)
    spec = model_spec(run, head_spec(module.head), num_concepts=int(clusterbook.shape[0]))
    payload = {**module.export(), "meta": provenance(run, spec)}
    entry = _handed_on(run, "head", built, target, payload, inputs)
    results = {"artifacts/head": str(entry.file)}
    publish_step(built, "head", results, str(run.cfg.experiment_name), [book.file])
    return results


def fit_probe(run: RunContext) -> dict[str, Any]:
    """Stage 3: the cluster probe and the linear probe on the frozen head (method.md §6)."""
    target = _start(run, "probe")
    stage = run.cfg.method.probe
    head_entry = run.require("head")
    run.store.check_fresh(head_entry, run.require("mediator"))
    record = run.store.load(head_entry)
    head, linear = run.store.trained_head(record)
    module = stage_module(
        run,
        "probe",
        head=head,
        linear=linear,
        lr=run.derived.lr["probe"],
        cluster_lr=run.derived.lr["probe_cluster"],
    )
    built = trainer(run, "probe", target / "checkpoints", stage.epochs)
    log_scaling(run, "probe", built)
    data = datamodule(run, "probe", stage.batch_size)
    inputs = {"head": head_entry.content}
    fit(run, "probe", built, module, data, target, inputs)
    meta = {
        **{k: v for k, v in record["meta"].items() if k not in ("settings", "inputs")},
        "spec": record["spec"].to_dict(),
        # A head imported from the release carries the leak whatever this stage does.
        "reference_leak": bool(stage.reference_leak or record["meta"].get("reference_leak")),
        "config": run.plain,
    }
    entry = _handed_on(run, "probe", built, target, {**module.export(), "meta": meta}, inputs)
    results = {"artifacts/probe": str(entry.file)}
    publish_step(built, "probe", results, str(run.cfg.experiment_name), [head_entry.file])
    return results


def evaluate(run: RunContext) -> dict[str, Any]:
    """The evaluation: every variant, probe and baseline, one matching; report and segmenter."""
    from cause_lightning.reports.evaluation import write_report
    from cause_lightning.segmenter import Segmenter

    target = _start(run, "eval")
    stage = run.cfg.method.eval
    probe_entry = run.require("probe")
    head_entry, book_entry = run.require("head"), run.require("mediator")
    run.store.check_fresh(probe_entry, head_entry)
    run.store.check_fresh(head_entry, book_entry)
    probe_record = run.store.load(probe_entry)
    head_record = run.store.load(head_entry)
    head, linear = run.store.trained_head(head_record, probe_record)
    crf_runner = stage_crf_runner(stage, run.local_processes)
    module = stage_module(
        run,
        "eval",
        head=head,
        centroids=probe_record["centroids"],
        linear=linear,
        variants=[v for v in stage.variants if crf_runner is not None or "crf" not in v],
        crf_runner=crf_runner,
        overcluster=_overcluster_centroids(run, probe_record, probe_entry),
    )
    built = trainer(run, "eval")
    data = datamodule(run, "eval", stage.batch_size)
    # A spawning strategy runs the loop in child processes: rank 0 leaves its outcome here.
    module.handoff = Path(tempfile.mkdtemp(prefix="cause-eval-")) / "outcome.pt"
    try:
        built.test(module, datamodule=data, verbose=False)
        module.receive()
        if stage.baselines:
            module.phase = "kmeans"
            built.test(module, datamodule=data, verbose=False)
            module.receive()
    finally:
        if crf_runner is not None:
            crf_runner.close()
        shutil.rmtree(module.handoff.parent, ignore_errors=True)
    results = dict(module.results)
    leak = bool(probe_record["meta"].get("reference_leak", False))
    if built.is_global_zero:
        outcome = _outcome(module, data)
        report = write_report(
            run.cfg,
            outcome,
            leak=leak,
            directories=(target, run.output_dir),
            resolution=run.derived.resolution["test"],
            backbone_kwargs=model_spec(run).backbone.kwargs,
            probe=probe_record.get("fit"),
            overcluster={
                int(r["num_clusters"]): r["fit"] for r in probe_record.get("overcluster", [])
            },
        )
        results.update(report)
        arguments = run.store.segmenter_arguments(probe_entry, backbone=run.backbone)
        arguments.update(
            class_names=outcome.class_names or arguments["class_names"],
            palette=outcome.palette,
            assignment=outcome.assignment,
        )
        segmenter = Segmenter(**arguments)
        results["artifacts/segmenter"] = str(segmenter.save(target / SEGMENTER_FILE))
    _handed_on(run, "eval", built, target, None, inputs={"probe": probe_entry.content})
    read = [book_entry.file, head_entry.file, probe_entry.file]
    publish_step(built, "eval", results, str(run.cfg.experiment_name), read)
    return results


def _outcome(module: Any, data: Any) -> EvalOutcome:
    """The plain outcome of an evaluation for its report."""
    names = getattr(data, "class_names", None)
    palette = getattr(data, "palette", None)
    describe = getattr(data, "describe", None)
    try:
        description = describe() if callable(describe) else {"name": getattr(data, "name", None)}
    except Exception as err:  # the report must not fail on a description
        log.debug("datamodule.describe() failed: %s", err)
        description = {"name": getattr(data, "name", None)}
    return EvalOutcome(
        results=dict(module.results),
        examples=list(module.examples),
        variants=tuple(module.variants),
        num_classes=int(module.num_classes),
        overcluster_counts=list(module.overcluster_counts),
        class_names=[str(n) for n in names] if names else [],
        palette=None if palette is None else np.asarray(palette, dtype=np.uint8),
        data_description=description or {},
    )


def _overcluster_centroids(
    run: RunContext, probe_record: dict[str, Any], entry: Entry
) -> dict[int, torch.Tensor]:
    """The k-centroid probes of ``probe.pt`` for every configured over-clustering count.

    Raises:
        ArtifactError: When ``probe.pt`` was fitted without one of the counts.
    """
    wanted = check_overcluster(
        run.cfg.method.eval.get("overcluster"), int(run.cfg.data.num_classes)
    )
    stored = {int(r["num_clusters"]): r["centroids"] for r in probe_record.get("overcluster", [])}
    missing = [k for k in wanted if k not in stored]
    if missing:
        raise ArtifactError(
            f"method.eval.overcluster={wanted}, but {entry.file} holds over-clustering probes "
            f"for {sorted(stored) or 'no count'} (missing {missing}): re-run stage=probe with "
            f"method.eval.overcluster={wanted}, or drop the missing counts"
        )
    return {k: stored[k] for k in wanted}


#: Every step of the pipeline by stage name (``stage.steps`` of conf/stage/*.yaml).
STEPS = {
    "mediator": train_mediator,
    "head": train_head,
    "probe": fit_probe,
    "eval": evaluate,
}
