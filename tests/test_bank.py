"""Tests of ``ConceptBank`` (docs/method.md §5.5) against a plain per-concept list model.

Every projection row carries a unique id in column 0, so the tests can tell exactly which inputs
were kept, in which order, and which were evicted.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from cause_lightning.models.bank import ConceptBank
from cause_lightning.ops import concept_contrastive_terms, contrastive_mean, nearest_concept

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _batch(
    concepts: list[int], first_id: int, dim: int = 3, device: str = "cpu"
) -> tuple[Tensor, Tensor]:
    ids = torch.arange(first_id, first_id + len(concepts), dtype=torch.float64)
    proj = torch.cat([ids[:, None], torch.randn(len(concepts), dim - 1, dtype=torch.float64)], 1)
    return torch.tensor(concepts, dtype=torch.long, device=device), proj.to(device)


def _contents(bank: ConceptBank) -> dict[int, list[int]]:
    entries, concepts = bank.view()
    out: dict[int, list[int]] = {}
    for value, concept in zip(entries[:, 0].tolist(), concepts.tolist(), strict=True):
        out.setdefault(int(concept), []).append(int(value))
    return out


def _check_view_layout(bank: ConceptBank, model: dict[int, list[int]]) -> None:
    entries, concepts = bank.view()
    expected_ids = [i for k in sorted(model) for i in model[k]]
    expected_concepts = [k for k in sorted(model) for _ in model[k]]
    assert entries[:, 0].long().tolist() == expected_ids
    assert concepts.tolist() == expected_concepts
    assert len(bank) == len(expected_ids) == entries.shape[0]
    assert concepts.dtype == torch.long


@pytest.mark.parametrize("device", DEVICES)
def test_fifo_order_capacity_and_wraparound(device: str) -> None:
    """keep_fraction = 1 makes the update deterministic: an exact FIFO per concept."""
    torch.manual_seed(0)
    num_concepts, capacity = 5, 4
    bank = ConceptBank(num_concepts, capacity=capacity, dim=3, keep_fraction=1.0)
    model: dict[int, list[int]] = {}
    next_id = 0
    gen = torch.Generator().manual_seed(1)
    for step in range(12):
        size = 11 if step != 5 else 30  # step 5 overflows single concepts within one update
        concepts = torch.randint(0, num_concepts - 1, (size,), generator=gen).tolist()  # K-1 unused
        c, p = _batch(concepts, next_id, device=device)
        bank.update(c, p)
        for offset, k in enumerate(concepts):
            model.setdefault(k, []).append(next_id + offset)
            model[k] = model[k][-capacity:]  # newest kept
        next_id += size
        _check_view_layout(bank, model)
    assert num_concepts - 1 not in _contents(bank)
    assert bank.count.tolist()[: num_concepts - 1] == [capacity] * (num_concepts - 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_half_kept_random_subset_in_input_order(seed: int) -> None:
    num_concepts, capacity = 6, 5
    bank = ConceptBank(num_concepts, capacity=capacity, dim=4)
    gen = torch.Generator().manual_seed(seed)
    model: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(8):
        concepts = torch.randint(0, num_concepts, (14,), generator=gen).tolist()
        c, p = _batch(concepts, next_id, dim=4)
        bank.update(c, p, generator=gen)
        after = _contents(bank)
        for k in range(num_concepts):
            inputs = [next_id + i for i, kk in enumerate(concepts) if kk == k]
            new = [i for i in after.get(k, []) if i >= next_id]
            kept = len(inputs) // 2  # floor(n_k / 2); a concept seen once keeps nothing
            assert kept <= capacity
            assert len(new) == kept
            assert set(new) <= set(inputs)
            assert new == sorted(new)  # appended in input order
            model[k] = (model.get(k, []) + new)[-capacity:]  # newest kept, oldest evicted
        _check_view_layout(bank, {k: v for k, v in model.items() if v})
        next_id += len(concepts)


def test_seen_once_keeps_nothing_and_floor() -> None:
    bank = ConceptBank(4, capacity=10, dim=3)
    c, p = _batch([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3], 0)
    bank.update(c, p)
    assert bank.count.tolist() == [0, 1, 1, 2]
    assert len(bank) == 4


def test_subset_is_uniformly_random() -> None:
    bank = ConceptBank(1, capacity=4, dim=3)
    gen = torch.Generator().manual_seed(0)
    c, p = _batch([0, 0, 0, 0], 0)
    hits = torch.zeros(4)
    pairs = set()
    draws = 300
    for _ in range(draws):
        bank.reset()
        bank.update(c, p, generator=gen)
        chosen = tuple(_contents(bank)[0])
        assert len(chosen) == 2
        pairs.add(chosen)
        hits[list(chosen)] += 1
    assert len(pairs) == 6  # every 2-subset of 4 occurs
    freq = hits / draws
    assert torch.all((freq > 0.38) & (freq < 0.62)), freq


def test_generator_reproducible() -> None:
    c, p = _batch([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], 0)
    views = []
    for seed in (5, 5, 6):
        bank = ConceptBank(2, capacity=10, dim=3)
        bank.update(c, p, generator=torch.Generator().manual_seed(seed))
        views.append(bank.view()[0])
    assert torch.equal(views[0], views[1])
    draws = set()
    for seed in range(10):
        bank = ConceptBank(2, capacity=10, dim=3)
        bank.update(c, p, generator=torch.Generator().manual_seed(seed))
        draws.add(tuple(bank.view()[0][:, 0].tolist()))
    assert len(draws) > 1


def test_ring_buffer_preallocated_once_and_not_a_buffer() -> None:
    bank = ConceptBank(3, capacity=2, dim=5)
    assert bank.storage is None and not bank.is_allocated
    entries, concepts = bank.view()
    assert entries.shape == (0, 5) and concepts.shape == (0,) and len(bank) == 0
    c = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    p = torch.randn(8, 5, dtype=torch.float64)
    bank.update(c, p)
    assert bank.storage is not None
    assert bank.storage.shape == (3, 2, 5) and bank.storage.dtype == torch.float64
    assert bank.memory_bytes() == (3 * 2 + 1) * 5 * 8  # one spare row for discarded writes
    pointer = bank.storage.data_ptr()
    for _ in range(5):
        bank.update(c, p)
    assert bank.storage.data_ptr() == pointer
    # Not a registered buffer: DDP would otherwise broadcast rank 0's bank before every forward.
    assert list(bank.named_buffers()) == [] and list(bank.parameters()) == []
    # Inputs of another dtype are stored in the buffer's dtype.
    bank.update(c, p.float())
    assert bank.storage.dtype == torch.float64 and bank.storage.data_ptr() == pointer


def test_module_casts_and_moves_reach_the_bank() -> None:
    bank = ConceptBank(3, capacity=4, dim=3)
    bank.update(*_batch([0, 0, 1, 1, 2, 2], 0))
    before = bank.view()
    holder = torch.nn.Sequential(bank).float()  # as a submodule of a stage module
    assert bank.storage.dtype == torch.float32 and bank.count.dtype == torch.long
    after = bank.view()
    assert after[0].dtype == torch.float32
    torch.testing.assert_close(after[0], before[0].float())
    assert torch.equal(after[1], before[1])
    holder.to("cpu")
    bank.update(*_batch([1, 1], 10))
    assert len(bank) == 4 and bank.view()[0].dtype == torch.float32


def test_view_cache_rebuilt_only_after_update(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = ConceptBank(3, capacity=4, dim=3)
    calls = []
    original = bank._build_view
    monkeypatch.setattr(bank, "_build_view", lambda: (calls.append(1), original())[1])
    c, p = _batch([0, 0, 1, 1, 1, 1], 0)
    bank.update(c, p)
    first = bank.view()
    second = bank.view()
    assert len(calls) == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    bank.update(*_batch([2, 2], 10))
    third = bank.view()
    assert len(calls) == 2
    assert third[1].tolist() == [0, 1, 1, 2]
    # The stored values are copies: changing the input afterwards changes nothing.
    p.zero_()
    assert torch.equal(bank.view()[0][:3], third[0][:3])


def test_reset_empties_but_keeps_buffer() -> None:
    bank = ConceptBank(2, capacity=3, dim=3)
    bank.update(*_batch([0, 0, 1, 1], 0))
    pointer = bank.storage.data_ptr()
    bank.reset()
    assert len(bank) == 0 and bank.view()[0].shape == (0, 3)
    assert bank.storage.data_ptr() == pointer
    bank.update(*_batch([1, 1, 1, 1], 10))
    contents = _contents(bank)
    assert list(contents) == [1] and len(contents[1]) == 2 and len(bank) == 2
    assert set(contents[1]) <= {10, 11, 12, 13} and contents[1] == sorted(contents[1])


def test_empty_update_and_errors() -> None:
    bank = ConceptBank(3, capacity=2, dim=4)
    bank.update(torch.empty(0, dtype=torch.long), torch.empty(0, 4))
    assert len(bank) == 0
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        bank.update(torch.tensor([0]), torch.randn(1, 5))
    with pytest.raises(ValueError, match="one concept per projection"):
        bank.update(torch.tensor([0, 1]), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        bank.update(torch.tensor([0, 3]), torch.randn(2, 4))
    with pytest.raises(ValueError, match="integer"):
        bank.update(torch.tensor([0.0, 1.0]), torch.randn(2, 4))
    with pytest.raises(ValueError, match="keep_fraction"):
        ConceptBank(3, keep_fraction=1.5)
    with pytest.raises(ValueError, match="capacity"):
        ConceptBank(3, capacity=0)


def test_other_keep_fraction_is_exact_floor() -> None:
    bank = ConceptBank(3, capacity=50, dim=3, keep_fraction=0.3)
    c = torch.tensor([0] * 10 + [1] * 7 + [2] * 3)
    bank.update(c, torch.randn(20, 3))
    assert bank.count.tolist() == [3, 2, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_bank_feeds_contrastive_loss(device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    clusterbook = torch.randn(8, 6, generator=gen).to(device)
    tokens = torch.randn(2, 10, 6, generator=gen).to(device)
    student = torch.randn(2, 10, 16, generator=gen).to(device).requires_grad_(True)
    teacher = torch.randn(2, 10, 16, generator=gen).to(device)
    bank = ConceptBank(8, capacity=4, dim=16).to(device)
    entries, concepts = bank.view()
    assert entries.device.type == device
    terms, _ = concept_contrastive_terms(tokens, student, teacher, clusterbook, entries, concepts)
    assert terms.shape == (2,)  # empty bank: in-batch terms only
    bank.update(nearest_concept(tokens, clusterbook).flatten(), teacher.flatten(0, 1))
    entries, concepts = bank.view()
    assert entries.device.type == device and entries.shape[0] == len(bank) > 0
    terms, _ = concept_contrastive_terms(tokens, student, teacher, clusterbook, entries, concepts)
    assert terms.shape == (4,)
    terms.mean().backward()
    assert torch.isfinite(student.grad).all()


def _filled(seed: int = 0, steps: int = 6) -> ConceptBank:
    bank = ConceptBank(5, capacity=4, dim=6)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        concepts = torch.randint(0, 4, (13,), generator=gen)  # concept 4 never seen
        bank.update(concepts, torch.randn(13, 6, generator=gen), generator=gen)
        if step == 2:
            assert len(bank) < 4 * 4  # some concepts not yet full
    return bank


def test_slots_are_the_buffer_with_a_mask_equal_to_the_view() -> None:
    bank = ConceptBank(5, capacity=4, dim=6)
    assert bank.slots() is None
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        concepts = torch.randint(0, 4, (9,), generator=gen)
        bank.update(concepts, torch.randn(9, 6, generator=gen), generator=gen)
        entries, concepts_of_slots, valid = bank.slots()  # type: ignore[misc]
        assert entries.shape == (20, 6) and valid.shape == (20,) and valid.dtype == torch.bool
        assert entries.data_ptr() == bank.storage.data_ptr()  # a view, not a copy
        assert concepts_of_slots.tolist() == [k for k in range(5) for _ in range(4)]
        view, view_concepts = bank.view()
        assert int(valid.sum()) == len(bank) == view.shape[0]
        # The used slots hold the same entries as the compact view (another order within a concept).
        for k in range(5):
            used = entries[(concepts_of_slots == k) & valid]
            listed = view[view_concepts == k]
            assert sorted(map(tuple, used.tolist())) == sorted(map(tuple, listed.tolist()))
        assert not valid[16:].any()  # concept 4 is never seen


def test_loss_on_slots_equals_loss_on_the_compact_view() -> None:
    bank = _filled(1)
    gen = torch.Generator().manual_seed(2)
    tokens, book = torch.randn(2, 7, 3, generator=gen), torch.randn(5, 3, generator=gen)
    teacher = torch.randn(2, 7, 6, generator=gen)
    student = torch.randn(2, 7, 6, generator=gen)
    results = []
    for slots in (True, False):
        leaf = student.clone().requires_grad_(True)
        if slots:
            entries, concepts, valid = bank.slots()  # type: ignore[misc]
            kwargs = {"bank_valid": valid}
        else:
            entries, concepts = bank.view()
            kwargs = {}
        terms, empty = concept_contrastive_terms(
            tokens, leaf, teacher, book, entries, concepts, temperature=0.5, **kwargs
        )
        loss = contrastive_mean(terms, kwargs.get("bank_valid"))
        loss.backward()
        results.append((terms.detach(), empty, loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][3], results[1][3], rtol=1e-5, atol=1e-6)


def test_all_empty_slots_count_like_an_empty_bank() -> None:
    bank = _filled(3)
    bank.reset()
    entries, concepts, valid = bank.slots()  # type: ignore[misc]
    gen = torch.Generator().manual_seed(4)
    tokens, book = torch.randn(2, 7, 3, generator=gen), torch.randn(5, 3, generator=gen)
    student, teacher = torch.randn(2, 7, 6, generator=gen), torch.randn(2, 7, 6, generator=gen)
    terms, empty = concept_contrastive_terms(
        tokens, student, teacher, book, entries, concepts, bank_valid=valid
    )
    assert terms.shape == (4,) and empty[2:].all() and torch.equal(terms[2:], torch.zeros(2))
    without, _ = concept_contrastive_terms(tokens, student, teacher, book)
    torch.testing.assert_close(contrastive_mean(terms, valid), without.mean())


def test_state_dict_round_trip_restores_the_bank_and_its_future() -> None:
    bank = _filled(5)
    state = bank.state_dict()
    assert set(state) == {"_extra_state"}
    assert set(state["_extra_state"]) == {"count", "pointer", "entries"}
    # Only the used slots travel, not the whole [K, capacity, P] buffer.
    assert state["_extra_state"]["entries"].shape == (len(bank), 6) and len(bank) < 5 * 4
    restored = ConceptBank(5, capacity=4, dim=6)
    restored.load_state_dict(state)
    for name in ("count", "pointer", "storage"):
        assert torch.equal(getattr(restored, name), getattr(bank, name))
    assert [torch.equal(a, b) for a, b in zip(restored.slots(), bank.slots(), strict=True)] == [
        True
    ] * 3
    # The state is a copy, and both banks continue identically from it.
    state["_extra_state"]["count"].zero_()
    assert len(restored) == len(bank) > 0
    c = torch.tensor([0, 0, 0, 1, 1, 3, 3, 3, 3])
    p = torch.randn(9, 6)
    for target in (bank, restored):
        target.update(c, p, generator=torch.Generator().manual_seed(7))
    assert torch.equal(restored.storage, bank.storage)
    assert torch.equal(restored.pointer, bank.pointer)
    # Through a module that holds the bank (a stage module and its Lightning checkpoint).
    holder, other = torch.nn.Sequential(bank), torch.nn.Sequential(ConceptBank(5, 4, 6))
    other.load_state_dict(holder.state_dict())
    assert torch.equal(other[0].storage, bank.storage)
    # An empty, unallocated bank round-trips as empty; a bank of another shape is refused.
    empty = ConceptBank(5, capacity=4, dim=6)
    filled = _filled(6)
    filled.load_state_dict(empty.state_dict())
    assert not filled.is_allocated and len(filled) == 0
    with pytest.raises(ValueError, match="bank_capacity"):
        ConceptBank(5, capacity=3, dim=6).load_state_dict(state)
    with pytest.raises(RuntimeError, match="_extra_state"):
        ConceptBank(5, capacity=4, dim=6).load_state_dict({})


def test_update_reads_nothing_back_without_validation() -> None:
    from host_sync import HostSyncs

    bank = _filled(8)
    gen = torch.Generator().manual_seed(9)
    concepts, projections = torch.randint(0, 5, (40,), generator=gen), torch.randn(40, 6)
    with HostSyncs() as syncs:
        bank.update(concepts, projections, generator=gen, validate=False)
        bank.slots()
    assert syncs.total == 0, syncs.counts
    with HostSyncs() as syncs:
        bank.update(concepts, projections, generator=gen)
    assert syncs.total > 0  # the range check reads the ids back


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bank_keeps_the_dtype_of_its_product(dtype: torch.dtype) -> None:
    bank = ConceptBank(3, capacity=4, dim=5)
    bank.update(
        torch.tensor([0, 0, 1, 1]), torch.nn.functional.normalize(torch.randn(4, 5)).to(dtype)
    )
    entries, _, _ = bank.slots()  # type: ignore[misc]
    assert entries.dtype == dtype and bank.storage.dtype == dtype
    bank.update(torch.tensor([2, 2]), torch.randn(2, 5))  # float32 input: stored as the buffer
    assert bank.storage.dtype == dtype
