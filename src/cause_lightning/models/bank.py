"""Concept bank of stage 2 (docs/method.md §5.5).

A per-concept FIFO of teacher projections from earlier steps, stored un-normalised and detached in
one preallocated ring buffer ``[K, capacity, P]``. After every optimiser step, each concept
present in the batch keeps a random ``floor(n_k * keep_fraction)`` of its ``n_k`` sampled teacher
projections (50 %: a concept seen once keeps nothing); only the newest ``capacity`` entries per
concept survive.
Before the loss, :meth:`ConceptBank.view` concatenates all FIFOs (concept-major, oldest first).

The bank is run state, not model state: it is never saved (not in the state dict), each process
keeps its own (never broadcast by DDP), and it starts empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor, nn

from cause_lightning.logs import get_logger

__all__ = ["ConceptBank"]

log = get_logger(__name__)


class ConceptBank(nn.Module):
    """Per-concept FIFO of teacher projections held in one ring buffer.

    The ring buffer ``storage [K, capacity, P]`` and the per-concept ``count`` / ``pointer``
    (next write slot) are plain tensor attributes rather than registered buffers: they are not
    saved, and DDP does not broadcast them, so every process keeps its own bank. Module moves and
    casts (``.to()``, ``.double()``) still apply to them.

    Args:
        num_concepts: Number of concepts ``K`` (clusterbook rows).
        capacity: Entries kept per concept (newest first out of the ring last).
        dim: Projection width ``P``.
        keep_fraction: Fraction of each concept's tokens of a step that is stored
            (``floor(n_k * keep_fraction)`` of them, chosen at random).

    Raises:
        ValueError: On non-positive sizes or a fraction outside ``[0, 1]``.
    """

    storage: Tensor | None
    count: Tensor
    pointer: Tensor

    def __init__(
        self,
        num_concepts: int,
        capacity: int = 100,
        dim: int = 2048,
        keep_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if num_concepts < 1 or capacity < 1 or dim < 1:
            raise ValueError(
                "ConceptBank needs num_concepts, capacity and dim >= 1, got "
                f"num_concepts={num_concepts}, capacity={capacity}, dim={dim}."
            )
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction}.")
        self.num_concepts = int(num_concepts)
        self.capacity = int(capacity)
        self.dim = int(dim)
        self.keep_fraction = float(keep_fraction)
        # floor(n * f) in exact integer arithmetic (no float64 needed on any device).
        ratio = Fraction(self.keep_fraction).limit_denominator(1_000_000)
        self._keep_num, self._keep_den = ratio.numerator, ratio.denominator
        # The ring buffer and its counters are plain tensor attributes, not registered buffers:
        # they stay out of the state dict, and out of `named_buffers()` so that DDP's per-forward
        # buffer broadcast never overwrites a process's bank with rank 0's (one bank per process,
        # method §5.5). `_apply` still moves and casts them with the module.
        self.storage = None  # K cap P, allocated on the first update with that input's device/dtype
        self.count = torch.zeros(self.num_concepts, dtype=torch.long)  # K: valid entries
        self.pointer = torch.zeros(self.num_concepts, dtype=torch.long)  # K: next slot to write
        self._view_index: Tensor | None = None
        self._view_concepts: Tensor | None = None
        self._size: int | None = 0

    def extra_repr(self) -> str:
        return (
            f"num_concepts={self.num_concepts}, capacity={self.capacity}, dim={self.dim}, "
            f"keep_fraction={self.keep_fraction}"
        )

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ConceptBank:
        # `.to()`, `.cuda()`, `.double()` ... reach the bank state like they reach buffers.
        if self.storage is not None:
            self.storage = fn(self.storage)
        self.count = fn(self.count)
        self.pointer = fn(self.pointer)
        self._invalidate()
        return super()._apply(fn, recurse)

    def _invalidate(self) -> None:
        self._view_index = None
        self._view_concepts = None
        self._size = None

    def reset(self) -> None:
        """Empty the bank (the ring buffer stays allocated)."""
        self.count.zero_()
        self.pointer.zero_()
        self._invalidate()
        self._size = 0

    def __len__(self) -> int:
        """Number of valid entries ``M``."""
        if self._size is None:
            self._size = int(self.count.sum())
        return self._size

    def _allocate(self, projections: Tensor) -> Tensor:
        if self.storage is None:
            self.storage = torch.zeros(
                self.num_concepts,
                self.capacity,
                self.dim,
                device=projections.device,
                dtype=projections.dtype,
            )  # K cap P
            log.debug(
                "concept bank allocated: [%d, %d, %d] %s on %s",
                self.num_concepts,
                self.capacity,
                self.dim,
                projections.dtype,
                projections.device,
            )
        storage = self.storage
        if self.count.device != storage.device:
            self.count = self.count.to(storage.device)
            self.pointer = self.pointer.to(storage.device)
        return storage

    @torch.no_grad()
    def update(
        self,
        concepts: Tensor,
        projections: Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        """Append a random ``floor(n_k * keep_fraction)`` of each concept's projections.

        Kept entries are appended in their input order (image-major, then token order); once a
        concept holds ``capacity`` entries the oldest are overwritten.

        Args:
            concepts: Long ``[n]`` nearest concept of each sampled token.
            projections: Teacher projections ``[n, P]`` of the same tokens (stored detached).
            generator: Random generator for the subset draw (global RNG when ``None``).

        Raises:
            ValueError: On shape mismatches or concept ids outside ``[0, K)``.
        """
        if concepts.dim() != 1:
            concepts = concepts.reshape(-1)
        if projections.dim() != 2 or projections.shape[1] != self.dim:
            raise ValueError(
                f"projections must be [n, {self.dim}] (the bank's dim), got "
                f"{tuple(projections.shape)}; flatten [B, N, P] tokens with `.flatten(0, 1)`."
            )
        if projections.shape[0] != concepts.shape[0]:
            raise ValueError(
                f"{concepts.shape[0]} concepts for {projections.shape[0]} projections; pass one "
                "concept per projection."
            )
        if concepts.dtype.is_floating_point or concepts.dtype == torch.bool:
            raise ValueError(f"concepts must be an integer tensor, got {concepts.dtype}.")
        storage = self._allocate(projections)
        num = concepts.shape[0]
        if num == 0:
            return
        device = storage.device
        concepts = concepts.to(device=device, dtype=torch.long)
        if int(concepts.min()) < 0 or int(concepts.max()) >= self.num_concepts:
            raise ValueError(
                f"concept ids must lie in [0, {self.num_concepts}); got values in "
                f"[{int(concepts.min())}, {int(concepts.max())}]."
            )
        projections = projections.detach().to(device=device, dtype=storage.dtype)

        seen = torch.zeros(self.num_concepts, dtype=torch.long, device=device)
        seen.index_add_(0, concepts, torch.ones_like(concepts))  # K: n_k
        keep = seen * self._keep_num // self._keep_den  # K: floor(n_k * f)

        # Random subset per concept: shuffle, group by concept (stable), keep the first `keep`.
        draw_device = generator.device if generator is not None else device
        perm = torch.randperm(num, generator=generator, device=draw_device).to(device)  # n
        perm = perm[torch.sort(concepts[perm], stable=True).indices]  # n, grouped by concept
        start = torch.cumsum(seen, 0) - seen  # K: first position of each concept's group
        rank = torch.arange(num, device=device) - start[concepts[perm]]  # n
        chosen = perm[rank < keep[concepts[perm]]]  # kept token ids, grouped by concept

        # Back to input order within each concept; the FIFO appends in that order.
        chosen = chosen.sort().values
        chosen = chosen[torch.sort(concepts[chosen], stable=True).indices]
        chosen_concepts = concepts[chosen]
        kept_start = torch.cumsum(keep, 0) - keep  # K
        order = torch.arange(chosen.shape[0], device=device) - kept_start[chosen_concepts]
        # Entries that a later entry of the same step would overwrite are skipped, which keeps the
        # write slots unique (index_put with duplicate slots has no defined winner).
        survive = order >= (keep - self.capacity)[chosen_concepts]
        chosen, chosen_concepts, order = chosen[survive], chosen_concepts[survive], order[survive]
        slots = (self.pointer[chosen_concepts] + order) % self.capacity
        storage[chosen_concepts, slots] = projections[chosen]

        self.pointer.copy_((self.pointer + keep) % self.capacity)
        self.count.copy_(torch.clamp(self.count + keep, max=self.capacity))
        self._invalidate()

    def _build_view(self) -> None:
        count = self.count  # K
        device = count.device
        concept_ids = torch.arange(self.num_concepts, device=device)
        entry_concepts = torch.repeat_interleave(concept_ids, count)  # M
        size = entry_concepts.shape[0]
        offset = (
            torch.arange(size, device=device) - (torch.cumsum(count, 0) - count)[entry_concepts]
        )
        oldest = (self.pointer - count) % self.capacity  # K
        slots = (oldest[entry_concepts] + offset) % self.capacity  # M
        self._view_index = entry_concepts * self.capacity + slots  # M, into [K * cap]
        self._view_concepts = entry_concepts
        self._size = size

    def view(self) -> tuple[Tensor, Tensor]:
        """All valid entries, concept by concept (ascending), oldest first within a concept.

        Returns:
            ``(bank [M, P], bank_concepts [M] long)``. Before the first update: ``[0, P]`` float32
            and ``[0]`` on the device of the bank's counters.
        """
        if self.storage is None:
            device = self.count.device
            return (
                torch.empty(0, self.dim, device=device),
                torch.empty(0, dtype=torch.long, device=device),
            )
        if self._view_index is None or self._view_concepts is None:
            self._build_view()
        assert self._view_index is not None and self._view_concepts is not None
        flat = self.storage.view(self.num_concepts * self.capacity, self.dim)  # K*cap P
        return flat.index_select(0, self._view_index), self._view_concepts

    @property
    def is_allocated(self) -> bool:
        """Whether the ring buffer exists (after the first update)."""
        return self.storage is not None

    def memory_bytes(self) -> int:
        """Bytes held by the ring buffer (0 before the first update)."""
        if self.storage is None:
            return 0
        return math.prod(self.storage.shape) * self.storage.element_size()
