"""The training steps as the GPU runs them: no host synchronisation with debug checks off in any
stage (counted through the Lightning loop, progress bar and logging included), a deferred
finiteness check, the nearest concepts found once per head step, a bank in the product's dtype
that travels in the state dict."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from cause_lightning.config import stage_module
from cause_lightning.models import LinearProbe, TRHead, build_backbone
from cause_lightning.modules.base import NonFiniteLossError
from cause_lightning.modules.head import HeadModule
from cause_lightning.ops import grid_sample_tokens, nearest_concept
from cause_lightning.stages import build
from cause_lightning.stages.callbacks import ThroughputProgressBar
from cause_lightning.stages.context import RunContext
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


# --------------------------------------------------------------------------------------------------
# the nearest concepts of a head step
# --------------------------------------------------------------------------------------------------


class _Argmax(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ``aten.argmax`` calls: one per nearest-concept search at these sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += str(func).startswith("aten.argmax")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head_type", ["tr", "mlp"])
def test_head_step_finds_the_nearest_concepts_once(
    head_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One search per step (TR: the grid's, for both heads; the sampled tokens' are the same
    values at the sampled positions), used by the loss and the bank alike."""
    import cause_lightning.modules.head as head_module

    module = _module(debug_checks=False) if head_type == "tr" else _mlp_module(debug_checks=False)
    used: dict[str, torch.Tensor] = {}
    terms = head_module.concept_contrastive_terms

    def recorded(*args: Any, **kwargs: Any) -> Any:
        used["tokens"], used["loss"] = args[0], kwargs["concepts"]
        return terms(*args, **kwargs)

    monkeypatch.setattr(head_module, "concept_contrastive_terms", recorded)
    with warnings.catch_warnings(), _Argmax() as searches:
        warnings.simplefilter("ignore")  # self.log without a trainer
        module.training_step(_batch(), 0)
    assert searches.count == 1
    # Bit-identical to a search on the sampled tokens themselves.
    assert torch.equal(used["loss"], nearest_concept(used["tokens"], module.clusterbook))
    assert module._pending_bank is not None
    assert torch.equal(module._pending_bank[0], used["loss"].flatten())
    if head_type == "tr":  # and to the concepts each head would find on its own grid
        features = module.extract(_batch()["image"])
        grid = nearest_concept(features.flatten(2).transpose(1, 2), module.head.clusterbook)
        index = module.grid_index(features, module.hparams.window, 0)
        sampled, _ = grid_sample_tokens(grid.view(4, 1, 8, 8), module.hparams.window, index)
        assert torch.equal(sampled.squeeze(-1), used["loss"])


# --------------------------------------------------------------------------------------------------
# every training stage through the Lightning loop
# --------------------------------------------------------------------------------------------------

# Host synchronisations allowed in one step of any stage through the loop, debug checks off
# (before: 5 in the mediator and probe steps, 2 in the head step, from the progress bar).
MAX_LOOP_SYNCS = 0


class _StepSyncs(pl.Callback):
    """Host synchronisations of each training step: from one batch start to the next, so the
    step, its backward, the batch-end hooks (EMA, bank, progress bar) and Lightning's logging.
    From the optimiser hook to the batch end (clipping and the parameter update; Adam keeps its
    step counters on the host) nothing is counted."""

    def __init__(self) -> None:
        self.steps: list[dict[str, int]] = []
        self._syncs: HostSyncs | None = None
        self._pause: Any = None

    def _close(self) -> None:
        if self._syncs is not None:
            self._syncs.__exit__(None, None, None)
            self.steps.append(dict(self._syncs.counts))
            self._syncs = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._close()
        self._syncs = HostSyncs().__enter__()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        assert self._syncs is not None
        self._pause = self._syncs.paused()
        self._pause.__enter__()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._pause.__exit__(None, None, None)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()  # before the once-per-epoch deferred finiteness check


