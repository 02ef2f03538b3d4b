"""Tests of ``cause_lightning.ops`` against literal versions of docs/method.md §3, §4.2 and §5.6.

The references below are written straight from the method text (brute-force ``[B, K, N, N]``
modularity with a literal max over k of tanh, per-pair loops for the contrastive loss) and share no
code with the implementation.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cause_lightning.ops import (
    concept_contrastive_loss,
    concept_contrastive_terms,
    contrastive,
    grid_sample_index,
    grid_sample_tokens,
    modularity,
    modularity_loss,
    nearest_concept,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# --------------------------------------------------------------------------------------------------
# literal references
# --------------------------------------------------------------------------------------------------


def literal_grid_sample(features: Tensor, window: int, index: Tensor) -> Tensor:
    batch, channels, height, width = features.shape
    cells_h, cells_w = height // window, width // window
    out = torch.empty(batch, cells_h * cells_w, channels, dtype=features.dtype)
    for b in range(batch):
        for r in range(cells_h):
            for c in range(cells_w):
                cell = r * cells_w + c
                t = int(index[b, cell])
                out[b, cell] = features[b, :, r * window + t // window, c * window + t % window]
    return out


def literal_nearest(tokens: Tensor, clusterbook: Tensor) -> Tensor:
    batch, num, _ = tokens.shape
    out = torch.empty(batch, num, dtype=torch.long)
    for b in range(batch):
        for i in range(num):
            cos = [
                float(tokens[b, i] @ clusterbook[k] / (tokens[b, i].norm() * clusterbook[k].norm()))
                for k in range(clusterbook.shape[0])
            ]
            out[b, i] = max(range(len(cos)), key=lambda k, cos=cos: cos[k])
    return out


def literal_modularity(tokens: Tensor, prototypes: Tensor, tau: float) -> Tensor:
    """method.md §4.2 step by step, with the brute-force [B, K, N, N] tensor and trace((W/e) δ)."""
    x = tokens.detach()
    x = x / x.norm(dim=-1, keepdim=True)
    c = prototypes / prototypes.norm(dim=-1, keepdim=True)
    batch, num, _ = x.shape
    affinity = torch.relu(x @ x.transpose(1, 2)) * (1 - torch.eye(num, dtype=x.dtype))
    degree = affinity.sum(-1)
    total = affinity.sum((-2, -1))
    weights = affinity - degree[:, :, None] * degree[:, None, :] / total[:, None, None]
    assign = torch.relu(x @ c.T)  # B N K
    s_t = assign.transpose(1, 2)  # B K N
    full = torch.tanh(s_t[:, :, :, None] * s_t[:, :, None, :] / tau)  # B K N N (brute force)
    delta = full.amax(dim=1)  # B N N
    quality = torch.stack([torch.trace((weights[b] / total[b]) @ delta[b]) for b in range(batch)])
    return -quality.mean()


def literal_contrastive(
    tokens: Tensor,
    student: Tensor,
    teacher: Tensor,
    clusterbook: Tensor,
    bank: Tensor | None,
    bank_concepts: Tensor | None,
    temperature: float = 0.07,
    pos_thresh: float = 0.3,
    neg_thresh: float = 0.1,
) -> tuple[Tensor, list[bool], dict[str, int]]:
    """method.md §5.6 with explicit loops over images, anchors and candidates."""
    batch, num, _ = tokens.shape
    kappa = literal_nearest(tokens, clusterbook).view(-1).tolist()

    def concept_vec(k: int) -> Tensor:
        return clusterbook[k] / clusterbook[k].norm()

    def unit(v: Tensor) -> Tensor:
        return v / v.norm()

    teach = [unit(teacher.detach()[j // num, j % num]) for j in range(batch * num)]
    stats = {"pos": 0, "neg": 0, "mid": 0}
    terms: list[Tensor] = []
    empty: list[bool] = []

    def term(b: int, cands: list[tuple[Tensor, int]], self_exclude: bool) -> None:
        pair_losses: list[Tensor] = []
        for i in range(num):
            a = b * num + i
            z = unit(student[b, i])
            q = concept_vec(kappa[a])
            logits = [z @ zt / temperature for zt, _ in cands]
            shift = torch.stack(logits).max().detach()
            shifted = [lg - shift for lg in logits]
            pos, den = [], []
            for j, (_, k) in enumerate(cands):
                if self_exclude and j == a:
                    continue
                s = float(q @ concept_vec(k))
                if s > pos_thresh:
                    pos.append(j)
                    den.append(j)
                    stats["pos"] += 1
                elif s < neg_thresh:
                    den.append(j)
                    stats["neg"] += 1
                else:
                    stats["mid"] += 1
            if pos:
                log_den = torch.log(sum(torch.exp(shifted[k]) for k in den))
                pair_losses.extend(-shifted[j] + log_den for j in pos)
        if pair_losses:
            terms.append(torch.stack(pair_losses).mean())
            empty.append(False)
        else:
            terms.append(student.sum() * 0)
            empty.append(True)

    in_batch = [(teach[j], kappa[j]) for j in range(batch * num)]
    for b in range(batch):
        term(b, in_batch, True)
    if bank is not None and bank.shape[0] > 0:
        assert bank_concepts is not None
        entries = [(unit(bank.detach()[m]), int(bank_concepts[m])) for m in range(bank.shape[0])]
        for b in range(batch):
            term(b, entries, False)
    return torch.stack(terms), empty, stats


class MaxNumel(TorchDispatchMode):
    """Records the largest element count of any tensor an op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for leaf in tree_leaves(out):
            if isinstance(leaf, Tensor):
                self.max_numel = max(self.max_numel, leaf.numel())
        return out


