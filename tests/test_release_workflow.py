"""The reference-release workflow end to end (docs/method.md §10, docs/api.md interop / Segmenter).

Fake release files with exactly the documented keys and shapes (method.md §10.1-10.3; D = 64 of
``tiny_vit``, Q = (64 / 8)^2 for a TR head at 64 px, C = 6 as ``data=mosaic``) go through
``stage=import`` -> ``stage=eval`` -> ``stage=predict`` in-process via ``run(cfg)``. The exported
segmenter is checked against a functional forward written here straight from the release tensors,
and the eval metrics against a confusion matrix + Hungarian matching computed here.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

from cause_lightning.artifacts.io import ArtifactError, MissingArtifactError, load_artifact
from cause_lightning.core.specs import ModelSpec, Resolution
from cause_lightning.data.datasets import open_image
from cause_lightning.models import build_backbone
from cause_lightning.run import run
from cause_lightning.segmenter import Segmenter
from cause_lightning.stages.predict import UnreadableImagesError
from release_files import write_release as write_release_files
from tiny import TINY, compose_config

D, Q, C, R, K, P = 64, 64, 6, 90, 2048, 2048
RES = 64
MOSAIC_NAMES = ["brick", "grass", "gravel", "wood", "fur", "tissue"]


def write_release(root: Path, kind: str = "tr", **kw: Any) -> dict[str, Any]:
    """The release files at this module's sizes (D, Q, C) unless overridden."""
    return write_release_files(root, kind, **{"d": D, "q": Q, "c": C, **kw})


def import_overrides(paths: dict[str, Path]) -> list[str]:
    return [
        "stage=import",
        f"import.segment={paths['segment']}",
        f"import.cluster={paths['cluster']}",
        f"import.clusterbook={paths['clusterbook']}",
    ]


# -------------------------------------------------------------------- functional reference forward


def _conv1x1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x @ w[:, :, 0, 0].T + b  # tokens [B, N, Din] -> [B, N, Dout]


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * w + b


