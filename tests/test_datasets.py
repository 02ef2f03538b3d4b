"""Real-dataset support (protocol.md §1-§3): label maps, crop recipes and cache, data modules on
tiny fake trees in the real layouts, count / layout errors, preparation from local archives, and the
dataset / experiment presets.

Expected values come from the spec written out here (the COCO-Stuff-27 table, the 81 / 171 rules,
torchvision's ``five_crop`` / ``ten_crop`` as the independent crop reference, PIL for the protocol
resize), never from the code under test.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import pickle
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import yaml
from PIL import Image

from cause_lightning.data import crops as crops_mod
from cause_lightning.data.base import DatasetNotFoundError
from cause_lightning.data.cityscapes import Cityscapes27DataModule
from cause_lightning.data.cocostuff import (
    Coco81DataModule,
    Coco171DataModule,
    CocoStuff27DataModule,
    packaged_list,
)
from cause_lightning.data.crops import (
    CropCacheMismatchError,
    CropCacheSpec,
    build_crop_cache,
    cache_folder_name,
    crop_label_lut,
    decode_crop_label,
    encode_crop_label,
    get_recipe,
    inspect_crop_cache,
    list_sha256,
    make_crops,
)
from cause_lightning.data.crops import writer as crops_writer
from cause_lightning.data.labels import dataset_names, get_label_spec
from cause_lightning.data.pascalvoc import PascalVOC21DataModule
from cause_lightning.data.prepare import download_file, extract_archive, prepare_dataset
from cause_lightning.data.real import DatasetCountError, detect_layout

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------- spec tables
# protocol.md §1.3, COCO-Stuff-27: coarse class -> fine stuffthingmap ids.
COCO27_TABLE: dict[int, list[int]] = {
    0: [71, 72, 73, 74, 75, 76],
    1: [77, 78, 79, 80, 81, 82],
    2: [51, 52, 53, 54, 55, 56, 57, 58, 59, 60],
    3: [61, 62, 63, 64, 65, 66, 67, 68, 69, 70],
    4: [83, 84, 85, 86, 87, 88, 89, 90],
    5: [43, 44, 45, 46, 47, 48, 49, 50],
    6: [25, 26, 27, 28, 29, 30, 31, 32],
    7: [15, 16, 17, 18, 19, 20, 21, 22, 23, 24],
    8: [9, 10, 11, 12, 13, 14],
    9: [0],
    10: [33, 34, 35, 36, 37, 38, 39, 40, 41, 42],
    11: [1, 2, 3, 4, 5, 6, 7, 8],
    12: [101, 102],
    13: [100, 113, 114, 115, 116, 117],
    14: [120, 121, 152, 169],
    15: [97, 106, 107, 109, 111, 122, 129, 132, 155, 160, 164],
    16: [99, 131, 138, 142],
    17: [91, 92, 103, 104, 108, 130, 136, 140, 151, 166, 167],
    18: [170, 171, 172, 173, 174, 175, 176],
    19: [179, 180],
    20: [94, 95, 127, 150, 157, 165],
    21: [110, 124, 125, 135, 139, 143, 144, 146, 148, 153, 158],
    22: [93, 96, 118, 123, 128, 133, 141, 162, 168],
    23: [105, 156],
    24: [126, 134, 149, 159, 161, 181],
    25: [98, 112, 137, 145, 163],
    26: [119, 147, 154, 177, 178],
}
UNUSED_THINGS = {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}

# method.md §9: every published row -> (mIoU, pAcc or None).
PUBLISHED_ROWS: dict[str, tuple[float, float | None]] = {
    "cocostuff27_dino_vits8_mlp": (27.9, 66.8),
    "cocostuff27_dino_vits8_tr": (32.4, 69.6),
    "cocostuff27_dino_vits16_mlp": (25.9, 66.3),
    "cocostuff27_dino_vits16_tr": (33.1, 70.4),
    "cocostuff27_dino_vitb8_mlp": (34.3, 72.8),
    "cocostuff27_dino_vitb8_tr": (41.9, 74.9),
    "cocostuff27_dinov2_vitb14_tr": (45.3, 78.0),
    "cocostuff27_ibot_vitb16_tr": (39.5, 73.8),
    "cocostuff27_msn_vits16_tr": (34.1, 72.1),
    "cocostuff27_mae_vitb16_tr": (21.5, 59.1),
    "cityscapes27_dino_vits8_mlp": (21.7, 87.7),
    "cityscapes27_dino_vits8_tr": (24.6, 89.4),
    "cityscapes27_dino_vitb8_mlp": (25.7, 90.3),
    "cityscapes27_dino_vitb8_tr": (28.0, 90.8),
    "cityscapes27_dinov2_vitb14_tr": (29.9, 89.8),
    "cityscapes27_ibot_vitb16_tr": (23.0, 89.1),
    "cityscapes27_msn_vits16_tr": (21.2, 89.1),
    "cityscapes27_mae_vitb16_tr": (12.5, 82.0),
    "pascalvoc21_dino_vits8_mlp": (46.0, None),
    "pascalvoc21_dino_vits8_tr": (50.0, None),
    "pascalvoc21_dino_vitb8_mlp": (47.9, None),
    "pascalvoc21_dino_vitb8_tr": (53.3, None),
    "pascalvoc21_dinov2_vitb14_tr": (53.2, 91.5),
    "pascalvoc21_ibot_vitb16_tr": (53.4, 89.6),
    "pascalvoc21_msn_vits16_tr": (30.2, 84.2),
    "pascalvoc21_mae_vitb16_tr": (25.8, 83.7),
    "coco81_dino_vits8_mlp": (19.1, 78.8),
    "coco81_dino_vits8_tr": (21.2, 75.2),
    "coco171_dino_vits8_mlp": (10.6, 44.9),
    "coco171_dino_vits8_tr": (15.2, 46.6),
}

REAL_DATA = ["cocostuff27", "coco81", "coco171", "cityscapes27", "pascalvoc21"]


# --------------------------------------------------------------------------------- fake trees
def _rgb(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


COCO_SIZES = [(24, 33), (31, 20), (17, 26)]


def make_coco_tree(root: Path, n_train: int = 3, n_val: int = 2, seed: int = 0) -> dict:
    """COCO-Stuff layout: 12-digit ids, JPEG images, stuffthingmaps PNGs with fine ids + 255."""
    rng = np.random.default_rng(seed)
    base = root / "cocostuff"
    values = np.r_[0:182, 255].astype(np.uint8)
    ids = {"train2017": [f"{9 + 16 * i:012d}" for i in range(n_train)]}
    ids["val2017"] = [f"{139 + 7 * i:012d}" for i in range(n_val)]
    labels = {}
    for split, split_ids in ids.items():
        for sub in ("images", "annotations", "curated"):
            (base / sub / split).mkdir(parents=True, exist_ok=True)
        for k, image_id in enumerate(split_ids):
            h, w = COCO_SIZES[k % len(COCO_SIZES)]
            _rgb(rng, h, w).save(base / "images" / split / f"{image_id}.jpg")
            lab = rng.choice(values, size=(h, w)).astype(np.uint8)
            Image.fromarray(lab, mode="L").save(base / "annotations" / split / f"{image_id}.png")
            labels[image_id] = lab
        text = "\n".join(split_ids) + "\n"
        for name in ("Coco164kFull_Stuff_Coarse.txt", "Coco164kFull_Stuff_Coarse_7.txt"):
            (base / "curated" / split / name).write_text(text)
    return {"ids": ids, "labels": labels}


def make_cityscapes_tree(root: Path, frames: dict[str, int] | None = None, seed: int = 1) -> dict:
    """Official Cityscapes layout with ``*_leftImg8bit.png`` and ``*_gtFine_labelIds.png``."""
    frames = frames or {"train": 3, "val": 2}
    rng = np.random.default_rng(seed)
    base = root / "cityscapes"
    cities = {"train": ["bochum", "aachen"], "val": ["lindau"]}
    out = {}
    for split, n in frames.items():
        for k in range(n):
            city = cities[split][k % len(cities[split])]
            stem = f"{city}_{k:06d}_{19 + k:06d}"
            img_dir = base / "leftImg8bit" / split / city
            gt_dir = base / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            _rgb(rng, 16, 32).save(img_dir / f"{stem}_leftImg8bit.png")
            lab = rng.integers(0, 34, (16, 32)).astype(np.uint8)
            Image.fromarray(lab, mode="L").save(gt_dir / f"{stem}_gtFine_labelIds.png")
            out[f"{split}/{city}/{stem}"] = lab
    return out


def _voc_palette() -> list[int]:
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def make_voc_tree(root: Path, n_train: int = 2, n_val: int = 2, seed: int = 2) -> dict:
    """VOC 2012 devkit layout: JPEG images, palette PNGs (0..20, 255 boundaries), ImageSets."""
    rng = np.random.default_rng(seed)
    voc = root / "pascalvoc" / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    ids = {
        "train": [f"2007_{i:06d}" for i in range(n_train)],
        "val": [f"2008_{i:06d}" for i in range(n_val)],
    }
    labels = {}
    for split, split_ids in ids.items():
        for image_id in split_ids:
            h, w = 20, 27
            _rgb(rng, h, w).save(voc / "JPEGImages" / f"{image_id}.jpg")
            lab = rng.integers(0, 21, (h, w)).astype(np.uint8)
            lab[h // 2, :] = 255  # object boundary
            png = Image.fromarray(lab, mode="P")
            png.putpalette(_voc_palette())
            png.save(voc / "SegmentationClass" / f"{image_id}.png")
            labels[image_id] = lab
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(
            "\n".join(split_ids) + "\n"
        )
    return {"ids": ids, "labels": labels}


# --------------------------------------------------------------------------------- label maps
def test_cocostuff27_every_fine_id_follows_the_table() -> None:
    lut = get_label_spec("cocostuff27").lut
    listed = [fine for fines in COCO27_TABLE.values() for fine in fines]
    assert sorted(listed) == list(range(182))  # the table covers every fine id exactly once
    for coarse, fines in COCO27_TABLE.items():
        for fine in fines:
            assert lut[fine] == coarse, (fine, coarse)
    assert all(lut[v] == 255 for v in range(182, 256))
    assert lut[0] == 9 and lut[156] == 23 and lut[255] == 255  # protocol anchors


def test_coco81_and_coco171_rules() -> None:
    lut81 = get_label_spec("coco81").lut
    lut171 = get_label_spec("coco171").lut
    used_things = [i for i in range(91) if i not in UNUSED_THINGS]
    used = [i for i in range(182) if i not in UNUSED_THINGS]
    assert len(used_things) == 80 and len(used) == 171
    expected81 = np.full(256, 255)
    expected81[91:182] = 0
    for k, fine in enumerate(used_things):
        expected81[fine] = k + 1
    expected171 = np.full(256, 255)
    for k, fine in enumerate(used):
        expected171[fine] = k
    np.testing.assert_array_equal(lut81, expected81)
    np.testing.assert_array_equal(lut171, expected171)
    assert lut81[0] == 1 and lut81[89] == 80 and lut171[91] == 80 and lut171[181] == 170


def test_cityscapes_and_voc_luts() -> None:
    cs = get_label_spec("cityscapes27").lut
    voc = get_label_spec("pascalvoc21").lut
    for v in range(256):
        assert cs[v] == (v - 7 if 7 <= v <= 33 else 255)
        assert voc[v] == (v if v <= 20 else 255)


@pytest.mark.parametrize("name", REAL_DATA)
def test_label_spec_shapes(name: str) -> None:
    spec = get_label_spec(name)
    expected = {
        "cocostuff27": 27,
        "coco81": 81,
        "coco171": 171,
        "cityscapes27": 27,
        "pascalvoc21": 21,
    }
    assert spec.num_classes == expected[name] == len(spec.class_names)
    assert len(set(spec.class_names)) == spec.num_classes
    assert spec.palette.shape == (spec.num_classes, 3) and spec.palette.dtype == np.uint8
    assert spec.lut.shape == (256,) and spec.lut.dtype == np.uint8
    mapped = spec.lut[spec.lut != 255]
    assert set(mapped.tolist()) == set(range(spec.num_classes))  # every class is reachable
    raw = np.array([[0, 7, 255], [20, 33, 156]], dtype=np.int32)
    np.testing.assert_array_equal(spec.decode(raw), spec.lut[raw.astype(np.uint8)])


def test_class_names_anchor_values() -> None:
    assert get_label_spec("cocostuff27").class_names[9] == "person"
    assert get_label_spec("cocostuff27").class_names[23] == "sky"
    assert get_label_spec("cityscapes27").class_names[0] == "road"
    assert get_label_spec("cityscapes27").class_names[26] == "bicycle"
    assert get_label_spec("pascalvoc21").class_names[20] == "tvmonitor"
    assert get_label_spec("coco81").class_names[:2] == ("background", "person")
    assert get_label_spec("coco171").class_names[80] == "banner"
    with pytest.raises(ValueError, match="cityscapes27"):
        get_label_spec("cityscapes")
    assert dataset_names() == REAL_DATA


def test_packaged_curated_lists() -> None:
    counts = {
        ("train2017", "Coco164kFull_Stuff_Coarse.txt"): 97_702,
        ("train2017", "Coco164kFull_Stuff_Coarse_7.txt"): 49_629,
        ("val2017", "Coco164kFull_Stuff_Coarse.txt"): 4_172,
        ("val2017", "Coco164kFull_Stuff_Coarse_7.txt"): 2_175,
    }
    lists = {}
    for (split, name), n in counts.items():
        path = packaged_list(split, name)
        assert path is not None and path.is_file()
        raw = path.read_bytes()
        entries = raw.decode().split()
        assert len(entries) == n
        assert all(len(e) == 12 and e.isdigit() for e in entries)
        # the crop manifest's fingerprint equals sha256sum of a canonical list file
        assert list_sha256(entries) == hashlib.sha256(raw).hexdigest()
        lists[(split, name)] = set(entries)
    for split in ("train2017", "val2017"):
        assert (
            lists[(split, "Coco164kFull_Stuff_Coarse_7.txt")]
            <= lists[(split, "Coco164kFull_Stuff_Coarse.txt")]
        )


# --------------------------------------------------------------------------------- crop recipes
def _reference_crops(arr: np.ndarray, recipe: str) -> list[np.ndarray]:
    """Crops by torchvision's five_crop / ten_crop on a [C,H,W] tensor (independent reference)."""
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))  # C H W
    h, w = arr.shape[:2]
    ratios = {"five": [0.5], "double": [0.5, 0.8], "super": [0.3, 0.4, 0.5, 0.6, 0.7]}[recipe]
    out = []
    for r in ratios:
        size = [int(h * r), int(w * r)]
        parts = TF.five_crop(t, size) if recipe == "five" else TF.ten_crop(t, size)
        out.extend(p.numpy().transpose(1, 2, 0) for p in parts)
    return out


