"""The stage-2 training step as the GPU runs it: no host synchronisation with debug checks off, a
deferred finiteness check, a bank in the product's dtype that travels in the state dict."""

from __future__ import annotations

import warnings

import pytest
import torch

from cause_lightning.config import stage_module
from cause_lightning.models import TRHead, build_backbone
from cause_lightning.modules.base import NonFiniteLossError
from cause_lightning.modules.head import HeadModule
from host_sync import HostSyncs

# Host synchronisations allowed in one head step with debug checks off (there are none today).
MAX_SYNCS = 2


def _head_module(head: torch.nn.Module, clusterbook: torch.Tensor, **kwargs: object) -> HeadModule:
    kwargs.setdefault("debug_checks", True)
    return stage_module(
        "head",
        build_backbone("tiny_vit"),
        head=head,
        clusterbook=clusterbook,
        num_classes=5,
        lr=4e-3,
        projection_dim=32,
        bank_capacity=4,
        **kwargs,
    )


def _module(**kwargs: object) -> HeadModule:
    torch.manual_seed(0)
    clusterbook = torch.randn(32, 64)
    head = TRHead(64, reduced_dim=16, num_queries=64, clusterbook=clusterbook, dropout=0.1)
    return _head_module(head, clusterbook, **kwargs)


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {
        "image": torch.randn(4, 3, 64, 64, generator=gen),
        "label": torch.randint(0, 5, (4, 64, 64), generator=gen),
    }


def _step(module: HeadModule, optimizer: torch.optim.Optimizer, index: int) -> torch.Tensor:
    batch = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        loss = module.training_step(batch, index)
        loss.backward()
        optimizer.step()  # Adam's step counters live on the host: not part of the count
        optimizer.zero_grad()
        module.on_train_batch_end(None, batch, index)
    return loss


def _counted_step(module: HeadModule, optimizer: torch.optim.Optimizer, index: int) -> HostSyncs:
    batch = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with HostSyncs() as syncs:
            loss = module.training_step(batch, index)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with HostSyncs() as after:
            module.on_train_batch_end(None, batch, index)
    syncs.counts.update(after.counts)
    return syncs


@pytest.mark.parametrize("head_type", ["tr", "mlp"])
def test_head_step_has_no_host_sync_without_debug_checks(head_type: str) -> None:
    module = _module(debug_checks=False) if head_type == "tr" else _mlp_module(debug_checks=False)
    optimizer = module.configure_optimizers()
    for index in range(3):  # fill the bank
        _step(module, optimizer, index)
    assert len(module.bank) > 0
    syncs = _counted_step(module, optimizer, 3)
    assert syncs.total <= MAX_SYNCS, dict(syncs.counts)
    # The instrument sees the checks that the debug mode makes.
    checked = _module(debug_checks=True) if head_type == "tr" else _mlp_module(debug_checks=True)
    optimizer = checked.configure_optimizers()
    _step(checked, optimizer, 0)
    assert _counted_step(checked, optimizer, 1).total > MAX_SYNCS


def _mlp_module(**kwargs: object) -> HeadModule:
    from cause_lightning.models import MLPHead

    torch.manual_seed(0)
    clusterbook = torch.randn(32, 64)
    return _head_module(MLPHead(64, reduced_dim=16), clusterbook, **kwargs)


def test_deferred_finite_check_stops_before_a_checkpoint() -> None:
    module = _module(debug_checks=False)
    module.defer_finite_check(torch.tensor(1.0))
    module.on_train_epoch_end()  # finite: nothing to report, flag cleared
    module.defer_finite_check(torch.tensor(float("nan")))
    module.defer_finite_check(torch.tensor(2.0))  # a later finite step does not clear it
    with pytest.raises(NonFiniteLossError, match="between global steps"):
        module.on_save_checkpoint({"state_dict": {}})
    module.defer_finite_check(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match="debug_checks=true"):
        module.on_train_epoch_end()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_step_keeps_the_bank_in_the_product_dtype(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _module(debug_checks=False)
    monkeypatch.setattr(module, "_matmul_dtype", lambda: dtype)
    optimizer = module.configure_optimizers()
    losses = [_step(module, optimizer, index) for index in range(3)]
    assert module.bank.storage.dtype == dtype
    entries, _, valid = module.bank.slots()  # type: ignore[misc]
    norms = entries[valid].float().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-2)  # normalised
    assert all(torch.isfinite(loss) for loss in losses)
    module.raise_if_nonfinite()


def test_head_checkpoint_state_carries_the_bank() -> None:
    module = _module(debug_checks=False)
    optimizer = module.configure_optimizers()
    for index in range(2):
        _step(module, optimizer, index)
    state = module.state_dict()
    assert "bank._extra_state" in state
    fresh = _module(debug_checks=False)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.bank.storage, module.bank.storage)
    assert torch.equal(fresh.bank.count, module.bank.count)
    assert torch.equal(fresh.bank.pointer, module.bank.pointer)


def test_checked_step_on_the_used_slots_equals_the_static_bank_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checked step gathers the bank's used slots; its loss and gradients are the same."""
    import cause_lightning.modules.head as head_module

    rows: list[int] = []
    terms = head_module.concept_contrastive_terms

    def recorded(*args: object, **kwargs: object) -> object:
        rows.append(kwargs["bank"].shape[0])  # type: ignore[union-attr]
        return terms(*args, **kwargs)

    module = _module(debug_checks=False)
    optimizer = module.configure_optimizers()
    for index in range(3):
        _step(module, optimizer, index)
    assert 0 < len(module.bank) < module.bank.slot_count  # a partly filled bank
    results = {}
    monkeypatch.setattr(head_module, "concept_contrastive_terms", recorded)
    for checks in (True, False):
        module.hparams.debug_checks = checks
        torch.manual_seed(100)  # the heads' dropout
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a trainer
            loss = module.training_step(_batch(), 3)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        results[checks] = (loss.detach(), grads)
        optimizer.zero_grad()
    assert rows == [len(module.bank), module.bank.slot_count]
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-5, atol=1e-7)