def _attention(sd: dict, prefix: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Single-head attention with the packed in-projection (rows q | k | v)."""
    w, b = sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"]
    d = w.shape[1]
    qh, kh, vh = (
        q @ w[:d].T + b[:d],
        k @ w[d : 2 * d].T + b[d : 2 * d],
        v @ w[2 * d :].T + b[2 * d :],
    )
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)  # B N N
    return (att @ vh) @ sd[prefix + "out_proj.weight"].T + sd[prefix + "out_proj.bias"]


def reference_tr_head(segment: dict, book: np.ndarray, feats: torch.Tensor) -> torch.Tensor:
    """Teacher TR head of method.md §5.2 in eval mode, float64: ``[B, D, h, w] -> [B, R, h, w]``."""
    sd = {k[9:]: v.double() for k, v in segment.items() if k.startswith("head_ema.")}
    rows = torch.from_numpy(book).double()  # K D
    b, _, h, w = feats.shape
    mem = feats.double().flatten(2).transpose(1, 2)  # B N D
    cos = F.normalize(mem, dim=-1) @ F.normalize(rows, dim=-1).T  # B N K
    top2 = cos.topk(2, dim=-1).values
    # The module runs in float32: the nearest concept must not be a near tie.
    assert float((top2[..., 0] - top2[..., 1]).min()) > 1e-4
    t0 = rows[cos.argmax(-1)]  # raw concept rows as queries
    pos = sd["query_pos"][None]
    t1 = _layer_norm(
        t0 + _attention(sd, "tr.self_attn.", t0 + pos, t0 + pos, t0),
        sd["tr.norm1.weight"],
        sd["tr.norm1.bias"],
    )
    t2 = _layer_norm(
        t1 + _attention(sd, "tr.multihead_attn.", t1 + pos, mem, mem),
        sd["tr.norm2.weight"],
        sd["tr.norm2.bias"],
    )
    ffn = torch.relu(t2 @ sd["tr.linear1.weight"].T + sd["tr.linear1.bias"])
    t3 = t2 + ffn @ sd["tr.linear2.weight"].T + sd["tr.linear2.bias"]
    g = mem + _layer_norm(t3, sd["tr.norm3.weight"], sd["tr.norm3.bias"])
    hidden = torch.relu(_conv1x1(g, sd["tr.f2.0.weight"], sd["tr.f2.0.bias"]))
    out = _conv1x1(g, sd["tr.f1.weight"], sd["tr.f1.bias"]) + _conv1x1(
        hidden, sd["tr.f2.2.weight"], sd["tr.f2.2.bias"]
    )  # B N R
    return out.transpose(1, 2).reshape(b, -1, h, w)


def reference_logits(release: dict, images: torch.Tensor) -> torch.Tensor:
    """Cosine logits ``[B, C, H, W]`` of method.md §7 (no flip) from the release tensors."""
    feats = build_backbone("tiny_vit")(images)  # B D h w
    head = reference_tr_head(release["segment"], release["book"], feats)  # B R h w
    up = F.interpolate(head, size=images.shape[-2:], mode="bilinear", align_corners=False)
    cents = F.normalize(release["cluster"]["cluster_probe"].double(), dim=1)  # C R
    return torch.einsum("brhw,cr->bchw", F.normalize(up, dim=1), cents)


def hungarian_scores(confusion: np.ndarray) -> tuple[float, float, np.ndarray]:
    """mIoU, pAcc and per-class IoU of protocol.md §5 from ``confusion[class, cluster]``."""
    rows, cols = linear_sum_assignment(confusion, maximize=True)
    tp = np.zeros(len(confusion))
    fp = np.zeros(len(confusion))
    tp[rows] = confusion[rows, cols]
    fp[rows] = confusion[:, cols].sum(0) - tp[rows]
    fn = confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
    return float(np.nanmean(iou)), float(tp.sum() / confusion.sum()), iou


# ------------------------------------------------------------------------------------- fixtures


def _compose(base: Path, data_root: Path, *overrides: str) -> Any:
    """The tiny-run config with every path under ``base`` and the shared mosaic at ``data_root``."""
    return compose_config(base, *TINY, f"data.module.root={data_root}", *overrides)


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[dict]:
    """Import a fake TR release and evaluate it once for the whole module."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from cause_lightning.__main__ import config_dir

    base = tmp_path_factory.mktemp("release_workflow")
    data_root = shared_data_dir / "mosaic"
    release = write_release(base / "release", "tr")
    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=config_dir(), version_base="1.3")
    try:
        imported = run(_compose(base, data_root, *import_overrides(release["paths"]), "head=tr"))
        eval_cfg = _compose(
            base,
            data_root,
            "stage=eval",
            "head=tr",
            "artifact_tag=release",  # the import's label (its default)
            "method.eval.variants=[raw,flip]",
            "method.eval.baselines=false",
        )
        evaluated = run(eval_cfg)
        datamodule = instantiate(eval_cfg.data.module, train_res=RES, test_res=RES, batch_size=4)
    finally:
        GlobalHydra.instance().clear()
    yield {
        "base": base,
        "data_root": data_root,
        "segmenter": Path(evaluated["artifacts/segmenter"]),
        "release": release,
        "imported": imported,
        "evaluated": evaluated,
        "datamodule": datamodule,
    }


@pytest.fixture
def predict_run(compose: Callable[..., Any], workflow: dict) -> Callable[..., dict]:
    """``stage=predict`` against the imported artifacts (or a throw-away root via ``paths=``)."""

    def _run(*overrides: str, paths: Path | None = None) -> dict:
        cfg = compose(
            *TINY,
            f"data.module.root={workflow['data_root']}",
            "stage=predict",
            "head=tr",
            "artifact_tag=release",
            *overrides,
            paths=paths or workflow["base"],
        )
        return run(cfg)

    return _run


