"""Tests of the data layer: protocol transforms, datasets, mosaic and folder data modules.

References are written here from docs/protocol.md §2 (shorter-side formula, Python-round crop
offsets, PIL nearest index tables) rather than taken from the package.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cause_lightning.data import (
    CorruptImageError,
    DatasetNotFoundError,
    FolderDataModule,
    ImageFolderDataset,
    MosaicDataModule,
    SegDataModule,
    SegmentationDataset,
    SegTransform,
    collate_predict,
    voc_palette,
)
from cause_lightning.data.datasets import open_image, open_label
from cause_lightning.data.mosaic import MOSAIC_TEXTURES
from cause_lightning.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    center_crop,
    resize_short_side_nearest,
    squash_resize,
    to_tensor_normalized,
)
from cause_lightning.ops.pixels import denormalize, normalize, normalize_uint8

# ----------------------------------------------------------------------------------- references


def pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index per output pixel, as protocol.md §2.2 describes PIL's nearest."""
    s = n_in / n_out
    x = s / 2.0
    out = []
    for _ in range(n_out):
        out.append(min(int(math.floor(x)), n_in - 1))
        x += s  # accumulated once per output pixel in double precision
    return np.asarray(out)


def ref_short_side(w: int, h: int, res: int) -> tuple[int, int]:
    s, big = min(w, h), max(w, h)
    long_side = math.floor(res * big / s)
    return (res, long_side) if w <= h else (long_side, res)


def index_image(h: int, w: int) -> np.ndarray:
    return (np.arange(h)[:, None] * w + np.arange(w)[None, :]).astype(np.int32)


# ----------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize(
    ("size", "expected"),
    [((640, 480), (426, 320)), ((480, 640), (320, 426)), ((2048, 1024), (640, 320))],
)
def test_short_side_resize_protocol_examples(size, expected):
    img = Image.new("RGB", size)
    assert resize_short_side_nearest(img, 320).size == expected
    assert center_crop(resize_short_side_nearest(img, 320), 320).size == (320, 320)


def test_short_side_resize_matches_formula_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(50):
        w, h = (int(v) for v in rng.integers(1, 3000, size=2))
        res = int(rng.integers(1, 400))
        out = resize_short_side_nearest(Image.new("L", (w, h)), res).size
        assert out == ref_short_side(w, h, res), (w, h, res)


@pytest.mark.parametrize(("width", "offset"), [(325, 2), (327, 4), (326, 3), (320, 0)])
def test_center_crop_offsets_use_python_round(width, offset):
    # (325-320)/2 = 2.5 rounds to 2 and (327-320)/2 = 3.5 to 4: Python's round-half-to-even.
    assert offset == round((width - 320) / 2)
    ids = index_image(330, width)
    crop = np.asarray(center_crop(Image.fromarray(ids, mode="I"), 320))
    top = round((330 - 320) / 2)
    assert crop.shape == (320, 320)
    assert crop[0, 0] == ids[top, offset]
    np.testing.assert_array_equal(crop, ids[top : top + 320, offset : offset + 320])


def test_center_crop_too_small_raises():
    with pytest.raises(ValueError, match="resize its shorter side"):
        center_crop(Image.new("RGB", (100, 50)), 64)


@pytest.mark.parametrize(
    ("w", "h", "res"), [(640, 480, 320), (2048, 1024, 320), (37, 23, 32), (101, 77, 9), (5, 300, 7)]
)
def test_nearest_resize_matches_pil_index_tables(w, h, res):
    ids = index_image(h, w)
    out = np.asarray(resize_short_side_nearest(Image.fromarray(ids, mode="I"), res))
    ow, oh = ref_short_side(w, h, res)
    expected = ids[pil_nearest_index(h, oh)][:, pil_nearest_index(w, ow)]
    np.testing.assert_array_equal(out, expected)


def test_squash_resize_matches_index_tables():
    ids = index_image(45, 70)
    out = np.asarray(squash_resize(Image.fromarray(ids, mode="I"), 32))
    np.testing.assert_array_equal(out, ids[pil_nearest_index(45, 32)][:, pil_nearest_index(70, 32)])


