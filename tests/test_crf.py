"""Tests of the DenseCRF post-processing and its runner (docs/method.md §7.3)."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pydensecrf")

from cause_lightning.inference import crf  # noqa: E402
from cause_lightning.inference.crf import (  # noqa: E402
    CRFRunner,
    crf_available,
    default_crf_workers,
    denormalize_to_uint8,
    dense_crf,
    dense_crfs,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _two_region_scene(
    size: int = 40, num_classes: int = 3, noise: float = 1.6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Red left half / blue right half, with per-pixel noisy logits favouring the true class."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size), dtype=np.int64)
    labels[:, size // 2 :] = 1
    colours = np.array([[200, 40, 40], [40, 60, 200]], dtype=np.float64)
    image = colours[labels] + rng.normal(0, 6, (size, size, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    logits = rng.normal(0, noise, (num_classes, size, size)).astype(np.float32)
    logits[labels, np.arange(size)[:, None], np.arange(size)[None, :]] += 1.5
    return image, logits, labels


def test_crf_output_is_a_distribution_and_cleans_label_noise() -> None:
    image, logits, labels = _two_region_scene()
    probs = dense_crf(image, logits)
    assert probs.dtype == np.float32 and probs.shape == logits.shape
    assert probs.min() >= 0.0
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    noisy_acc = (logits.argmax(0) == labels).mean()
    crf_acc = (probs.argmax(0) == labels).mean()
    assert noisy_acc < 0.75
    assert crf_acc > 0.97
    assert crf_acc > noisy_acc + 0.2


def test_zero_iterations_return_the_clipped_softmax() -> None:
    image, logits, _ = _two_region_scene(size=16)
    probs = dense_crf(image, logits, iterations=0)
    expected = torch.softmax(torch.from_numpy(logits).double(), 0).clamp_min(1e-5)  # library clip
    expected = (expected / expected.sum(0, keepdim=True)).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    one = dense_crf(image, logits, iterations=1)
    assert np.abs(one - probs).max() > 1e-3  # the pairwise terms act from the first iteration


def test_crf_ignores_logit_offsets_and_accepts_torch_and_low_resolution() -> None:
    image, logits, _ = _two_region_scene(size=24)
    base = dense_crf(image, logits)
    # softmax is shift-invariant: log-probabilities and raw scores give the same result
    log_probs = torch.log_softmax(torch.from_numpy(logits), 0)
    np.testing.assert_allclose(dense_crf(image, log_probs), base, atol=1e-5)
    np.testing.assert_allclose(dense_crf(image, logits + 7.0), base, atol=1e-5)
    small = torch.from_numpy(logits)[None, :, ::4, ::4].contiguous()  # 1 C 6 6
    up = F.interpolate(small, size=(24, 24), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(dense_crf(image, small[0]), dense_crf(image, up.numpy()), atol=1e-6)


def _reference_recipe(
    image_rgb: np.ndarray, logits: np.ndarray, iterations: int = 10
) -> np.ndarray:
    """The reference's DenseCRF call, written out from docs/method.md §7.3."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])
    height, width = bgr.shape[:2]
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    model = dcrf.DenseCRF2D(width, height, probs.shape[0])
    model.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    model.addPairwiseGaussian(sxy=1, compat=3)
    model.addPairwiseBilateral(sxy=67, srgb=3, rgbim=bgr, compat=4)
    return np.array(model.inference(iterations)).reshape(probs.shape[0], height, width)


def test_dense_crf_equals_reference_recipe() -> None:
    image, logits, _ = _two_region_scene(size=32, num_classes=5, seed=3)
    np.testing.assert_allclose(
        dense_crf(image, logits), _reference_recipe(image, logits), atol=1e-6
    )


def test_channel_order_argument() -> None:
    image, logits, _ = _two_region_scene(size=20)
    bgr = np.ascontiguousarray(image[..., ::-1])
    rgb_out = dense_crf(image, logits)
    np.testing.assert_array_equal(dense_crf(bgr, logits, channel_order="bgr"), rgb_out)
    # pydensecrf's lattice is not invariant to a channel permutation, so the order is pinned
    assert np.abs(dense_crf(bgr, logits) - rgb_out).max() > 1e-3
    with pytest.raises(ValueError, match="channel_order"):
        dense_crf(image, logits, channel_order="hsv")  # type: ignore[arg-type]


def test_non_contiguous_image_is_accepted() -> None:
    image, logits, _ = _two_region_scene(size=20)
    flipped_view = image[:, ::-1]  # negative strides
    expected = dense_crf(np.ascontiguousarray(flipped_view), logits[:, :, ::-1].copy())
    np.testing.assert_allclose(dense_crf(flipped_view, logits[:, :, ::-1]), expected)