def write_odd_images(folder: Path) -> dict[str, tuple[int, int]]:
    """An RGB 37x53, a grayscale 100x64 and a translucent RGBA 50x70 PNG; returns (H, W) by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(folder / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (100, 64), dtype=np.uint8), "L").save(folder / "gray.png")
    rgba = rng.integers(0, 256, (50, 70, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    return {"rgb": (37, 53), "gray": (100, 64), "rgba": (50, 70)}


def _outputs(output: Path, kind: str) -> dict[str, Path]:
    """``<output>/<kind>/<index>_<stem>.png`` keyed by the input stem."""
    found = {}
    for path in sorted((output / kind).glob("*.png")):
        match = re.fullmatch(r"\d{5}_(.+)", path.stem)
        assert match, path
        found[match.group(1)] = path
    return found


# ------------------------------------------------------------------------------------------ import


def test_import_writes_the_release_as_stage_artifacts(workflow: dict) -> None:
    release, imported = workflow["release"], workflow["imported"]
    paths = {kind: Path(imported[f"artifacts/{kind}"]) for kind in ("clusterbook", "head", "probe")}
    # Labelled directories, one inside the other, as trained artifacts are.
    assert paths["clusterbook"].parent.name.startswith("clusterbook-release-")
    assert paths["head"].parent.parent == paths["clusterbook"].parent
    assert paths["probe"].parent.parent == paths["head"].parent
    book = load_artifact(paths["clusterbook"], "clusterbook", "mediator")
    torch.testing.assert_close(book["clusterbook"], torch.from_numpy(release["book"]))
    head = load_artifact(paths["head"], "head", "head")
    teacher = {k[9:]: v for k, v in release["segment"].items() if k.startswith("head_ema.")}
    assert set(head["head_state"]) == {*teacher, "clusterbook"}
    for key, value in teacher.items():
        assert torch.equal(head["head_state"][key], value), key
    assert torch.equal(head["head_state"]["clusterbook"], torch.from_numpy(release["book"]))
    assert torch.equal(head["linear_state"]["f.weight"], release["segment"]["linear.f.weight"])
    probe = load_artifact(paths["probe"], "probe", "probe")
    assert torch.equal(probe["centroids"], release["cluster"]["cluster_probe"])
    meta = head["meta"]
    spec = ModelSpec.from_meta(meta)
    # The release's K = 2048 rows, whatever method.num_concepts says (32 in these runs).
    assert (spec.num_concepts, spec.head.kwargs["num_queries"], spec.num_classes) == (K, Q, C)
    assert (spec.head.kwargs["dim"], spec.backbone.name, spec.head.name) == (
        D,
        "tiny_vit",
        "TRHead",
    )
    assert spec.resolution == Resolution(train=RES, test=RES)
    assert meta["class_names"] == MOSAIC_NAMES
    assert meta["reference_release"] is True and meta["reference_leak"] is True


def test_eval_of_the_imported_release(workflow: dict) -> None:
    import json

    results = workflow["evaluated"]
    report = json.loads(Path(results["artifacts/metrics"]).read_text())
    assert report["record_variant"] == "flip"
    # The released heads carry the stage-3 label leak (method.md §6.3): labelled, not unsupervised.
    assert report["reference_leak"] is True and report["unsupervised"] is False
    assert report["class_names"] == MOSAIC_NAMES
    ious = report["details"]["details/cluster/flip/per_class_iou"]
    assert len(ious) == C
    assert (
        workflow["segmenter"].parent.parent == Path(workflow["imported"]["artifacts/probe"]).parent
    )

    # The exported segmenter (flip on, as the recorded variant) reproduces the eval metrics.
    segmenter = Segmenter.load(workflow["segmenter"])
    assert segmenter.flip and not segmenter.crf
    data = workflow["datamodule"]
    data.prepare_data()
    data.setup("test")
    confusion = np.zeros((C, C), dtype=np.int64)
    for batch in data.test_dataloader():
        pred = segmenter(batch["image"]).numpy().ravel()
        label = batch["label"].numpy().ravel()
        keep = label != 255
        confusion += np.bincount(label[keep] * C + pred[keep], minlength=C * C).reshape(C, C)
    miou, pacc, per_class = hungarian_scores(confusion)
    assert results["test/cluster/flip/mIoU"] == pytest.approx(miou, abs=1e-6)
    assert results["test/cluster/flip/pAcc"] == pytest.approx(pacc, abs=1e-6)
    np.testing.assert_allclose(np.asarray(ious, dtype=float), per_class, atol=1e-6)
    assert report["metrics"]["test/cluster/flip/mIoU"] == pytest.approx(miou, abs=1e-6)


def test_exported_segmenter_runs_the_release_head(workflow: dict) -> None:
    segmenter = Segmenter.load(workflow["segmenter"])
    segmenter.flip = False
    images = torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(7))
    expected = reference_logits(workflow["release"], images)
    torch.testing.assert_close(segmenter.logits(images).double(), expected, rtol=0, atol=1e-4)
    top2 = expected.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # pixels whose argmax float32 cannot flip
    assert clear.float().mean() > 0.95
    assert torch.equal(segmenter(images)[clear], expected.argmax(1)[clear])


def test_segmenter_round_trip(workflow: dict, tmp_path: Path) -> None:
    first = Segmenter.load(workflow["segmenter"])
    copy = Segmenter.load(first.save(tmp_path / "copy" / "segmenter.pt"))
    assert (copy.class_names, copy.assignment, copy.resolution) == (
        first.class_names,
        first.assignment,
        first.resolution,
    )
    assert sorted(copy.assignment) == list(range(C))  # a full cluster -> class matching
    assert torch.equal(copy.clusterbook, first.clusterbook)
    assert copy.clusterbook.shape == (K, D)
    images = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    assert torch.equal(copy(images), first(images))
    picture = np.random.default_rng(0).integers(0, 256, (45, 77, 3), dtype=np.uint8)
    for kwargs in ({}, {"to_classes": True}, {"sliding_window": True}):
        a = first.predict_image(picture, **kwargs)
        assert a.shape == (45, 77)
        np.testing.assert_array_equal(copy.predict_image(picture, **kwargs), a)


# ------------------------------------------------------------------------------------------ predict


def test_predict_folder_of_odd_images(workflow: dict, predict_run, tmp_path: Path) -> None:
    sizes = write_odd_images(tmp_path / "images")
    output = tmp_path / "predictions"
    results = predict_run(f"predict.input={tmp_path / 'images'}", f"predict.output_dir={output}")
    assert results["predict/count"] == 3
    segmenter = Segmenter.load(workflow["segmenter"])
    labels, colours, overlays = (_outputs(output, k) for k in ("labels", "colour", "overlay"))
    assert set(labels) == set(colours) == set(overlays) == set(sizes)
    for stem, (height, width) in sizes.items():
        label = np.asarray(Image.open(labels[stem]))
        assert label.shape == (height, width), stem
        # Class ids (the eval stage stored the assignment), the same as the Python API gives.
        expected = segmenter.predict_image(
            open_image(tmp_path / "images" / f"{stem}.png"), to_classes=True
        )
        np.testing.assert_array_equal(label, expected)
        colour = np.asarray(Image.open(colours[stem]).convert("RGB"))
        np.testing.assert_array_equal(colour, segmenter.palette[label])
        assert np.asarray(Image.open(overlays[stem])).shape[:2] == (height, width)
    assert Image.open(output / "contact_sheet.png").size[0] > 0
    page = (output / "index.html").read_text()
    for stem in sizes:
        for kind in ("overlay", "colour"):
            reference = f"{kind}/{Path(labels[stem]).name}"
            assert reference in page and (output / reference).is_file()


def test_predict_with_explicit_segmenter_glob_and_single_image(
    workflow: dict, predict_run, tmp_path: Path
) -> None:
    # Another root without artifacts: only predict.segmenter can provide the model.
    model = tmp_path / "model" / "segmenter.pt"
    model.parent.mkdir()
    shutil.copy(workflow["segmenter"], model)
    write_odd_images(tmp_path / "images")
    Image.new("RGB", (20, 30), (9, 9, 9)).save(tmp_path / "images" / "skip.jpg")
    empty = tmp_path / "elsewhere"
    results = predict_run(
        f"predict.segmenter={model}",
        f"predict.input={tmp_path / 'images'}/*.png",
        f"predict.output_dir={tmp_path / 'glob'}",
        paths=empty,
    )
    assert results["predict/count"] == 3
    assert set(_outputs(tmp_path / "glob", "labels")) == {"rgb", "gray", "rgba"}
    results = predict_run(
        f"predict.segmenter={model}",
        f"predict.input={tmp_path / 'images' / 'gray.png'}",
        f"predict.output_dir={tmp_path / 'single'}",
        "predict.contact_sheet=false",
        paths=empty,
    )
    assert results["predict/count"] == 1 and "predict/contact_sheet" not in results
    (label,) = _outputs(tmp_path / "single", "labels").values()
    assert np.asarray(Image.open(label)).shape == (100, 64)
    assert not (tmp_path / "single" / "contact_sheet.png").exists()
    assert not (empty / "artifacts").exists()


def test_predict_sliding_window(workflow: dict, predict_run, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 256, (41, 150, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    output = tmp_path / "out"
    predict_run(
        f"predict.input={tmp_path / 'wide.png'}",
        "predict.sliding_window=true",
        f"predict.output_dir={output}",
    )
    (path,) = _outputs(output, "labels").values()
    label = np.asarray(Image.open(path))
    assert label.shape == (41, 150)
    segmenter = Segmenter.load(workflow["segmenter"])
    picture = open_image(tmp_path / "wide.png")
    np.testing.assert_array_equal(
        label, segmenter.predict_image(picture, sliding_window=True, to_classes=True)
    )
    # The windows differ from one squashed pass over the elongated image.
    assert not np.array_equal(label, segmenter.predict_image(picture, to_classes=True))


def test_mlp_release_predicts_right_after_import(
    compose: Callable[..., Any], shared_data_dir: Path, tmp_path: Path
) -> None:
    files = write_release(tmp_path / "release", "mlp", seed=4)
    common = [*TINY, f"data.module.root={shared_data_dir / 'mosaic'}", "head=mlp"]
    imported = run(compose(*common, *import_overrides(files["paths"])))
    common.append("artifact_tag=release")  # the import's label: the later stages use it
    head_path = imported["artifacts/head"]
    spec = ModelSpec.from_meta(load_artifact(head_path, "head", "head")["meta"])
    assert (spec.head.name, spec.head.kwargs.get("num_queries"), spec.num_concepts) == (
        "MLPHead",
        None,
        K,
    )
    sizes = write_odd_images(tmp_path / "images")
    output = tmp_path / "predictions"
    # No stage=eval: a segmenter assembled from the imported artifacts, without an assignment.
    results = run(
        compose(
            *common,
            "stage=predict",
            f"predict.input={tmp_path / 'images'}",
            f"predict.output_dir={output}",
        )
    )
    assert results["predict/count"] == 3
    segmenter = Segmenter.from_artifacts(Path(imported["artifacts/probe"]).parent)
    assert segmenter.assignment is None and segmenter.class_names == MOSAIC_NAMES
    for stem, path in _outputs(output, "labels").items():
        label = np.asarray(Image.open(path))
        assert label.shape == sizes[stem]
        expected = segmenter.predict_image(open_image(tmp_path / "images" / f"{stem}.png"))
        np.testing.assert_array_equal(label, expected)  # cluster ids

    # Refitting the probes on the released head keeps the leak label of the head; the new probe
    # sits beside the imported one, which is kept.
    refit = run(compose(*common, "stage=probe", "method.probe.reference_leak=false"))
    assert Path(refit["artifacts/probe"]).parent.parent == Path(head_path).parent
    assert Path(imported["artifacts/probe"]).is_file()
    probe = load_artifact(refit["artifacts/probe"], "probe", "probe")
    assert probe["meta"]["reference_leak"] is True
    assert not torch.equal(probe["centroids"], files["cluster"]["cluster_probe"])
    # The evaluation of the same settings scores the refitted probe, not the imported one.
    scored = run(compose(*common, "stage=eval", "method.probe.reference_leak=false"))
    assert Path(scored["artifacts/metrics"]).parent.parent == Path(refit["artifacts/probe"]).parent


def test_predict_segments_every_readable_image_and_lists_the_others(
    predict_run, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = tmp_path / "images"
    write_odd_images(images)
    (images / "a_broken.jpg").write_text("not an image")  # sorted first
    output = tmp_path / "predictions"
    with caplog.at_level("WARNING", logger="cause_lightning"):
        results = predict_run(f"predict.input={images}", f"predict.output_dir={output}")
    assert results["predict/count"] == 3
    assert results["predict/unreadable"] == [str(images / "a_broken.jpg")]
    assert (output / "contact_sheet.png").is_file() and len(_outputs(output, "labels")) == 3
    assert "1 of 4 images could not be read" in caplog.text and "a_broken.jpg" in caplog.text
    with pytest.raises(UnreadableImagesError, match=r"(?s)predict\.strict=true.*a_broken\.jpg"):
        predict_run(
            f"predict.input={images}", f"predict.output_dir={output}", "predict.strict=true"
        )
    with pytest.raises(UnreadableImagesError, match="no image could be segmented"):
        predict_run(f"predict.input={images / 'a_broken.jpg'}", f"predict.output_dir={output}")


def test_predict_names_a_missing_input(predict_run, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"predict\.input=.*photos does not exist"):
        predict_run(f"predict.input={tmp_path / 'photos'}")


def test_predict_needs_an_input(predict_run) -> None:
    with pytest.raises(ValueError, match=r"stage=predict needs predict\.input="):
        predict_run()


def test_predict_without_a_model_names_the_stages(predict_run, tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    with pytest.raises(
        MissingArtifactError,
        match=r"(?s)stage=mediator.*stage=all.*stage=import.*predict\.segmenter",
    ):
        predict_run(f"predict.input={tmp_path / 'x.png'}", paths=tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"predict\.segmenter=.*nope\.pt does not exist"):
        predict_run(
            f"predict.input={tmp_path / 'x.png'}",
            f"predict.segmenter={tmp_path / 'nope.pt'}",
            paths=tmp_path / "nothing",
        )


# --------------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    ("release", "overrides", "message"),
    [
        (
            {"kind": "mlp"},
            ["head=tr"],
            r"segment_mlp\.pth is an MLP segment file .*head='tr' was requested",
        ),
        ({"c": 5}, ["head=tr"], r"the release has 5 classes but data=mosaic has 6"),
        ({"book_shape": (K, 48)}, ["head=tr"], r"shape \[2048, 48\], expected \[2048, 64\]"),
        (
            {"book_shape": (32, D)},
            ["head=tr"],
            r"shape \[32, 64\], expected \[2048, 64\].*2048 concept rows",
        ),
        ({"d": 48, "book_shape": (K, 48)}, ["head=tr"], r"48-d features but backbone=tiny_vit"),
        (
            {"q": 1600},
            ["head=tr"],
            r"1600 position queries .*64 tokens.*resolution=320.*data\.recipe\.resolution\.test",
        ),
    ],
    ids=[
        "mlp-files-as-tr",
        "class-count",
        "clusterbook-width",
        "clusterbook-rows",
        "dim",
        "queries",
    ],
)
def test_import_rejects_mismatched_releases(
    compose: Callable[..., Any],
    shared_data_dir: Path,
    tmp_path: Path,
    release: dict,
    overrides: list[str],
    message: str,
) -> None:
    files = write_release(tmp_path / "release", **release)
    cfg = compose(
        *TINY,
        f"data.module.root={shared_data_dir / 'mosaic'}",
        *import_overrides(files["paths"]),
        *overrides,
    )
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "artifacts").exists()  # nothing half-written


def test_backbone_options_of_the_import_must_be_repeated(
    compose: Callable[..., Any], shared_data_dir: Path, tmp_path: Path
) -> None:
    # As +backbone.num_heads=12 for the released DINO ViT-S heads: same shapes, other features.
    files = write_release(tmp_path / "release")
    common = [*TINY, f"data.module.root={shared_data_dir / 'mosaic'}", "head=tr"]
    imported = run(compose(*common, *import_overrides(files["paths"]), "+backbone.num_heads=4"))
    common.append("artifact_tag=release")
    meta = load_artifact(imported["artifacts/head"], "head", "head")["meta"]
    assert ModelSpec.from_meta(meta).backbone.kwargs == {"num_heads": 4}
    with pytest.raises(
        ArtifactError, match=r"differing: backbone\.num_heads.*\+backbone\.num_heads=4"
    ):
        run(compose(*common, "stage=eval", "method.eval.variants=[raw]"))
    results = run(
        compose(
            *common,
            "stage=eval",
            "method.eval.variants=[raw]",
            "method.eval.baselines=false",
            "+backbone.num_heads=4",
        )
    )
    segmenter = Segmenter.load(results["artifacts/segmenter"])
    assert segmenter.backbone_kwargs == {"num_heads": 4}


def test_bundle_save_checks_the_token_grid(tmp_path: Path) -> None:
    from cause_lightning.interop import import_official

    files = write_release(tmp_path / "release")
    bundle = import_official(**files["paths"], head="tr")
    # 128 is a multiple of the 8x8 query grid, but gives 16x16 tokens with patch 8.
    with pytest.raises(ValueError, match=r"64 position queries .*256 tokens; use resolution=64"):
        bundle.save(tmp_path / "a", backbone="tiny_vit", resolution=128, patch_size=8)
    assert not (tmp_path / "a").exists()
    paths = bundle.save(tmp_path / "b", backbone="tiny_vit", resolution=64, patch_size=8)
    meta = load_artifact(paths["head"], "head", "head")["meta"]
    assert ModelSpec.from_meta(meta).resolution.test == 64


def test_import_needs_the_three_files(compose: Callable[..., Any], tmp_path: Path) -> None:
    files = write_release(tmp_path / "release")
    cfg = compose(*TINY, "stage=import", f"import.segment={files['paths']['segment']}")
    with pytest.raises(ValueError, match=r"import\.cluster=<file>, import\.clusterbook=<file>"):
        run(cfg)