@pytest.mark.parametrize("mode", ["crop", "squash"])
def test_seg_transform_label_geometry_and_ignore(mode):
    rng = np.random.default_rng(1)
    h, w, res = 61, 90, 40
    label = rng.integers(0, 5, size=(h, w)).astype(np.uint8)
    label[10:30, 20:60] = 255
    image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8))
    img_t, lab_t = SegTransform(res, mode=mode)(image, label)
    # uint8 across the worker boundary; normalised on the device (normalize_uint8).
    assert img_t.shape == (3, res, res) and img_t.dtype == torch.uint8
    assert lab_t.shape == (res, res) and lab_t.dtype == torch.uint8
    if mode == "crop":
        ow, oh = ref_short_side(w, h, res)
        rows, cols = pil_nearest_index(h, oh), pil_nearest_index(w, ow)
        top, left = round((oh - res) / 2), round((ow - res) / 2)
        rows, cols = rows[top : top + res], cols[left : left + res]
    else:
        rows, cols = pil_nearest_index(h, res), pil_nearest_index(w, res)
    np.testing.assert_array_equal(lab_t.numpy(), label[rows][:, cols])
    assert (lab_t == 255).any()
    # The image goes through the same geometry: compare one channel after undoing the normalisation.
    img_arr = np.asarray(image)
    np.testing.assert_array_equal(img_t.numpy().transpose(1, 2, 0), img_arr[rows][:, cols])
    expected = (img_arr[rows][:, cols][..., 0] / 255.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    np.testing.assert_allclose(normalize_uint8(img_t)[0].numpy(), expected, atol=1e-5)


def test_seg_transform_wide_label_values_survive():
    label = np.full((20, 30), 1000, dtype=np.int32)
    label[:, :15] = 255
    _, lab = SegTransform(16)(Image.new("RGB", (30, 20)), label)
    assert set(lab.unique().tolist()) == {255, 1000}


def test_seg_transform_without_label_is_all_ignore():
    img_t, lab_t = SegTransform(24)(Image.new("RGB", (50, 30)), None)
    assert img_t.shape == (3, 24, 24)
    assert bool((lab_t == 255).all())


def test_seg_transform_rejects_size_mismatch_and_bad_mode():
    with pytest.raises(ValueError, match="does not match image size"):
        SegTransform(16)(Image.new("RGB", (30, 20)), np.zeros((21, 30), np.uint8))
    with pytest.raises(ValueError, match="Unknown SegTransform mode"):
        SegTransform(16, mode="bilinear")


def test_non_rgb_images_are_converted_and_empty_rejected():
    for mode in ("L", "RGBA", "P", "I;16"):
        img = Image.new(mode, (20, 12))
        img_t, _ = SegTransform(8)(img, None)
        assert img_t.shape == (3, 8, 8)
    with pytest.raises(ValueError, match="too small"):
        resize_short_side_nearest(Image.new("RGB", (0, 10)), 8)


def test_normalize_roundtrip_and_values():
    arr = np.random.default_rng(2).integers(0, 256, size=(7, 9, 3)).astype(np.uint8)
    t = to_tensor_normalized(Image.fromarray(arr))
    ref = (arr.transpose(2, 0, 1) / 255.0 - np.array(IMAGENET_MEAN)[:, None, None]) / np.array(
        IMAGENET_STD
    )[:, None, None]
    np.testing.assert_allclose(t.numpy(), ref, atol=1e-5)
    batch = torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(denormalize(normalize(batch)), batch)


# ----------------------------------------------------------------------------------- file readers


def test_open_image_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(CorruptImageError, match="bad.png"):
        open_image(bad)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 128).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(CorruptImageError, match="truncated.png"):
        open_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        open_image(tmp_path / "missing.jpg")
    assert isinstance(CorruptImageError("x"), ValueError)
    grey = tmp_path / "grey.png"
    Image.new("L", (5, 4), 7).save(grey)
    assert open_image(grey).mode == "RGB"