def _stage(run: RunContext, step: str) -> pl.LightningModule:
    """The step's module as the pipeline builds it (trained inputs drawn at random)."""
    checks = {"lr": 1e-3}
    if step == "mediator":
        return build.stage_module(run, "mediator", **checks)
    clusterbook = torch.randn(int(run.cfg.method.num_concepts), int(run.backbone.embed_dim))
    head = build.new_head(run, clusterbook)
    if step == "head":
        return build.stage_module(run, "head", head=head, clusterbook=clusterbook, **checks)
    linear = LinearProbe(head.reduced_dim, int(run.cfg.data.num_classes))
    return build.stage_module(run, "probe", head=head, linear=linear, cluster_lr=1e-3, **checks)


def _fit(
    run: RunContext, step: str, root: Path, log_every: int, *callbacks: pl.Callback
) -> pl.LightningModule:
    module = _stage(run, step)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=4,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        log_every_n_steps=log_every,
        logger=CSVLogger(root, name=step),
        callbacks=[*callbacks, ThroughputProgressBar()],
        enable_checkpointing=False,
        enable_model_summary=False,
        gradient_clip_val=run.cfg.method.head.clip if step == "head" else None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few batches, no workers, no validation
        trainer.fit(module, datamodule=build.datamodule(run, step, batch_size=2))
    return module


@pytest.mark.parametrize("step", ["mediator", "head", "probe"])
def test_training_steps_have_no_host_sync_without_debug_checks(
    step: str, tiny: Callable[..., Any], tmp_path: Path
) -> None:
    run = RunContext(tiny("method.debug_checks=false", "head=tr")).setup()
    counter = _StepSyncs()
    module = _fit(run, step, tmp_path, 50, counter)
    assert module.hparams.debug_checks is False
    assert len(counter.steps) == 4
    # The first step takes the progress bar's first host copy; the steps after it read nothing.
    for counts in counter.steps[1:]:
        assert sum(counts.values()) <= MAX_LOOP_SYNCS, (step, counts)
    assert isinstance(module.trainer.progress_bar_metrics[_PROGRESS[step]], float)
    # The instrument sees the per-step checks of the debug mode.
    checked = RunContext(tiny("method.debug_checks=true", "head=tr")).setup()
    counter = _StepSyncs()
    _fit(checked, step, tmp_path / "checked", 50, counter)
    assert all(sum(counts.values()) > MAX_LOOP_SYNCS for counts in counter.steps[1:])


_PROGRESS = {
    "mediator": "train/modularity",
    "head": "train/loss_front",
    "probe": "train/modularity",
}


def test_loggers_get_the_exact_value_of_every_step_they_write(
    tiny: Callable[..., Any], tmp_path: Path
) -> None:
    run = RunContext(tiny("method.debug_checks=false")).setup()
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, *_: Any) -> None:
            losses.append(float(outputs["loss"]))

    module = _fit(run, "mediator", tmp_path, 2, Record())
    path = Path(module.logger.log_dir) / "metrics.csv"  # type: ignore[union-attr]
    rows = [row for row in csv.DictReader(path.open()) if row.get("train/modularity")]
    logged = {int(row["step"]): float(row["train/modularity"]) for row in rows}
    assert sorted(logged) == [1, 3]  # every second step (0-based)
    for step, value in logged.items():
        assert value == pytest.approx(losses[step], rel=1e-6)


@pytest.mark.parametrize(("setting", "expected"), [("null", True), ("false", False)])
def test_debug_checks_reach_every_training_stage(
    setting: str, expected: bool, tiny: Callable[..., Any]
) -> None:
    """``method.debug_checks`` resolved for the run's device (null: on for a CPU run)."""
    run = RunContext(tiny(f"method.debug_checks={setting}", "head=tr")).setup()
    for step in ("mediator", "head", "probe"):
        assert _stage(run, step).hparams.debug_checks is expected, step
