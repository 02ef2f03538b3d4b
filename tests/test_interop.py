"""Tests for importing the reference release files (docs/method.md §10, docs/api.md interop).

Fake release files are written with exactly the documented keys and shapes (small D and Q); the
imported heads are compared with a functional forward written here straight from the state-dict
tensors (method.md §5.2).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cause_lightning.core.specs import ModelSpec, Resolution
from cause_lightning.interop import OfficialBundle, import_official
from cause_lightning.models.heads import MLPHead, TRHead
from release_files import write_release

D, Q, C, R, K, P = 32, 16, 5, 90, 2048, 2048
GRID = 4  # sqrt(Q)


# ------------------------------------------------------------------------------ fake release files


def _write_release(root: Path, kind: str, **kw: Any) -> dict:
    """The release files at this module's sizes (D, Q, C) unless overridden."""
    return write_release(root, kind, **{"d": D, "q": Q, "c": C, **kw})


# -------------------------------------------------------------------- functional reference forward


def _conv1x1(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1x1 convolution on tokens ``[B, N, Din]`` as a matmul with ``weight[:, :, 0, 0]``."""
    return x @ w[:, :, 0, 0].T + b


def _layer_norm(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _attention(
    sd: dict, prefix: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Single-head attention from packed in-projection weights (rows q | k | v), batch-first."""
    w, b = sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"]
    d = w.shape[1]
    qh = q @ w[:d].T + b[:d]
    kh = k @ w[d : 2 * d].T + b[d : 2 * d]
    vh = v @ w[2 * d :].T + b[2 * d :]
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (att @ vh) @ sd[prefix + "out_proj.weight"].T + sd[prefix + "out_proj.bias"]


def _projection(sd: dict, p: str, g: torch.Tensor) -> torch.Tensor:
    f1 = _conv1x1(g, sd[p + "f1.weight"], sd[p + "f1.bias"])
    hid = torch.relu(_conv1x1(g, sd[p + "f2.0.weight"], sd[p + "f2.0.bias"]))
    return f1 + _conv1x1(hid, sd[p + "f2.2.weight"], sd[p + "f2.2.bias"])


def _reference_tr(
    sd: dict, book: torch.Tensor, feats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """method.md §5.2 TR forward in eval mode, float64; returns (out [B,R,h,w], concepts [B,N])."""
    sd = {k[len("head_ema.") :]: v.double() for k, v in sd.items() if k.startswith("head_ema.")}
    book = book.double()
    b, d, h, w = feats.shape
    mem = feats.double().flatten(2).transpose(1, 2)  # B N D
    cos = (mem / mem.norm(dim=-1, keepdim=True)) @ (book / book.norm(dim=-1, keepdim=True)).T
    ids = cos.argmax(-1)
    t0 = book[ids]  # raw rows
    pos = sd["query_pos"][None]
    a = _attention(sd, "tr.self_attn.", t0 + pos, t0 + pos, t0)
    t1 = _layer_norm(t0 + a, sd["tr.norm1.weight"], sd["tr.norm1.bias"])
    c = _attention(sd, "tr.multihead_attn.", t1 + pos, mem, mem)
    t2 = _layer_norm(t1 + c, sd["tr.norm2.weight"], sd["tr.norm2.bias"])
    ffn = torch.relu(t2 @ sd["tr.linear1.weight"].T + sd["tr.linear1.bias"])
    t3 = t2 + ffn @ sd["tr.linear2.weight"].T + sd["tr.linear2.bias"]
    t4 = mem + _layer_norm(t3, sd["tr.norm3.weight"], sd["tr.norm3.bias"])
    out = _projection(sd, "tr.", t4)  # B N R
    return out.transpose(1, 2).reshape(b, -1, h, w), ids


def _reference_mlp(sd: dict, feats: torch.Tensor) -> torch.Tensor:
    sd = {k[len("head_ema.") :]: v.double() for k, v in sd.items() if k.startswith("head_ema.")}
    b, d, h, w = feats.shape
    tokens = feats.double().flatten(2).transpose(1, 2)
    return _projection(sd, "", tokens).transpose(1, 2).reshape(b, -1, h, w)


def _features_near_concepts(
    book: np.ndarray, b: int = 3, seed: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose tokens are scaled, perturbed concept rows (unambiguous nearest concepts)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, book.shape[0], (b, Q), generator=g)
    rows = torch.from_numpy(book)[ids]  # B N D
    scale = torch.rand(b, Q, 1, generator=g) + 0.5
    tokens = rows * scale + 0.05 * torch.randn(b, Q, D, generator=g)
    return tokens.transpose(1, 2).reshape(b, D, GRID, GRID).contiguous(), ids


# ------------------------------------------------------------------------------------- equivalence


def test_tr_import_matches_functional_forward(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "tr")
    bundle = import_official(**rel["paths"], head="tr")
    assert isinstance(bundle, OfficialBundle)
    assert isinstance(bundle.head, TRHead) and not bundle.head.training
    assert (bundle.head_type, bundle.dim, bundle.num_classes, bundle.num_queries) == ("tr", D, C, Q)
    assert bundle.reduced_dim == R
    feats, ids = _features_near_concepts(rel["book"])
    ref, ref_ids = _reference_tr(rel["segment"], torch.from_numpy(rel["book"]), feats)
    assert torch.equal(ref_ids, ids)  # the test's own features hit the intended concepts
    with torch.no_grad():
        out = bundle.head(feats)
    assert out.shape == (3, R, GRID, GRID)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # The student weights (head.*) give something else: the importer took the teacher.
    student = {
        k.replace("head.", "head_ema.", 1): v
        for k, v in rel["segment"].items()
        if k.startswith("head.")
    }
    ref_student, _ = _reference_tr(student, torch.from_numpy(rel["book"]), feats)
    assert not torch.allclose(out.double(), ref_student, atol=1e-3)


def test_tr_import_matches_on_generic_features(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "tr", seed=3)
    bundle = import_official(**rel["paths"], head="tr")
    feats = torch.randn(2, D, GRID, GRID, generator=torch.Generator().manual_seed(7)) * 2
    ref, ref_ids = _reference_tr(rel["segment"], torch.from_numpy(rel["book"]), feats)
    book = torch.from_numpy(rel["book"]).double()
    tok = feats.double().flatten(2).transpose(1, 2)
    cos = torch.nn.functional.normalize(tok, dim=-1) @ torch.nn.functional.normalize(book, dim=-1).T
    top2 = cos.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 1e-5, "near-tie in the test data; change the seed"
    with torch.no_grad():
        out = bundle.head(feats)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_mlp_import_matches_functional_forward(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "mlp", seed=1)
    bundle = import_official(**rel["paths"], head="mlp")
    assert isinstance(bundle.head, MLPHead) and not bundle.head.training
    assert (bundle.head_type, bundle.dim, bundle.num_classes, bundle.num_queries) == (
        "mlp",
        D,
        C,
        None,
    )
    feats = torch.randn(2, D, 5, 7, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = bundle.head(feats)
    torch.testing.assert_close(
        out.double(), _reference_mlp(rel["segment"], feats), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("kind", ["tr", "mlp"])
def test_bundle_contents(tmp_path: Path, kind: str) -> None:
    rel = _write_release(tmp_path, kind, seed=2)
    bundle = import_official(**rel["paths"], head=kind)
    assert torch.equal(bundle.centroids, rel["cluster"]["cluster_probe"])
    assert bundle.clusterbook.dtype == torch.float32
    assert torch.equal(bundle.clusterbook, torch.from_numpy(rel["book"]))
    assert bundle.num_concepts == K
    assert torch.equal(bundle.linear.f.weight, rel["segment"]["linear.f.weight"])
    assert torch.equal(bundle.linear.f.bias, rel["segment"]["linear.f.bias"])
    assert not bundle.linear.training
    assert bundle.source == rel["paths"]
    if kind == "tr":
        assert torch.equal(bundle.head.clusterbook, torch.from_numpy(rel["book"]))
    x = torch.randn(1, R, 2, 2)
    ref = torch.einsum("brhw,cr->bchw", x, rel["segment"]["linear.f.weight"][:, :, 0, 0])
    ref = ref + rel["segment"]["linear.f.bias"][None, :, None, None]
    torch.testing.assert_close(bundle.linear(x), ref)


# ------------------------------------------------------------------------------------------ errors


def test_mlp_file_with_tr_requested(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "mlp")
    with pytest.raises(
        ValueError, match=r"segment_mlp\.pth is an MLP segment file.*head='tr'.*head='mlp'"
    ):
        import_official(**rel["paths"], head="tr")


def test_tr_file_with_mlp_requested(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "tr")
    with pytest.raises(ValueError, match=r"is a TR segment file.*head='mlp'"):
        import_official(**rel["paths"], head="mlp")


def test_unknown_head_argument(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "mlp")
    with pytest.raises(ValueError, match="'tr' or 'mlp'"):
        import_official(**rel["paths"], head="linear")


@pytest.mark.parametrize("shape", [(K, 16), (1000, D)])
def test_clusterbook_wrong_shape(tmp_path: Path, shape: tuple[int, int]) -> None:
    rel = _write_release(tmp_path, "tr", book_shape=shape)
    with pytest.raises(ValueError, match=r"modular\.npy has shape .*expected \[2048, 32\]"):
        import_official(**rel["paths"], head="tr")


def test_truncated_segment_file(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "tr")
    path = rel["paths"]["segment"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*segment_tr\.pth as a reference segment"):
        import_official(**rel["paths"], head="tr")


def test_truncated_clusterbook(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "mlp")
    path = rel["paths"]["clusterbook"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(
        ValueError, match=r"cannot read .*modular\.npy as the reference modular\.npy"
    ):
        import_official(**rel["paths"], head="mlp")


def test_swapped_files(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "tr")
    p = rel["paths"]
    with pytest.raises(ValueError, match=r"modular\.npy as a reference segment"):
        import_official(p["clusterbook"], p["cluster"], p["clusterbook"], head="tr")
    with pytest.raises(ValueError, match=r"cluster_tr\.pth has no 'head_ema\.\*' keys"):
        import_official(p["cluster"], p["cluster"], p["clusterbook"], head="tr")
    with pytest.raises(ValueError, match=r"segment_tr\.pth has no 'cluster_probe'"):
        import_official(p["segment"], p["segment"], p["clusterbook"], head="tr")
    with pytest.raises(
        ValueError, match=r"segment_tr\.pth holds .*expected the reference modular\.npy"
    ):
        import_official(p["segment"], p["cluster"], p["segment"], head="tr")


def test_missing_file(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "mlp")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        import_official(
            tmp_path / "nope.pth", rel["paths"]["cluster"], rel["paths"]["clusterbook"], head="mlp"
        )


def test_class_count_mismatch(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "tr")
    torch.save(
        {"codebook": rel["cluster"]["codebook"], "cluster_probe": torch.randn(C + 1, R)},
        rel["paths"]["cluster"],
    )
    with pytest.raises(ValueError, match=r"class count mismatch: .*C=6 .*linear probe for 5"):
        import_official(**rel["paths"], head="tr")


def test_missing_head_key_is_a_strict_load_error(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "tr")
    seg = dict(rel["segment"])
    del seg["head_ema.tr.norm2.bias"]
    torch.save(seg, rel["paths"]["segment"])
    with pytest.raises(
        ValueError, match=r"(?s)cannot load the TR teacher head .*strictly.*tr\.norm2\.bias"
    ):
        import_official(**rel["paths"], head="tr")


def test_codebook_mismatch_warns(tmp_path: Path) -> None:
    rel = _write_release(tmp_path, "mlp")
    torch.save(
        {
            "codebook": rel["cluster"]["codebook"] + 1.0,
            "cluster_probe": rel["cluster"]["cluster_probe"],
        },
        rel["paths"]["cluster"],
    )
    with pytest.warns(UserWarning, match=r"\['codebook'\].*differs from .*modular\.npy"):
        bundle = import_official(**rel["paths"], head="mlp")
    assert torch.equal(bundle.clusterbook, torch.from_numpy(rel["book"]))


# --------------------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("kind", ["tr", "mlp"])
def test_bundle_save_writes_stage_artifacts(tmp_path: Path, kind: str) -> None:
    artifacts = pytest.importorskip(
        "cause_lightning.artifacts.io", reason="cause_lightning.artifacts.io is not available yet"
    )
    rel = _write_release(tmp_path / "release", kind, seed=4)
    bundle = import_official(**rel["paths"], head=kind)
    root = artifacts.artifact_root(tmp_path / "art", "mosaic", "dino_vits8")
    names = [f"class{i}" for i in range(C)]
    paths = bundle.save(
        root,
        backbone="dino_vits8",
        backbone_weights="/weights/dino.pth",
        backbone_kwargs={"num_heads": 12},
        resolution=32,
        class_names=names,
    )
    # Labelled directories, each inside the one it was made from (docs/release.md).
    assert paths["clusterbook"].parent.parent == root
    assert paths["clusterbook"].parent.name.startswith("clusterbook-release-")
    assert paths["head"].parent.parent == paths["clusterbook"].parent
    assert paths["head"].parent.name.startswith(f"{kind}-release-")
    assert paths["probe"].parent.parent == paths["head"].parent
    book = artifacts.load_artifact(paths["clusterbook"], "clusterbook", produced_by="mediator")
    head = artifacts.load_artifact(paths["head"], "head", produced_by="head")
    probe = artifacts.load_artifact(paths["probe"], "probe", produced_by="probe")
    for path in paths.values():  # weights_only-safe, as the artifacts contract requires
        assert isinstance(torch.load(path, weights_only=True), dict)
    for rec in (book, head, probe):
        meta = rec["meta"]
        assert meta["reference_release"] is True
        assert meta["imported_from"] == {k: str(v) for k, v in rel["paths"].items()}
        spec = ModelSpec.from_meta(meta)
        assert spec.head.name == f"{kind.upper()}Head"
        head_kwargs = spec.head.kwargs
        assert (head_kwargs["dim"], head_kwargs["reduced_dim"]) == (D, R)
        assert (spec.num_classes, spec.num_concepts) == (C, K)
        assert head_kwargs.get("num_queries") == (Q if kind == "tr" else None)
        assert spec.backbone.name == "dino_vits8"
        assert spec.backbone.weights == "/weights/dino.pth"
        assert spec.backbone.kwargs == {"num_heads": 12}
        assert spec.resolution == Resolution(train=32 if kind == "tr" else 224, test=32)
        assert meta["class_names"] == names
        assert isinstance(meta["config"], dict)
    assert torch.equal(book["clusterbook"], torch.from_numpy(rel["book"]))
    assert torch.equal(probe["centroids"], rel["cluster"]["cluster_probe"])
    assert torch.equal(probe["linear_state"]["f.weight"], rel["segment"]["linear.f.weight"])
    assert torch.equal(head["linear_state"]["f.bias"], rel["segment"]["linear.f.bias"])
    # The saved head state rebuilds the same head.
    fresh = TRHead(D, R, num_queries=Q) if kind == "tr" else MLPHead(D, R)
    fresh.load_state_dict(head["head_state"], strict=True)
    feats = torch.randn(2, D, GRID, GRID)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(feats), bundle.head(feats), rtol=0, atol=0)


def test_bundle_save_validates(tmp_path: Path) -> None:
    rel = _write_release(tmp_path / "release", "tr")
    bundle = import_official(**rel["paths"], head="tr")
    with pytest.raises(ValueError, match="class_names has 2 entries but the release has 5"):
        bundle.save(tmp_path / "art", backbone="dino_vits8", resolution=32, class_names=["a", "b"])
    with pytest.raises(ValueError, match="resolution 30 is not a multiple of 4"):
        bundle.save(tmp_path / "art", backbone="dino_vits8", resolution=30)
    with pytest.raises(ValueError, match="train resolution == test resolution"):
        bundle.save(tmp_path / "art", backbone="dino_vits8", resolution=32, train_resolution=16)
