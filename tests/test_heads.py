"""Tests: heads, projection head, linear probe, EMA, cluster probe (method.md §5.1-5.3, §6.1)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cause_lightning.core.specs import SpecError, builtin_head_spec
from cause_lightning.models.contract import build_head, head_spec, head_traits
from cause_lightning.models.heads import LinearProbe, MLPHead, ProjectionHead, TRHead, ema_update
from cause_lightning.ops import nearest_concept

D, R, K = 32, 90, 64
H = W = 4
Q = H * W

TR_KEYS = [
    "query_pos",
    "tr.self_attn.in_proj_weight",
    "tr.self_attn.in_proj_bias",
    "tr.self_attn.out_proj.weight",
    "tr.self_attn.out_proj.bias",
    "tr.multihead_attn.in_proj_weight",
    "tr.multihead_attn.in_proj_bias",
    "tr.multihead_attn.out_proj.weight",
    "tr.multihead_attn.out_proj.bias",
    "tr.linear1.weight",
    "tr.linear1.bias",
    "tr.linear2.weight",
    "tr.linear2.bias",
    "tr.norm1.weight",
    "tr.norm1.bias",
    "tr.norm2.weight",
    "tr.norm2.bias",
    "tr.norm3.weight",
    "tr.norm3.bias",
    "tr.f1.weight",
    "tr.f1.bias",
    "tr.f2.0.weight",
    "tr.f2.0.bias",
    "tr.f2.2.weight",
    "tr.f2.2.bias",
]
MLP_KEYS = ["f1.weight", "f1.bias", "f2.0.weight", "f2.0.bias", "f2.2.weight", "f2.2.bias"]


def _tr_shapes(d: int, q: int, r: int = 90) -> dict[str, tuple[int, ...]]:
    """Shapes of docs/method.md §10.1, written out independently of the module."""
    shapes: dict[str, tuple[int, ...]] = {"query_pos": (q, d)}
    for attn in ("self_attn", "multihead_attn"):
        shapes[f"tr.{attn}.in_proj_weight"] = (3 * d, d)
        shapes[f"tr.{attn}.in_proj_bias"] = (3 * d,)
        shapes[f"tr.{attn}.out_proj.weight"] = (d, d)
        shapes[f"tr.{attn}.out_proj.bias"] = (d,)
    shapes |= {
        "tr.linear1.weight": (2048, d),
        "tr.linear1.bias": (2048,),
        "tr.linear2.weight": (d, 2048),
        "tr.linear2.bias": (d,),
    }
    for n in (1, 2, 3):
        shapes[f"tr.norm{n}.weight"] = (d,)
        shapes[f"tr.norm{n}.bias"] = (d,)
    shapes |= {
        "tr.f1.weight": (r, d, 1, 1),
        "tr.f1.bias": (r,),
        "tr.f2.0.weight": (d, d, 1, 1),
        "tr.f2.0.bias": (d,),
        "tr.f2.2.weight": (r, d, 1, 1),
        "tr.f2.2.bias": (r,),
    }
    return shapes


def _make_tr(seed: int = 0, reduced_dim: int = R) -> TRHead:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return TRHead(D, reduced_dim, num_queries=Q, clusterbook=torch.randn(K, D, generator=g))


def _feats(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, D, H, W, generator=torch.Generator().manual_seed(seed))


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_head_output_shape_and_type(kind: str) -> None:
    tr = kind == "tr"
    spec = builtin_head_spec(
        kind, D, R, 0.1, num_queries=Q if tr else None, num_concepts=K if tr else None
    )
    head = build_head(spec, clusterbook=torch.randn(K, D) if kind == "tr" else None)
    assert head_spec(head) == spec
    assert head_traits(head).fixed_grid == head_traits(head).needs_clusterbook == tr
    assert head_traits(head).per_token != tr
    out = head.eval()(_feats(3))
    assert out.shape == (3, R, H, W)
    assert torch.isfinite(out).all()


def test_projection_and_linear_shapes() -> None:
    x = torch.randn(2, R, 5, 6)
    proj = ProjectionHead(R, 2048)
    assert proj(x).shape == (2, 2048, 5, 6)
    assert _n_params(proj) == 186_368
    assert list(proj.state_dict()) == ["f.weight", "f.bias"]
    lin = LinearProbe(R, 27)
    assert lin(x).shape == (2, 27, 5, 6)
    assert lin.num_classes == 27
    assert _n_params(lin) == 91 * 27


def test_mlp_accepts_non_square_grids() -> None:
    head = MLPHead(D).eval()
    assert head(torch.randn(1, D, 3, 7)).shape == (1, R, 3, 7)


def test_head_spec_rejects_unknown_kinds_and_incomplete_tr() -> None:
    with pytest.raises(SpecError, match="head kind 'conv' is not one of"):
        builtin_head_spec("conv", D, R, 0.1)
    with pytest.raises(SpecError, match="TR head spec needs num_queries and num_concepts"):
        builtin_head_spec("tr", D, R, 0.1, num_queries=Q)


def test_tr_requires_num_queries() -> None:
    with pytest.raises(ValueError, match="num_queries"):
        TRHead(D)


def test_wrong_feature_width_raises() -> None:
    with pytest.raises(ValueError, match="D=32.*16 channels"):
        MLPHead(D)(torch.randn(1, 16, H, W))
    with pytest.raises(ValueError, match=r"\[B, D, h, w\]"):
        MLPHead(D)(torch.randn(1, Q, D))


# -------------------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize(
    ("dim", "grid", "mlp_m", "tr_m", "qpos_m"),
    [
        (384, 40, 0.217, 3.592, 0.614),  # ViT-S/8 @320
        (384, 20, 0.217, 3.131, 0.154),  # ViT-S/16 @320
        (768, 40, 0.729, 9.836, 1.229),  # ViT-B/8 @320
        (768, 20, 0.729, 8.914, 0.307),  # ViT-B/16 @320
        (768, 23, 0.729, 9.013, 0.406),  # DINOv2 ViT-B/14 @322
    ],
)
def test_parameter_counts_match_method_table(
    dim: int, grid: int, mlp_m: float, tr_m: float, qpos_m: float
) -> None:
    with torch.device("meta"):
        mlp = MLPHead(dim)
        tr = TRHead(dim, num_queries=grid * grid)
    assert round(_n_params(mlp) / 1e6, 3) == mlp_m
    assert round(_n_params(tr) / 1e6, 3) == tr_m
    assert round(tr.query_pos.numel() / 1e6, 3) == qpos_m


def test_exact_parameter_counts_vits8() -> None:
    with torch.device("meta"):
        mlp, tr = MLPHead(384), TRHead(384, num_queries=1600)
    assert _n_params(mlp) == 217_140
    assert _n_params(tr) == 3_591_860
    assert tr.query_pos.numel() == 614_400
    # The clusterbook is a buffer, not a parameter.
    assert "clusterbook" not in dict(tr.named_parameters())


# -------------------------------------------------------------------------------- state-dict names


def test_tr_state_dict_keys_and_shapes() -> None:
    head = _make_tr()
    sd = head.state_dict()
    keys = [k for k in sd if k != "clusterbook"]
    assert keys == TR_KEYS  # names and reference registration order
    assert len(keys) == 25
    for k, shape in _tr_shapes(D, Q).items():
        assert tuple(sd[k].shape) == shape, k
    assert tuple(sd["clusterbook"].shape) == (K, D)
    assert [n for n, _ in head.named_parameters()] == TR_KEYS


def test_mlp_state_dict_keys_and_shapes() -> None:
    sd = MLPHead(D).state_dict()
    assert list(sd) == MLP_KEYS
    assert tuple(sd["f1.weight"].shape) == (R, D, 1, 1)
    assert tuple(sd["f2.0.weight"].shape) == (D, D, 1, 1)
    assert tuple(sd["f2.2.weight"].shape) == (R, D, 1, 1)


def test_tr_layer_settings() -> None:
    head = _make_tr()
    for attn in (head.tr.self_attn, head.tr.multihead_attn):
        assert attn.num_heads == 1
        assert attn.dropout == pytest.approx(0.1)
        assert not attn.batch_first
        assert attn.in_proj_bias is not None
    for norm in (head.tr.norm1, head.tr.norm2, head.tr.norm3):
        assert norm.eps == pytest.approx(1e-5)
    assert head.tr.linear1.out_features == 2048


# ------------------------------------------------------------------------------------- clusterbook


def test_tr_clusterbook_buffer_lifecycle() -> None:
    head = TRHead(D, R, num_queries=Q, num_concepts=K).eval()
    assert head.clusterbook.shape == (K, D)
    assert torch.count_nonzero(head.clusterbook) == 0
    with pytest.raises(RuntimeError, match="clusterbook"):
        head(_feats())
    with pytest.raises(ValueError, match=r"\[64, 32\].*\[64, 16\]"):
        head.set_clusterbook(torch.randn(K, 16))
    book = torch.randn(K, D)
    head.set_clusterbook(book)
    assert torch.equal(head.clusterbook, book)
    head(_feats())
    # A fresh head loading a state dict (with the buffer) becomes usable too.
    other = TRHead(D, R, num_queries=Q, num_concepts=K).eval()
    other.load_state_dict(head.state_dict())
    assert torch.equal(other(_feats()), head(_feats()))


def test_tr_num_concepts_from_clusterbook() -> None:
    head = TRHead(D, num_queries=Q, clusterbook=torch.randn(10, D))
    assert head.num_concepts == 10
    assert TRHead(D, num_queries=Q).num_concepts == 2048


def test_tr_token_count_error() -> None:
    head = _make_tr().eval()
    msg = (
        re.escape("expected 16 tokens, got 4")
        + r".*TR test resolution must equal the train resolution"
    )
    with pytest.raises(ValueError, match=msg):
        head(torch.randn(1, D, 2, 2))


def test_tr_queries_are_raw_nearest_concepts() -> None:
    """Tokens that are positive multiples of concept rows select those rows (cosine, raw rows)."""
    head = _make_tr().eval()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, K, (2, Q), generator=g)
    scale = torch.rand(2, Q, 1, generator=g) * 5 + 0.1
    tokens = head.clusterbook[idx] * scale  # B N D
    feats = tokens.transpose(1, 2).reshape(2, D, H, W)
    # Changing only non-selected clusterbook rows must not change the output...
    other = copy.deepcopy(head)
    unused = torch.ones(K, dtype=torch.bool)
    unused[idx.unique()] = False
    book = head.clusterbook.clone()
    book[unused] = book[unused] * 0.5  # same directions, so the nearest concepts stay the same
    other.set_clusterbook(book)
    torch.testing.assert_close(other(feats), head(feats), rtol=0, atol=0)
    # ...while scaling the selected rows changes the queries (raw rows are used, not normalised).
    book = head.clusterbook.clone()
    book[~unused] = book[~unused] * 2.0
    other.set_clusterbook(book)
    assert not torch.allclose(other(feats), head(feats), atol=1e-4)


def _mha_reference(head: TRHead, feats: torch.Tensor) -> torch.Tensor:
    """The TR forward with ``nn.MultiheadAttention``'s own functional attention (eval mode)."""
    layer = head.tr

    def attend(attn: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        args = (attn.embed_dim, attn.num_heads, attn.in_proj_weight, attn.in_proj_bias)
        out, _ = F.multi_head_attention_forward(
            q, k, v, *args, None, None, False, 0.0, attn.out_proj.weight, attn.out_proj.bias,
            training=False, need_weights=False,
        )  # fmt: skip
        return out

    b, d, h, w = feats.shape
    tokens = feats.flatten(2).transpose(1, 2)
    t0 = head.clusterbook[nearest_concept(tokens, head.clusterbook)].transpose(0, 1)  # L B D
    mem, pos = tokens.transpose(0, 1), head.query_pos[:, None]
    t1 = layer.norm1(t0 + attend(layer.self_attn, t0 + pos, t0 + pos, t0))
    t2 = layer.norm2(t1 + attend(layer.multihead_attn, t1 + pos, mem, mem))
    t3 = t2 + layer.linear2(F.relu(layer.linear1(t2)))
    grid = (mem + layer.norm3(t3)).permute(1, 2, 0).reshape(b, d, h, w)
    return layer.f1(grid) + layer.f2(grid)


def test_tr_attention_equals_multihead_attention_forward_float64() -> None:
    head = _make_tr().double().eval()
    with torch.no_grad():  # non-trivial biases and norms
        for parameter in head.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    feats = (_feats(3) * 2).double().requires_grad_(True)
    ours = head(feats)
    grads = torch.autograd.grad(ours.square().sum(), [feats, *head.parameters()])
    ref = _mha_reference(head, feats)
    ref_grads = torch.autograd.grad(ref.square().sum(), [feats, *head.parameters()])
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


class _Ops(TorchDispatchMode):
    """Records ``(op name, dtype of the first tensor argument)`` of every aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.seen.append((str(func), None if first is None else first.dtype))
        return func(*args, **(kwargs or {}))


def test_tr_attention_is_plain_products_with_a_float32_softmax() -> None:
    head = _make_tr().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16), _Ops() as ops:
        out = head(_feats())
    assert torch.isfinite(out).all()
    names = [name for name, _ in ops.seen]
    assert not [n for n in names if "scaled_dot_product" in n or "attention" in n]
    softmax = [dtype for name, dtype in ops.seen if name.startswith("aten._softmax")]
    assert len(softmax) == 2 and all(d == torch.float32 for d in softmax)  # of the two attentions
    bmm = [dtype for name, dtype in ops.seen if name.startswith(("aten.bmm", "aten.mm"))]
    assert torch.bfloat16 in bmm  # the products themselves follow autocast


def test_tr_attention_dropout_follows_the_dropout_switch() -> None:
    head = _make_tr()
    for module in (head.head_dropout, head.tr.dropout, head.tr.dropout1, head.tr.dropout2):
        module.p = 0.0
    head.tr.dropout3.p = 0.0
    x = _feats()
    head.eval()
    torch.testing.assert_close(head(x), head(x, dropout=False), rtol=0, atol=0)
    assert not torch.allclose(head(x, dropout=True), head(x))  # attention dropout alone
    head.tr.self_attn.dropout = head.tr.multihead_attn.dropout = 0.0
    torch.testing.assert_close(head(x, dropout=True), head(x), rtol=0, atol=0)


def test_tr_takes_the_nearest_concepts_of_its_caller() -> None:
    head = _make_tr().eval()
    x = _feats()
    concepts = nearest_concept(x.flatten(2).transpose(1, 2), head.clusterbook)
    with _Ops() as ops:
        given = head(x, concepts=concepts)
    assert not [name for name, _ in ops.seen if name.startswith("aten.argmax")]
    torch.testing.assert_close(given, head(x), rtol=0, atol=0)
    assert not torch.allclose(head(x, concepts=torch.zeros_like(concepts)), given)
    with pytest.raises(ValueError, match=r"concepts must be \[B, h\*w\]"):
        head(x, concepts=concepts[:, :3])


# ----------------------------------------------------------------------------------------- dropout


def _cancelling(head: nn.Module) -> nn.Module:
    """Set f1 = identity and f2 = -identity, so out = drop_a(G) - drop_b(G) (R == D)."""
    f1, f2 = (head.tr.f1, head.tr.f2) if isinstance(head, TRHead) else (head.f1, head.f2)
    eye = torch.eye(D)[:, :, None, None]
    big = 100.0  # keeps the ReLU input positive, so f2(y) = -(y + big) + big = -y
    with torch.no_grad():
        f1.weight.copy_(eye)
        f1.bias.zero_()
        f2[0].weight.copy_(eye)
        f2[0].bias.fill_(big)
        f2[2].weight.copy_(-eye)
        f2[2].bias.fill_(big)
    return head


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_dropout_independent_per_branch(kind: str) -> None:
    head = MLPHead(D, reduced_dim=D) if kind == "mlp" else _make_tr(reduced_dim=D)
    head = _cancelling(head)
    x = _feats(4) + 3.0
    head.eval()
    assert (
        head(x).abs().max() < 1e-3
    )  # no dropout: the branches cancel (up to the big-bias rounding)
    assert head(x, dropout=False).abs().max() < 1e-3
    head.train()
    torch.manual_seed(0)
    out = head(x)
    # Independent draws: about 2 * 0.1 * 0.9 of the entries differ between the branches.
    frac = (out.abs() > 1e-3).float().mean().item()
    assert 0.10 < frac < 0.26, frac
    torch.manual_seed(0)
    assert head(x, dropout=False).abs().max() < 1e-3
    head.eval()
    assert (head(x, dropout=True).abs() > 1e-3).float().mean().item() > 0.10


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_dropout_train_vs_eval(kind: str) -> None:
    head = MLPHead(D) if kind == "mlp" else _make_tr()
    x = _feats()
    head.train()
    a, b = head(x), head(x)
    assert not torch.allclose(a, b)
    head.eval()
    torch.testing.assert_close(head(x), head(x), rtol=0, atol=0)


def test_mlp_dropout_scaling() -> None:
    """Only f1 active (identity): the train output is the input with 10% zeros, rest / 0.9."""
    head = MLPHead(D, reduced_dim=D)
    with torch.no_grad():
        head.f1.weight.copy_(torch.eye(D)[:, :, None, None])
        head.f1.bias.zero_()
        for p in head.f2.parameters():
            p.zero_()
    x = torch.rand(2, D, 8, 8) + 1.0
    torch.manual_seed(0)
    out = head.train()(x)
    zero = out == 0
    assert 0.05 < zero.float().mean().item() < 0.15
    torch.testing.assert_close(out[~zero], x[~zero] / 0.9)


def test_tr_decoder_dropout_active_in_train() -> None:
    """With the head dropout off, the decoder's own dropouts still randomise train-mode outputs."""
    head = _make_tr()
    head.head_dropout.p = 0.0
    x = _feats()
    head.train()
    assert not torch.allclose(head(x), head(x))
    head.eval()
    torch.testing.assert_close(head(x), head(x))


# --------------------------------------------------------------------------------------------- EMA


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_ema_update_formula(kind: str) -> None:
    student = MLPHead(D) if kind == "mlp" else _make_tr(seed=0)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    if kind == "tr":
        student.set_clusterbook(torch.randn(K, D))
    before = [p.detach().clone() for p in teacher.parameters()]
    ema_update(teacher, student, decay=0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s, rtol=1e-6, atol=1e-6)
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        assert torch.equal(tb, sb)


def test_ema_update_pairs_by_registration_order_and_checks() -> None:
    t = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    s = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    expected = [
        0.99 * a.detach() + 0.01 * b.detach()
        for a, b in zip(t.parameters(), s.parameters(), strict=True)
    ]
    ema_update(t, s)
    for a, e in zip(t.parameters(), expected, strict=True):
        torch.testing.assert_close(a, e)
    with pytest.raises(ValueError, match="structure"):
        ema_update(t, nn.Linear(3, 4))
    with pytest.raises(ValueError, match="shape"):
        ema_update(nn.Linear(3, 4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="decay"):
        ema_update(t, s, decay=1.5)


def test_ema_marks_teacher_clusterbook_ready() -> None:
    student = _make_tr()
    teacher = TRHead(D, R, num_queries=Q, num_concepts=K)
    ema_update(teacher, student, decay=0.99)
    assert torch.equal(teacher.clusterbook, student.clusterbook)
    teacher.eval()(_feats())


# --------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["mlp", "tr"])
def test_gradients_reach_head_not_detached_inputs(kind: str) -> None:
    head = MLPHead(D) if kind == "mlp" else _make_tr()
    x = _feats().requires_grad_(True)
    head.train()(x.detach()).square().mean().backward()
    assert x.grad is None
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if kind == "tr":
        assert not head.clusterbook.requires_grad


def test_gradients_reach_inputs_when_not_detached() -> None:
    head = MLPHead(D)
    x = _feats().requires_grad_(True)
    head(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
