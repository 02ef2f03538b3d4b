"""Which settings each stage's result depends on: the identity of its artifact and of its resume
checkpoints.

A stage's settings are the values that change what it computes, and only those: the seed, the
stage's own section of ``method`` (epochs included), the method-wide values it reads, the data and
backbone (for the first stage), the head (for the head stage), and the trainer options that change
results (precision, gradient accumulation, smoke-test limits). Run folders, resume paths, worker
counts and logging never enter them. An artifact directory is named by a short digest of them
(:func:`digest`), so two runs with the same settings share a directory and two runs that differ in
one result-changing setting never do; the inputs of a stage are found by the settings of the stage
that made them, and they nest inside their input's directory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

__all__ = [
    "LOOP_LIMITS",
    "RESULT_TRAINER_KEYS",
    "STAGES",
    "STAGE_INPUT",
    "digest",
    "flatten",
    "is_smoke_run",
    "resume_signature",
    "run_shape",
    "stage_settings",
]

#: The stages that make artifacts, in pipeline order.
STAGES = ("mediator", "head", "probe", "eval")
#: The stage whose artifact each stage reads.
STAGE_INPUT = {"mediator": None, "head": "mediator", "probe": "head", "eval": "probe"}
#: Trainer options that change what a training stage computes (the others only change how).
RESULT_TRAINER_KEYS = ("precision", "accumulate_grad_batches")
#: Trainer options that cut a run's loops short: they make it a smoke test (:func:`is_smoke_run`).
#: (Validation batches are not among them: validation changes no artifact.)
LOOP_LIMITS = ("limit_train_batches", "limit_test_batches", "overfit_batches", "fast_dev_run")
# Keys of a data module that change where or how fast data is read, never what is read.
_DATA_OPERATIONAL = ("root", "num_workers")
# Keys of method.eval that change how the evaluation runs or what it draws, not its numbers.
_EVAL_OPERATIONAL = ("crf_workers", "crf_timeout", "save_images")
# Stage module arguments that only split work into passes (images per forward pass over the probe's
# fixed samples: the per-device batch, which the global batch already stands for).
_MODULE_OPERATIONAL = ("sample_batch_size",)


def run_shape(stage: str) -> tuple[str, ...]:
    """The settings of ``stage`` that say how a run was shaped on its hardware rather than what it
    was asked to compute: numerical precision, gradient accumulation, process count and the
    global batch they make. A later run on other hardware (evaluating on a CPU what a GPU
    trained, on one process what four did) cannot repeat them when it looks for its inputs."""
    return (
        "trainer.precision",
        "trainer.accumulate_grad_batches",
        "world_size",
        f"method.{stage}.global_batch_size",
    )


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as flat ``"a.b.c": value`` entries."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def stage_settings(cfg: Mapping[str, Any], stage: str, world_size: int = 1) -> dict[str, Any]:
    """The settings that determine what ``stage`` produces from its input, as flat entries.

    Args:
        cfg: The resolved config as plain values.
        stage: ``mediator``, ``head``, ``probe`` or ``eval``.
        world_size: Processes of the run: each stage's batch size enters as the global batch,
            and the world size itself where it changes the learning rates
            (``method.scale_lr_with_world_size``).

    Returns:
        ``{"setting.path": value}``, sorted by key.
    """
    method = cfg["method"]
    trainer = cfg.get("trainer") or {}
    section = dict(method[stage])
    if "batch_size" in section:
        # What a run computes depends on its global batch, not on how it is split over
        # processes: 2 processes of 2 make what 1 process of 4 makes (tests/test_ddp.py).
        section["global_batch_size"] = int(section.pop("batch_size")) * int(world_size)
    if stage == "eval":
        section = {k: v for k, v in section.items() if k not in _EVAL_OPERATIONAL}
    if isinstance(section.get("module"), Mapping):
        module = section["module"]
        section["module"] = {k: v for k, v in module.items() if k not in _MODULE_OPERATIONAL}
    keys = RESULT_TRAINER_KEYS + LOOP_LIMITS  # a smoke run's limits set its results apart
    settings: dict[str, Any] = {
        "seed": cfg["seed"],
        f"method.{stage}": section,
        "trainer": {k: trainer.get(k) for k in keys if trainer.get(k) is not None},
    }
    if stage != "eval":
        settings["method.scale_lr_with_world_size"] = method["scale_lr_with_world_size"]
        settings["method.reference_schedule"] = method["reference_schedule"]
        if method["reference_schedule"]:
            settings["method.reference_world_size"] = method["reference_world_size"]
        if method["scale_lr_with_world_size"]:
            settings["world_size"] = int(world_size)
    if stage == "mediator":
        data = dict(cfg["data"])
        data["module"] = {k: v for k, v in data["module"].items() if k not in _DATA_OPERATIONAL}
        settings.update(
            {
                "data": data,
                "backbone": _backbone(cfg["backbone"]),
                "method.num_concepts": method["num_concepts"],
            }
        )
    if stage == "head":
        # The head's clips and probe epochs reach the stages through method.head / method.probe.
        head = cfg["head"]
        settings["head"] = {k: v for k, v in head.items() if k not in ("clip", "probe_epochs")}
    return dict(sorted(flatten(settings).items()))


def _backbone(node: Mapping[str, Any]) -> dict[str, Any]:
    """The backbone's settings: its weights file by name (a moved file is the same backbone)."""
    weights = node.get("weights")
    return {**node, "weights": None if not weights else PurePath(str(weights)).name}


def resume_signature(settings: Mapping[str, Any], inputs: Mapping[str, str]) -> dict[str, Any]:
    """What a resume checkpoint must agree on: the stage's settings but its epoch count (a
    finished run may be trained on) and the content of the artifacts it read.

    Args:
        settings: :func:`stage_settings` of the stage.
        inputs: Content ids of the artifacts the stage read, by kind.
    """
    kept = {k: v for k, v in settings.items() if not k.endswith(".epochs")}
    return {**kept, **{f"input.{kind}": content for kind, content in sorted(inputs.items())}}


def digest(settings: Mapping[str, Any], length: int = 8) -> str:
    """A short, stable digest of some settings (``json`` of the sorted entries, SHA-256)."""
    text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def is_smoke_run(cfg: Mapping[str, Any]) -> bool:
    """Whether the run is a smoke test whose artifacts must not land among real ones: a fast
    dev run, overfitting a few batches, or a training or test loop limited to a count of batches
    (the epoch's length is not known before the data is) or to a fraction below 1."""
    trainer = cfg.get("trainer") or {}
    if trainer.get("fast_dev_run") or trainer.get("overfit_batches"):
        return True
    for key in LOOP_LIMITS[:2]:
        value = trainer.get(key)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, int) or float(value) < 1.0:
            return True
    return False
