"""The settings of the pipeline itself: what each key may hold, written next to the key.

A hyper-parameter that a class receives (a stage module's ``temperature``, a head's
``reduced_dim``, the optimiser's ``lr``) is typed and bounded in that class's signature
(``temperature: Annotated[float, POSITIVE]``) and reaches it through a ``_target_`` node of the
YAML; :func:`~cause_lightning.config.validate` checks it there. What is declared here is what the
pipeline reads itself (epochs, batch sizes, learning rates before scaling, resolutions, paths, ...).
No default is written here: every default lives in the YAML files of ``conf/``.

A new hyper-parameter or ablation switch of a stage therefore needs a constructor argument of the
stage module and its key in ``conf/method/cause.yaml`` (its value, and the module node's
``name: ${..name}`` line that hands it over); nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cause_lightning.core.bounds import (
    COUNT,
    NON_NEGATIVE,
    OPTIONAL_NON_NEGATIVE_INT,
    OPTIONAL_POSITIVE,
    OPTIONAL_RESOLUTION,
    POSITIVE,
    RESOLUTION,
    SEED,
    Bound,
)

__all__ = ["OPEN", "SCHEMA", "TARGET", "TARGETS", "Open", "Setting", "Target", "Targets"]


@dataclass(frozen=True)
class Setting:
    """One key: its type (an annotation such as ``int``, ``str | None``, ``list[str]``) and the
    values it accepts.

    Args:
        type: The accepted type.
        bound: The accepted numeric values (``None``: any value of the type).
        required: The key must be present (a group file that omits it is refused).
    """

    type: Any
    bound: Bound | None = None
    required: bool = False


@dataclass(frozen=True)
class Target:
    """A ``_target_`` node: its keys are the arguments of the class or function it names, checked
    against that signature's types and ``Annotated`` bounds.

    Args:
        optional: The node may be null (e.g. ``method.head.scheduler: null``).
        required: The key must be present.
    """

    optional: bool = False
    required: bool = False


@dataclass(frozen=True)
class Targets:
    """A mapping of names to ``_target_`` nodes (``callbacks``, ``logger``); may be null."""


@dataclass(frozen=True)
class Open:
    """Free-form content (``published``, values written by the pipeline)."""


TARGET = Target()
TARGETS = Targets()
OPEN = Open()

_optional_str = Setting(str | None)


def _training_step(**extra: Setting | Target) -> dict[str, Any]:
    """The pipeline's settings of a training stage (``method.mediator|head|probe``)."""
    return {
        "epochs": Setting(int, COUNT),
        "lr": Setting(float, POSITIVE),  # absolute, per-device batch (method.md §8)
        "batch_size": Setting(int, COUNT),
        "module": Target(required=True),
        "optimizer": Target(optional=True),
        "scheduler": Target(optional=True),
        **extra,
    }


_STEP_SCHEDULE = {"step_size": Setting(int, COUNT), "gamma": Setting(float, POSITIVE)}
_SEGMENT = {
    "weight_decay": Setting(float, NON_NEGATIVE),
    "clip": Setting(float | None, OPTIONAL_POSITIVE),
}

#: Every key of a composed config that the pipeline reads itself. Nested dicts are config nodes.
SCHEMA: dict[str, Any] = {
    "seed": Setting(int, SEED),
    "artifact_tag": Setting(str),
    "experiment_name": Setting(str),
    "tags": Setting(list),
    "published": OPEN,
    "notes": _optional_str,
    "ckpt_path": _optional_str,
    "predict": {
        "input": _optional_str,
        "output_dir": Setting(str),
        "segmenter": _optional_str,
        "sliding_window": Setting(bool),
        "crf": Setting(bool),
        "contact_sheet": Setting(bool),
        "strict": Setting(bool),
    },
    "import": {"segment": _optional_str, "cluster": _optional_str, "clusterbook": _optional_str},
    "sweep_dir": _optional_str,
    "summary_metric": Setting(str),
    "stage": {
        "name": Setting(str, required=True),
        "action": Setting(str, required=True),
        "steps": Setting(list[str], required=True),
        "download": Setting(bool | None),
    },
    "data": {
        "name": Setting(str, required=True),
        "num_classes": Setting(int, COUNT, required=True),
        "module": Target(required=True),
        "recipe": {
            "resolution": {
                "test": Setting(int, RESOLUTION, required=True),
                "train": Setting(int | None, OPTIONAL_RESOLUTION),
            },
            "weight_decay": Setting(float, NON_NEGATIVE),
            "clip": {"head": _SEGMENT["clip"], "probe": _SEGMENT["clip"]},
        },
    },
    "backbone": Target(required=True),
    "head": {
        "name": Setting(str, required=True),
        "module": Target(required=True),
        "train_resolution": Setting(int | None, OPTIONAL_RESOLUTION),
        "clip": {"head": _SEGMENT["clip"], "probe": _SEGMENT["clip"]},
        "probe_epochs": Setting(int, COUNT),
    },
    "method": {
        "scale_lr_with_world_size": Setting(bool),
        "debug_checks": Setting(bool | None),
        "reference_schedule": Setting(bool),
        "reference_world_size": Setting(int, COUNT),
        "mediator": _training_step(**_STEP_SCHEDULE),
        "head": _training_step(**_SEGMENT),
        "probe": _training_step(cluster_lr=Setting(float, POSITIVE), **_SEGMENT, **_STEP_SCHEDULE),
        "eval": {
            "batch_size": Setting(int, COUNT),
            "variants": Setting(list[str]),
            "crf_iterations": Setting(int, COUNT),
            "crf_workers": Setting(int | None, OPTIONAL_NON_NEGATIVE_INT),  # null: from the cores
            "crf_timeout": Setting(float, POSITIVE),
            "overcluster": Setting(list[int]),
            "module": Target(required=True),
        },
    },
    "trainer": Target(required=True),
    "logger": TARGETS,
    "callbacks": TARGETS,
    "paths": {
        "root_dir": Setting(str),
        "data_dir": Setting(str),
        "artifact_dir": Setting(str),
        "log_dir": Setting(str),
        "output_dir": Setting(str),
    },
    # written by the pipeline once the backbone exists (config.derive)
    "derived": OPEN,
}
