"""Segmentation heads, projection head, linear probe and EMA update (docs/method.md §5.1-5.3).

Two heads map frozen backbone features ``[B, D, h, w]`` to ``[B, R, h, w]`` (R = 90):

* :class:`MLPHead`: ``f1(drop(F)) + f2(drop(F))`` with 1x1 convolutions (STEGO style);
* :class:`TRHead`: one post-norm DETR-style decoder layer whose queries are the raw clusterbook rows
  of each token's nearest concept, followed by the same two-branch projection block.

Parameter names follow the reference release (``f1``, ``f2.0``, ``f2.2``; ``query_pos``,
``tr.self_attn``, ``tr.multihead_attn``, ``tr.linear1``, ``tr.linear2``, ``tr.norm1..3``, ``tr.f1``,
``tr.f2.*``), so importing a release checkpoint is a prefix strip (docs/method.md §10.4).

Dropout follows the module's training mode by default. Every head ``forward`` also takes
``dropout=True/False`` to force it on or off regardless of the mode: stage 3 keeps a frozen head
whose dropout is a stage option (docs/method.md §6.3), not a side effect of ``train()``/``eval()``.

Every head here follows the head contract of :mod:`cause_lightning.models.contract`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cause_lightning.core.constants import REFERENCE_NUM_CONCEPTS
from cause_lightning.core.logs import get_logger
from cause_lightning.models.contract import remember_arguments
from cause_lightning.ops import nearest_concept

__all__ = [
    "LinearProbe",
    "MLPHead",
    "ProjectionHead",
    "TRDecoderLayer",
    "TRHead",
    "ema_update",
]

log = get_logger(__name__)

#: Hidden width of the TR decoder's feed-forward block (docs/method.md §5.2).
TR_FFN_DIM = 2048


def _check_features(features: Tensor, dim: int, head: str) -> None:
    """Validate a ``[B, D, h, w]`` feature grid for a head of width ``dim``."""
    if features.ndim != 4:
        raise ValueError(
            f"{head} expects a feature grid [B, D, h, w], got a tensor of shape "
            f"{tuple(features.shape)}; reshape token sets [B, N, D] with "
            "tokens.transpose(1, 2).reshape(B, D, h, w)"
        )
    if features.shape[1] != dim:
        raise ValueError(
            f"{head} was built for backbone width D={dim}, got features with "
            f"{features.shape[1]} channels (shape {tuple(features.shape)}); build the head with "
            "the backbone's embed_dim"
        )


def _two_branch(x: Tensor, f1: nn.Module, f2: nn.Module, p: float, active: bool) -> Tensor:
    """``f1(drop(x)) + f2(drop(x))``, one independent dropout draw per branch (method.md §5.1)."""
    return f1(F.dropout(x, p, training=active)) + f2(F.dropout(x, p, training=active))


def _projection_block(dim: int, reduced_dim: int) -> tuple[nn.Conv2d, nn.Sequential]:
    """The shared ``f1`` / ``f2`` pair: Conv1x1(D->R) and Conv1x1(D->D), ReLU, Conv1x1(D->R)."""
    f1 = nn.Conv2d(dim, reduced_dim, kernel_size=1)
    f2 = nn.Sequential(
        nn.Conv2d(dim, dim, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(dim, reduced_dim, kernel_size=1),
    )
    return f1, f2


class MLPHead(nn.Module):
    """STEGO-style head: ``f1(drop(F)) + f2(drop(F))`` (docs/method.md §5.2).

    Args:
        dim: Backbone width D.
        reduced_dim: Output width R (90 in the reference).
        dropout: Probability of the head dropout applied to the input grid, separately per branch.

    Attributes:
        f1: Conv1x1 D -> R.
        f2: ``Sequential(Conv1x1 D -> D, ReLU, Conv1x1 D -> R)``.
    """

    #: 1x1 convolutions only: sampled tokens give the same outputs as the full grid.
    per_token: ClassVar[bool] = True

    def __init__(self, dim: int, reduced_dim: int = 90, dropout: float = 0.1) -> None:
        super().__init__()
        if dim <= 0 or reduced_dim <= 0:
            raise ValueError(
                f"dim and reduced_dim must be positive, got dim={dim}, reduced_dim={reduced_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dim = dim
        self.reduced_dim = reduced_dim
        self.f1, self.f2 = _projection_block(dim, reduced_dim)
        # Holds only p; kept as a module so that the printed structure shows the dropout.
        self.dropout = nn.Dropout(dropout)
        remember_arguments(self, dim=dim, reduced_dim=reduced_dim, dropout=float(dropout))

    def forward(self, features: Tensor, dropout: bool | None = None) -> Tensor:
        """Project a feature grid to the reduced space.

        Args:
            features: Backbone features ``[B, D, h, w]``.
            dropout: Force the head dropout on (``True``) or off (``False``); ``None`` follows
                ``self.training``.

        Returns:
            Head features ``[B, R, h, w]``.
        """
        _check_features(features, self.dim, "MLPHead")
        active = self.training if dropout is None else bool(dropout)
        return _two_branch(features, self.f1, self.f2, self.dropout.p, active)  # B R h w

    def extra_repr(self) -> str:
        return f"dim={self.dim}, reduced_dim={self.reduced_dim}"


class TRDecoderLayer(nn.Module):
    """Post-norm decoder layer with query positions, plus the ``f1``/``f2`` projection block.

    The reference keeps ``f1``/``f2`` inside this sub-module (state-dict names ``tr.f1``,
    ``tr.f2.*``). The attentions keep ``nn.MultiheadAttention``'s parameters (packed in-projection,
    one head); tensors are batch-first ``[B, L, D]``.

    Args:
        dim: Model width D.
        reduced_dim: Output width R of the projection block.
        ffn_dim: Hidden width of the feed-forward block.
        dropout: Dropout of the attention weights, the residual branches and the FFN hidden layer.
    """

    def __init__(
        self, dim: int, reduced_dim: int = 90, ffn_dim: int = TR_FFN_DIM, dropout: float = 0.1
    ) -> None:
        super().__init__()
        # Registration order = the reference's parameter order, which ema_update relies on.
        self.self_attn = nn.MultiheadAttention(dim, num_heads=1, dropout=dropout, bias=True)
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads=1, dropout=dropout, bias=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.f1, self.f2 = _projection_block(dim, reduced_dim)

    @staticmethod
    def _project(attn: nn.MultiheadAttention, x: Tensor, first: int, count: int) -> Tensor:
        """``count`` of the packed in-projections (0 = q, 1 = k, 2 = v) of ``x`` from ``first``
        on, in one product: ``[B, L, count * D]``."""
        rows = slice(first * attn.embed_dim, (first + count) * attn.embed_dim)
        return F.linear(x, attn.in_proj_weight[rows], attn.in_proj_bias[rows])

    @staticmethod
    def _attend(
        attn: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor, active: bool
    ) -> Tensor:
        """One-head attention of projected ``q``, ``k``, ``v`` ``[B, L, D]``, as two batched
        products.

        ``softmax(q kᵀ / √D)`` in at least float32 whatever the input dtype, as the reference
        computes it, then attention dropout (following ``active``, not ``attn.training``) and
        ``attn``'s output projection. Fused attention kernels stop at head widths of 256: one
        head of width 384 or 768 would fall back to a slower kernel.
        """
        scores = torch.matmul(q * attn.embed_dim**-0.5, k.transpose(1, 2))  # B L L
        at_least_float32 = torch.promote_types(scores.dtype, torch.float32)
        weights = torch.softmax(scores, dim=-1, dtype=at_least_float32)  # B L L
        weights = F.dropout(weights, attn.dropout, training=active)
        out = torch.matmul(weights.to(v.dtype), v)  # B L D
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, active: bool) -> Tensor:
        """Run the decoder layer (docs/method.md §5.2, T0 -> T4).

        Args:
            tgt: Concept queries T0 ``[B, L, D]``.
            memory: Backbone tokens ``[B, L, D]``; also the final residual.
            pos: Query positions ``[1, L, D]`` (broadcast over the batch), added to queries and
                self-attention keys.
            active: Whether the decoder's dropouts are applied.

        Returns:
            Decoder output T4 ``[B, L, D]``.
        """
        p1, p2, p3, p = self.dropout1.p, self.dropout2.p, self.dropout3.p, self.dropout.p
        # Self-attention: query and key are both T0 + pos (one product for both projections).
        q, k = self._project(self.self_attn, tgt + pos, 0, 2).chunk(2, dim=-1)  # B L D
        v = self._project(self.self_attn, tgt, 2, 1)  # B L D
        a = self._attend(self.self_attn, q, k, v, active)
        t1 = self.norm1(tgt + F.dropout(a, p1, training=active))
        # Cross-attention: key and value are both the memory.
        q = self._project(self.multihead_attn, t1 + pos, 0, 1)  # B L D
        k, v = self._project(self.multihead_attn, memory, 1, 2).chunk(2, dim=-1)  # B L D
        c = self._attend(self.multihead_attn, q, k, v, active)
        t2 = self.norm2(t1 + F.dropout(c, p2, training=active))
        hidden = F.dropout(F.relu(self.linear1(t2)), p, training=active)  # B L 2048
        t3 = t2 + F.dropout(self.linear2(hidden), p3, training=active)
        return memory + self.norm3(t3)  # B L D


class TRHead(nn.Module):
    """Transformer head: concept queries attend to the backbone tokens (docs/method.md §5.2).

    The clusterbook is a persistent buffer ``clusterbook [K, D]`` holding the raw (un-normalised)
    stage-1 rows. It is zero until filled by the constructor, :meth:`set_clusterbook` or
    ``load_state_dict``; a forward pass before that raises.

    Args:
        dim: Backbone width D.
        reduced_dim: Output width R (90 in the reference).
        num_queries: Q = tokens per image at the train resolution, ``(train_res / patch) ** 2``. The
            test token count must equal it.
        clusterbook: Optional ``[K, D]`` clusterbook to copy into the buffer.
        num_concepts: K. ``None`` takes it from ``clusterbook`` when given, else 2048.
        dropout: Probability of the head dropout (on the decoder output, per branch) and of the
            decoder's own dropouts.

    Raises:
        ValueError: On a missing / non-positive ``num_queries`` or a clusterbook of the wrong shape.
    """

    #: Queries are the nearest clusterbook rows of the tokens.
    needs_clusterbook: ClassVar[bool] = True
    #: One position query per training token: the grid size is fixed.
    fixed_grid: ClassVar[bool] = True

    def __init__(
        self,
        dim: int,
        reduced_dim: int = 90,
        num_queries: int | None = None,
        clusterbook: Tensor | None = None,
        num_concepts: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_queries is None or int(num_queries) <= 0:
            raise ValueError(
                "TRHead needs num_queries = tokens per image at the train resolution, "
                f"(train_res / patch)**2 (e.g. 1600 for /8@320), got {num_queries!r}"
            )
        if dim <= 0 or reduced_dim <= 0:
            raise ValueError(
                f"dim and reduced_dim must be positive, got dim={dim}, reduced_dim={reduced_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_concepts is None:
            num_concepts = (
                int(clusterbook.shape[0]) if clusterbook is not None else REFERENCE_NUM_CONCEPTS
            )
        self.dim = dim
        self.reduced_dim = reduced_dim
        self.num_queries = int(num_queries)
        self.num_concepts = int(num_concepts)
        self.query_pos = nn.Parameter(torch.randn(self.num_queries, dim))
        self.tr = TRDecoderLayer(dim, reduced_dim, TR_FFN_DIM, dropout)
        # Head dropout before f1/f2 (method.md §5.1); the decoder's dropouts live in self.tr.
        self.head_dropout = nn.Dropout(dropout)
        self.register_buffer("clusterbook", torch.zeros(self.num_concepts, dim), persistent=True)
        self._clusterbook_set = False
        if clusterbook is not None:
            self.set_clusterbook(clusterbook)
        remember_arguments(
            self,
            dim=dim,
            reduced_dim=reduced_dim,
            num_queries=self.num_queries,
            num_concepts=self.num_concepts,
            dropout=float(dropout),
        )

    @torch.no_grad()
    def set_clusterbook(self, clusterbook: Tensor) -> None:
        """Copy raw clusterbook rows ``[K, D]`` into the buffer.

        Args:
            clusterbook: Tensor of shape ``[num_concepts, dim]`` (any float dtype / device).

        Raises:
            ValueError: On a shape mismatch or non-finite values.
        """
        clusterbook = torch.as_tensor(clusterbook)
        expected = (self.num_concepts, self.dim)
        if tuple(clusterbook.shape) != expected:
            raise ValueError(
                f"clusterbook must have shape {list(expected)} [num_concepts, dim], got "
                f"{list(clusterbook.shape)}; build TRHead with the clusterbook's K and the "
                "backbone's D"
            )
        if not torch.isfinite(clusterbook).all():
            raise ValueError("clusterbook contains NaN or Inf values")
        self.clusterbook.copy_(clusterbook.detach().to(self.clusterbook))
        self._clusterbook_set = True

    @property
    def clusterbook_set(self) -> bool:
        """Whether the clusterbook buffer has been filled."""
        return self._clusterbook_set

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if prefix + "clusterbook" in state_dict:
            self._clusterbook_set = True
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(
        self, features: Tensor, dropout: bool | None = None, concepts: Tensor | None = None
    ) -> Tensor:
        """Decode concept queries against the backbone tokens and project to R dims.

        Args:
            features: Backbone features ``[B, D, h, w]`` with ``h * w == num_queries``.
            dropout: Force all dropouts (head and decoder) on (``True``) or off (``False``);
                ``None`` follows ``self.training``.
            concepts: Long ``[B, h * w]`` nearest concept of every token (row-major), i.e.
                ``nearest_concept(tokens, clusterbook)``, when the caller has computed it for
                several heads with this clusterbook (a student and its EMA teacher); ``None``
                computes it here.

        Returns:
            Head features ``[B, R, h, w]``.

        Raises:
            ValueError: If the token count differs from ``num_queries``, the width from ``dim``,
                or ``concepts`` from ``[B, h * w]``.
            RuntimeError: If the clusterbook was never filled.
        """
        _check_features(features, self.dim, "TRHead")
        b, d, h, w = features.shape
        if h * w != self.num_queries:
            raise ValueError(
                f"expected {self.num_queries} tokens, got {h * w} (a {h}x{w} grid; TR test "
                "resolution must equal the train resolution, because query_pos has one row per "
                "training token)"
            )
        if not self._clusterbook_set:
            raise RuntimeError(
                "TRHead.clusterbook is still all zeros: pass clusterbook= to the constructor, call "
                "set_clusterbook(), or load a state dict that contains it (the stage-1 "
                "clusterbook.pt)"
            )
        if concepts is not None and tuple(concepts.shape) != (b, h * w):
            raise ValueError(
                f"concepts must be [B, h*w] = [{b}, {h * w}] (one per token), got "
                f"{tuple(concepts.shape)}"
            )
        active = self.training if dropout is None else bool(dropout)
        tokens = features.flatten(2).transpose(1, 2)  # B N D, row-major
        if concepts is None:
            concepts = nearest_concept(tokens, self.clusterbook)  # B N
        t0 = self.clusterbook.to(features.dtype)[concepts]  # B N D, raw rows
        pos = self.query_pos.to(features.dtype).unsqueeze(0)  # 1 Q D
        t4 = self.tr(t0, tokens, pos, active)  # B N D
        grid = t4.transpose(1, 2).reshape(b, d, h, w)  # B D h w
        return _two_branch(grid, self.tr.f1, self.tr.f2, self.head_dropout.p, active)  # B R h w

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, reduced_dim={self.reduced_dim}, num_queries={self.num_queries}, "
            f"num_concepts={self.num_concepts}"
        )


class ProjectionHead(nn.Module):
    """1x1 convolution R -> P used by the contrastive loss (docs/method.md §5.1).

    Args:
        reduced_dim: Input width R.
        projection_dim: Output width P (2048 in the reference).
    """

    def __init__(self, reduced_dim: int = 90, projection_dim: int = 2048) -> None:
        super().__init__()
        self.f = nn.Conv2d(reduced_dim, projection_dim, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        """Project head features ``[B, R, h, w]`` to ``[B, P, h, w]``."""
        return self.f(x)


class LinearProbe(nn.Module):
    """1x1 convolution R -> C trained with labels (diagnostic only; docs/method.md §6.2).

    Args:
        reduced_dim: Input width R.
        num_classes: Number of classes C.
    """

    def __init__(self, reduced_dim: int, num_classes: int) -> None:
        super().__init__()
        if reduced_dim <= 0 or num_classes <= 0:
            raise ValueError(
                f"reduced_dim and num_classes must be positive, got {reduced_dim} and {num_classes}"
            )
        self.f = nn.Conv2d(reduced_dim, num_classes, kernel_size=1)

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return self.f.out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Map head features ``[B, R, h, w]`` to class logits ``[B, C, h, w]``."""
        return self.f(x)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float = 0.99) -> None:
    """In-place EMA ``θ_t ← decay·θ_t + (1 − decay)·θ_s``; buffers are copied (docs/method.md §5.3).

    Parameters are paired in registration order, as in the reference.

    Args:
        teacher: Module updated in place.
        student: Module providing the new values (not modified).
        decay: EMA factor in [0, 1] (0.99 in the reference).

    Raises:
        ValueError: On a decay outside [0, 1] or modules whose parameters / buffers do not pair up.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    t_bufs, s_bufs = list(teacher.buffers()), list(student.buffers())
    if len(t_params) != len(s_params) or len(t_bufs) != len(s_bufs):
        raise ValueError(
            f"teacher and student differ in structure: {len(t_params)} vs {len(s_params)} "
            f"parameters, {len(t_bufs)} vs {len(s_bufs)} buffers; the teacher must be a copy of "
            "the student"
        )
    for i, (t, s) in enumerate(zip(t_params, s_params, strict=True)):
        if t.shape != s.shape:
            raise ValueError(
                f"parameter #{i} has shape {tuple(t.shape)} in the teacher but "
                f"{tuple(s.shape)} in the student"
            )
    for t, s in zip(t_params, s_params, strict=True):
        t.mul_(decay).add_(s.detach().to(t), alpha=1.0 - decay)
    for t, s in zip(t_bufs, s_bufs, strict=True):
        t.copy_(s)
    # Copying the buffers copies a filled clusterbook; keep the TR readiness flag in step with it.
    for t_mod, s_mod in zip(teacher.modules(), student.modules(), strict=False):
        if isinstance(t_mod, TRHead) and isinstance(s_mod, TRHead):
            t_mod._clusterbook_set = t_mod._clusterbook_set or s_mod._clusterbook_set
