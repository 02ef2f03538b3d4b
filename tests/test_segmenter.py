"""Segmenter (docs/api.md) and visualisation helpers.

The expected values come from straightforward re-implementations of docs/method.md §7 written
here: head features -> optional flip average on the grid -> bilinear upsampling -> per-pixel
normalisation -> cosine with the normalised centroids -> argmax.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cause_lightning.artifacts import io as artifacts
from cause_lightning.core.specs import ModelSpec, builtin_head_spec
from cause_lightning.inference.crf import crf_available, denormalize_to_uint8, dense_crf
from cause_lightning.models import backbones
from cause_lightning.models import contract as heads
from cause_lightning.segmenter import Segmenter
from cause_lightning.visualize import (
    TITLE_HEIGHT,
    colorize,
    contact_sheet,
    contact_sheet_html,
    default_palette,
    overlay,
    save_png,
)

RES = 32  # tiny_vit has patch 8: a 4 x 4 grid, 16 TR queries
NUM_CLASSES = 5
REDUCED = 16
NUM_CONCEPTS = 24
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


# ---------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # The models here are tiny: intra-op threading only adds contention on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    return backbones.build_backbone("tiny_vit")


def _head(head_type: str, dim: int, clusterbook: torch.Tensor, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if head_type == "tr":
        spec = builtin_head_spec(
            "tr", dim, REDUCED, 0.1, num_queries=(RES // 8) ** 2, num_concepts=len(clusterbook)
        )
        head = heads.build_head(spec, clusterbook=clusterbook)
    else:
        head = heads.build_head(builtin_head_spec("mlp", dim, REDUCED, 0.1))
    return head.eval()


def _parts(backbone: torch.nn.Module, head_type: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    clusterbook = torch.randn(NUM_CONCEPTS, backbone.embed_dim, generator=gen)
    centroids = torch.randn(NUM_CLASSES, REDUCED, generator=gen)
    return _head(head_type, backbone.embed_dim, clusterbook, seed), centroids, clusterbook


def _segmenter(backbone: torch.nn.Module, head_type: str, **kw) -> Segmenter:
    head, centroids, clusterbook = _parts(backbone, head_type)
    kw.setdefault("resolution", RES)
    return Segmenter(backbone, head, centroids, clusterbook=clusterbook, **kw)


def _images(batch: int = 2, h: int = RES, w: int = RES, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _normalise_pil(img: Image.Image) -> torch.Tensor:
    arr = (np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(arr).permute(2, 0, 1)[None]  # 1 3 H W


def _reference_logits(
    backbone: torch.nn.Module,
    head: torch.nn.Module,
    centroids: torch.Tensor,
    images: torch.Tensor,
    flip: bool,
) -> torch.Tensor:
    """docs/method.md §7 written out: flip average on the grid, upsample, normalise, cosine."""
    with torch.no_grad():
        feats = head(backbone(images))
        if flip:
            feats = 0.5 * (feats + head(backbone(images.flip(-1))).flip(-1))
        up = F.interpolate(feats, size=images.shape[-2:], mode="bilinear", align_corners=False)
        out = torch.zeros(images.shape[0], centroids.shape[0], *images.shape[-2:])
        for c in range(centroids.shape[0]):
            cen = centroids[c] / centroids[c].norm()
            out[:, c] = (up * cen[None, :, None, None]).sum(1) / up.norm(dim=1)
    return out


def _random_pil(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 0}[mode]
    shape = (height, width, channels) if channels else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


def _pil_nearest(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(labels.astype(np.uint8))
    return np.asarray(img.resize((width, height), Image.Resampling.NEAREST)).astype(np.int64)


# ---------------------------------------------------------------------------------- pipeline
@pytest.mark.parametrize("head_type", ["mlp", "tr"])
@pytest.mark.parametrize("flip", [False, True])
def test_logits_and_ids_match_reference_pipeline(backbone, head_type, flip):
    seg = _segmenter(backbone, head_type, flip=flip)
    x = _images()
    expected = _reference_logits(backbone, seg.head, seg.centroids, x, flip)
    got = seg.logits(x)
    assert got.shape == (2, NUM_CLASSES, RES, RES)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    ids = seg(x)
    assert ids.dtype == torch.long and ids.shape == (2, RES, RES)
    assert torch.equal(ids, expected.argmax(1))
    torch.testing.assert_close(
        seg.log_probs(x), F.log_softmax(3.0 * expected, dim=1), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("head_type", ["mlp", "tr"])
def test_flip_average_is_on_the_grid(backbone, head_type):
    seg = _segmenter(backbone, head_type, flip=True)
    x = _images(seed=3)
    with torch.no_grad():
        plain = seg.head(backbone(x))
        flipped = seg.head(backbone(x.flip(-1))).flip(-1)
    torch.testing.assert_close(seg.features(x), (plain + flipped) / 2, atol=1e-5, rtol=1e-5)
    seg.flip = False
    torch.testing.assert_close(seg.features(x), plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, flipped, atol=1e-3)  # the average is not a no-op here


def test_stays_in_eval_mode_and_is_deterministic(backbone):
    seg = _segmenter(backbone, "tr")
    seg.train()
    assert not seg.training and not seg.head.training
    assert all(not p.requires_grad for p in seg.parameters())
    x = _images()
    assert torch.equal(seg.logits(x), seg.logits(x))


def test_rejects_bad_inputs(backbone):
    seg = _segmenter(backbone, "tr")
    with pytest.raises(ValueError, match="TRHead needs a 32x32"):
        seg(_images(h=40, w=40))
    with pytest.raises(ValueError, match="multiple of the patch"):
        seg(_images(h=30, w=32))
    head, centroids, cb = _parts(backbone, "tr")
    with pytest.raises(ValueError, match="resolution=32"):
        Segmenter(backbone, head, centroids, clusterbook=cb, resolution=40)
    with pytest.raises(ValueError, match="multiple of the patch"):
        Segmenter(backbone, _parts(backbone, "mlp")[0], centroids, resolution=30)
    with pytest.raises(ValueError, match="R=7"):
        Segmenter(backbone, head, torch.randn(3, 7), clusterbook=cb, resolution=RES)


def test_clusterbook_handling(backbone, tmp_path):
    _, centroids, clusterbook = _parts(backbone, "tr")
    empty = heads.build_head(
        builtin_head_spec(
            "tr", backbone.embed_dim, REDUCED, 0.1, num_queries=16, num_concepts=NUM_CONCEPTS
        )
    )
    seg = Segmenter(backbone, empty, centroids, clusterbook=clusterbook, resolution=RES)
    torch.testing.assert_close(seg.head.clusterbook, clusterbook)  # filled, so it runs
    assert seg(_images()).shape == (2, RES, RES)
    mlp = Segmenter(backbone, _parts(backbone, "mlp")[0], centroids, resolution=RES)
    assert mlp.clusterbook is None
    assert Segmenter.load(mlp.save(tmp_path / "m.pt")).clusterbook is None
    wide = heads.build_head(builtin_head_spec("mlp", backbone.embed_dim + 8, REDUCED, 0.1))
    with pytest.raises(ValueError, match="D=72"):
        Segmenter(backbone, wide, centroids, resolution=RES)


# ---------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("head_type", ["mlp", "tr"])
def test_save_load_round_trip(backbone, head_type, tmp_path):
    seg = _segmenter(
        backbone,
        head_type,
        class_names=[f"c{i}" for i in range(NUM_CLASSES)],
        assignment=[2, 0, -1, 1, 3],
        config={"seed": 0, "nested": {"a": (1, 2)}},
        meta={"note": "x", "arr": np.arange(3)},
    )
    path = seg.save(tmp_path / "sub" / "segmenter.pt")
    assert path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name != "segmenter.pt"]  # no temp left
    loaded = Segmenter.load(path)
    x = _images(seed=5)
    assert torch.equal(loaded(x), seg(x))
    assert torch.equal(loaded.logits(x), seg.logits(x))
    img = _random_pil(37, 53)
    assert np.array_equal(loaded.predict_image(img), seg.predict_image(img))
    assert loaded.class_names == seg.class_names
    assert loaded.assignment == [2, 0, -1, 1, 3]
    assert np.array_equal(loaded.palette, seg.palette)
    assert (loaded.resolution, loaded.flip, loaded.crf, loaded.alpha) == (RES, True, False, 3.0)
    assert loaded.config == {"seed": 0, "nested": {"a": [1, 2]}}
    assert loaded.head_spec == seg.head_spec and loaded.head_spec.name == f"{head_type.upper()}Head"
    torch.testing.assert_close(loaded.clusterbook, seg.clusterbook)
    if head_type == "tr":
        torch.testing.assert_close(loaded.head.clusterbook, seg.head.clusterbook)


def test_file_is_weights_only_loadable(backbone, tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"a": 1, "b": "${a}", "c": [1, 2]})
    seg = _segmenter(backbone, "tr", config=cfg, meta={"path": tmp_path, "n": np.int64(4)})
    path = seg.save(tmp_path / "segmenter.pt")
    record = torch.load(path, map_location="cpu", weights_only=True)
    assert record["kind"] == "segmenter" and record["format_version"] == 1
    assert record["config"] == {"a": 1, "b": 1, "c": [1, 2]}
    assert record["meta"] == {"path": str(tmp_path), "n": 4}
    spec = ModelSpec.from_dict(record["spec"])
    assert spec.head == seg.head_spec and spec.head.name == "TRHead"
    assert (spec.num_classes, spec.resolution.test) == (seg.num_classes, seg.resolution)
    assert "clusterbook" in record["head_state"]
    assert spec.backbone.name == "tiny_vit" and spec.backbone.weights is None
    # No weights file for tiny_vit: its state is embedded so a reload predicts identically.
    assert record["backbone_state"]


def test_wrong_kind_and_missing_file(backbone, tmp_path):
    artifacts.save_artifact(tmp_path / "head.pt", "head", {"head_state": {}})
    with pytest.raises(artifacts.ArtifactError, match="expected 'segmenter'"):
        Segmenter.load(tmp_path / "head.pt")
    with pytest.raises(artifacts.MissingArtifactError, match="stage=eval"):
        Segmenter.load(tmp_path / "nothing.pt")


def test_backbone_architecture_overrides_survive(tmp_path):
    # 4 heads instead of tiny_vit's 2: same parameter shapes, so only the stored kwargs
    # (derived from backbone.arch) can rebuild the right model.
    bb = backbones.build_backbone("tiny_vit", num_heads=4)
    seg = _segmenter(bb, "mlp")
    assert seg.backbone_kwargs == {"num_heads": 4}
    loaded = Segmenter.load(seg.save(tmp_path / "s.pt"))
    assert loaded.backbone.arch["num_heads"] == 4
    x = _images()
    assert torch.equal(loaded(x), seg(x))


def test_filterbank_round_trip(tmp_path):
    bb = backbones.build_backbone("filterbank")
    seg = _segmenter(bb, "mlp")  # parameter-free: rebuilt from its name alone
    loaded = Segmenter.load(seg.save(tmp_path / "fb.pt"))
    assert loaded.backbone_name == "filterbank"
    x = _images()
    assert torch.equal(loaded.logits(x), seg.logits(x))


def test_moved_weights_file(tmp_path):
    # A weights file in the DINO release layout (raw state dict) with values unlike the default.
    reference = backbones.build_backbone("tiny_vit")
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in reference.vit.state_dict().items()}
    old = tmp_path / "old" / "tiny.pth"
    old.parent.mkdir()
    torch.save(state, old)
    bb = backbones.build_backbone("tiny_vit", weights=str(old))
    seg = _segmenter(bb, "mlp")
    assert seg.backbone_weights == str(old.resolve())
    path = seg.save(tmp_path / "segmenter.pt")
    record = torch.load(path, weights_only=True)
    assert record["backbone_state"] is None  # a weights file exists: reference only
    new = tmp_path / "new.pth"
    old.rename(new)
    with pytest.raises(FileNotFoundError) as err:
        Segmenter.load(path)
    assert str(old.resolve()) in str(err.value) and "weights=" in str(err.value)
    loaded = Segmenter.load(path, weights=new)
    x = _images()
    assert torch.equal(loaded.logits(x), seg.logits(x))
    assert not torch.equal(loaded.logits(x), _segmenter(reference, "mlp").logits(x))
    assert loaded.backbone_weights == str(new)


# ---------------------------------------------------------------------------------- from_artifacts
def _write_artifacts(root: Path, head_type: str, backbone, drop_cb_from_state: bool = False):
    """Stage artifacts in the store's layout (the head's meta in the earlier flat form)."""
    from cause_lightning.artifacts.store import ArtifactStore

    head, centroids, clusterbook = _parts(backbone, head_type, seed=7)
    state = dict(head.state_dict())
    if drop_cb_from_state:
        state.pop("clusterbook")
    store = ArtifactStore(root)

    def save(kind, parent, payload):
        settings = {"stage": kind}
        directory = store.directory(kind, parent, settings, kind, "")
        inputs = {} if parent is None else {parent.kind: parent.content}
        return store.save(kind, directory, payload, settings=settings, inputs=inputs, label=kind)

    meta = {
        "head_type": head_type,
        "dim": backbone.embed_dim,
        "reduced_dim": REDUCED,
        "num_queries": (RES // 8) ** 2 if head_type == "tr" else None,
        "num_concepts": NUM_CONCEPTS,
        "num_classes": NUM_CLASSES,
        "backbone": "tiny_vit",
        "backbone_weights": None,
        "backbone_kwargs": {},
        "resolution": {"train": RES, "test": RES},
        "class_names": [f"k{i}" for i in range(NUM_CLASSES)],
        "config": {"stage": "head"},
    }
    book_meta = {k: v for k, v in meta.items() if k != "head_type"}
    book = save("clusterbook", None, {"clusterbook": clusterbook, "meta": book_meta})
    linear = {"f.weight": torch.zeros(NUM_CLASSES, REDUCED, 1, 1), "f.bias": torch.zeros(5)}
    trained = save("head", book, {"head_state": state, "linear_state": linear, "meta": meta})
    probe_meta = {"config": {"stage": "probe"}}
    probe = save(
        "probe", trained, {"centroids": centroids, "linear_state": linear, "meta": probe_meta}
    )
    return head, centroids, clusterbook, probe.path


@pytest.mark.parametrize(("head_type", "drop_cb"), [("mlp", False), ("tr", False), ("tr", True)])
def test_from_artifacts(backbone, head_type, drop_cb, tmp_path):
    head, centroids, clusterbook, probe = _write_artifacts(tmp_path, head_type, backbone, drop_cb)
    seg = Segmenter.from_artifacts(probe)
    shared = Segmenter.from_artifacts(probe, backbone=backbone, flip=False)
    x = _images(seed=11)
    expected = _reference_logits(backbone, head, centroids, x, flip=True)
    torch.testing.assert_close(seg.logits(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        shared.logits(x), _reference_logits(backbone, head, centroids, x, False), atol=1e-5, rtol=0
    )
    assert seg.class_names == [f"k{i}" for i in range(NUM_CLASSES)]
    assert seg.resolution == RES and seg.config == {"stage": "probe"}
    torch.testing.assert_close(seg.clusterbook, clusterbook)
    if head_type == "tr":
        torch.testing.assert_close(seg.head.clusterbook, clusterbook)
    # ... and it saves / loads like any other segmenter.
    loaded = Segmenter.load(seg.save(tmp_path / head_type / "segmenter.pt"))
    assert torch.equal(loaded(x), seg(x))


def test_from_artifacts_missing_files(backbone, tmp_path):
    *_, probe = _write_artifacts(tmp_path / "a", "tr", backbone)
    (probe / "probe.pt").unlink()
    with pytest.raises(artifacts.MissingArtifactError, match="stage=probe"):
        Segmenter.from_artifacts(probe)
    *_, probe = _write_artifacts(tmp_path / "b", "tr", backbone)
    (probe.parent.parent / "clusterbook.pt").unlink()
    with pytest.raises(artifacts.MissingArtifactError, match="stage=mediator"):
        Segmenter.from_artifacts(probe)
    with pytest.raises(artifacts.MissingArtifactError, match="not a probe"):
        Segmenter.from_artifacts(probe.parent)


# ---------------------------------------------------------------------------------- predict_image
@pytest.mark.parametrize("head_type", ["mlp", "tr"])
@pytest.mark.parametrize(
    ("width", "height", "mode"),
    [(37, 53, "RGB"), (200, 90, "RGBA"), (45, 31, "L"), (8, 8, "RGB"), (32, 32, "RGB")],
)
def test_predict_image_any_size(backbone, head_type, width, height, mode):
    seg = _segmenter(backbone, head_type)
    img = _random_pil(width, height, mode)
    for sliding in (False, True):
        out = seg.predict_image(img, sliding_window=sliding)
        assert isinstance(out, np.ndarray) and out.dtype == np.int64
        assert out.shape == (height, width)
        assert out.min() >= 0 and out.max() < NUM_CLASSES


def test_predict_image_accepts_arrays_and_paths(backbone, tmp_path):
    seg = _segmenter(backbone, "mlp")
    img = _random_pil(41, 29)
    expected = seg.predict_image(img)
    assert np.array_equal(seg.predict_image(np.asarray(img)), expected)
    img.save(tmp_path / "x.png")
    assert np.array_equal(seg.predict_image(tmp_path / "x.png"), expected)
    # Transparency is composited on black, as the datasets and the predict stage load images,
    # whatever form the RGBA picture comes in.
    rgba = _random_pil(41, 29, "RGBA")
    on_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    composited = seg.predict_image(on_black.convert("RGB"))
    assert not np.array_equal(composited, seg.predict_image(rgba.convert("RGB")))
    assert np.array_equal(seg.predict_image(rgba), composited)
    assert np.array_equal(seg.predict_image(np.asarray(rgba)), composited)
    rgba.save(tmp_path / "rgba.png")
    assert np.array_equal(seg.predict_image(tmp_path / "rgba.png"), composited)
    gray = _random_pil(41, 29, "L")
    assert np.array_equal(seg.predict_image(np.asarray(gray)), seg.predict_image(gray))
    with pytest.raises(TypeError, match="PIL image"):
        seg.predict_image(torch.zeros(3, 32, 32))


def test_tr_squashes_to_resolution(backbone):
    seg = _segmenter(backbone, "tr")
    img = _random_pil(50, 70, seed=2)
    assert seg.working_size(50, 70) == (RES, RES)
    x = _normalise_pil(img.resize((RES, RES), Image.Resampling.NEAREST))
    small = _reference_logits(backbone, seg.head, seg.centroids, x, flip=True)[0].argmax(0)
    expected = _pil_nearest(small.numpy(), 50, 70)
    assert np.array_equal(seg.predict_image(img), expected)


def test_mlp_resizes_short_side_and_snaps_to_patch(backbone):
    seg = _segmenter(backbone, "mlp")
    # 37 x 53: short side 37 -> 32, long 53 -> floor(32 * 53 / 37) = 45 -> nearest multiple 48.
    assert seg.working_size(37, 53) == (32, 48)
    assert seg.working_size(90, 41) == (72, 32)  # floor(32 * 90 / 41) = 70 -> 72
    assert seg.working_size(5, 3) == (56, 32)  # upsampled: floor(32 * 5 / 3) = 53 -> 56
    img = _random_pil(37, 53, seed=4)
    x = _normalise_pil(img.resize((32, 48), Image.Resampling.NEAREST))
    assert x.shape[-2:] == (48, 32)
    small = _reference_logits(backbone, seg.head, seg.centroids, x, flip=True)[0].argmax(0)
    expected = _pil_nearest(small.numpy(), 37, 53)
    assert np.array_equal(seg.predict_image(img), expected)


@pytest.mark.parametrize("head_type", ["mlp", "tr"])
def test_sliding_window_averages_window_logits(backbone, head_type):
    seg = _segmenter(backbone, head_type)
    img = _random_pil(80, 32, seed=6)  # already short side 32: windows at x = 0, 16, 32, 48
    assert seg.working_size(80, 32, sliding_window=True) == (80, 32)
    x = _normalise_pil(img)
    acc = torch.zeros(NUM_CLASSES, 32, 80)
    cnt = torch.zeros(32, 80)
    for x0 in (0, 16, 32, 48):
        crop = x[..., x0 : x0 + 32]
        acc[:, :, x0 : x0 + 32] += _reference_logits(backbone, seg.head, seg.centroids, crop, True)[
            0
        ]
        cnt[:, x0 : x0 + 32] += 1
    expected = (acc / cnt).argmax(0).numpy()
    got = seg.predict_image(img, sliding_window=True, batch_size=3)
    assert np.array_equal(got, expected)
    # A res x res image is a single window: same as the plain path.
    square = _random_pil(RES, RES, seed=8)
    assert np.array_equal(seg.predict_image(square, sliding_window=True), seg.predict_image(square))


def test_sliding_window_on_large_image_shape(backbone):
    seg = _segmenter(backbone, "tr")
    img = _random_pil(150, 61, seed=9)
    # short side 61 -> 32, long side floor(32 * 150 / 61) = 78: windows 0, 16, 32, 46
    assert seg.working_size(150, 61, sliding_window=True) == (78, 32)
    out = seg.predict_image(img, sliding_window=True)
    assert out.shape == (61, 150) and out.max() < NUM_CLASSES


def test_assignment_remap(backbone, tmp_path):
    seg = _segmenter(backbone, "mlp")
    img = _random_pil(37, 53, seed=12)
    with pytest.raises(RuntimeError, match="assignment"):
        seg.predict_image(img, to_classes=True)
    clusters = seg.predict_image(img)
    seg.set_assignment(torch.tensor([2, 0, -1, 1, 3]))
    lut = np.array([2, 0, 255, 1, 3])
    assert np.array_equal(seg.predict_image(img, to_classes=True), lut[clusters])
    ids = torch.tensor([[0, 1, 2], [3, 4, 255]])
    assert torch.equal(seg.remap(ids), torch.tensor([[2, 0, 255], [1, 3, 255]]))
    with pytest.raises(ValueError, match="entries"):
        seg.set_assignment([0, 1])


@pytest.mark.skipif(not crf_available(), reason="pydensecrf (pydensecrf2) is not installed")
def test_crf_path(backbone):
    seg = _segmenter(backbone, "mlp", crf=True)
    x = _images(batch=2, seed=13)
    cos = _reference_logits(backbone, seg.head, seg.centroids, x, flip=True)
    expected = [
        dense_crf(denormalize_to_uint8(x[i]), F.log_softmax(3.0 * cos[i], dim=0)).argmax(0)
        for i in range(2)
    ]
    assert np.array_equal(seg(x).numpy(), np.stack(expected))
    img = _random_pil(37, 53, seed=14)
    work = img.resize((32, 48), Image.Resampling.NEAREST)
    cos1 = _reference_logits(backbone, seg.head, seg.centroids, _normalise_pil(work), True)[0]
    small = dense_crf(np.asarray(work), F.log_softmax(3.0 * cos1, dim=0)).argmax(0)
    assert np.array_equal(seg.predict_image(img), _pil_nearest(small, 37, 53))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_gpu(backbone, full_fp32_cuda):
    seg = _segmenter(backbone, "tr")
    x = _images()
    cpu = seg.logits(x)
    seg = seg.to("cuda")
    assert seg.device.type == "cuda"
    gpu = seg.logits(x)  # CPU input is moved to the module's device
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    out = seg.predict_image(_random_pil(37, 53))
    assert out.shape == (53, 37)


# ---------------------------------------------------------------------------------- visualize
def test_default_palette():
    pal = default_palette(300)
    assert pal.dtype == np.uint8 and pal.shape == (300, 3)
    assert len({tuple(c) for c in pal}) == 300
    assert not (pal == 0).all(axis=1).any()  # black is reserved for ignore
    assert np.array_equal(default_palette(300), pal)
    assert np.array_equal(default_palette(5), pal[:5])
    assert default_palette(0).shape == (0, 3)


def test_colorize_and_ignore():
    pal = default_palette(4)
    labels = np.array([[0, 1, 255], [3, -1, 2]])
    out = colorize(labels, pal)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0, 0], pal[0]) and np.array_equal(out[1, 0], pal[3])
    assert np.array_equal(out[0, 2], [0, 0, 0]) and np.array_equal(out[1, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="default_palette\\(5\\)"):
        colorize(np.array([[4]]), pal)
    assert np.array_equal(colorize(np.array([[7]]), pal, ignore_index=7), [[[0, 0, 0]]])


def test_overlay_formula_and_range():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    col = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    out = overlay(img, col, alpha=0.3)
    expected = np.rint(0.7 * img.astype(np.float64) + 0.3 * col.astype(np.float64))
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - expected).max() <= 1
    assert np.array_equal(overlay(img, col, 0.0), img)
    assert np.array_equal(overlay(img, col, 1.0), col)
    mask = np.zeros((9, 7), bool)
    mask[0] = True
    assert np.array_equal(overlay(img, col, 1.0, ignore_mask=mask)[0], img[0])
    with pytest.raises(ValueError, match="alpha"):
        overlay(img, col, 1.5)
    with pytest.raises(ValueError, match="differ in size"):
        overlay(img, col[:5])


def test_contact_sheet_size():
    a = np.zeros((10, 20, 3), np.uint8)
    b = np.full((12, 8), 200, np.uint8)  # grayscale cell
    c = np.zeros((5, 30, 4), np.uint8)  # RGBA cell
    sheet = contact_sheet([[a, b, c], [b, a]], titles=["first", ""], pad=3)
    # columns: max(20, 8)=20, max(8, 20)=20, 30; rows: 12 (+ title), 12 (no title)
    assert sheet.shape == (3 + (TITLE_HEIGHT + 12 + 3) + (12 + 3), 3 + 23 + 23 + 33, 3)
    assert sheet.dtype == np.uint8
    assert np.array_equal(sheet[3 + TITLE_HEIGHT + 0, 3 + 23], [200, 200, 200])  # b placed
    assert (sheet[3 : 3 + TITLE_HEIGHT, 3:40] < 255).any()  # title text drawn
    plain = contact_sheet([[a, a]], pad=0)
    assert plain.shape == (10, 40, 3)
    with pytest.raises(ValueError, match="titles"):
        contact_sheet([[a]], titles=["x", "y"])


def test_save_png_atomic_and_round_trip(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    path = save_png(rgb, tmp_path / "d" / "x.png")
    assert np.array_equal(np.asarray(Image.open(path)), rgb)
    ids = np.array([[0, 3], [255, 1]], dtype=np.int64)
    assert np.array_equal(np.asarray(Image.open(save_png(ids, tmp_path / "ids.png"))), ids)
    big = np.array([[0, 1000]], dtype=np.int64)
    assert np.array_equal(np.asarray(Image.open(save_png(big, tmp_path / "big.png"))), big)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["big.png", "d", "ids.png", "x.png"]
    with pytest.raises(ValueError, match="float"):
        save_png(np.zeros((2, 2)), tmp_path / "f.png")


def test_contact_sheet_html(tmp_path):
    p1 = save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "png" / "a.png")
    p2 = save_png(np.zeros((4, 4), np.uint8), tmp_path / "png" / "a_pred.png")
    page = contact_sheet_html([{"title": "a <1>", "images": [p1, p2]}], tmp_path / "index.html")
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>")
    srcs = re.findall(r'<img src="([^"]+)"', text)
    assert srcs == ["png/a.png", "png/a_pred.png"]
    assert all((tmp_path / html.unescape(s)).is_file() for s in srcs)
    assert "a &lt;1&gt;" in text and "http" not in text
    with pytest.raises(ValueError, match="images"):
        contact_sheet_html([{"title": "x"}], tmp_path / "bad.html")