@pytest.mark.parametrize(
    ("image", "logits", "error"),
    [
        (np.zeros((8, 8, 3), np.float32), np.zeros((2, 8, 8), np.float32), ValueError),
        (np.zeros((8, 8), np.uint8), np.zeros((2, 8, 8), np.float32), ValueError),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), np.zeros((2, 8, 8), np.float32), TypeError),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32), ValueError),
        (np.zeros((8, 8, 3), np.uint8), np.zeros((2, 8, 8), np.int64), TypeError),
    ],
)
def test_bad_inputs_raise(image: object, logits: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        dense_crf(image, logits)  # type: ignore[arg-type]


def test_missing_pydensecrf_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pydensecrf", None)
    monkeypatch.setitem(sys.modules, "pydensecrf.densecrf", None)
    assert crf_available() is False
    image, logits, _ = _two_region_scene(size=8)
    with pytest.raises(RuntimeError, match=r"cause-lightning\[crf\]") as info:
        dense_crf(image, logits)
    assert "pydensecrf2" in str(info.value)
    with pytest.raises(RuntimeError, match="pydensecrf2"):
        CRFRunner()([image], [logits])


def test_crf_available_when_installed() -> None:
    assert crf_available() is True


@pytest.mark.parametrize("start_method", [None, "spawn"])
def test_runner_serial_and_pool_agree(start_method: str | None) -> None:
    scenes = [_two_region_scene(size=24, seed=s) for s in range(3)]
    images = [s[0] for s in scenes]
    logits = [s[1] for s in scenes]
    serial = CRFRunner(num_workers=0)(images, logits)
    direct = [dense_crf(im, lg) for im, lg in zip(images, logits)]
    with CRFRunner(num_workers=2, timeout=60.0, start_method=start_method) as runner:
        pooled = runner(images, logits)
        again = runner(images[:1], [torch.from_numpy(logits[0])])  # pool reused, torch accepted
        assert runner._executor is not None
    assert runner._executor is None  # closed on exit
    for a, b, c in zip(serial, pooled, direct):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(again[0], serial[0])
    assert CRFRunner(2)([], []) == []


def _photo_and_maps(count: int = 4, classes: int = 6) -> tuple[np.ndarray, list[np.ndarray]]:
    """A real photo (scikit-image's cat, every 8th pixel) and score maps of two kinds: per-pixel
    noise, and the evaluation's kind (a coarse grid upsampled, 3 x cosine, log-softmax)."""
    from skimage import data

    photo = np.ascontiguousarray(data.chelsea()[::8, ::8])  # 38 57 3
    height, width = photo.shape[:2]
    g = torch.Generator().manual_seed(7)
    maps = []
    for i in range(count):
        if i % 2:
            maps.append(torch.randn(classes, height, width, generator=g).numpy())
            continue
        cos = torch.rand(1, classes, height // 8 + 1, width // 8 + 1, generator=g) * 2 - 1
        up = F.interpolate(cos, size=(height, width), mode="bilinear", align_corners=False)
        maps.append(torch.log_softmax(3.0 * up[0], 0).numpy())
    return photo, maps


def test_one_lattice_gives_the_results_of_separate_calls() -> None:
    photo, maps = _photo_and_maps()
    scene, logits, _ = _two_region_scene(size=24, num_classes=6, seed=4)
    for image, unaries in ((photo, maps), (scene, [logits, logits[::-1].copy(), -logits])):
        separate = [dense_crf(image, u) for u in unaries]
        shared = dense_crfs(image, unaries)
        for a, b in zip(separate, shared, strict=True):
            np.testing.assert_array_equal(a, b)  # bit for bit, not just the labels
        np.testing.assert_array_equal(np.stack(dense_crfs(image, np.stack(unaries))), separate)
    labels = [m.argmax(0) for m in separate]
    assert any((a != b).any() for a, b in zip(labels, labels[1:]))  # distinct results


def test_runner_refines_several_maps_per_image_serially_and_in_a_pool() -> None:
    photo, maps = _photo_and_maps()
    scene, logits, _ = _two_region_scene(size=24, num_classes=6, seed=5)
    images = [photo, scene, photo]
    entries = [maps[:3], np.stack([logits, -logits]), torch.from_numpy(maps[3])]
    expected = [
        np.stack([dense_crf(photo, m).argmax(0) for m in maps[:3]]),  # 3 H W
        np.stack([dense_crf(scene, m).argmax(0) for m in (logits, -logits)]),  # 2 H W
        dense_crf(photo, maps[3]).argmax(0),  # one map: H W, as before
    ]
    with CRFRunner(num_workers=2, timeout=60.0) as pool:
        pooled = pool(images, entries, argmax=True)
    for runner_out in (CRFRunner(num_workers=0)(images, entries, argmax=True), pooled):
        for got, want in zip(runner_out, expected, strict=True):
            assert got.dtype == np.uint8
            np.testing.assert_array_equal(got, want)
    probabilities = CRFRunner()([scene], [[logits, -logits]])[0]
    assert probabilities.shape == (2, *logits.shape)
    np.testing.assert_array_equal(probabilities[1], dense_crf(scene, -logits))


def test_several_maps_of_one_image_are_checked_before_any_work() -> None:
    image, logits, _ = _two_region_scene(size=8, num_classes=3)
    with pytest.raises(ValueError, match="class count"):
        CRFRunner(num_workers=2).submit([image], [[logits, logits[:2]]])
    with pytest.raises(ValueError, match="no score map"):
        CRFRunner().submit([image], [[]])
    with pytest.raises(ValueError, match="class count"):
        dense_crfs(image, [logits, logits[:2]])


def test_default_workers_leave_one_core_to_the_loop() -> None:
    from cause_lightning.core.system import cores_per_rank

    assert default_crf_workers() == max(1, cores_per_rank() - 1)
    assert default_crf_workers(10_000) == 1


def test_runner_validates_arguments() -> None:
    image, logits, _ = _two_region_scene(size=8)
    with pytest.raises(ValueError, match="2 logit maps"):
        CRFRunner()([image], [logits, logits])
    with pytest.raises(ValueError):
        CRFRunner(num_workers=-1)
    with pytest.raises(ValueError):
        CRFRunner(timeout=0)
    with pytest.raises(ValueError, match="fork"):
        CRFRunner(num_workers=2, start_method="fork")


def test_pool_timeout_raises_kills_workers_and_recovers() -> None:
    small = _two_region_scene(size=16)
    big = _two_region_scene(size=96, num_classes=8)
    runner = CRFRunner(num_workers=2, timeout=60.0, iterations=10)
    try:
        runner([small[0]] * 2, [small[1]] * 2)  # starts both workers
        workers = list(runner._executor._processes.values())
        assert len(workers) == 2 and all(p.is_alive() for p in workers)
        # ~10-20 s per image on the 2-core machine: far past the timeout, yet bounded, so a broken
        # kill fails the test below instead of leaving hour-long orphan workers behind
        runner.iterations = 5_000
        runner.timeout = 1.0
        start = time.monotonic()
        with pytest.raises(TimeoutError, match="did not finish within 1.0 s"):
            runner([big[0], big[0]], [big[1], big[1]])
        assert time.monotonic() - start < 10.0  # 1 s timeout + bounded shutdown, never a hang
        assert runner._executor is None
        assert not any(p.is_alive() for p in workers)  # busy workers were terminated
        runner.iterations, runner.timeout = 10, 60.0
        out = runner([small[0]], [small[1]])  # a fresh pool serves the next batch
        np.testing.assert_array_equal(out[0], dense_crf(small[0], small[1]))
    finally:
        runner.close()


def test_denormalize_round_trip_and_reference_formula() -> None:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (3, 12, 10), generator=g, dtype=torch.uint8)
    normalised = (pixels.float() / 255.0 - MEAN) / STD
    out = denormalize_to_uint8(normalised)
    assert out.dtype == np.uint8 and out.shape == (12, 10, 3) and out.flags["C_CONTIGUOUS"]
    original = pixels.permute(1, 2, 0).numpy().astype(np.int64)
    assert np.abs(out.astype(np.int64) - original).max() <= 1  # truncation may drop one level
    assert (out == original).mean() > 0.5
    reference = ((normalised * STD + MEAN) * 255.0).to(torch.uint8).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(out, reference)
    np.testing.assert_array_equal(denormalize_to_uint8(normalised.numpy()), out)


def test_denormalize_clamps_and_validates() -> None:
    image = torch.zeros(3, 2, 2)
    image[:, 0, 0] = 100.0
    image[:, 1, 1] = -100.0
    out = denormalize_to_uint8(image)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[1, 1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="batch"):
        denormalize_to_uint8(torch.zeros(1, 3, 2, 2))


def test_constants_match_data_pipeline() -> None:
    assert crf.IMAGENET_MEAN == pytest.approx(MEAN.flatten().tolist())
    assert crf.IMAGENET_STD == pytest.approx(STD.flatten().tolist())
    try:
        from cause_lightning.data import transforms
    except ImportError:
        return
    assert list(crf.IMAGENET_MEAN) == pytest.approx(list(np.ravel(transforms.IMAGENET_MEAN)))
    assert list(crf.IMAGENET_STD) == pytest.approx(list(np.ravel(transforms.IMAGENET_STD)))
