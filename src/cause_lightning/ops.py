"""Pure tensor operations of CAUSE (docs/method.md §3, §4.2, §5.6; docs/api.md, ``ops``).

* :func:`grid_sample_tokens`: one token per non-overlapping ``window x window`` cell (method §3);
  :func:`grid_sample_index` draws its offsets.
* :func:`nearest_concept`: cosine nearest clusterbook row of every token.
* :func:`modularity_loss`: minus the batch mean of the soft graph modularity (method §4.2), computed
  with the monotonic-tanh identity and a chunked running maximum, so no ``[B, K, N, N]`` tensor is
  ever built.
* :func:`concept_contrastive_terms` / :func:`concept_contrastive_loss`: the concept-wise InfoNCE of
  stage 2 (method §5.6), in-batch term plus concept-bank term.

The losses run in at least float32 with autocast disabled: similarity logits and graph weights are
accumulated in full precision whatever the caller's AMP setting, which keeps them equal to the
literal formulas. Products that feed a threshold, an argmax or a maximum run at the ``"highest"``
float32 matmul precision (:func:`exact_matmul`) whatever the process-wide setting.
Nothing here touches Lightning, I/O or a specific device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from cause_lightning.logs import get_logger

__all__ = [
    "concept_contrastive_loss",
    "concept_contrastive_terms",
    "contrastive_mean",
    "exact_matmul",
    "grid_sample_index",
    "grid_sample_tokens",
    "modularity_loss",
    "nearest_concept",
]

log = get_logger(__name__)

# Element budget of one [B, chunk, N, N] block of pairwise products in `modularity_loss`
# (8M float32 = 32 MiB); the default chunk over concepts is derived from it.
_MODULARITY_CHUNK_ELEMENTS = 1 << 23

# Default working memory of one block of anchor rows in the contrastive loss (the training config
# sets its own, `method.head.contrastive_memory_mb`).
DEFAULT_CONTRASTIVE_MEMORY_BYTES = 1 << 30


# Element budget of one [rows, K] similarity block in `nearest_concept`.
_NEAREST_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Floating dtype at least as wide as float32 that all ``tensors`` promote to."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        return torch.float32
    return dtype


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Full-precision float32 matmuls (no TF32 / reduced-precision inner products) inside.

    The backbone may run with ``torch.set_float32_matmul_precision("high")``; the products whose
    results go through a threshold, an argmax or a maximum (concept similarities, nearest concepts,
    the modularity's concept assignment) are computed at ``"highest"`` so that those decisions do
    not move with the accelerator's matmul mode. The setting is process-wide host state; it is
    restored on exit.
    """
    previous = torch.get_float32_matmul_precision()
    if previous == "highest":
        yield
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _check_tokens(tokens: Tensor, name: str = "tokens") -> None:
    if tokens.dim() != 3:
        raise ValueError(
            f"{name} must be a token set [B, N, D], got shape {tuple(tokens.shape)}; "
            "flatten a feature map with `features.flatten(2).transpose(1, 2)` or grid-sample it "
            "with `grid_sample_tokens`."
        )


def _check_codebook(codebook: Tensor, dim: int, name: str) -> None:
    if codebook.dim() != 2:
        raise ValueError(f"{name} must be [K, D], got shape {tuple(codebook.shape)}.")
    if codebook.shape[0] == 0:
        raise ValueError(f"{name} is empty (K = 0); it needs at least one row.")
    if codebook.shape[1] != dim:
        raise ValueError(
            f"{name} dim {codebook.shape[1]} != token dim {dim}: the {name} must live in the "
            "same feature space as the tokens (was it built for another backbone?)."
        )


# --------------------------------------------------------------------------------------------------
# grid sampling (method §3)
# --------------------------------------------------------------------------------------------------


