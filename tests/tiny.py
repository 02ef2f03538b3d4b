"""Override lists for small, fast runs of the pipeline (tiny_vit, 8 + 4 mosaic scenes at 64 px),
and the config composition every in-process test run goes through."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def compose_config(base: Path, *overrides: str) -> Any:
    """Compose the project config (Hydra must be initialised) with every path under ``base``.

    The Hydra config is registered (so ``hydra:`` interpolations resolve) and then removed, as
    ``@hydra.main`` does for the job.
    """
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    cfg = compose(
        "config",
        overrides=[
            f"paths.root_dir={base}",
            f"paths.data_dir={base / 'data'}",
            f"paths.output_dir={base / 'out'}",
            *overrides,
        ],
        return_hydra_config=True,
    )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# Backbone, data and widths: enough for every stage to run in a second or two.
TINY_DATA = [
    "backbone=tiny_vit",
    "data.module.num_train=8",
    "data.module.num_val=4",
    "data.module.image_size=64",
    "data.recipe.resolution={train:64,test:64}",
    "method.head.projection_dim=32",
]
TINY_BATCHES = [
    "method.mediator.batch_size=4",
    "method.head.batch_size=4",
    "method.probe.batch_size=4",
    "method.eval.batch_size=4",
]
QUIET = ["callbacks=none", "trainer.enable_progress_bar=false"]

# In-process runs of tests/test_pipeline.py and tests/test_release_workflow.py.
TINY = [
    *TINY_DATA,
    *TINY_BATCHES,
    "method.num_concepts=32",
    "method.eval.save_images=2",
    *QUIET,
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
]


def artifact_file(root: Path, name: str, smoke: bool = False) -> Path:
    """The one file ``name`` (``clusterbook.pt``, ``head.pt``, ``probe.pt``, ``metrics.json``)
    among the artifacts of a run whose paths are under ``root``: the real ones, or with ``smoke``
    those a smoke run (limited loops) wrote under ``debug/``."""
    artifacts = root / "artifacts"
    found = [
        p for p in artifacts.rglob(name) if (p.relative_to(artifacts).parts[0] == "debug") == smoke
    ]
    assert len(found) == 1, f"{name} under {artifacts}: {found}"
    return found[0]