@pytest.mark.parametrize("recipe", ["five", "double", "super"])
@pytest.mark.parametrize("size", [(24, 33), (31, 20), (17, 26), (10, 13)])
def test_make_crops_matches_torchvision(recipe: str, size: tuple[int, int]) -> None:
    h, w = size
    # unique values per pixel, so any off-by-one in a box shows up
    ys, xs = np.mgrid[0:h, 0:w]
    arr = np.stack([ys, xs, (ys * w + xs) % 251], axis=-1).astype(np.uint8)  # H W 3
    label = ((ys * 7 + xs) % 27).astype(np.uint8)
    rec = get_recipe(recipe)
    got = list(make_crops(Image.fromarray(arr), label, rec))
    ref_img = _reference_crops(arr, recipe)
    ref_lab = _reference_crops(label[..., None], recipe)
    assert len(got) == rec.crops_per_image == {"five": 5, "double": 20, "super": 50}[recipe]
    for (img, lab), ri, rl in zip(got, ref_img, ref_lab, strict=True):
        np.testing.assert_array_equal(np.asarray(img), ri)
        np.testing.assert_array_equal(lab, rl[..., 0])


def test_centre_crop_rounds_half_to_even() -> None:
    # H=9, crop 4 -> (9-4)/2 = 2.5 -> 2 (even); W=11, crop 5 -> 3.0 -> 3; W=13, crop 6 -> 3.5 -> 4
    boxes = crops_mod.crop_boxes(9, 11, 0.5)
    assert boxes[4][:2] == (2, 3)
    assert crops_mod.crop_boxes(13, 13, 0.5)[4][:2] == (4, 4)
    assert boxes[:4] == [(0, 0, 4, 5), (0, 6, 4, 5), (5, 0, 4, 5), (5, 6, 4, 5)]


