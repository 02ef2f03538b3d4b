"""Concept bank of stage 2 (docs/method.md §5.5).

A per-concept FIFO of teacher projections from earlier steps, detached, in one preallocated
static-shape ring buffer ``[K, capacity, P]``. After every optimiser step, each concept present in
the batch keeps a random ``floor(n_k * keep_fraction)`` of its ``n_k`` sampled teacher projections
(50 %: a concept seen once keeps nothing); only the newest ``capacity`` entries per concept survive.

The loss reads the buffer as it is (:meth:`ConceptBank.slots`: every slot, its concept and whether
it is used), so a training step never copies or compacts the bank and never reads a size back from
the device; the buffer keeps the dtype of the first projections written to it (the dtype of the
loss's product). :meth:`ConceptBank.view` gives the compact, ordered entries for inspection.

The bank is run state: it travels in the state dict (a Lightning checkpoint restores it on
resume) as the module's extra state, not as registered buffers, so DDP never broadcasts rank 0's
bank over the other processes' (each process keeps its own unless the stage synchronises it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from cause_lightning.core.logs import get_logger

__all__ = ["ConceptBank"]

log = get_logger(__name__)


class ConceptBank(nn.Module):
    """Per-concept FIFO of teacher projections held in one static-shape ring buffer.

    Concept ``k`` owns slots ``[k * capacity, (k + 1) * capacity)`` of the flat buffer. Slots are
    written from 0 upwards and wrap once a concept is full, so the used slots of concept ``k`` are
    exactly ``s < count[k]``: the validity mask is a function of the per-concept ``count``, and
    ``pointer`` is the next slot to write. The buffer has one extra row after the last slot that
    takes the writes a step discards, which keeps :meth:`update` free of data-dependent shapes.

    ``storage``, ``count`` and ``pointer`` are plain tensor attributes, saved and restored as the
    module's extra state; module moves and casts (``.to()``, ``.double()``) apply to them.

    Args:
        num_concepts: Number of concepts ``K`` (clusterbook rows).
        capacity: Entries kept per concept (newest first out of the ring last).
        dim: Projection width ``P``.
        keep_fraction: Fraction of each concept's tokens of a step that is stored
            (``floor(n_k * keep_fraction)`` of them, chosen at random).

    Raises:
        ValueError: On non-positive sizes or a fraction outside ``[0, 1]``.
    """

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
        self._data: Tensor | None = None  # K*cap+1 P, allocated on the first update
        self.count = torch.zeros(self.num_concepts, dtype=torch.long)  # K: used slots
        self.pointer = torch.zeros(self.num_concepts, dtype=torch.long)  # K: next slot to write
        self._slot_concepts: Tensor | None = None  # K*cap, cached per device
        self._view_index: Tensor | None = None
        self._view_concepts: Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"num_concepts={self.num_concepts}, capacity={self.capacity}, dim={self.dim}, "
            f"keep_fraction={self.keep_fraction}"
        )

    @staticmethod
    def storage_shape(num_concepts: int, capacity: int, dim: int) -> tuple[int, int]:
        """Shape of the ring buffer of a bank: ``K * capacity`` slots of width ``P`` and one last
        row that takes the discarded writes (what the settings alone say it will hold)."""
        return int(num_concepts) * int(capacity) + 1, int(dim)

    @property
    def slot_count(self) -> int:
        """Number of slots ``K * capacity`` (the static size of :meth:`slots`)."""
        return self.num_concepts * self.capacity

    @property
    def storage(self) -> Tensor | None:
        """The ring buffer ``[K, capacity, P]`` (a view, ``None`` before the first update)."""
        if self._data is None:
            return None
        return self._data[: self.slot_count].view(self.num_concepts, self.capacity, self.dim)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ConceptBank:
        # `.to()`, `.cuda()`, `.double()` ... reach the bank state like they reach buffers.
        if self._data is not None:
            self._data = fn(self._data)
        self.count = fn(self.count)
        self.pointer = fn(self.pointer)
        self._invalidate()
        self._slot_concepts = None
        return super()._apply(fn, recurse)

    def _invalidate(self) -> None:
        self._view_index = None
        self._view_concepts = None

    # ------------------------------------------------------------------ state dict
    def _used(self) -> Tensor:
        """Which slots hold an entry ``[K, capacity]``: a concept fills its slots from 0 on."""
        return torch.arange(self.capacity, device=self.count.device) < self.count[:, None]

    def get_extra_state(self) -> dict[str, Any]:
        """Counters and, once allocated, the used slots' entries only (for checkpoints).

        A bank fills over many steps (the demo's room for 2,048 x 100 entries holds a few
        thousand), so the checkpoint carries ``[M, P]``, not the ``[K, capacity, P]`` buffer.
        """
        state: dict[str, Any] = {"count": self.count.clone(), "pointer": self.pointer.clone()}
        if self.storage is not None:
            state["entries"] = self.storage[self._used()]  # M P (a copy)
        return state

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved (a bank of the same K, capacity and P)."""
        count, entries = state["count"], state.get("entries")
        used = int(torch.clamp(count, max=self.capacity).sum()) if count.ndim == 1 else -1
        if tuple(count.shape) != (self.num_concepts,) or (
            entries is not None and tuple(entries.shape) != (used, self.dim)
        ):
            shape = None if entries is None else tuple(entries.shape)
            raise ValueError(
                f"the saved concept bank has counters {tuple(count.shape)} and entries {shape}, "
                f"this bank has {self.num_concepts} concepts x {self.capacity} slots of width "
                f"{self.dim}: resume with the num_concepts, bank_capacity and projection_dim the "
                "checkpoint was trained with."
            )
        device = self.count.device
        self.count = count.to(device=device, dtype=torch.long).clone()
        self.pointer = state["pointer"].to(device=device, dtype=torch.long).clone()
        if entries is None:
            self._data = None
        else:
            self._data = None  # a fresh buffer in the saved dtype, on this bank's device
            self._allocate(entries.to(device))
            assert self.storage is not None
            self.storage[self._used()] = entries.to(device)
        self._invalidate()

    # ------------------------------------------------------------------ contents
    def reset(self) -> None:
        """Empty the bank (the ring buffer stays allocated)."""
        self.count.zero_()
        self.pointer.zero_()
        self._invalidate()

    def __len__(self) -> int:
        """Number of used slots ``M`` (reads the count back from the device)."""
        return int(self.count.sum())

    def _allocate(self, projections: Tensor) -> Tensor:
        if self._data is None:
            shape = self.storage_shape(self.num_concepts, self.capacity, self.dim)
            self._data = torch.zeros(
                shape, device=projections.device, dtype=projections.dtype
            )  # K*cap+1 P
            log.debug(
                "concept bank allocated: [%d, %d, %d] %s on %s",
                self.num_concepts,
                self.capacity,
                self.dim,
                projections.dtype,
                projections.device,
            )
        data = self._data
        if self.count.device != data.device:
            self.count = self.count.to(data.device)
            self.pointer = self.pointer.to(data.device)
        return data

    @torch.no_grad()
    def update(
        self,
        concepts: Tensor,
        projections: Tensor,
        generator: torch.Generator | None = None,
        *,
        validate: bool = True,
    ) -> None:
        """Append a random ``floor(n_k * keep_fraction)`` of each concept's projections.

        Kept entries are appended in their input order (image-major, then token order); once a
        concept holds ``capacity`` entries the oldest are overwritten. Every shape is fixed by the
        input size, so nothing is read back from the device unless ``validate`` is on.

        Args:
            concepts: Long ``[n]`` nearest concept of each sampled token.
            projections: Teacher projections ``[n, P]`` of the same tokens (stored detached, in
                the buffer's dtype).
            generator: Random generator for the subset draw (global RNG when ``None``).
            validate: Check that the concept ids lie in ``[0, K)`` (reads them back).

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
        data = self._allocate(projections)
        num = concepts.shape[0]
        if num == 0:
            return
        device = data.device
        concepts = concepts.to(device=device, dtype=torch.long)
        if validate and (int(concepts.min()) < 0 or int(concepts.max()) >= self.num_concepts):
            raise ValueError(
                f"concept ids must lie in [0, {self.num_concepts}); got values in "
                f"[{int(concepts.min())}, {int(concepts.max())}]."
            )
        projections = projections.detach().to(device=device, dtype=data.dtype)

        seen = torch.zeros(self.num_concepts, dtype=torch.long, device=device)
        seen.index_add_(0, concepts, torch.ones_like(concepts))  # K: n_k
        keep = seen * self._keep_num // self._keep_den  # K: floor(n_k * f)

        # Random subset per concept: shuffle, group by concept (stable), keep the first `keep`.
        draw_device = generator.device if generator is not None else device
        perm = torch.randperm(num, generator=generator, device=draw_device)  # n
        if perm.device != device:
            if device.type == "cuda":
                perm = perm.pin_memory()  # an asynchronous copy needs page-locked memory
            perm = perm.to(device, non_blocking=True)
        perm = perm[torch.sort(concepts[perm], stable=True).indices]  # n, grouped by concept
        start = torch.cumsum(seen, 0) - seen  # K: first position of each concept's group
        rank = torch.arange(num, device=device) - start[concepts[perm]]  # n
        kept = torch.zeros(num, dtype=torch.bool, device=device)
        kept[perm] = rank < keep[concepts[perm]]  # n, in input order

        # The FIFO appends each concept's kept tokens in input order.
        group = torch.sort(concepts, stable=True).indices  # n: by concept, input order within
        group_concepts = concepts[group]
        kept = kept[group]
        before = torch.cumsum(kept, 0) - kept.long()  # kept tokens ahead in the grouped order
        order = before - (torch.cumsum(keep, 0) - keep)[group_concepts]  # rank within the concept
        # Entries that a later entry of the same step would overwrite are dropped, which keeps the
        # write slots unique; dropped and unkept tokens all go to the spare last row.
        survive = kept & (order >= (keep - self.capacity)[group_concepts])
        slots = (
            group_concepts * self.capacity + (self.pointer[group_concepts] + order) % self.capacity
        )
        slots = torch.where(survive, slots, torch.full_like(slots, self.slot_count))
        data.index_copy_(0, slots, projections[group])

        self.pointer.copy_((self.pointer + keep) % self.capacity)
        self.count.copy_(torch.clamp(self.count + keep, max=self.capacity))
        self._invalidate()

    def slots(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """Every slot of the buffer, its concept and whether it is used: the loss's input.

        Returns:
            ``(entries [K * capacity, P], concepts [K * capacity] long, valid [K * capacity]
            bool)``: ``entries`` is a view of the buffer (no copy), ``concepts`` is fixed, and
            ``valid`` is computed on the device from the counters. ``None`` before the first
            update.
        """
        if self._data is None:
            return None
        device = self._data.device
        if self._slot_concepts is None or self._slot_concepts.device != device:
            concept_ids = torch.arange(self.num_concepts, device=device)
            self._slot_concepts = concept_ids.repeat_interleave(self.capacity)  # K*cap
        used = self._used()  # K cap
        return self._data[: self.slot_count], self._slot_concepts, used.reshape(-1)

    def used_slots(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """The used slots of :meth:`slots` only, gathered into a copy.

        The loss's products cost in proportion to the slots they are given, and a bank fills over
        the first steps (the demo's 2,048 concepts x 100 slots are mostly empty for a whole run).
        Gathering reads the fill back from the device, so the static :meth:`slots` is what an
        accelerator step takes; a step that reads values back anyway (debug checks, the default
        on a CPU) takes this.

        Returns:
            ``(entries [M, P], concepts [M], valid [M])`` with every ``valid`` true, or ``None``
            while no slot is used.
        """
        slots = self.slots()
        if slots is None:
            return None
        entries, concepts, valid = slots
        index = valid.nonzero().squeeze(1)  # M
        if index.numel() == 0:
            return None
        return entries.index_select(0, index), concepts.index_select(0, index), valid[index]

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

    def view(self) -> tuple[Tensor, Tensor]:
        """All used entries, concept by concept (ascending), oldest first within a concept.

        A compact copy whose size is read back from the device: for inspection, tests and callers
        of the plain ``(bank, bank_concepts)`` interface. A training step uses :meth:`slots`.

        Returns:
            ``(bank [M, P], bank_concepts [M] long)``. Before the first update: ``[0, P]`` float32
            and ``[0]`` on the device of the bank's counters.
        """
        storage = self.storage
        if storage is None:
            device = self.count.device
            return (
                torch.empty(0, self.dim, device=device),
                torch.empty(0, dtype=torch.long, device=device),
            )
        if self._view_index is None or self._view_concepts is None:
            self._build_view()
        assert self._view_index is not None and self._view_concepts is not None
        flat = storage.reshape(self.slot_count, self.dim)  # K*cap P (a view)
        return flat.index_select(0, self._view_index), self._view_concepts

    @property
    def is_allocated(self) -> bool:
        """Whether the ring buffer exists (after the first update)."""
        return self._data is not None

    def memory_bytes(self) -> int:
        """Bytes held by the ring buffer (0 before the first update)."""
        if self._data is None:
            return 0
        return math.prod(self._data.shape) * self._data.element_size()