class CountOps(TorchDispatchMode):
    """Counts the calls of the aten ops whose name starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if str(func).startswith(self.prefix + ".") or str(func) == self.prefix:
            self.count += 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------------------------------
# grid_sample_tokens
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "channels", "height", "width", "window"),
    [(2, 5, 8, 8, 4), (3, 4, 10, 7, 4), (1, 3, 9, 13, 3), (2, 2, 5, 6, 1), (2, 6, 23, 23, 4)],
)
def test_grid_sample_matches_literal(
    batch: int, channels: int, height: int, width: int, window: int
) -> None:
    gen = torch.Generator().manual_seed(batch * 100 + height)
    features = torch.randn(batch, channels, height, width, generator=gen)
    tokens, index = grid_sample_tokens(features, window=window, generator=gen)
    cells = (height // window) * (width // window)
    assert tokens.shape == (batch, cells, channels)
    assert index.shape == (batch, cells) and index.dtype == torch.long
    assert int(index.min()) >= 0 and int(index.max()) < window * window
    torch.testing.assert_close(tokens, literal_grid_sample(features, window, index), rtol=0, atol=0)


def test_grid_sample_drops_leftovers_and_reuses_index() -> None:
    batch, height, width, window = 2, 11, 6, 4  # 3 leftover rows, 2 leftover columns
    rows = torch.arange(height).view(1, 1, height, 1).expand(batch, 1, height, width)
    cols = torch.arange(width).view(1, 1, 1, width).expand(batch, 1, height, width)
    coords = torch.cat([rows, cols], dim=1).float()  # B 2 h w: each token knows its position
    sampled, index = grid_sample_tokens(coords, window=window)
    assert sampled.shape == (batch, 2, 2)
    assert int(sampled[..., 0].max()) < 8 and int(sampled[..., 1].max()) < 4
    for cell in range(2):  # a 2x1 grid of cells: cell c covers rows 4c..4c+3, columns 0..3
        assert torch.all(sampled[:, cell, 0] // window == cell)
        assert torch.all(sampled[:, cell, 1] < window)
    expected_rows = torch.arange(2) * window + index // window
    expected_cols = index % window
    torch.testing.assert_close(sampled[..., 0].long(), expected_rows)
    torch.testing.assert_close(sampled[..., 1].long(), expected_cols)
    # Reusing the index on a map with another channel count samples the same positions.
    wide = torch.randn(batch, 7, height, width)
    again, same = grid_sample_tokens(wide, window=window, index=index)
    assert torch.equal(same, index)
    torch.testing.assert_close(again, literal_grid_sample(wide, window, index), rtol=0, atol=0)
    repeat, _ = grid_sample_tokens(coords, window=window, index=index)
    assert torch.equal(repeat, sampled)


def test_grid_sample_random_draw_independent_and_seeded() -> None:
    features = torch.randn(4, 3, 40, 40)
    _, first = grid_sample_tokens(features, generator=torch.Generator().manual_seed(3))
    _, second = grid_sample_tokens(features, generator=torch.Generator().manual_seed(3))
    _, other = grid_sample_tokens(features, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    # Every image draws its own offsets, and cells differ within an image.
    assert not torch.equal(first[0], first[1])
    assert first[0].unique().numel() > 8
    # Global RNG path.
    torch.manual_seed(11)
    _, global_a = grid_sample_tokens(features)
    torch.manual_seed(11)
    _, global_b = grid_sample_tokens(features)
    assert torch.equal(global_a, global_b)


def test_grid_sample_index_is_the_draw_of_grid_sample_tokens() -> None:
    features = torch.randn(3, 2, 13, 9)
    _, drawn = grid_sample_tokens(features, window=4, generator=torch.Generator().manual_seed(5))
    index = grid_sample_index(3, 13, 9, 4, generator=torch.Generator().manual_seed(5))
    assert index.shape == (3, 6) and index.dtype == torch.long
    assert torch.equal(index, drawn)
    assert int(index.min()) >= 0 and int(index.max()) < 16
    with pytest.raises(ValueError, match="smaller than one"):
        grid_sample_index(1, 3, 8, 4)


def test_grid_sample_index_rows_do_not_depend_on_how_the_batch_is_split() -> None:
    # A data-parallel process draws for the global batch and keeps its rows (global j*W + r):
    # every image gets the offsets of the one-process draw, whatever the world size.
    whole = grid_sample_index(8, 16, 16, 4, generator=torch.Generator().manual_seed(9))
    for world in (2, 4):
        shards = [
            grid_sample_index(8, 16, 16, 4, generator=torch.Generator().manual_seed(9))[rank::world]
            for rank in range(world)
        ]
        rebuilt = torch.stack(shards, dim=1).flatten(0, 1)  # local j of rank r -> j * W + r
        assert torch.equal(rebuilt, whole)


def test_grid_sample_gradient_reaches_sampled_positions() -> None:
    features = torch.randn(2, 3, 8, 12, requires_grad=True)
    tokens, index = grid_sample_tokens(features, window=4)
    tokens.sum().backward()
    expected = torch.zeros(2, 3, 8, 12)
    for b in range(2):
        for cell in range(6):
            t = int(index[b, cell])
            r, c = (cell // 3) * 4 + t // 4, (cell % 3) * 4 + t % 4
            expected[b, :, r, c] = 1
    torch.testing.assert_close(features.grad, expected)


def test_grid_sample_errors() -> None:
    with pytest.raises(ValueError, match="smaller than one"):
        grid_sample_tokens(torch.randn(1, 2, 3, 8), window=4)
    with pytest.raises(ValueError, match="index has shape"):
        grid_sample_tokens(torch.randn(1, 2, 8, 8), index=torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        grid_sample_tokens(torch.randn(1, 2, 8, 8), index=torch.full((1, 4), 16))
    with pytest.raises(ValueError, match=r"\[B, C, h, w\]"):
        grid_sample_tokens(torch.randn(2, 8, 8))


# --------------------------------------------------------------------------------------------------
# nearest_concept
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_concept_matches_literal(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64)
    # Rows of very different norms: cosine, not dot product, must decide.
    clusterbook = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    clusterbook = clusterbook * torch.logspace(-2, 2, 9, dtype=torch.float64)[:, None]
    got = nearest_concept(tokens, clusterbook)
    assert got.dtype == torch.long and got.shape == (2, 7)
    assert torch.equal(got, literal_nearest(tokens, clusterbook))
    assert not torch.equal(got, (tokens @ clusterbook.T).argmax(-1))


def test_nearest_concept_dim_mismatch() -> None:
    with pytest.raises(ValueError, match="clusterbook dim 4 != token dim 5"):
        nearest_concept(torch.randn(1, 3, 5), torch.randn(6, 4))


# --------------------------------------------------------------------------------------------------
# modularity_loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "batch", "num", "concepts", "dim", "tau"),
    [(0, 2, 6, 5, 4, 0.1), (1, 3, 9, 17, 8, 0.1), (2, 1, 12, 33, 6, 0.05), (3, 4, 5, 2, 3, 0.3)],
)
def test_modularity_matches_brute_force_float64(
    seed: int, batch: int, num: int, concepts: int, dim: int, tau: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, num, dim, generator=gen, dtype=torch.float64)
    tokens[:, :, 0] += 0.5  # enough positive affinities for a non-trivial graph
    protos = torch.randn(concepts, dim, generator=gen, dtype=torch.float64)
    mine_p = protos.clone().requires_grad_(True)
    ref_p = protos.clone().requires_grad_(True)
    mine = modularity_loss(tokens, mine_p, temperature=tau, chunk_size=3)
    ref = literal_modularity(tokens, ref_p, tau)
    mine.backward()
    ref.backward()
    assert mine.dtype == torch.float64
    torch.testing.assert_close(mine, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mine_p.grad, ref_p.grad, rtol=1e-8, atol=1e-12)
    assert ref_p.grad.abs().max() > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_modularity_matches_brute_force_float32(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(3, 20, 16, generator=gen)
    protos = (torch.rand(64, 16, generator=gen) * 2 - 1) / 64  # stage-1 initialisation
    mine_p = protos.clone().requires_grad_(True)
    ref_p = protos.double().requires_grad_(True)
    mine = modularity_loss(tokens, mine_p)
    ref = literal_modularity(tokens.double(), ref_p, 0.1)
    mine.backward()
    ref.backward()
    assert mine.dtype == torch.float32
    assert abs(mine.item() - ref.item()) <= 1e-5 * abs(ref.item())
    scale = ref_p.grad.abs().max().item()
    torch.testing.assert_close(mine_p.grad.double(), ref_p.grad, rtol=1e-4, atol=1e-5 * scale)


def test_modularity_includes_diagonal_terms() -> None:
    # With the diagonal dropped, Q would differ by sum_i (-d_i^2 / e) tanh(max_k S_ik^2 / τ) / e.
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(1, 6, 4, generator=gen, dtype=torch.float64) + 0.3
    protos = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    x = F.normalize(tokens[0], dim=-1)
    c = F.normalize(protos, dim=-1)
    affinity = torch.relu(x @ x.T).fill_diagonal_(0)
    degree, total = affinity.sum(1), affinity.sum()
    assign = torch.relu(x @ c.T)
    diag = (-(degree**2) / total * torch.tanh((assign**2).amax(1) / 0.1)).sum() / total
    assert diag.abs() > 1e-3
    full = literal_modularity(tokens, protos, 0.1)
    assert full.abs() > 1e-3
    torch.testing.assert_close(modularity_loss(tokens, protos), full, rtol=1e-10, atol=0)


def test_modularity_chunk_invariant_and_tokens_constant() -> None:
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randn(2, 10, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(23, 6, generator=gen, dtype=torch.float64)
    results = []
    for chunk in (1, 4, 7, 23, 100, None):
        p = protos.clone().requires_grad_(True)
        loss = modularity_loss(tokens, p, chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), p.grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-14, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-15)
    assert tokens.grad is None


def test_modularity_never_builds_bknn() -> None:
    batch, num, concepts, dim, chunk = 2, 24, 48, 8, 4
    tokens = torch.randn(batch, num, dim)
    protos = torch.randn(concepts, dim, requires_grad=True)
    with MaxNumel() as probe:
        modularity_loss(tokens, protos, chunk_size=chunk).backward()
    assert any("threshold_backward" in op for op in probe.ops)  # the backward pass was observed
    assert probe.max_numel <= batch * num * num * chunk < batch * concepts * num * num
    # The probe is sensitive: the brute-force form does allocate [B, K, N, N].
    with MaxNumel() as brute:
        literal_modularity(tokens, protos, 0.1).backward()
    assert brute.max_numel >= batch * concepts * num * num


def test_modularity_default_chunk_respects_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 3000
    monkeypatch.setattr(modularity, "_MODULARITY_CHUNK_ELEMENTS", budget)
    batch, num, concepts = 2, 20, 64  # one concept block of pairs = 800 elements -> chunk 3
    tokens = torch.randn(batch, num, 5, dtype=torch.float64)
    protos = torch.randn(concepts, 5, dtype=torch.float64, requires_grad=True)
    with MaxNumel() as probe:
        loss = modularity_loss(tokens, protos)
        loss.backward()
    assert probe.max_numel <= budget
    torch.testing.assert_close(loss, literal_modularity(tokens, protos, 0.1), rtol=1e-12, atol=0)


def test_modularity_reference_size_blocks_stay_small() -> None:
    # Stage-1 sizes (B = 16 images, N = 100 sampled tokens, K = 2048 concepts): the literal
    # [B, K, N, N] tensor would hold 327M elements (1.3 GB in float32).
    batch, num, concepts = 16, 100, 2048
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, num, 8, generator=gen)
    protos = ((torch.rand(concepts, 8, generator=gen) * 2 - 1) / concepts).requires_grad_(True)
    with MaxNumel() as probe:
        loss = modularity_loss(tokens, protos)
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(protos.grad).all()
    assert probe.max_numel <= modularity._MODULARITY_CHUNK_ELEMENTS
    assert probe.max_numel * 4 < 64 * 2**20  # largest single tensor well under 1 GB


def test_modularity_edge_cases_and_errors() -> None:
    # One token per image: no edges, Q = 0 (the literal formula would give 0/0).
    loss = modularity_loss(torch.randn(3, 1, 4), torch.randn(5, 4, requires_grad=True))
    assert torch.isfinite(loss) and loss.item() == 0.0
    with pytest.raises(ValueError, match="prototypes dim 3 != token dim 4"):
        modularity_loss(torch.randn(1, 5, 4), torch.randn(6, 3))
    with pytest.raises(ValueError, match="temperature"):
        modularity_loss(torch.randn(1, 5, 4), torch.randn(6, 4), temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        modularity_loss(torch.randn(1, 5, 4), torch.randn(6, 4), chunk_size=0)


def test_modularity_under_autocast_is_full_precision() -> None:
    tokens = torch.randn(2, 12, 8)
    protos = torch.randn(16, 8)
    plain = modularity_loss(tokens, protos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = modularity_loss(tokens, protos)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


# --------------------------------------------------------------------------------------------------
# concept_contrastive_terms / concept_contrastive_loss
# --------------------------------------------------------------------------------------------------


def _random_case(
    seed: int, batch: int, num: int, concepts: int, dim: int, proj: int, bank_size: int
) -> dict[str, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    case: dict[str, Tensor | None] = {
        "tokens": torch.randn(batch, num, dim, **kw),
        "student": torch.randn(batch, num, proj, **kw),
        "teacher": torch.randn(batch, num, proj, **kw),
        "clusterbook": torch.randn(concepts, dim, **kw) * 3,
        "bank": None,
        "bank_concepts": None,
    }
    if bank_size >= 0:
        case["bank"] = torch.randn(bank_size, proj, **kw) * 2
        case["bank_concepts"] = torch.randint(0, concepts, (bank_size,), generator=gen)
    return case


def _run_both(case: dict[str, Tensor | None], **kw: float) -> None:
    student = case["student"]
    assert student is not None
    mine_s = student.clone().requires_grad_(True)
    ref_s = student.clone().requires_grad_(True)
    teacher = case["teacher"].clone().requires_grad_(True)  # type: ignore[union-attr]
    args = (
        case["tokens"],
        mine_s,
        teacher,
        case["clusterbook"],
        case["bank"],
        case["bank_concepts"],
    )
    terms, empty = concept_contrastive_terms(*args, **kw)
    ref_terms, ref_empty, stats = literal_contrastive(
        case["tokens"],  # type: ignore[arg-type]
        ref_s,
        case["teacher"],  # type: ignore[arg-type]
        case["clusterbook"],  # type: ignore[arg-type]
        case["bank"],
        case["bank_concepts"],
        **kw,
    )
    assert stats["pos"] > 0 and stats["neg"] > 0
    assert terms.shape == ref_terms.shape and empty.tolist() == ref_empty
    torch.testing.assert_close(terms, ref_terms, rtol=1e-10, atol=1e-12)
    loss = concept_contrastive_loss(*args, **kw)
    torch.testing.assert_close(loss, terms.mean())
    loss.backward()
    ref_terms.mean().backward()
    torch.testing.assert_close(mine_s.grad, ref_s.grad, rtol=1e-8, atol=1e-12)
    assert teacher.grad is None


@pytest.mark.parametrize(
    ("seed", "batch", "num", "concepts", "bank_size"),
    [(0, 2, 5, 6, -1), (1, 3, 4, 8, 0), (4, 2, 6, 5, 9), (3, 1, 7, 7, 12), (4, 3, 3, 10, 4)],
)
def test_contrastive_matches_literal(
    seed: int, batch: int, num: int, concepts: int, bank_size: int
) -> None:
    case = _random_case(seed, batch, num, concepts, dim=3, proj=5, bank_size=bank_size)
    _, _, stats = literal_contrastive(**case)  # type: ignore[arg-type]
    assert stats["mid"] > 0  # the random concepts also produce ignored pairs
    _run_both(case)


def test_contrastive_matches_literal_with_empty_terms() -> None:
    # Few tokens per image and a 2-entry bank: some in-batch and some bank terms have no positive.
    case = _random_case(8, 4, 2, 12, dim=3, proj=5, bank_size=2)
    _, empty, _ = literal_contrastive(**case)  # type: ignore[arg-type]
    assert any(empty[:4]) and any(empty[4:]) and not all(empty)
    _run_both(case)


def test_contrastive_other_thresholds_and_temperature() -> None:
    case = _random_case(8, 2, 5, 9, dim=3, proj=4, bank_size=6)
    _run_both(case, temperature=0.2, pos_thresh=0.5, neg_thresh=-0.2)


def test_contrastive_term_counts() -> None:
    case = _random_case(0, 3, 4, 6, dim=3, proj=5, bank_size=-1)
    terms, empty = concept_contrastive_terms(**case)  # type: ignore[arg-type]
    assert terms.shape == (3,) and empty.shape == (3,) and empty.dtype == torch.bool
    case["bank"] = torch.empty(0, 5, dtype=torch.float64)
    case["bank_concepts"] = torch.empty(0, dtype=torch.long)
    terms_empty_bank, _ = concept_contrastive_terms(**case)  # type: ignore[arg-type]
    torch.testing.assert_close(terms_empty_bank, terms)
    case["bank"] = torch.randn(4, 5, dtype=torch.float64)
    case["bank_concepts"] = torch.tensor([0, 1, 2, 3])
    terms_bank, empty_bank = concept_contrastive_terms(**case)  # type: ignore[arg-type]
    assert terms_bank.shape == (6,) and empty_bank.shape == (6,)
    torch.testing.assert_close(terms_bank[:3], terms)


def _one_hot_case() -> dict[str, Tensor]:
    """Orthogonal concepts: s = 1 for the same concept, 0 otherwise."""
    clusterbook = torch.eye(6, dtype=torch.float64)
    concepts = torch.tensor([[0, 1], [2, 2]])  # image 0: two unique concepts; image 1: concept 2
    tokens = clusterbook[concepts] + 0.01 * torch.randn(2, 2, 6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    return {
        "tokens": tokens,
        "student": torch.randn(2, 2, 4, generator=gen, dtype=torch.float64),
        "teacher": torch.randn(2, 2, 4, generator=gen, dtype=torch.float64),
        "clusterbook": clusterbook,
        "bank": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "bank_concepts": torch.tensor([2, 3, 3]),
    }


def test_contrastive_empty_terms_count_as_zero() -> None:
    case = _one_hot_case()
    student = case["student"].clone().requires_grad_(True)
    terms, empty = concept_contrastive_terms(
        case["tokens"],
        student,
        case["teacher"],
        case["clusterbook"],
        case["bank"],
        case["bank_concepts"],
    )
    # In-batch: image 0 has no positive (its concepts are unique); image 1 has one pair per anchor.
    # Bank: image 0 has no entry of concepts 0/1; image 1 matches the concept-2 entry.
    assert empty.tolist() == [True, False, True, False]
    assert terms[0].item() == 0.0 and terms[2].item() == 0.0
    assert torch.isfinite(terms).all()
    loss = terms.mean()
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[0].abs().max() == 0  # empty terms back-propagate nothing
    assert student.grad[1].abs().max() > 0
    ref_s = case["student"].clone().requires_grad_(True)
    ref_terms, ref_empty, _ = literal_contrastive(
        case["tokens"],
        ref_s,
        case["teacher"],
        case["clusterbook"],
        case["bank"],
        case["bank_concepts"],
    )
    assert ref_empty == empty.tolist()
    torch.testing.assert_close(terms, ref_terms)
    ref_terms.mean().backward()  # denominator 2B = 4, empty terms included
    torch.testing.assert_close(student.grad, ref_s.grad)


def test_contrastive_self_pair_removed() -> None:
    clusterbook = torch.eye(3, dtype=torch.float64)
    tokens = clusterbook[torch.tensor([[0, 0, 1]])]  # B=1, N=3
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(1, 3, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(1, 3, 4, generator=gen, dtype=torch.float64)
    terms, empty = concept_contrastive_terms(tokens, student, teacher, clusterbook, temperature=0.1)
    zs, zt = F.normalize(student[0], dim=-1), F.normalize(teacher[0], dim=-1)
    logit = zs @ zt.T / 0.1
    # Anchor 0: positive {1}, negative {2}; anchor 1: positive {0}, negative {2}; anchor 2: none.
    l0 = -logit[0, 1] + torch.logsumexp(logit[0, [1, 2]], 0)
    l1 = -logit[1, 0] + torch.logsumexp(logit[1, [0, 2]], 0)
    torch.testing.assert_close(terms, ((l0 + l1) / 2).view(1))
    assert empty.tolist() == [False]
    # A single token has only its own copy as candidate: empty term.
    one, one_empty = concept_contrastive_terms(
        tokens[:, :1], student[:, :1], teacher[:, :1], clusterbook
    )
    assert one_empty.tolist() == [True] and one.item() == 0.0


def test_contrastive_bank_has_no_self_exclusion() -> None:
    # The anchor's own teacher copy placed in the bank is a positive there.
    clusterbook = torch.eye(3, dtype=torch.float64)
    tokens = clusterbook[torch.tensor([[0, 1]])]
    gen = torch.Generator().manual_seed(3)
    student = torch.randn(1, 2, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(1, 2, 4, generator=gen, dtype=torch.float64)
    bank = teacher[0].clone()
    terms, empty = concept_contrastive_terms(
        tokens, student, teacher, clusterbook, bank, torch.tensor([0, 1]), temperature=0.1
    )
    assert empty.tolist() == [True, False]
    logit = F.normalize(student[0], dim=-1) @ F.normalize(bank, dim=-1).T / 0.1
    expected = (torch.logsumexp(logit, 1) - logit.diagonal()).mean()
    torch.testing.assert_close(terms[1], expected)


@pytest.mark.parametrize(("seed", "bank_size"), [(0, -1), (2, 7), (8, 2)])
def test_contrastive_anchor_subset_equals_rows_of_the_whole_batch(
    seed: int, bank_size: int
) -> None:
    # Rank r of a 2-process run holds images r, r + 2, ... of a 4-image global batch as anchors and
    # the whole batch as in-batch candidates; its terms are those rows of the one-process terms.
    case = _random_case(seed, 4, 3, 12 if seed == 8 else 6, dim=3, proj=5, bank_size=bank_size)
    ref_terms, ref_empty, _ = literal_contrastive(**case)  # type: ignore[arg-type]
    whole = 4
    for rank in range(2):
        rows = torch.arange(rank, whole, 2)
        student = case["student"][rows]  # type: ignore[index]
        terms, empty = concept_contrastive_terms(
            case["tokens"],  # type: ignore[arg-type]
            student,
            case["teacher"],  # type: ignore[arg-type]
            case["clusterbook"],  # type: ignore[arg-type]
            case["bank"],
            case["bank_concepts"],
            anchor_index=rows,
        )
        picked = rows if len(ref_terms) == whole else torch.cat([rows, rows + whole])
        torch.testing.assert_close(terms, ref_terms[picked], rtol=1e-10, atol=1e-12)
        assert empty.tolist() == [ref_empty[i] for i in picked.tolist()]


@pytest.mark.parametrize("bank_size", [-1, 6])
def test_contrastive_data_parallel_gradient_equals_one_process(bank_size: int) -> None:
    # DDP averages the gradients of the per-process losses (each the mean of its B or 2B terms).
    # With equal shards this equals the gradient of the mean over the 2 x global terms.
    case = _random_case(4, 4, 3, 6, dim=3, proj=5, bank_size=bank_size)
    inputs = torch.randn(4, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def gradient(rows: Tensor | None) -> Tensor:
        weight = torch.linspace(-1, 1, 30, dtype=torch.float64).view(6, 5).requires_grad_(True)
        student = inputs @ weight  # B N P: a per-token head shared by all processes
        if rows is not None:
            student = student[rows]
        loss = concept_contrastive_loss(
            case["tokens"],  # type: ignore[arg-type]
            student,
            case["teacher"],  # type: ignore[arg-type]
            case["clusterbook"],  # type: ignore[arg-type]
            case["bank"],
            case["bank_concepts"],
            anchor_index=rows,
        )
        loss.backward()
        return weight.grad  # type: ignore[return-value]

    one_process = gradient(None)
    averaged = (gradient(torch.tensor([0, 2])) + gradient(torch.tensor([1, 3]))) / 2
    torch.testing.assert_close(averaged, one_process, rtol=1e-10, atol=1e-13)
    assert one_process.abs().max() > 1e-3


def test_contrastive_anchor_index_validation() -> None:
    case = _random_case(0, 4, 3, 4, dim=3, proj=5, bank_size=-1)
    tokens, teacher, book = case["tokens"], case["teacher"], case["clusterbook"]
    assert tokens is not None and teacher is not None and book is not None
    student = teacher[:2].clone()

    def call(anchor_index: Tensor | None, anchors: Tensor = student) -> None:
        concept_contrastive_terms(tokens, anchors, teacher, book, anchor_index=anchor_index)

    with pytest.raises(ValueError, match="same shape"):
        call(None)
    with pytest.raises(ValueError, match=r"anchor_index must be \[B\]"):
        call(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        call(torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="integer"):
        call(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"agree on \[N, P\]"):
        call(torch.tensor([0, 1]), student[:, :, :4])
    call(torch.tensor([3, 0]))


def _inputs(case: dict[str, Tensor | None], student: Tensor) -> tuple[Any, ...]:
    """Positional inputs of the loss for ``case`` with ``student`` in place of its own."""
    keys = ("tokens", "teacher", "clusterbook", "bank", "bank_concepts")
    tokens, teacher, book, bank, concepts = (case[k] for k in keys)
    return tokens, student, teacher, book, bank, concepts


# Bytes per [anchor, candidate] pair of a float64 block: the product, the negated positive
# indicator and the denominator mask.
_PAIR_BYTES = 8 + 8 + 1


@pytest.mark.parametrize("rows_per_block", [1, 2, 5])
def test_contrastive_blocks_equal_one_block(rows_per_block: int) -> None:
    case = _random_case(5, 3, 6, 8, dim=3, proj=5, bank_size=40)

    def run(memory_bytes: int) -> tuple[Tensor, Tensor, Tensor]:
        student = case["student"].clone().requires_grad_(True)  # type: ignore[union-attr]
        terms, empty = concept_contrastive_terms(*_inputs(case, student), memory_bytes=memory_bytes)
        terms.mean().backward()
        return terms.detach(), empty, student.grad  # type: ignore[return-value]

    whole = run(1 << 30)
    with MaxNumel() as probe:
        blocked = run(rows_per_block * 40 * _PAIR_BYTES)
    assert any("exp" in op for op in probe.ops)
    assert probe.max_numel < 18 * 40  # never all anchors x all bank entries at once
    torch.testing.assert_close(blocked[0], whole[0], rtol=1e-12, atol=1e-14)
    assert torch.equal(blocked[1], whole[1])
    torch.testing.assert_close(blocked[2], whole[2], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    ("rows", "candidates", "pair_bytes", "budget", "expected"),
    [
        (1600, 204_800, 9, 1 << 30, 534),  # float32 on a CPU, full bank: 3 blocks, not 582+582+436
        (1600, 204_800, 11, 1 << 30, 400),  # bf16 products under AMP: 4 blocks of 400
        (1600, 20_480, 9, 1 << 30, 1600),  # one block whenever the budget allows it
        (18, 40, 17, 2 * 40 * 17, 2),
        (18, 18, 17, 5 * 18 * 17, 5),  # at most 5 rows: 4 blocks, balanced to 5, 5, 5, 3
        (7, 10, 1, 1, 1),  # a budget below one row still makes progress
    ],
)
def test_contrastive_blocks_are_as_large_as_the_budget_allows_and_balanced(
    rows: int, candidates: int, pair_bytes: int, budget: int, expected: int
) -> None:
    got = contrastive._block_rows(rows, candidates, pair_bytes, budget)
    assert got == expected
    assert got * candidates * pair_bytes <= max(budget, candidates * pair_bytes)
    blocks = -(-rows // got)
    assert blocks == -(-rows // max(1, min(rows, budget // (candidates * pair_bytes))))
    assert rows - (blocks - 1) * got > 0  # the last block is not empty


def test_contrastive_pair_bytes_count_the_block_working_set() -> None:
    assert contrastive._pair_bytes(torch.float32, torch.float32) == 9
    assert contrastive._pair_bytes(torch.float32, torch.bfloat16) == 11
    assert contrastive._pair_bytes(torch.float64, torch.float64) == _PAIR_BYTES


def test_contrastive_gradient_formed_in_forward_never_recomputed() -> None:
    """Each block's product runs once forward and once for the gradient, never again."""
    case = _random_case(5, 3, 6, 8, dim=3, proj=5, bank_size=40)

    def loss_of(student: Tensor) -> Tensor:
        # 2 rows per bank block: 9 blocks; 4 rows per in-batch block: 5 blocks (18 candidates)
        return concept_contrastive_loss(*_inputs(case, student), memory_bytes=2 * 40 * _PAIR_BYTES)

    student = case["student"].clone().requires_grad_(True)  # type: ignore[union-attr]
    with CountOps("aten.mm") as forward:
        loss = loss_of(student)
    with CountOps("aten.mm") as backward:
        loss.backward()
    assert backward.count == 0  # the backward pass only scales the stored row gradients
    with torch.no_grad(), CountOps("aten.mm") as no_grad:
        loss_of(case["student"])  # type: ignore[arg-type]
    # With a gradient: the logit and the gradient product of every block; without: logits only.
    assert forward.count - no_grad.count == 9 + 5