def grid_sample_index(
    batch: int,
    height: int,
    width: int,
    window: int = 4,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw the grid-sampling offsets of :func:`grid_sample_tokens` for a batch of feature maps.

    One offset per ``window x window`` cell of every image, uniform in ``[0, window**2)`` and
    independent (method §3). Row ``b`` is image ``b``: drawing for a larger batch and keeping some
    rows gives those images the same offsets as the full draw, which is how the stages make the
    sampling of an image independent of the number of processes (docs/scaling.md).

    Args:
        batch: Number of images ``B``.
        height: Feature-grid height ``h``.
        width: Feature-grid width ``w``.
        window: Cell side length.
        generator: Random generator of the draw (the global RNG of ``device`` when ``None``).
        device: Device of the returned index (default: the generator's device, else CPU).

    Returns:
        Long offsets ``[B, (h // window) * (w // window)]``.

    Raises:
        ValueError: On a non-positive window or a grid smaller than one cell.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    cells_h, cells_w = height // window, width // window
    if cells_h == 0 or cells_w == 0:
        raise ValueError(
            f"grid {height}x{width} is smaller than one {window}x{window} cell; use a smaller "
            "window or a larger input resolution."
        )
    target = torch.device(device) if device is not None else None
    if generator is not None:
        draw_device = generator.device
    else:
        draw_device = target if target is not None else torch.device("cpu")
    index = torch.randint(
        0, window * window, (batch, cells_h * cells_w), generator=generator, device=draw_device
    )  # B N
    return index if target is None else index.to(target)


def grid_sample_tokens(
    features: Tensor,
    window: int = 4,
    index: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor]:
    """Keep one token per non-overlapping ``window x window`` cell of a feature map.

    The ``h x w`` grid is cut into ``(h // window) x (w // window)`` cells; leftover rows at the
    bottom and columns at the right are dropped. Cell ``c`` of image ``b`` keeps the token at offset
    ``t = index[b, c]`` inside the cell, addressed row-major (row ``t // window``, column
    ``t % window``). Cells are ordered row-major. Passing the returned ``index`` again samples
    any other map of the same grid (any channel count) at the same positions.

    Args:
        features: Feature map ``[B, C, h, w]``; gradients flow back to the sampled positions.
        window: Cell side length.
        index: Long offsets ``[B, (h // window) * (w // window)]`` in ``[0, window**2)`` to reuse,
            or ``None`` to draw them uniformly and independently for every cell of every image.
        generator: Random generator for the draw when ``index`` is ``None`` (the global RNG of the
            generator's device otherwise; the features' device when no generator is given).
        validate: Check the values of a given ``index`` against ``[0, window**2)`` (reads them
            back from the device; a training step turns it off).

    Returns:
        ``(tokens [B, N, C], index [B, N])`` with ``N = (h // window) * (w // window)``; ``tokens``
        are image-major, cells row-major.

    Raises:
        ValueError: On a non-4-D input, a window larger than the grid, or a malformed ``index``.
    """
    if features.dim() != 4:
        raise ValueError(
            f"features must be a feature map [B, C, h, w], got shape {tuple(features.shape)}."
        )
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    batch, _, height, width = features.shape
    cells_h, cells_w = height // window, width // window
    if cells_h == 0 or cells_w == 0:
        raise ValueError(
            f"grid {height}x{width} is smaller than one {window}x{window} cell; use a smaller "
            "window or a larger input resolution."
        )
    num_cells = cells_h * cells_w
    cell_area = window * window

    if index is None:
        index = grid_sample_index(
            batch, height, width, window, generator=generator, device=features.device
        )
    else:
        if index.shape != (batch, num_cells):
            raise ValueError(
                f"index has shape {tuple(index.shape)} but this map needs [{batch}, {num_cells}] "
                f"(B x cells of a {height}x{width} grid with window {window}); reuse an index only "
                "on maps of the same batch and grid."
            )
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"index must be an integer tensor, got {index.dtype}.")
        index = index.to(device=features.device, dtype=torch.long)
        if validate and index.numel() and (int(index.min()) < 0 or int(index.max()) >= cell_area):
            raise ValueError(
                f"index values must lie in [0, {cell_area}) for window {window}; was the index "
                "drawn with another window?"
            )

    # Flat spatial position of the kept token of every cell.
    cell = torch.arange(num_cells, device=features.device)
    rows = (cell // cells_w) * window + index // window  # B N
    cols = (cell % cells_w) * window + index % window  # B N
    flat = rows * width + cols  # B N
    batch_ids = torch.arange(batch, device=features.device)[:, None]  # B 1
    # Advanced indexing on the [B, h*w, C] view gathers [B, N, C] without copying the whole map.
    tokens = features.flatten(2).transpose(1, 2)[batch_ids, flat]  # B N C
    return tokens, index


# --------------------------------------------------------------------------------------------------
# nearest concept
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def nearest_concept(tokens: Tensor, clusterbook: Tensor) -> Tensor:
    """Index of the most cosine-similar clusterbook row for every token.

    Args:
        tokens: Token set ``[B, N, D]``.
        clusterbook: Concept rows ``[K, D]`` (raw; normalised here).

    Returns:
        Long tensor ``[B, N]`` with values in ``[0, K)``; ties go to the lowest index.

    Raises:
        ValueError: On malformed shapes or a dim mismatch.
    """
    _check_tokens(tokens)
    _check_codebook(clusterbook, tokens.shape[-1], "clusterbook")
    batch, num_tokens, dim = tokens.shape
    dtype = _compute_dtype(tokens, clusterbook)
    with _autocast_off(tokens.device), exact_matmul():
        flat = F.normalize(tokens.reshape(batch * num_tokens, dim).to(dtype), dim=-1)  # BN D
        concepts = F.normalize(clusterbook.to(device=tokens.device, dtype=dtype), dim=-1)  # K D
        rows = max(1, _NEAREST_CHUNK_ELEMENTS // concepts.shape[0])
        out = [(part @ concepts.T).argmax(dim=-1) for part in flat.split(rows)]  # BN
    if not out:
        return torch.empty(batch, num_tokens, dtype=torch.long, device=tokens.device)
    return torch.cat(out).view(batch, num_tokens)


# --------------------------------------------------------------------------------------------------
# stage 1 / 3: soft modularity (method §4.2)
# --------------------------------------------------------------------------------------------------


def _default_modularity_chunk(batch: int, num_tokens: int, num_concepts: int) -> int:
    per_concept = max(1, batch * num_tokens * num_tokens)
    return max(1, min(num_concepts, _MODULARITY_CHUNK_ELEMENTS // per_concept))


def modularity_loss(
    tokens: Tensor,
    prototypes: Tensor,
    temperature: float = 0.1,
    chunk_size: int | None = None,
) -> Tensor:
    """Minus the batch mean of the soft modularity ``Q`` of each image's token graph.

    Per image (method §4.2): ``A = relu(x̂ x̂ᵀ)`` with a zero diagonal, ``d = A 1``,
    ``e = 1ᵀ A 1``, ``W = A - d dᵀ / e``, ``S = relu(x̂ ĉᵀ)``,
    ``δ_ij = max_k tanh(S_ik S_jk / τ)`` and ``Q = Σ_ij W_ij δ_ij / e`` including ``i = j``.

    Because ``S >= 0`` and tanh is increasing, ``δ = tanh(max_k S_ik S_jk / τ)``. The max-product
    ``G`` is found with a running maximum over chunks of concepts without gradient tracking; the
    winning products are then rebuilt from ``S`` by gathering the arg-max concept, so autograd
    routes the gradient to the arg-max element only (exactly the gradient of ``max``) and never
    stores a ``[B, K, N, N]`` tensor. Peak memory is ``B * N * N * chunk_size`` elements.

    Args:
        tokens: Token set ``[B, N, D]``; treated as constants (detached).
        prototypes: Prototype rows ``[K, D]`` (clusterbook or centroids); receive the gradient.
        temperature: ``τ > 0``.
        chunk_size: Concepts per block of the running maximum; ``None`` picks one that keeps a
            block near 8M elements. Results do not depend on it.

    Returns:
        Scalar loss (``-mean_b Q_b``) in at least float32. An image whose graph has no edges
        (``e = 0``, e.g. ``N = 1``) contributes ``Q = 0`` instead of the literal ``0 / 0``.

    Raises:
        ValueError: On malformed shapes, a dim mismatch, ``temperature <= 0`` or ``chunk_size < 1``.
    """
    _check_tokens(tokens)
    _check_codebook(prototypes, tokens.shape[-1], "prototypes")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")
    batch, num_tokens, _ = tokens.shape
    num_concepts = prototypes.shape[0]
    if batch == 0:
        raise ValueError("modularity_loss needs at least one image (B = 0).")
    chunk = chunk_size or _default_modularity_chunk(batch, num_tokens, num_concepts)
    dtype = _compute_dtype(tokens, prototypes)

    with _autocast_off(tokens.device), exact_matmul():
        x = F.normalize(tokens.detach().to(dtype), dim=-1)  # B N D
        c = F.normalize(prototypes.to(device=tokens.device, dtype=dtype), dim=-1)  # K D

        # Graph of each image: constants, no gradient.
        affinity = torch.relu(x @ x.transpose(1, 2))  # B N N
        affinity.diagonal(dim1=1, dim2=2).zero_()
        degree = affinity.sum(dim=2)  # B N
        total = degree.sum(dim=1)  # B
        # A graph without edges has d = 0, so clamping e only turns 0/0 into 0.
        total = total.clamp_min(torch.finfo(dtype).tiny)
        weights = affinity - degree[:, :, None] * degree[:, None, :] / total[:, None, None]  # B N N

        assign = torch.relu(x @ c.T)  # B N K

        with torch.no_grad():
            assign_t = assign.detach().transpose(1, 2).contiguous()  # B K N
            best = assign.new_zeros(batch, num_tokens, num_tokens)  # B N N
            arg = torch.zeros(batch, num_tokens, num_tokens, dtype=torch.long, device=x.device)
            for start in range(0, num_concepts, chunk):
                block = assign_t[:, start : start + chunk]  # B c N
                products = block[:, :, :, None] * block[:, :, None, :]  # B c N N
                value, where = products.max(dim=1)  # B N N
                better = value > best
                best = torch.where(better, value, best)
                arg = torch.where(better, where + start, arg)
                del products, value, where, better

        # G_ij = S_{i,k*} S_{j,k*} with k* the arg-max concept of pair (i, j).
        left = torch.gather(assign, 2, arg)  # B N N: S[b, i, k*_ij]
        # B N N: S[b, j, k*_ij]
        right = torch.gather(assign, 2, arg.transpose(1, 2)).transpose(1, 2)
        delta = torch.tanh(left * right / temperature)  # B N N
        quality = (weights * delta).sum(dim=(1, 2)) / total  # B
        return -quality.mean()


# --------------------------------------------------------------------------------------------------
# stage 2: concept-wise contrastive loss (method §5.6)
# --------------------------------------------------------------------------------------------------


def _block_rows(num_rows: int, num_candidates: int, bytes_per_pair: int, budget: int) -> int:
    """Anchor rows per block of the contrastive products: as few blocks as ``budget`` allows.

    A block's working set is ``rows x candidates x bytes_per_pair``. Larger blocks are faster
    (fewer passes of every element-wise step, the candidates read fewer times; docs/performance.md
    §3), so the only reason to split is memory; the rows are then spread evenly over the blocks,
    so that no block is a small remainder.
    """
    per_row = max(1, num_candidates * bytes_per_pair)
    cap = max(1, min(num_rows, budget // per_row))
    blocks = -(-num_rows // cap)
    return -(-num_rows // blocks)


def _pair_bytes(compute: torch.dtype, product: torch.dtype) -> int:
    """Bytes per ``[anchor, candidate]`` pair of a block: the product, its compute-dtype copy when
    the product is in half precision, the negated positive indicator (compute dtype, then the
    gradient weights) and the denominator mask (bool)."""
    copy = 0 if product == compute else compute.itemsize
    return product.itemsize + copy + compute.itemsize + 1


def _pair_terms(
    logits: Tensor,
    negative_positive: Tensor,
    in_denominator: Tensor,
    scale: Tensor,
    weights: bool,
) -> tuple[Tensor, Tensor]:
    """Loss sum and positive count of each anchor row of a block; its gradient weights in place.

    With the logits ``l_ij = (a_i · c_j) · scale_j``, ``p_ij`` the softmax of row ``i`` over its
    denominator set and ``n_i`` its positive count, the row's ``Σ_{j ∈ pos} L_ij = n_i ·
    log_den_i - Σ_{j ∈ pos} l_ij`` and ``∂/∂(a_i · c_j) = (n_i · p_ij - [j ∈ pos]) · scale_j``. A
    row without positives contributes exactly 0 (its denominator may even be empty).

    Each step is one pass over the block, in place and in one dtype wherever it can be (a CPU
    casts a mixed-dtype operand through a full-size copy): the positives come as ``-[j ∈ pos]``
    in the compute dtype, whose row sum is ``-n_i`` and which one multiply-add turns into the
    gradient weights.

    Args:
        logits: ``l_ij`` ``[r, C]`` of anchor rows and candidates, in the compute dtype;
            overwritten.
        negative_positive: ``-[j ∈ pos]`` ``[r, C]`` in the compute dtype; overwritten with the
            gradient weights when ``weights``.
        in_denominator: Bool ``[r, C]``: ``j ∈ pos ∪ neg``.
        scale: ``[C]`` factor of each candidate in the logits (``1 / (τ ||c_j||)``, 0 for an
            unused slot).
        weights: Whether to form the gradient weights.

    Returns:
        ``(loss_sum [r], count [r] long)``.
    """
    # A sum of 0/1 in floating point: exact while a row has fewer than 2**24 candidates.
    counted = -negative_positive.sum(dim=1)  # r: n_i
    linear = -torch.einsum("ij,ij->i", logits, negative_positive)  # r: Σ_{j ∈ pos} l_ij
    torch.where(in_denominator, logits, logits.new_tensor(float("-inf")), out=logits)
    top = logits.amax(dim=1)  # r; -inf for a row whose denominator is empty
    top = torch.where(torch.isfinite(top), top, 0)
    total = logits.sub_(top[:, None]).exp_().sum(dim=1)  # r; exp(l - top), 0 outside the set
    has_positive = counted > 0
    loss_sum = torch.where(has_positive, counted * (top + total.log()) - linear, 0)
    if weights:
        coef = torch.where(has_positive, counted / total, 0)  # r: n_i / Σ exp
        negative_positive.addcmul_(logits, coef[:, None]).mul_(scale)  # r C
    return loss_sum, counted.long()


class _ContrastiveTerm(torch.autograd.Function):
    """Per-anchor ``Σ_{j ∈ pos} L_ij`` and positive count, gradient formed in the same pass.

    Row ``i`` of the output depends on anchor row ``i`` only, so the gradient of every row with
    respect to its anchor (a ``[R, P]`` matrix) is computed block by block in the forward pass,
    while each block's products are at hand; the backward pass only scales it by the incoming
    gradient. No ``[R, C]`` tensor outlives its block and nothing is recomputed.

    The pair kinds come from two per-concept tables of the anchors (``[R, K + 1]``; column ``K``
    is that of unused bank slots), gathered by each candidate's concept; the element-wise work of
    a block (:func:`_pair_terms`) is a dozen whole-block operations, one kernel each.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        anchors: Tensor,
        positive_table: Tensor,
        denominator_table: Tensor,
        candidates: Tensor,
        scale: Tensor,
        columns: Tensor,
        self_columns: Tensor | None,
        budget: int,
    ) -> tuple[Tensor, Tensor]:
        # anchors R P (compute dtype); positive_table R K+1 (compute dtype, -[positive]);
        # denominator_table R K+1 bool; candidates C P (product dtype); scale C; columns C
        # (concept of each candidate, K for an unused slot)
        compute = anchors.dtype
        product = candidates.dtype
        device = anchors.device
        num_rows, num_candidates = anchors.shape[0], candidates.shape[0]
        need_grad = bool(ctx.needs_input_grad[0])
        loss_sum = anchors.new_empty(num_rows)  # R
        count = torch.empty(num_rows, dtype=torch.long, device=device)  # R
        grad = anchors.new_empty(anchors.shape) if need_grad else None  # R P

        rows = _block_rows(num_rows, num_candidates, _pair_bytes(compute, product), budget)
        for start in range(0, num_rows, rows):
            stop = min(start + rows, num_rows)
            index = columns.expand(stop - start, -1)  # r C
            negative_positive = torch.gather(positive_table[start:stop], 1, index)  # r C
            in_denominator = torch.gather(denominator_table[start:stop], 1, index)  # r C
            if self_columns is not None:
                # The anchor's own teacher copy is neither a positive nor in the denominator.
                pair = (torch.arange(stop - start, device=device), self_columns[start:stop])
                negative_positive[pair] = 0
                in_denominator[pair] = False
            products = anchors[start:stop].to(product) @ candidates.T  # r C
            # The logits in the compute dtype: in place, or in the pass that widens a half product.
            logits = products.mul_(scale) if product == compute else products * scale  # r C
            loss_sum[start:stop], count[start:stop] = _pair_terms(
                logits, negative_positive, in_denominator, scale, need_grad
            )
            if grad is not None:
                # In half precision the products' buffer takes the weights (no further copy).
                weights = (
                    negative_positive if product == compute else products.copy_(negative_positive)
                )
                grad[start:stop] = (weights @ candidates).to(compute)  # r P
            del products, logits, negative_positive, in_denominator

        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(count)
        return loss_sum, count

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, _grad_count: Tensor | None) -> tuple[Any, ...]:
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss[:, None], *(None,) * 7)


def _contrastive_term(
    anchors: Tensor,
    anchor_sim: Tensor,
    candidates: Tensor,
    candidate_concepts: Tensor,
    valid: Tensor | None,
    batch: int,
    self_columns: Tensor | None,
    temperature: float,
    pos_thresh: float,
    neg_thresh: float,
    budget: int,
) -> tuple[Tensor, Tensor]:
    """Per-image mean over positive pairs of one term (in-batch or bank).

    ``candidates`` are used in their own dtype for the products (the caller normalises them before
    any cast to half precision); ``valid`` masks unused slots of a static-shape bank; ``budget`` is
    the working memory of one block of anchor rows in bytes.

    Returns:
        ``(terms [B], empty [B])``.
    """
    num_concepts = anchor_sim.shape[1]
    # 1 / (τ · ||c||), F.normalize's eps; accumulated in float32 without a float32 copy.
    norms = torch.linalg.vector_norm(candidates, dim=1, dtype=anchors.dtype)  # C
    scale = 1.0 / (temperature * norms.clamp_min(1e-12))  # C
    columns = candidate_concepts  # C: concept of each candidate, K for an unused slot
    if valid is not None:
        columns = torch.where(valid, columns, torch.full_like(columns, num_concepts))
        scale = torch.where(valid, scale, torch.zeros_like(scale))
    with torch.no_grad():
        # Per (anchor, concept) pair kind; an extra column, neither positive nor in the
        # denominator, for unused slots.
        positive = F.pad(anchor_sim > pos_thresh, (0, 1))  # R K+1
        denominator = positive | F.pad(anchor_sim < neg_thresh, (0, 1))  # R K+1
        negative_positive = -positive.to(anchors.dtype)  # R K+1
    loss_sum, count = _ContrastiveTerm.apply(
        anchors, negative_positive, denominator, candidates, scale, columns, self_columns, budget
    )
    loss_sum = loss_sum.view(batch, -1).sum(dim=1)  # B
    count = count.view(batch, -1).sum(dim=1)  # B
    empty = count == 0  # B
    # An empty term is exactly 0 (its sum is 0) and keeps its place in the final mean.
    terms = loss_sum / count.clamp_min(1).to(loss_sum.dtype)  # B
    return terms, empty


def concept_contrastive_terms(
    tokens: Tensor,
    student: Tensor,
    teacher: Tensor,
    clusterbook: Tensor,
    bank: Tensor | None = None,
    bank_concepts: Tensor | None = None,
    temperature: float = 0.07,
    pos_thresh: float = 0.3,
    neg_thresh: float = 0.1,
    anchor_index: Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
    *,
    bank_valid: Tensor | None = None,
    memory_bytes: int = DEFAULT_CONTRASTIVE_MEMORY_BYTES,
    validate: bool = True,
    concepts: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-image terms of the concept-wise InfoNCE of stage 2 (method §5.6).

    For anchor ``i`` of image ``b`` and candidate ``j`` (all ``B * N`` teacher tokens of the batch,
    image-major), ``s_ij = q_i · q̄_j`` with ``q = norm(clusterbook[nearest_concept(tokens)])``,
    positives ``s > pos_thresh``, negatives ``s < neg_thresh`` (pairs in between are ignored),
    ``l_ij = norm(student_i) · norm(teacher_j) / τ``, and
    ``L_ij = -l_ij + log Σ_{k in pos ∪ neg} exp(l_ik)``. The anchor's own teacher copy is removed
    from the positives and from the denominator. ``T_b`` is the mean of ``L_ij`` over all positive
    pairs of image ``b`` (flattened). The bank term is the same against the bank entries (compared
    through their concept vectors), without self-removal.

    The anchors are processed in blocks of rows whose ``[rows, candidates]`` working set stays
    within ``memory_bytes``; each block's gradient is formed while its logits are at hand, so no
    block is ever recomputed in the backward pass and a smaller budget only means more, smaller
    products. Only the products themselves run in ``matmul_dtype``: the projections are normalised
    in float32 first (a half-precision product of unit vectors cannot overflow), and a bank already
    held in ``matmul_dtype`` is used as it is, without a copy.

    With ``anchor_index``, the anchors are a subset of the images: ``tokens`` and ``teacher`` hold
    the whole batch of ``G`` images (the candidates), ``student`` only the ``B`` anchor images, and
    ``anchor_index[b]`` is the position of student image ``b`` in that batch. Term ``b`` then
    equals term ``anchor_index[b]`` of the call with every image as an anchor; a process of a
    data-parallel run computes its share of the global batch's terms this way (docs/scaling.md).

    Args:
        tokens: Backbone tokens ``[G, N, D]`` (used only to pick the concepts); ``G = B`` without
            ``anchor_index``.
        student: Student projections ``[B, N, P]`` (receive the gradient).
        teacher: Teacher projections ``[G, N, P]`` (treated as constants).
        clusterbook: Concept rows ``[K, D]`` (treated as constants).
        bank: Teacher projections of earlier steps ``[M, P]`` (constants, raw or normalised), or
            ``None``.
        bank_concepts: Long ``[M]`` concept index of each bank entry; required with ``bank``.
        temperature: ``τ > 0``.
        pos_thresh: Concept similarity above which a pair is positive.
        neg_thresh: Concept similarity below which a pair is negative.
        anchor_index: Long ``[B]`` position of each student image among the ``G`` images of
            ``tokens`` / ``teacher``, or ``None`` when ``student`` covers them all in order.
        matmul_dtype: Dtype of the student x teacher / bank products only (e.g. ``float16``
            under mixed precision, as the reference's AMP runs them); ``None`` keeps them in the
            float32 compute dtype. Thresholds and log-sum-exps stay in float32.
        bank_valid: Bool ``[M]`` marking the used slots of a static-shape bank
            (:meth:`ConceptBank.slots`); ``None`` when every row of ``bank`` is an entry. With a
            mask the bank term is always returned (all empty when no slot is used; see
            :func:`contrastive_mean`).
        memory_bytes: Working memory of one block of anchors (default 1 GiB).
        validate: Check index values (``anchor_index``, ``bank_concepts``, ``concepts``) against
            their ranges. Each check reads a value back from the device, so a training step turns
            it off.
        concepts: Long ``[G, N]`` nearest concept of every token of ``tokens``
            (:func:`nearest_concept`), when the caller has them already (a TR head computes those
            of the whole grid); ``None`` computes them here.

    Returns:
        ``(terms, empty)``: ``terms`` float ``[B]`` (no bank, or ``M == 0``) or ``[2B]`` (in-batch
        terms of images ``0..B-1``, then bank terms), each 0 when the image has no positive pair;
        ``empty`` bool of the same shape marks those terms. The loss is
        :func:`contrastive_mean` of them (``terms.mean()`` without ``bank_valid``).

    Raises:
        ValueError: On inconsistent shapes, a clusterbook/bank mismatch or a bad temperature.
    """
    _check_tokens(tokens)
    _check_tokens(student, "student")
    _check_tokens(teacher, "teacher")
    if anchor_index is None and student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} projections must "
            "have the same shape [B, N, P]; sample both with the same grid index."
        )
    if anchor_index is not None and student.shape[1:] != teacher.shape[1:]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} projections must "
            "agree on [N, P]; sample both with the same grid index."
        )
    if teacher.shape[:2] != tokens.shape[:2]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} and projections {tuple(teacher.shape)} disagree on "
            "[B, N]; grid-sample the backbone tokens and the projections with the same index."
        )
    _check_codebook(clusterbook, tokens.shape[-1], "clusterbook")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if memory_bytes < 1:
        raise ValueError(f"memory_bytes must be >= 1, got {memory_bytes}.")
    batch, num_tokens, proj_dim = student.shape
    candidates = teacher.shape[0]  # G
    if anchor_index is not None:
        if anchor_index.shape != (batch,):
            raise ValueError(
                f"anchor_index must be [B] = [{batch}] (one position per student image), got "
                f"{tuple(anchor_index.shape)}."
            )
        if anchor_index.dtype.is_floating_point or anchor_index.dtype == torch.bool:
            raise ValueError(f"anchor_index must be an integer tensor, got {anchor_index.dtype}.")
        if validate and batch:
            if int(anchor_index.min()) < 0 or int(anchor_index.max()) >= candidates:
                raise ValueError(
                    f"anchor_index values must lie in [0, {candidates}) (the images of tokens and "
                    "teacher)."
                )
    num_concepts = clusterbook.shape[0]
    if concepts is not None:
        if concepts.shape != tokens.shape[:2]:
            raise ValueError(
                f"concepts must be [G, N] = {list(tokens.shape[:2])} (one per token of tokens), "
                f"got {tuple(concepts.shape)}."
            )
        if concepts.dtype.is_floating_point or concepts.dtype == torch.bool:
            raise ValueError(f"concepts must be an integer tensor, got {concepts.dtype}.")
        if validate and (int(concepts.min()) < 0 or int(concepts.max()) >= num_concepts):
            raise ValueError(
                f"concepts must lie in [0, {num_concepts}) (the clusterbook size); were they "
                "computed with another clusterbook?"
            )
    if batch * num_tokens == 0:
        raise ValueError("concept_contrastive_terms needs at least one token (B * N = 0).")

    use_bank = False
    if bank is not None or bank_concepts is not None:
        if bank is None or bank_concepts is None:
            raise ValueError(
                "bank and bank_concepts go together: pass both (e.g. `ConceptBank.view()`) or "
                "neither."
            )
        if bank.dim() != 2 or bank.shape[1] != proj_dim:
            raise ValueError(
                f"bank must be [M, {proj_dim}] (the projection width), got {tuple(bank.shape)}."
            )
        if bank_concepts.shape != (bank.shape[0],):
            raise ValueError(
                f"bank_concepts must be [M] = [{bank.shape[0]}], got {tuple(bank_concepts.shape)}."
            )
        if bank_concepts.dtype.is_floating_point or bank_concepts.dtype == torch.bool:
            raise ValueError(f"bank_concepts must be an integer tensor, got {bank_concepts.dtype}.")
        if bank_valid is not None and (
            bank_valid.shape != (bank.shape[0],) or bank_valid.dtype != torch.bool
        ):
            raise ValueError(
                f"bank_valid must be a bool [M] = [{bank.shape[0]}] mask, got "
                f"{bank_valid.dtype} {tuple(bank_valid.shape)}."
            )
        if bank.shape[0] > 0:
            if validate and (
                int(bank_concepts.min()) < 0 or int(bank_concepts.max()) >= num_concepts
            ):
                raise ValueError(
                    f"bank_concepts must lie in [0, {num_concepts}) (the clusterbook size); was "
                    "the bank filled with another clusterbook?"
                )
            use_bank = True
    elif bank_valid is not None:
        raise ValueError("bank_valid needs a bank: pass it with `bank` and `bank_concepts`.")

    device = student.device
    dtype = _compute_dtype(student, teacher, clusterbook)
    product = matmul_dtype or dtype
    token_ids = torch.arange(num_tokens, device=device)  # N
    if anchor_index is None:
        rows = torch.arange(batch, device=device)  # B
    else:
        rows = anchor_index.to(device=device, dtype=torch.long)  # B
    # Column of each anchor's own teacher copy among the G * N candidates (image-major).
    self_columns = (rows[:, None] * num_tokens + token_ids).reshape(-1)  # BN
    with _autocast_off(device):
        if concepts is None:
            concepts = nearest_concept(tokens, clusterbook)  # G N
        concepts = concepts.to(device=device, dtype=torch.long).reshape(-1)  # GN
        anchor_concepts = concepts[self_columns]  # BN
        with torch.no_grad(), exact_matmul():
            book = F.normalize(clusterbook.detach().to(device=device, dtype=dtype), dim=-1)  # K D
            anchor_sim = book[anchor_concepts] @ book.T  # BN K: q_i · norm(clusterbook_k)
        anchors = F.normalize(student.to(dtype), dim=-1).reshape(batch * num_tokens, proj_dim)
        targets = F.normalize(teacher.detach().to(dtype), dim=-1)  # G N P, before any cast
        targets = targets.reshape(candidates * num_tokens, proj_dim).to(product)  # GN P

        terms, empty = _contrastive_term(
            anchors,
            anchor_sim,
            targets,
            concepts,
            None,
            batch,
            self_columns,
            temperature,
            pos_thresh,
            neg_thresh,
            memory_bytes,
        )
        if use_bank:
            assert bank is not None and bank_concepts is not None
            bank = bank.detach().to(device=device)
            if bank.dtype != product:
                # A raw bank of another dtype: normalised in the compute dtype before the cast.
                bank = F.normalize(bank.to(dtype), dim=-1).to(product)
            bank_terms, bank_empty = _contrastive_term(
                anchors,
                anchor_sim,
                bank,
                bank_concepts.to(device=device, dtype=torch.long),
                None if bank_valid is None else bank_valid.to(device),
                batch,
                None,
                temperature,
                pos_thresh,
                neg_thresh,
                memory_bytes,
            )
            terms = torch.cat([terms, bank_terms])  # 2B
            empty = torch.cat([empty, bank_empty])  # 2B
    return terms, empty


def contrastive_mean(terms: Tensor, bank_valid: Tensor | None = None) -> Tensor:
    """The loss from :func:`concept_contrastive_terms`: the mean of its terms.

    With a static-shape bank (``bank_valid``) the bank terms are always present; while no slot is
    used they are left out of the mean, as an empty bank is without the mask. Decided on the
    device (no read-back).

    Args:
        terms: ``[B]`` or ``[2B]`` terms.
        bank_valid: The bank's slot mask passed to :func:`concept_contrastive_terms`, or ``None``.

    Returns:
        Scalar loss.
    """
    if bank_valid is None:
        return terms.mean()
    half = terms.shape[0] // 2
    counted = half * (1 + bank_valid.any().to(terms.dtype))
    return terms.sum() / counted


def concept_contrastive_loss(
    tokens: Tensor,
    student: Tensor,
    teacher: Tensor,
    clusterbook: Tensor,
    bank: Tensor | None = None,
    bank_concepts: Tensor | None = None,
    temperature: float = 0.07,
    pos_thresh: float = 0.3,
    neg_thresh: float = 0.1,
    anchor_index: Tensor | None = None,
    matmul_dtype: torch.dtype | None = None,
    *,
    bank_valid: Tensor | None = None,
    memory_bytes: int = DEFAULT_CONTRASTIVE_MEMORY_BYTES,
    validate: bool = True,
    concepts: Tensor | None = None,
) -> Tensor:
    """Concept-wise InfoNCE of stage 2: :func:`contrastive_mean` of the per-image terms.

    Empty terms (images without a positive pair) count as 0 and stay in the denominator (``B`` or
    ``2B``), which reproduces the reference gradient with a finite value (method §5.6).

    Args:
        tokens: Backbone tokens ``[B, N, D]``.
        student: Student projections ``[B, N, P]``.
        teacher: Teacher projections ``[B, N, P]`` (constants).
        clusterbook: Concept rows ``[K, D]``.
        bank: Bank entries ``[M, P]`` or ``None``.
        bank_concepts: Long ``[M]`` concept of each bank entry.
        temperature: ``τ``.
        pos_thresh: Positive threshold.
        neg_thresh: Negative threshold.
        anchor_index: Positions of the student images among the candidate images (see
            :func:`concept_contrastive_terms`).
        matmul_dtype: Dtype of the projection products (see :func:`concept_contrastive_terms`).
        bank_valid: Used slots of a static-shape bank (see :func:`concept_contrastive_terms`).
        memory_bytes: Working memory of one block of anchors.
        validate: Check index values (see :func:`concept_contrastive_terms`).
        concepts: Nearest concepts of the tokens when known (see
            :func:`concept_contrastive_terms`).

    Returns:
        Scalar loss.

    Raises:
        ValueError: See :func:`concept_contrastive_terms`.
    """
    terms, _ = concept_contrastive_terms(
        tokens,
        student,
        teacher,
        clusterbook,
        bank,
        bank_concepts,
        temperature=temperature,
        pos_thresh=pos_thresh,
        neg_thresh=neg_thresh,
        anchor_index=anchor_index,
        matmul_dtype=matmul_dtype,
        bank_valid=bank_valid,
        memory_bytes=memory_bytes,
        validate=validate,
        concepts=concepts,
    )
    return contrastive_mean(terms, bank_valid if bank is not None and bank.shape[0] else None)