def test_open_label_modes(tmp_path):
    ids = np.array([[0, 1, 2], [255, 20, 3]], dtype=np.uint8)
    pal = Image.fromarray(ids, mode="P")
    pal.putpalette(list(voc_palette(256).ravel()))
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(open_label(tmp_path / "p.png"), ids)
    Image.fromarray(ids, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(open_label(tmp_path / "l.png"), ids)
    colour = np.zeros((2, 3, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="colour image"):
        open_label(tmp_path / "rgb.png")


def test_segmentation_dataset_items(tmp_path):
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((30, 40), 7, np.uint8)).save(tmp_path / "a_lab.png")
    ds = SegmentationDataset(
        [(tmp_path / "a.png", tmp_path / "a_lab.png"), (tmp_path / "a.png", None)],
        SegTransform(16),
        decode_label=lambda a: np.where(a == 7, 2, 255).astype(np.uint8),
    )
    first, second = ds[0], ds[1]
    assert set(first) == {"image", "label", "index"}
    assert first["index"] == 0 and second["index"] == 1
    assert bool((first["label"] == 2).all())
    assert bool((second["label"] == 255).all())


def test_voc_palette_distinct():
    pal = voc_palette(256)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal.tolist()}) == 256
    np.testing.assert_array_equal(pal[:3], [[0, 0, 0], [128, 0, 0], [0, 128, 0]])


# ------------------------------------------------------------------------------- predict dataset


def _write_images(folder: Path, sizes: list[tuple[int, int]], ext: str = ".png") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(4)
    for i, (w, h) in enumerate(sizes):
        p = folder / f"img{i}{ext}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(p)
        paths.append(p)
    return paths


def test_image_folder_dataset_sizes_glob_single_and_list(tmp_path):
    paths = _write_images(tmp_path / "pics", [(37, 53), (100, 61), (64, 64)])
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path / "pics", res=32, patch_size=8)
    assert len(ds) == 3
    for item, p in zip([ds[i] for i in range(3)], paths, strict=True):
        h, w = item["image"].shape[1:]
        assert h % 8 == 0 and w % 8 == 0
        orig_w, orig_h = Image.open(p).size
        assert item["size"].tolist() == [orig_h, orig_w]
        assert item["path"] == str(p)
        # The shorter side lands on res (32 is a multiple of 8); the longer keeps the aspect ratio.
        ref_w, ref_h = ref_short_side(orig_w, orig_h, 32)
        assert min(h, w) == 32
        assert abs(h - ref_h) <= 4 and abs(w - ref_w) <= 4
    assert len(ImageFolderDataset(str(tmp_path / "pics" / "*.png"), 32, 8)) == 3
    assert len(ImageFolderDataset(str(tmp_path / "**" / "img1.png"), 32, 8)) == 1
    assert len(ImageFolderDataset(paths[0], 32, 8)) == 1
    assert len(ImageFolderDataset([paths[0], paths[2], paths[0]], 32, 8)) == 2
    with pytest.raises(FileNotFoundError, match="No images found"):
        ImageFolderDataset(tmp_path / "nothing_here" / "*.jpg", 32, 8)
    odd = ImageFolderDataset(paths[1], res=30, patch_size=14)[0]["image"]
    assert odd.shape[1] % 14 == 0 and odd.shape[2] % 14 == 0


def test_collate_predict_batch_one_and_mismatch(tmp_path):
    _write_images(tmp_path / "pics", [(37, 53), (100, 61)])
    ds = ImageFolderDataset(tmp_path / "pics", res=16, patch_size=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate_predict)
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b["image"].ndim == 4 and b["image"].shape[0] == 1
    assert b["size"].shape == (1, 2) and b["size"].dtype == torch.long
    assert isinstance(b["path"], list) and len(b["path"]) == 1
    with pytest.raises(ValueError, match="batch_size=1"):
        collate_predict([ds[0], ds[1]])
    squash = ImageFolderDataset(tmp_path / "pics", res=16, patch_size=8, mode="squash")
    assert collate_predict([squash[0], squash[1]])["image"].shape == (2, 3, 16, 16)


