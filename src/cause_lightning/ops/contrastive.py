"""The concept-wise contrastive loss of stage 2 (method.md §5.6): in-batch term plus concept-bank
term, computed in blocks of anchor rows with each block's gradient formed while its logits are at
hand."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from cause_lightning.ops.concepts import nearest_concept
from cause_lightning.ops.numerics import (
    autocast_off,
    check_codebook,
    check_index,
    check_tokens,
    compute_dtype,
    exact_matmul,
)

__all__ = [
    "DEFAULT_CONTRASTIVE_MEMORY_BYTES",
    "concept_contrastive_loss",
    "concept_contrastive_terms",
    "contrastive_mean",
]

#: Working memory of one block of anchor rows (``method.head.contrastive_memory_mb: null``).
DEFAULT_CONTRASTIVE_MEMORY_BYTES = 1 << 30


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
    _check_inputs(tokens, student, teacher, clusterbook, anchor_index, concepts, validate)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if memory_bytes < 1:
        raise ValueError(f"memory_bytes must be >= 1, got {memory_bytes}.")
    use_bank = _check_bank(
        bank, bank_concepts, bank_valid, student.shape[-1], clusterbook.shape[0], validate
    )
    return _terms(
        tokens,
        student,
        teacher,
        clusterbook,
        bank if use_bank else None,
        bank_concepts,
        bank_valid,
        concepts,
        anchor_index,
        (temperature, pos_thresh, neg_thresh),
        matmul_dtype,
        memory_bytes,
    )


def _check_inputs(
    tokens: Tensor,
    student: Tensor,
    teacher: Tensor,
    clusterbook: Tensor,
    anchor_index: Tensor | None,
    concepts: Tensor | None,
    validate: bool,
) -> None:
    """The shapes and index ranges of :func:`concept_contrastive_terms` (its ``Raises``)."""
    check_tokens(tokens)
    check_tokens(student, "student")
    check_tokens(teacher, "teacher")
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
    check_codebook(clusterbook, tokens.shape[-1], "clusterbook")
    batch, num_tokens, _ = student.shape
    candidates = teacher.shape[0]  # G
    if anchor_index is not None:
        if anchor_index.shape != (batch,):
            raise ValueError(
                f"anchor_index must be [B] = [{batch}] (one position per student image), got "
                f"{tuple(anchor_index.shape)}."
            )
        check_index(anchor_index, "anchor_index")
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
        check_index(concepts, "concepts")
        if validate and (int(concepts.min()) < 0 or int(concepts.max()) >= num_concepts):
            raise ValueError(
                f"concepts must lie in [0, {num_concepts}) (the clusterbook size); were they "
                "computed with another clusterbook?"
            )
    if batch * num_tokens == 0:
        raise ValueError("concept_contrastive_terms needs at least one token (B * N = 0).")


def _check_bank(
    bank: Tensor | None,
    bank_concepts: Tensor | None,
    bank_valid: Tensor | None,
    proj_dim: int,
    num_concepts: int,
    validate: bool,
) -> bool:
    """Whether the bank term is computed: a bank is given and holds rows; its parts checked."""
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
        check_index(bank_concepts, "bank_concepts")
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
    return use_bank


def _terms(
    tokens: Tensor,
    student: Tensor,
    teacher: Tensor,
    clusterbook: Tensor,
    bank: Tensor | None,
    bank_concepts: Tensor | None,
    bank_valid: Tensor | None,
    concepts: Tensor | None,
    anchor_index: Tensor | None,
    thresholds: tuple[float, float, float],
    matmul_dtype: torch.dtype | None,
    memory_bytes: int,
) -> tuple[Tensor, Tensor]:
    """:func:`concept_contrastive_terms` on checked inputs (``thresholds``: ``τ``, positive and
    negative threshold; ``bank`` is ``None`` when there is no bank term)."""
    temperature, pos_thresh, neg_thresh = thresholds
    batch, num_tokens, proj_dim = student.shape
    candidates = teacher.shape[0]  # G
    device = student.device
    dtype = compute_dtype(student, teacher, clusterbook)
    product = matmul_dtype or dtype
    token_ids = torch.arange(num_tokens, device=device)  # N
    if anchor_index is None:
        rows = torch.arange(batch, device=device)  # B
    else:
        rows = anchor_index.to(device=device, dtype=torch.long)  # B
    # Column of each anchor's own teacher copy among the G * N candidates (image-major).
    self_columns = (rows[:, None] * num_tokens + token_ids).reshape(-1)  # BN
    with autocast_off(device):
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
        if bank is not None:
            assert bank_concepts is not None
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
        concepts: Nearest concepts of the tokens when known.

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