def test_folder_names_and_recipe_errors() -> None:
    assert cache_folder_name("cocostuff", get_recipe("five")) == "cocostuff_five_crop_0.5"
    assert cache_folder_name("coco81", get_recipe("double")) == "coco81_double_crop_0"
    assert cache_folder_name("pascalvoc", get_recipe("super")) == "pascalvoc_super_crop_0"
    with pytest.raises(ValueError, match="unknown crop recipe"):
        get_recipe("ten")
    with pytest.raises(ValueError, match="empty"):
        list(make_crops(Image.new("RGB", (3, 1)), np.zeros((1, 3), np.uint8), get_recipe("five")))


def test_label_plus_one_round_trip() -> None:
    label = np.array([[0, 5, 26], [255, 1, 255]], dtype=np.uint8)
    stored = encode_crop_label(label)
    np.testing.assert_array_equal(stored, [[1, 6, 27], [0, 2, 0]])
    np.testing.assert_array_equal(decode_crop_label(stored, 27), label)
    # values above C never come from the tool and decode to ignore
    assert decode_crop_label(np.array([28, 200], np.uint8), 27).tolist() == [255, 255]
    assert crop_label_lut(171)[171] == 170 and crop_label_lut(171)[172] == 255
    with pytest.raises(ValueError, match="0..253"):
        encode_crop_label(np.array([254]))