# ----------------------------------------------------------------------------------- base module


class _TinyDataModule(SegDataModule):
    name = "tiny"
    num_classes = 2
    class_names = ["a", "b"]
    layout = "<root>/tiny/<files>"

    def build_dataset(self, split, res):
        return _RangeDataset(10 if split == "train" else 4, res)


class _RangeDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, res: int) -> None:
        self.n, self.res = n, res

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {
            "image": torch.zeros(3, self.res, self.res),
            "label": torch.zeros(self.res, self.res, dtype=torch.long),
            "index": i,
        }


def test_dataset_not_found_error_message(tmp_path):
    dm = _TinyDataModule(root=tmp_path / "missing")
    with pytest.raises(DatasetNotFoundError) as info:
        dm.prepare_data()
    msg = str(info.value)
    assert "<root>/tiny/<files>" in msg
    assert "python -m cause_lightning stage=prepare data=tiny" in msg
    assert str(tmp_path / "missing") in msg
    assert isinstance(info.value, FileNotFoundError)


def test_base_loaders_seeded_shuffle_and_limit(tmp_path):
    def order(seed: int) -> list[int]:
        dm = _TinyDataModule(root=tmp_path, train_res=8, test_res=12, batch_size=3, seed=seed)
        dm.setup("fit")
        return torch.cat([b["index"] for b in dm.train_dataloader()]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(10))
    dm = _TinyDataModule(root=tmp_path, train_res=8, test_res=12, limit_train=4, eval_batch_size=2)
    dm.setup(None)
    assert len(dm.train_dataset) == 4
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (2, 3, 12, 12)
    assert len(dm.test_dataloader().dataset) == 4
    info = dm.describe()
    assert info["name"] == "tiny" and info["counts"]["train"] == 4 and info["counts"]["val"] == 4
    assert dm.palette.shape == (2, 3)
    workers = _TinyDataModule(root=tmp_path, num_workers=2)
    workers.setup("fit")
    loader = workers.train_dataloader()  # not iterated: no worker process is started
    assert loader.persistent_workers and loader.num_workers == 2
    assert loader.pin_memory == torch.cuda.is_available()
    assert not dm.train_dataloader().persistent_workers


# ----------------------------------------------------------------------------------- mosaic

MOSAIC_KW = {"num_train": 24, "num_val": 6, "image_size": 48, "num_classes": 6, "data_seed": 3}


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> MosaicDataModule:
    dm = MosaicDataModule(root=tmp_path_factory.mktemp("mosaic"), batch_size=4, **MOSAIC_KW)
    dm.prepare_data()
    return dm


def _load_split(dm: MosaicDataModule, split: str) -> tuple[np.ndarray, np.ndarray]:
    imgs, labs = [], []
    for img_p, lab_p in dm.samples(split):
        imgs.append(np.asarray(Image.open(img_p).convert("RGB")))
        labs.append(np.asarray(Image.open(lab_p)))
    return np.stack(imgs), np.stack(labs)


