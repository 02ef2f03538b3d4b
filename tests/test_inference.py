"""The shared inference path: float32 cosines, chunked argmax, the flip average on the grid, and
the same labels from ``stage=eval`` (``EvalModule``) and from a ``Segmenter`` on one batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cause_lightning.config import stage_module
from cause_lightning.core.specs import builtin_head_spec
from cause_lightning.inference.crf import CRFRunner, crf_available
from cause_lightning.inference.dense import cosine_argmax, cosine_logits, grid_features
from cause_lightning.models import LinearProbe, build_backbone, build_head
from cause_lightning.segmenter import Segmenter

C = 4
R = 8
RES = 32  # tiny_vit has patch 8: a 4 x 4 grid
BATCH = 3


def test_cosine_is_float32_under_half_autocast_and_chunks_change_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 16, 5, 5, generator=g)
    centroids = torch.randn(C, 16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosine = cosine_logits(features.bfloat16(), centroids, (20, 20))
    assert cosine.dtype == torch.float32
    exact = cosine_logits(features.bfloat16().float(), centroids, (20, 20))
    assert torch.equal(cosine, exact)  # no half-precision product anywhere
    whole = cosine_logits(features, centroids, (20, 20)).argmax(1)
    for elements in (1, 16 * 400, 2 * 16 * 400, 10**9):  # one image per chunk .. one chunk
        assert torch.equal(cosine_argmax(features, centroids, (20, 20), elements), whole)


def test_flip_average_is_taken_on_the_grid_and_reuses_the_plain_features() -> None:
    calls: list[torch.Tensor] = []

    def encode(images: torch.Tensor) -> torch.Tensor:
        calls.append(images)
        return images[:, :, ::2, ::2] * torch.arange(images.shape[-1] // 2)  # not flip-symmetric

    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = encode(images)
    calls.clear()
    assert torch.equal(grid_features(encode, images, flip=False, plain=plain), plain)
    assert not calls
    averaged = grid_features(encode, images, flip=True, plain=plain)
    assert len(calls) == 1 and torch.equal(calls[0], images.flip(-1))
    torch.testing.assert_close(averaged, (plain + encode(images.flip(-1)).flip(-1)) / 2)
    assert not torch.allclose(averaged, plain)
    assert torch.equal(grid_features(encode, images, flip=True), averaged)


def _model(head_kind: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    backbone = build_backbone("tiny_vit")
    dim = int(backbone.embed_dim)
    if head_kind == "tr":
        clusterbook = torch.randn(12, dim)
        spec = builtin_head_spec("tr", dim, R, 0.1, num_queries=(RES // 8) ** 2, num_concepts=12)
        head = build_head(spec, clusterbook=clusterbook)
    else:
        head = build_head(builtin_head_spec("mlp", dim, R, 0.1))
    return backbone, head.eval(), torch.randn(C, R)


def _eval_labels(
    backbone: torch.nn.Module,
    head: torch.nn.Module,
    centroids: torch.Tensor,
    batch: dict[str, torch.Tensor],
    crf: bool,
) -> dict[str, np.ndarray]:
    """Labels ``[B, H, W]`` per variant, as the evaluation scored them (its kept examples)."""
    variants = ["raw", "flip", "crf", "flip_crf"] if crf else ["raw", "flip"]
    module = stage_module(
        "eval",
        backbone,
        head=head,
        centroids=centroids,
        linear=LinearProbe(R, C),
        num_classes=C,
        variants=variants,
        crf_runner=CRFRunner(num_workers=0) if crf else None,
        baselines=False,
        save_images=BATCH,
        overcluster=None,
    )
    module.on_test_start()
    step_batch = module.on_after_batch_transfer(module.on_before_batch_transfer(dict(batch), 0), 0)
    module.test_step(step_batch, 0)
    module._drain(wait=True)
    assert len(module.examples) == BATCH
    return {v: np.stack([example[v] for example in module.examples]) for v in variants}


@pytest.mark.parametrize("head_kind", ["mlp", "tr"])
def test_eval_and_segmenter_give_the_same_labels(head_kind: str) -> None:
    backbone, head, centroids = _model(head_kind)
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randint(0, 256, (BATCH, 3, RES, RES), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, C, (BATCH, RES, RES), generator=g, dtype=torch.uint8),
    }
    crf = crf_available()
    scored = _eval_labels(backbone, head, centroids, batch, crf)
    for variant, labels in scored.items():
        segmenter = Segmenter(
            backbone,
            head,
            centroids,
            backbone_name="tiny_vit",
            resolution=RES,
            flip=variant.startswith("flip"),
            crf=variant.endswith("crf"),
        )
        predicted = segmenter(batch["image"]).numpy()
        assert predicted.shape == (BATCH, RES, RES)
        np.testing.assert_array_equal(predicted, labels, err_msg=variant)
    assert len(np.unique(scored["raw"])) > 1  # the comparison is not between constant maps
    assert (scored["flip"] != scored["raw"]).any()  # the flip average changes labels here
    if crf:
        assert (scored["crf"] != scored["raw"]).any()


def test_segmenter_cosines_stay_float32_under_autocast() -> None:
    backbone, head, centroids = _model("mlp")
    segmenter = Segmenter(backbone, head, centroids, backbone_name="tiny_vit", resolution=RES)
    images = torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cosines = segmenter.logits(images)
    assert cosines.dtype == torch.float32