# --------------------------------------------------------------------------------- crop cache
def _coco_module(root: Path, **kw) -> CocoStuff27DataModule:
    kw.setdefault("strict_counts", False)
    return CocoStuff27DataModule(root, train_res=16, test_res=16, batch_size=4, **kw)


def _pil_roundtrip_jpeg(arr: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def test_crop_cache_numbering_and_encoding(tmp_path: Path) -> None:
    tree = make_coco_tree(tmp_path)
    dm = _coco_module(tmp_path)
    spec = dm.crop_cache_spec()
    source = dm.source_list("train")
    report = build_crop_cache(spec, source.samples, dm.label_spec.lut, progress=False)
    assert report["written"] == 15 and spec.num_crops == 15
    cache = tmp_path / "cocostuff" / "cropped" / "cocostuff_five_crop_0.5"
    assert spec.path == cache
    lut27 = np.full(256, 255)
    for coarse, fines in COCO27_TABLE.items():
        lut27[fines] = coarse
    for index, image_id in enumerate(tree["ids"]["train2017"]):
        image = np.asarray(Image.open(tmp_path / "cocostuff/images/train2017" / f"{image_id}.jpg"))
        mapped = lut27[tree["labels"][image_id]]
        ref_img = _reference_crops(image, "five")
        ref_lab = _reference_crops(mapped[..., None], "five")
        for pos in range(5):
            i = index * 5 + pos
            stored = np.asarray(Image.open(cache / "label/train" / f"{i}.png"))
            expected = np.where(ref_lab[pos][..., 0] == 255, 0, ref_lab[pos][..., 0] + 1)
            np.testing.assert_array_equal(stored, expected)
            got = np.asarray(Image.open(cache / "img/train" / f"{i}.jpg"))
            np.testing.assert_array_equal(
                got, _pil_roundtrip_jpeg(np.ascontiguousarray(ref_img[pos]))
            )
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["num_crops"] == 15 and manifest["list_lines"] == 3
    assert manifest["source_list"] == "curated/train2017/Coco164kFull_Stuff_Coarse.txt"
    list_bytes = (
        tmp_path / "cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse.txt"
    ).read_bytes()
    assert manifest["list_sha256"] == hashlib.sha256(list_bytes).hexdigest()
    assert manifest["recipe"] == "five" and manifest["tool_version"]


def test_crop_cache_resumes_after_interrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_coco_tree(tmp_path)
    dm = _coco_module(tmp_path)
    spec = dm.crop_cache_spec()
    samples = dm.source_list("train").samples
    original = crops_writer._write_atomic
    calls = {"n": 0}

    def flaky(img: Image.Image, path: Path, fmt: str) -> None:
        if calls["n"] == 7:  # 3 complete crops (jpg + png each) and one lone jpg
            raise KeyboardInterrupt
        calls["n"] += 1
        original(img, path, fmt)

    monkeypatch.setattr(crops_writer, "_write_atomic", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_crop_cache(spec, samples, dm.label_spec.lut, progress=False)
    assert not (spec.path / "manifest.json").exists()
    status = inspect_crop_cache(spec)
    assert status.state == "incomplete" and status.found == 3 and status.missing_example == 3
    with pytest.raises(DatasetCountError, match="found 3, expected 15"):
        dm.verify(["train"])
    # a truncated file left by a foreign tool is re-written, intact crops are kept untouched
    kept = {i: os.stat(spec.path / "img/train" / f"{i}.jpg").st_ino for i in (0, 1)}
    (spec.path / "img/train/2.jpg").write_bytes(b"\xff\xd8\xff")
    monkeypatch.setattr(crops_writer, "_write_atomic", original)
    report = build_crop_cache(spec, samples, dm.label_spec.lut, progress=False)
    assert report["state_before"] == "incomplete"
    assert report["kept"] == 2 and report["written"] == 13
    assert all(
        os.stat(spec.path / "img/train" / f"{i}.jpg").st_ino == ino for i, ino in kept.items()
    )
    assert inspect_crop_cache(spec).state == "complete"
    again = build_crop_cache(spec, samples, dm.label_spec.lut, progress=False)
    assert again["state_before"] == "complete" and again["written"] == 0
    dm.verify(["train"])


@pytest.mark.slow
def test_crop_cache_with_worker_processes(tmp_path: Path) -> None:
    make_coco_tree(tmp_path, n_train=3)
    serial = _coco_module(tmp_path, crops="double")
    spec = serial.crop_cache_spec()
    samples = serial.source_list("train").samples
    report = build_crop_cache(spec, samples, serial.label_spec.lut, num_workers=2, progress=False)
    assert report["written"] == 60 and inspect_crop_cache(spec).state == "complete"
    # same bytes as the in-process writer
    other = tmp_path / "serial"
    serial_spec = CropCacheSpec(**{**spec.__dict__, "path": other})
    build_crop_cache(serial_spec, samples, serial.label_spec.lut, progress=False)
    for i in (0, 17, 59):
        for sub in (f"img/train/{i}.jpg", f"label/train/{i}.png"):
            assert (spec.path / sub).read_bytes() == (other / sub).read_bytes()


def test_crop_cache_refuses_other_manifest(tmp_path: Path) -> None:
    make_coco_tree(tmp_path, n_train=3)
    dm = _coco_module(tmp_path)
    build_crop_cache(
        dm.crop_cache_spec(), dm.source_list("train").samples, dm.label_spec.lut, progress=False
    )
    # a different train list -> different hash / count -> refused by the loader and the writer
    short = tmp_path / "cocostuff/curated/train2017/Coco164kFull_Stuff_Coarse_7.txt"
    short.write_text("\n".join(short.read_text().split()[:2]) + "\n")
    other = _coco_module(tmp_path, train_list="Coco164kFull_Stuff_Coarse_7.txt")
    with pytest.raises(CropCacheMismatchError) as err:
        other.verify(["train"])
    message = str(err.value)
    assert "list_lines" in message and "list_sha256" in message and "stage=prepare" in message
    with pytest.raises(CropCacheMismatchError):
        build_crop_cache(
            other.crop_cache_spec(), other.source_list("train").samples, other.label_spec.lut
        )
    # another recipe writes to its own folder, so it never collides
    assert _coco_module(tmp_path, crops="double").crop_cache_dir.name == "cocostuff_double_crop_0"


def test_cache_without_manifest_is_accepted_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_coco_tree(tmp_path)
    dm = _coco_module(tmp_path)
    spec = dm.crop_cache_spec()
    build_crop_cache(spec, dm.source_list("train").samples, dm.label_spec.lut, progress=False)
    (spec.path / "manifest.json").unlink()  # e.g. a cache made by the reference tool
    fresh = _coco_module(tmp_path)
    with caplog.at_level("WARNING"):
        fresh.verify(["train"])
    assert "no manifest" in caplog.text
    assert inspect_crop_cache(spec).state == "unverified"


# --------------------------------------------------------------------------------- data modules
def _protocol_geometry(arr: np.ndarray, res: int, squash: bool) -> np.ndarray:
    """protocol.md §2.2 with PIL: shorter side -> res (nearest), centre crop; or squash."""
    img = Image.fromarray(arr)
    w, h = img.size
    if squash:
        return np.asarray(img.resize((res, res), Image.NEAREST))
    nw, nh = (res, res * h // w) if w <= h else (res * w // h, res)
    img = img.resize((nw, nh), Image.NEAREST)
    top, left = round((nh - res) / 2), round((nw - res) / 2)
    return np.asarray(img)[top : top + res, left : left + res]


def test_cocostuff27_module_end_to_end(tmp_path: Path) -> None:
    tree = make_coco_tree(tmp_path)
    report = prepare_dataset(
        "cocostuff27", tmp_path, download=False, strict_counts=False, progress=False
    )
    assert report["status"] == "ready" and report["crops"]["written"] == 15
    assert report["train_list"] == "curated/train2017/Coco164kFull_Stuff_Coarse.txt"
    dm = _coco_module(tmp_path)
    dm.setup("fit")
    assert len(dm.train_dataset) == 15 and len(dm.val_dataset) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.uint8
    assert set(batch["label"].unique().tolist()) <= set(range(27)) | {255}
    lut27 = np.full(256, 255)
    for coarse, fines in COCO27_TABLE.items():
        lut27[fines] = coarse
    for k, image_id in enumerate(tree["ids"]["val2017"]):
        expected = _protocol_geometry(
            lut27[tree["labels"][image_id]].astype(np.uint8), 16, squash=False
        )
        np.testing.assert_array_equal(dm.val_dataset[k]["label"].numpy(), expected)
    info = dm.describe()
    assert info["train_list"] == "curated/train2017/Coco164kFull_Stuff_Coarse.txt"
    assert info["val_list"] == "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"
    assert info["crop_recipe"] == "five" and info["train_images"] == 3
    pickle.loads(pickle.dumps(dm.train_dataset))  # workers / ddp_spawn


@pytest.mark.parametrize(
    ("cls", "classes", "folder"),
    [(Coco81DataModule, 81, "coco81"), (Coco171DataModule, 171, "coco171")],
)
def test_coco81_171_modules(tmp_path: Path, cls: type, classes: int, folder: str) -> None:
    tree = make_coco_tree(tmp_path, n_train=1)
    name = cls.name
    prepare_dataset(name, tmp_path, download=False, strict_counts=False, progress=False)
    dm = cls(tmp_path, train_res=8, test_res=8, batch_size=2, strict_counts=False)
    dm.setup("fit")
    assert dm.num_classes == classes and len(dm.train_dataset) == 20
    assert dm.crop_cache_dir.name == f"{folder}_double_crop_0"
    assert dm.describe()["val_list"] == "curated/val2017/Coco164kFull_Stuff_Coarse.txt"
    lut = get_label_spec(name).lut
    image_id = tree["ids"]["val2017"][0]
    expected = _protocol_geometry(lut[tree["labels"][image_id]], 8, squash=False)
    np.testing.assert_array_equal(dm.val_dataset[0]["label"].numpy(), expected)


def test_cityscapes_module(tmp_path: Path) -> None:
    labels = make_cityscapes_tree(tmp_path)
    report = prepare_dataset(
        "cityscapes27", tmp_path, download=False, strict_counts=False, progress=False
    )
    assert report["crops"]["crops"] == 15
    dm = Cityscapes27DataModule(
        tmp_path, train_res=8, test_res=8, batch_size=2, strict_counts=False
    )
    dm.setup("fit")
    train = dm.source_list("train")
    # cities sorted, then frames sorted
    assert list(train.entries) == sorted(train.entries) and train.entries[0].startswith("aachen/")
    val_key = "val/" + dm.source_list("val").entries[0]
    expected = _protocol_geometry(
        np.where((labels[val_key] >= 7) & (labels[val_key] <= 33), labels[val_key] - 7, 255).astype(
            np.uint8
        ),
        8,
        squash=False,
    )
    np.testing.assert_array_equal(dm.val_dataset[0]["label"].numpy(), expected)
    assert len(dm.train_dataset) == 15


def test_pascalvoc_module(tmp_path: Path) -> None:
    tree = make_voc_tree(tmp_path)
    prepare_dataset("pascalvoc21", tmp_path, download=False, strict_counts=False, progress=False)
    dm = PascalVOC21DataModule(
        tmp_path, train_res=12, test_res=12, batch_size=2, strict_counts=False
    )
    dm.setup("fit")
    assert len(dm.train_dataset) == 100  # super: 50 per image
    image_id = tree["ids"]["val"][0]
    expected = _protocol_geometry(tree["labels"][image_id], 12, squash=True)
    got = dm.val_dataset[0]["label"].numpy()
    np.testing.assert_array_equal(got, expected)
    assert (got == 255).any()  # boundaries survive as ignore
    item = dm.train_dataset[0]
    assert item["image"].shape == (3, 12, 12)


# --------------------------------------------------------------------------------- errors
def test_count_errors_name_found_expected_and_fix(tmp_path: Path) -> None:
    make_coco_tree(tmp_path, n_val=2)
    with pytest.raises(DatasetCountError) as err:
        CocoStuff27DataModule(tmp_path).verify(["val"])
    message = str(err.value)
    assert "found 2, expected 2,175" in message
    assert "python -m cause_lightning stage=prepare data=cocostuff27" in message
    assert err.value.found == 2 and err.value.expected == 2175
    with pytest.raises(DatasetCountError, match="found 2, expected 4,172"):
        Coco81DataModule(tmp_path).verify(["val"])
    with pytest.raises(DatasetCountError, match="found 2, expected 5"):
        CocoStuff27DataModule(tmp_path, expected_counts={"val": 5}).verify(["val"])
    with pytest.raises(DatasetCountError, match="found 3, expected 97,702"):
        CocoStuff27DataModule(tmp_path).verify(["train"])

    make_cityscapes_tree(tmp_path)
    with pytest.raises(DatasetCountError, match="found 3, expected 2,975"):
        Cityscapes27DataModule(tmp_path).verify(["train"])
    with pytest.raises(DatasetCountError, match="found 2, expected 500"):
        Cityscapes27DataModule(tmp_path).verify(["val"])
    make_voc_tree(tmp_path)
    with pytest.raises(DatasetCountError, match="found 2, expected 1,464"):
        PascalVOC21DataModule(tmp_path).verify(["train"])
    with pytest.raises(DatasetCountError, match="found 2, expected 1,449"):
        PascalVOC21DataModule(tmp_path).verify(["val"])


def test_missing_files_and_missing_cache(tmp_path: Path) -> None:
    tree = make_coco_tree(tmp_path)
    victim = tree["ids"]["val2017"][1]
    (tmp_path / "cocostuff/annotations/val2017" / f"{victim}.png").unlink()
    with pytest.raises(DatasetCountError) as err:
        _coco_module(tmp_path).verify(["val"])
    assert "found 1, expected 2" in str(err.value) and f"{victim}.png" in str(err.value)
    with pytest.raises(DatasetNotFoundError, match="no training crop cache"):
        _coco_module(tmp_path).verify(["train"])
    with pytest.raises(DatasetNotFoundError) as err:
        _coco_module(tmp_path / "nowhere").verify()
    assert "does not exist" in str(err.value) and "Expected layout" in str(err.value)


def test_wrong_layout_is_recognised(tmp_path: Path) -> None:
    make_cityscapes_tree(tmp_path)
    cityscapes_dir = tmp_path / "cityscapes"
    assert detect_layout(cityscapes_dir)[0] == "cityscapes"
    with pytest.raises(DatasetNotFoundError) as err:
        _coco_module(cityscapes_dir).verify(["val"])
    message = str(err.value)
    assert (
        "Cityscapes tree" in message
        and "data=cityscapes27" in message
        and "leftImg8bit/" in message
    )
    # a Cityscapes tree unpacked into the cocostuff folder
    os.rename(cityscapes_dir, tmp_path / "cocostuff")
    with pytest.raises(DatasetNotFoundError, match="holds a Cityscapes tree"):
        _coco_module(tmp_path).verify(["val"])
    make_voc_tree(tmp_path / "other")
    with pytest.raises(DatasetNotFoundError, match="Pascal VOC tree"):
        Cityscapes27DataModule(tmp_path / "other" / "pascalvoc").verify(["val"])
    # sibling datasets are named when the wanted one is absent
    with pytest.raises(DatasetNotFoundError, match=r"no cityscapes/ folder .*pascalvoc/"):
        Cityscapes27DataModule(tmp_path / "other").verify(["val"])


def test_dataset_dir_itself_and_packaged_list_fallback(tmp_path: Path) -> None:
    tree = make_coco_tree(tmp_path)
    for path in (tmp_path / "cocostuff/curated/val2017").iterdir():
        path.unlink()
    dm = CocoStuff27DataModule(tmp_path / "cocostuff", strict_counts=False)
    assert dm.dataset_root == tmp_path / "cocostuff"
    source = dm.source_list("val")
    assert source.origin == "package" and len(source.entries) == 2175
    present = len(set(tree["ids"]["val2017"]) & set(source.entries))
    with pytest.raises(DatasetCountError, match=f"found {present}, expected 2,175"):
        CocoStuff27DataModule(tmp_path).verify(["val"])  # most listed images are absent


# --------------------------------------------------------------------------------- preparation
def test_prepare_offline_prints_manual_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cause_lightning.data.prepare as prep

    def no_network(*args, **kwargs):
        raise AssertionError("the network must not be used")

    monkeypatch.setattr(prep, "download_file", no_network)
    with pytest.raises(DatasetNotFoundError) as err:
        prepare_dataset("cityscapes27", tmp_path, download=None, progress=False)
    message = str(err.value)
    assert "leftImg8bit_trainvaltest.zip" in message and "gtFine_trainvaltest.zip" in message
    assert (
        "cityscapes-dataset.com" in message
        and str(tmp_path / "cityscapes" / "downloads") in message
    )
    with pytest.raises(DatasetNotFoundError) as err:
        prepare_dataset("cocostuff27", tmp_path, download=False, progress=False)
    message = str(err.value)
    assert "http://images.cocodataset.org/zips/train2017.zip" in message
    assert "stuffthingmaps_trainval2017.zip" in message
    assert (tmp_path / "cocostuff/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").is_file()
    monkeypatch.setattr(prep, "probe", lambda url, timeout: False)
    with pytest.raises(DatasetNotFoundError, match="VOCtrainval_11-May-2012.tar"):
        prepare_dataset("pascalvoc21", tmp_path, download=None, progress=False)
    with pytest.raises(ValueError, match="train_list applies"):
        prepare_dataset("pascalvoc21", tmp_path, train_list="x.txt")

    def broken(*args, **kwargs):
        raise OSError("connection reset")

    monkeypatch.setattr(prep, "probe", lambda url, timeout: True)
    monkeypatch.setattr(prep, "download_file", broken)
    with pytest.raises(DatasetNotFoundError, match="download failed .connection reset., run again"):
        prepare_dataset("pascalvoc21", tmp_path, download=None, progress=False)


def _zip_dir(src: Path, zip_path: Path, extra: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(zip_path, "w") as zf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(src).as_posix())
        for name, data in (extra or {}).items():
            zf.writestr(name, data)


def test_prepare_unpacks_local_archives(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    make_cityscapes_tree(staging)
    src = staging / "cityscapes"
    data = tmp_path / "data"
    downloads = data / "cityscapes" / "downloads"
    downloads.mkdir(parents=True)
    for top, archive in (
        ("leftImg8bit", "leftImg8bit_trainvaltest.zip"),
        ("gtFine", "gtFine_trainvaltest.zip"),
    ):
        tmp_tree = tmp_path / f"zip_{top}"
        (tmp_tree / top).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src / top, tmp_tree / top)
        _zip_dir(
            tmp_tree,
            downloads / archive,
            {f"{top}/test/berlin/skip_me.png": b"x", "license.txt": b"l"},
        )
    report = prepare_dataset(
        "cityscapes27", data, download=False, strict_counts=False, progress=False
    )
    assert report["status"] == "ready" and len(report["extracted"]) == 2
    assert not (data / "cityscapes/leftImg8bit/test").exists()  # test split skipped
    assert report["train_images"] == 3 and report["val_images"] == 2
    again = prepare_dataset(
        "cityscapes27", data, download=False, strict_counts=False, progress=False
    )
    assert again["extracted"] == [] and again["crops"]["written"] == 0

    voc_stage = tmp_path / "voc_stage"
    make_voc_tree(voc_stage)
    tar_dir = data / "pascalvoc" / "downloads"
    tar_dir.mkdir(parents=True)
    with tarfile.open(tar_dir / "VOCtrainval_11-May-2012.tar", "w") as tf:
        tf.add(voc_stage / "pascalvoc" / "VOCdevkit", arcname="VOCdevkit")
    voc = prepare_dataset("pascalvoc21", data, download=False, strict_counts=False, progress=False)
    assert voc["crops"]["crops"] == 100 and voc["val_images"] == 2


def test_extract_archive_rejects_unsafe_names(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.txt", b"x")
        zf.writestr("ok/file.txt", b"hello")
    counts = extract_archive(archive, tmp_path / "out", progress=False)
    assert counts == {"extracted": 1, "kept": 0, "skipped": 1}
    assert (
        not (tmp_path / "evil.txt").exists()
        and (tmp_path / "out/ok/file.txt").read_bytes() == b"hello"
    )
    assert extract_archive(archive, tmp_path / "out", progress=False)["kept"] == 1


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = bytes(range(256)) * 40

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
            self.send_response(206)
        else:
            self.send_response(200)
        body = self.payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _serve(payload: bytes) -> http.server.HTTPServer:
    handler = type("Handler", (_RangeHandler,), {"payload": payload})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_prepare_downloads_when_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cause_lightning.data.prepare as prep

    make_voc_tree(tmp_path / "stage")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(tmp_path / "stage" / "pascalvoc" / "VOCdevkit", arcname="VOCdevkit")
    server = _serve(buf.getvalue())
    try:
        url = f"http://127.0.0.1:{server.server_port}/VOCtrainval_11-May-2012.tar"
        archive = prep.ARCHIVES["pascalvoc"]["devkit"]
        monkeypatch.setitem(
            prep.ARCHIVES["pascalvoc"], "devkit", prep.Archive(**{**archive.__dict__, "url": url})
        )
        data = tmp_path / "data"
        report = prepare_dataset(
            "pascalvoc21", data, strict_counts=False, progress=False, timeout=5
        )
    finally:
        server.shutdown()
        server.server_close()
    assert report["downloaded"] == [str(data / "pascalvoc/downloads/VOCtrainval_11-May-2012.tar")]
    assert report["status"] == "ready" and report["crops"]["crops"] == 100


def test_download_resumes_a_partial_file(tmp_path: Path) -> None:
    server = _serve(_RangeHandler.payload)
    try:
        url = f"http://127.0.0.1:{server.server_port}/archive.zip"
        dest = tmp_path / "archive.zip"
        (tmp_path / "archive.zip.part").write_bytes(_RangeHandler.payload[:1000])
        download_file(url, dest, timeout=5, progress=False)
        assert dest.read_bytes() == _RangeHandler.payload
        assert not (tmp_path / "archive.zip.part").exists()
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name", REAL_DATA)
def test_data_yaml(name: str) -> None:
    cfg = yaml.safe_load((REPO / "conf" / "data" / f"{name}.yaml").read_text())
    from hydra.utils import get_class

    cls = get_class(cfg["module"]["_target_"])
    assert cfg["name"] == name == cls.name and cfg["num_classes"] == cls.num_classes
    assert cfg["module"]["root"] == "${paths.data_dir}"
    recipe = cfg["recipe"]
    assert recipe["resolution"] == {"test": 320}  # each head brings its training resolution
    # protocol.md §3; the data module's class holds it (data.module.crops overrides it)
    protocol_crops = {"cocostuff27": "five", "cityscapes27": "five", "pascalvoc21": "super"}
    assert "crops" not in recipe and cls.default_crops == protocol_crops.get(name, "double")
    assert recipe["weight_decay"] == pytest.approx(0.0 if name == "cityscapes27" else 1e-4)
    # method.md §8: the effective per-head values, the head's unless the dataset overrides them
    from cause_lightning.config import compose
    from cause_lightning.config.derive import train_resolution

    for head, own in (("tr", 2.0), ("mlp", 0.1)):
        composed = compose(f"data={name}", f"head={head}")
        clip = 1.0 if name == "cityscapes27" else own
        probe_clip = clip if name in ("cityscapes27", "cocostuff27") else None
        assert (composed.method.head.clip, composed.method.probe.clip) == (clip, probe_clip)
        assert train_resolution(composed) == (None if head == "tr" else 224)
    if name.startswith("coco"):
        assert cfg["module"]["train_list"] == "Coco164kFull_Stuff_Coarse.txt"


def test_experiment_presets_cover_every_published_row() -> None:
    files = {p.stem: p for p in (REPO / "conf" / "experiment").glob("*.yaml")}
    assert set(PUBLISHED_ROWS) <= set(files)
    for stem, (miou, pacc) in PUBLISHED_ROWS.items():
        text = files[stem].read_text()
        assert text.startswith("# @package _global_")
        cfg = yaml.safe_load(text)
        data, head = stem.split("_")[0], stem.split("_")[-1]
        backbone = stem[len(data) + 1 : -len(head) - 1]
        assert cfg["defaults"] == [
            {"override /data": data},
            {"override /backbone": backbone},
            {"override /head": head},
        ]
        assert (REPO / "conf" / "backbone" / f"{backbone}.yaml").is_file()
        assert cfg["experiment_name"] == stem
        published = cfg["published"]
        assert published["mIoU"] == miou and published["pAcc"] == pacc
        assert published["variant"] == "flip_crf" and published["source"] == "CAUSE README"
        method = cfg["method"]
        assert method["num_concepts"] == 2048
        assert method["mediator"] == {"epochs": 1, "lr": 4e-3, "batch_size": 16}
        assert method["head"] == {"epochs": 2, "lr": 4e-3}
        epochs = 5 if head == "tr" else 1
        probe = {"epochs": epochs, "lr": 4e-3, "init": "reference", "restarts": 1}
        assert method["probe"] == probe
        assert method["reference_schedule"] and method["reference_world_size"] == 4
        assert "backbone" not in cfg  # the 12-head ViT-S stays a note, never the default
        if backbone in ("dino_vits8", "dino_vits16"):
            assert "12-head" in cfg["notes"]


def test_stage_prepare_goes_through_the_configured_data_module(compose, tmp_path: Path) -> None:
    from cause_lightning.run import run

    make_coco_tree(tmp_path / "coco")
    overrides = [
        "stage=prepare",
        "stage.download=false",
        "data=cocostuff27",
        "data.module.num_workers=0",
        "+data.module.strict_counts=false",
        f"data.module.root={tmp_path / 'coco'}",  # not paths.data_dir: the module's own root
        "+data.module.crops=double",
    ]
    report = run(compose(*overrides))["prepare"]
    assert report["dataset_dir"] == str(tmp_path / "coco" / "cocostuff")
    assert report["status"] == "ready" and report["crop_recipe"] == "double"
    assert report["crops"]["written"] == 3 * 20  # the double recipe: 20 crops per image
    with pytest.raises(ValueError, match="data=mosaic: .*MosaicDataModule needs no preparation"):
        run(compose("stage=prepare", "data=mosaic"))


def test_crop_recipe_is_no_longer_a_dead_recipe_key(compose) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("data=cocostuff27", "data.recipe.crops=double")
