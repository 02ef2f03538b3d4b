"""Constants shared by data, models and inference, each written once.

A leaf module (no project imports), so that ``models/`` and ``data/`` can both read it without
depending on each other.
"""

from __future__ import annotations

__all__ = [
    "CHECKPOINT_KEY",
    "HELDOUT_MODULARITY",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REFERENCE_NUM_CONCEPTS",
]

#: Per-channel RGB mean of ImageNet, the normalisation of every supported backbone.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet.
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: Label id of pixels that are not scored (docs/protocol.md §2).
IGNORE_INDEX: int = 255
#: Concepts K of the reference clusterbook (the released ``modular.npy``, docs/method.md §10.3).
REFERENCE_NUM_CONCEPTS: int = 2048
#: Result key of the kept cluster-probe centroid set's modularity on held-out training tokens
#: (``probe.pt["fit"]``; no labels): the label-free objective of sweeps (docs/scaling.md §4.4).
HELDOUT_MODULARITY: str = "fit/cluster/heldout_modularity"
#: Key of the project's own entries (settings signature, random states) in a Lightning checkpoint.
CHECKPOINT_KEY: str = "cause_lightning"