def test_mosaic_layout_and_manifest(mosaic):
    assert mosaic.generated_now
    assert mosaic.cache_dir.name.startswith("mosaic-v1-")
    manifest = json.loads((mosaic.cache_dir / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 3 and manifest["counts"] == {"train": 24, "val": 6}
    assert mosaic.class_names == [t.name for t in MOSAIC_TEXTURES[:6]]
    assert len(set(mosaic.class_names)) == 6
    assert mosaic.palette.shape == (6, 3)
    assert not list(mosaic.root.glob(".tmp-*"))


def test_mosaic_determinism(mosaic, tmp_path):
    again = MosaicDataModule(root=tmp_path / "a", **MOSAIC_KW)
    again.prepare_data()
    for (i1, l1), (i2, l2) in zip(mosaic.samples("train"), again.samples("train"), strict=True):
        assert i1.read_bytes() == i2.read_bytes()
        assert l1.read_bytes() == l2.read_bytes()
    other = MosaicDataModule(root=tmp_path / "b", **{**MOSAIC_KW, "data_seed": 4, "num_train": 3})
    other.prepare_data()
    assert other.cache_dir.name != mosaic.cache_dir.name
    differs = [
        a.read_bytes() != b.read_bytes()
        for (a, _), (b, _) in zip(mosaic.samples("train"), other.samples("train"), strict=False)
    ]
    assert all(differs)


def test_mosaic_train_and_val_differ(mosaic):
    train, _ = _load_split(mosaic, "train")
    val, _ = _load_split(mosaic, "val")
    for v in val:
        assert not any(np.array_equal(v, t) for t in train)


def test_mosaic_label_integrity_and_balance(mosaic):
    _, labels = _load_split(mosaic, "train")
    c = mosaic.num_classes
    assert labels.dtype == np.uint8 and labels.max() < c
    for lab in labels:
        assert len(np.unique(lab)) >= 2
    share = np.bincount(labels.ravel(), minlength=c) / labels.size
    assert share.min() > 0.35 / c and share.max() < 2.0 / c, share


def test_mosaic_cache_reuse_and_regeneration(mosaic):
    manifest = mosaic.cache_dir / "manifest.json"
    before = manifest.stat().st_mtime_ns
    same = MosaicDataModule(root=mosaic.root, **MOSAIC_KW)
    same.prepare_data()
    assert not same.generated_now
    assert same.cache_dir == mosaic.cache_dir
    assert manifest.stat().st_mtime_ns == before
    changed = MosaicDataModule(root=mosaic.root, **{**MOSAIC_KW, "num_val": 2})
    changed.prepare_data()
    assert changed.generated_now and changed.cache_dir != mosaic.cache_dir
    # A broken cache (manifest lost) is regenerated in place.
    (changed.cache_dir / "manifest.json").unlink()
    fixed = MosaicDataModule(root=mosaic.root, **{**MOSAIC_KW, "num_val": 2})
    fixed.prepare_data()
    assert fixed.generated_now and (fixed.cache_dir / "manifest.json").is_file()


def test_mosaic_colour_jitter_and_mean_colour_baseline(mosaic):
    imgs, labels = _load_split(mosaic, "train")
    imgs = imgs.astype(np.float64) / 255.0
    c = mosaic.num_classes
    # Per-image mean colour of each class varies across images.
    for k in range(c):
        means = [
            img[lab == k].mean(axis=0)
            for img, lab in zip(imgs, labels, strict=True)
            if (lab == k).mean() > 0.1
        ]
        if len(means) >= 3:
            assert np.std(np.asarray(means), axis=0).max() > 0.02, k
    # Nearest class-mean colour per pixel is far from solving the task.
    centres = np.stack([imgs[labels == k].mean(axis=0) for k in range(c)])  # C 3
    val_imgs, val_labels = _load_split(mosaic, "val")
    pix = val_imgs.reshape(-1, 3).astype(np.float64) / 255.0
    pred = np.argmin(((pix[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    acc = float((pred == val_labels.ravel()).mean())
    assert 1.0 / c < acc < 0.75, acc


def test_mosaic_datamodule_batches(mosaic):
    dm = MosaicDataModule(root=mosaic.root, train_res=32, test_res=40, batch_size=4, **MOSAIC_KW)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.uint8
    assert batch["label"].shape == (4, 32, 32) and batch["label"].dtype == torch.uint8
    assert batch["index"].dtype == torch.long and batch["index"].shape == (4,)
    assert int(batch["label"].max()) < dm.num_classes
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[-2:] == (40, 40)
    info = dm.describe()
    assert info["counts"]["train"] == 24 and info["cache_dir"] == str(mosaic.cache_dir)


def test_mosaic_rejects_bad_num_classes(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        MosaicDataModule(root=tmp_path, num_classes=len(MOSAIC_TEXTURES) + 1)


# ----------------------------------------------------------------------------------- folder


def _folder_tree(root: Path, with_masks: bool = True) -> None:
    rng = np.random.default_rng(5)
    (root / "images" / "sub").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, (w, h) in {"a.jpg": (40, 30), "b.png": (33, 50), "sub/c.jpg": (64, 48)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(
            root / "images" / name
        )
        stem = Path(name).stem
        if with_masks and stem != "c":
            mask = rng.integers(0, 3, (h, w)).astype(np.uint8)
            mask[:3] = 255
            Image.fromarray(mask, mode="L").save(root / "masks" / f"{stem}.png")


def test_folder_datamodule_flat(tmp_path):
    _folder_tree(tmp_path)
    dm = FolderDataModule(
        root=tmp_path,
        num_classes=3,
        class_names=["x", "y", "z"],
        train_res=16,
        test_res=16,
        batch_size=2,
    )
    dm.prepare_data()
    assert dm.has_labels
    assert len(dm.samples("train")) == 3 and len(dm.samples("val")) == 2
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].shape == (2, 16, 16)
    values = set(batch["label"].unique().tolist())
    assert values <= {0, 1, 2, 255} and 255 in values
    info = dm.describe()
    assert info["images"] == {"train": 3, "val": 2} and info["masks"]["val"] == 2
    train = list(dm.train_dataloader())
    unlabelled = [b for b in train if bool((b["label"] == 255).all(dim=(1, 2)).any())]
    assert unlabelled  # c.jpg has no mask -> all-ignore label


def test_folder_split_folders_and_bad_mask(tmp_path):
    rng = np.random.default_rng(6)
    for split, n in (("train", 3), ("val", 2)):
        (tmp_path / "images" / split).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "images" / split / f"{split}{i}.png")
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((20, 24), 9, np.uint8)).save(tmp_path / "masks" / "val0.png")
    dm = FolderDataModule(root=tmp_path, num_classes=3, train_res=8, test_res=8)
    assert len(dm.samples("train")) == 3 and len(dm.samples("val")) == 2
    ds = dm.build_dataset("val", 8)
    with pytest.raises(ValueError, match="val0.png"):
        ds[0]


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="stage=prepare data=folder"):
        FolderDataModule(root=tmp_path / "nope", num_classes=2).prepare_data()
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="no images"):
        FolderDataModule(root=tmp_path / "empty", num_classes=2).prepare_data()
    _folder_tree(tmp_path / "nomask", with_masks=False)
    dm = FolderDataModule(root=tmp_path / "nomask", num_classes=3, train_res=8, test_res=8)
    assert not dm.has_labels
    with pytest.raises(ValueError, match="needs masks"):
        dm.setup("validate")
    dm.setup("fit")  # training on unlabelled images works; validation is skipped
    assert len(dm.train_dataset) == 3 and dm.val_dataloader() == []
    with pytest.raises(ValueError, match="class_names"):
        FolderDataModule(root=tmp_path, num_classes=3, class_names=["a"])


def test_normalize_uint8_equals_the_float_pipeline_and_labels_can_be_skipped(mosaic):
    """Device-side normalisation of uint8 pixels gives the old in-worker float values exactly,
    and a training split with ``train_labels`` off reads no label."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    pixels = SegTransform(16).image(image)  # 3 16 16 uint8
    assert pixels.dtype == torch.uint8
    geometry = SegTransform(16).geometry(image, Image.NEAREST)
    assert torch.equal(normalize_uint8(pixels[None])[0], to_tensor_normalized(geometry))
    dm = MosaicDataModule(root=mosaic.root, train_res=32, test_res=32, batch_size=4, **MOSAIC_KW)
    dm.train_labels = False
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert "label" not in batch and batch["image"].dtype == torch.uint8
    assert "label" in next(iter(dm.val_dataloader()))


def test_num_workers_null_takes_the_cores_of_each_process(mosaic, monkeypatch):
    import os
    from types import SimpleNamespace

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    dm = MosaicDataModule(root=mosaic.root, num_workers=None, **MOSAIC_KW)
    assert dm.workers() == 7  # one process: its 8 cores less one for itself
    dm.trainer = SimpleNamespace(num_devices=2, world_size=2, global_rank=0)
    assert dm.workers() == 3  # two ranks on the node share the 8 cores
    assert MosaicDataModule(root=mosaic.root, num_workers=2, **MOSAIC_KW).workers() == 2