def test_contrastive_takes_known_concepts_instead_of_computing_them() -> None:
    case = _random_case(2, 3, 5, 7, dim=3, proj=5, bank_size=9)
    tokens, book = case["tokens"], case["clusterbook"]
    assert tokens is not None and book is not None

    def run(**kw: Any) -> tuple[Tensor, Tensor]:
        student = case["student"].clone().requires_grad_(True)  # type: ignore[union-attr]
        terms, _ = concept_contrastive_terms(*_inputs(case, student), **kw)
        terms.mean().backward()
        return terms.detach(), student.grad  # type: ignore[return-value]

    computed = run()
    known = nearest_concept(tokens, book).int()
    with CountOps("aten.argmax") as lookups:
        given = run(concepts=known)
    assert lookups.count == 0  # no nearest-concept search of its own
    assert torch.equal(given[0], computed[0]) and torch.equal(given[1], computed[1])
    other = run(concepts=torch.zeros(tokens.shape[:2], dtype=torch.long))  # all one concept
    assert not torch.equal(other[0], computed[0])
    with pytest.raises(ValueError, match=r"concepts must be \[G, N\]"):
        run(concepts=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        run(concepts=torch.zeros(tokens.shape[:2]))
    with pytest.raises(ValueError, match=r"lie in \[0, 7\)"):
        run(concepts=torch.full(tokens.shape[:2], 7))


def test_contrastive_float32_and_autocast() -> None:
    case = _random_case(6, 2, 8, 6, dim=4, proj=16, bank_size=10)
    f32 = {
        k: (v.float() if v is not None and v.is_floating_point() else v) for k, v in case.items()
    }
    ref, _ = concept_contrastive_terms(**case)  # type: ignore[arg-type]
    got, _ = concept_contrastive_terms(**f32)  # type: ignore[arg-type]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = concept_contrastive_terms(**f32)  # type: ignore[arg-type]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, got)
    # A bank stored in half precision (teacher projections under AMP) is compared in float32.
    half = dict(f32, bank=f32["bank"].half())  # type: ignore[union-attr]
    from_half, _ = concept_contrastive_terms(**half)  # type: ignore[arg-type]
    assert from_half.dtype == torch.float32
    torch.testing.assert_close(from_half, got, rtol=1e-2, atol=1e-2)


def test_contrastive_validation() -> None:
    case = _random_case(0, 2, 3, 4, dim=3, proj=5, bank_size=3)
    base = (case["tokens"], case["student"], case["teacher"])
    with pytest.raises(ValueError, match="clusterbook dim 2 != token dim 3"):
        concept_contrastive_terms(*base, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="same shape"):
        concept_contrastive_terms(
            case["tokens"], case["student"], case["teacher"][:, :, :4], case["clusterbook"]
        )
    with pytest.raises(ValueError, match="disagree on"):
        concept_contrastive_terms(
            case["tokens"][:, :2], case["student"], case["teacher"], case["clusterbook"]
        )
    with pytest.raises(ValueError, match="go together"):
        concept_contrastive_terms(*base, case["clusterbook"], case["bank"])
    with pytest.raises(ValueError, match=r"bank must be \[M, 5\]"):
        concept_contrastive_terms(
            *base, case["clusterbook"], torch.randn(3, 4), case["bank_concepts"]
        )
    with pytest.raises(ValueError, match="bank_concepts must lie"):
        concept_contrastive_terms(*base, case["clusterbook"], case["bank"], torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="temperature"):
        concept_contrastive_terms(*base, case["clusterbook"], temperature=0.0)


def test_contrastive_reference_scale_runs() -> None:
    # B = 16 images x N = 100 sampled tokens, K = 2048 concepts, a bank: finite, shaped, quick.
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(16, 100, 32, generator=gen)
    student = torch.randn(16, 100, 64, generator=gen, requires_grad=True)
    teacher = torch.randn(16, 100, 64, generator=gen)
    clusterbook = torch.randn(2048, 32, generator=gen)
    bank = torch.randn(3000, 64, generator=gen)
    bank_concepts = torch.randint(0, 2048, (3000,), generator=gen)
    terms, empty = concept_contrastive_terms(
        tokens, student, teacher, clusterbook, bank, bank_concepts
    )
    assert terms.shape == (32,) and torch.isfinite(terms).all()
    terms.mean().backward()
    assert torch.isfinite(student.grad).all()
    assert math.isfinite(float(empty.sum()))


@pytest.mark.parametrize("device", DEVICES)
def test_ops_device_agnostic(device: str) -> None:
    case = _random_case(9, 2, 6, 8, dim=4, proj=6, bank_size=7)
    moved = {k: (v.to(device) if v is not None else v) for k, v in case.items()}
    ref, ref_empty = concept_contrastive_terms(**case)  # type: ignore[arg-type]
    got, got_empty = concept_contrastive_terms(**moved)  # type: ignore[arg-type]
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), ref)
    assert torch.equal(got_empty.cpu(), ref_empty)
    tokens, protos = case["tokens"], case["clusterbook"]
    assert tokens is not None and protos is not None
    torch.testing.assert_close(
        modularity_loss(tokens.to(device), protos.to(device)).cpu(),
        literal_modularity(tokens, protos, 0.1),
    )
    features = torch.randn(2, 5, 9, 10, dtype=torch.float64)
    sampled, index = grid_sample_tokens(features.to(device))
    assert sampled.device.type == device and index.device.type == device
    torch.testing.assert_close(sampled.cpu(), literal_grid_sample(features, 4, index.cpu()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contrastive_half_precision_products_stay_close_to_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    tokens, clusterbook = torch.randn(3, 12, 8), torch.randn(10, 8)
    teacher, bank = torch.randn(3, 12, 16), torch.randn(40, 16)
    bank_concepts = torch.randint(10, (40,))
    results = {}
    for product in (None, dtype):
        student = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(0))
        student.requires_grad_(True)
        loss = concept_contrastive_loss(
            tokens, student, teacher, clusterbook, bank, bank_concepts, matmul_dtype=product
        )
        loss.backward()
        results[product] = (loss.detach(), student.grad)
    (exact, exact_grad), (half, half_grad) = results[None], results[dtype]
    assert half.dtype == torch.float32  # only the products are in half precision
    assert not torch.equal(exact, half)  # the dtype is really used
    torch.testing.assert_close(half, exact, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(half_grad, exact_grad, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contrastive_half_products_of_huge_projections_stay_finite(dtype: torch.dtype) -> None:
    """Projections are normalised before the cast: a norm above float16's 65,504 cannot overflow."""
    torch.manual_seed(4)
    tokens, clusterbook = torch.randn(2, 9, 8), torch.randn(6, 8)
    teacher, bank = torch.randn(2, 9, 16) * 1e6, torch.randn(30, 16) * 1e6
    bank_concepts = torch.randint(6, (30,))
    student = (torch.randn(2, 9, 16) * 1e6).requires_grad_(True)
    loss = concept_contrastive_loss(
        tokens, student, teacher, clusterbook, bank, bank_concepts, matmul_dtype=dtype
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    exact = concept_contrastive_loss(
        tokens, student.detach(), teacher / 1e6, clusterbook, bank / 1e6, bank_concepts
    )
    torch.testing.assert_close(loss.detach(), exact, rtol=2e-2, atol=2e-2)
    # A bank already held normalised in the product dtype is used as it is.
    stored = F.normalize(bank, dim=-1).to(dtype)
    same = concept_contrastive_loss(
        tokens, student.detach(), teacher, clusterbook, stored, bank_concepts, matmul_dtype=dtype
    )
    torch.testing.assert_close(same, loss.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_losses_of_half_precision_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    tokens, clusterbook = torch.randn(2, 9, 8), torch.randn(6, 8)
    student, teacher = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    half = [t.to(dtype) for t in (tokens, student, teacher, clusterbook)]
    terms, _ = concept_contrastive_terms(*half)
    assert terms.dtype == torch.float32
    ref, _ = concept_contrastive_terms(*[t.float() for t in half])
    torch.testing.assert_close(terms, ref)
    loss = modularity_loss(half[0], half[3])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, modularity_loss(half[0].float(), half[3].float()))
    assert torch.equal(
        nearest_concept(half[0], half[3]),
        nearest_concept(tokens.to(dtype).float(), clusterbook.to(dtype).float()),
    )
