"""Override lists for small, fast runs of the pipeline (tiny_vit, 8 + 4 mosaic scenes at 64 px)."""

from __future__ import annotations

# Backbone, data and widths: enough for every stage to run in a second or two.
TINY_DATA = [
    "backbone=tiny_vit",
    "data.module.num_train=8",
    "data.module.num_val=4",
    "data.module.image_size=64",
    "data.recipe.resolution={train:{tr:64,mlp:64},test:64}",
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
