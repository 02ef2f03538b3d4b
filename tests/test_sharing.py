"""Tensor sharing with spawned processes: the check and the file_system fallback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch.multiprocessing as mp

from cause_lightning.stages import sharing


@pytest.fixture
def fresh_sharing() -> Iterator[None]:
    before = mp.get_sharing_strategy()
    sharing.ensure_tensor_sharing.cache_clear()
    yield
    mp.set_sharing_strategy(before)
    sharing.ensure_tensor_sharing.cache_clear()


def test_failing_default_falls_back_to_file_system_with_one_warning(
    fresh_sharing: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    mp.set_sharing_strategy("file_descriptor")
    calls = []

    def probe(strategy: str, timeout: float = 120.0) -> tuple[bool, str]:
        calls.append(strategy)
        return False, "RuntimeError: unable to resize file <filename not specified> (22)"

    monkeypatch.setattr(sharing, "sharing_works", probe)
    with caplog.at_level(logging.WARNING, logger="cause_lightning.stages.sharing"):
        assert sharing.ensure_tensor_sharing() == "file_system"
        assert sharing.ensure_tensor_sharing() == "file_system"
    assert mp.get_sharing_strategy() == "file_system"
    assert calls == ["file_descriptor"]  # probed once per process
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "file_system" in warnings[0].getMessage()


def test_other_failures_and_success_keep_the_default(
    fresh_sharing: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    mp.set_sharing_strategy("file_descriptor")
    monkeypatch.setattr(sharing, "sharing_works", lambda s, timeout=120.0: (False, "MemoryError"))
    assert sharing.ensure_tensor_sharing() == "file_descriptor"
    sharing.ensure_tensor_sharing.cache_clear()
    monkeypatch.setattr(sharing, "sharing_works", lambda s, timeout=120.0: (True, ""))
    assert sharing.ensure_tensor_sharing() == "file_descriptor"


@pytest.mark.slow
def test_real_probe_file_system_works_and_a_failing_default_fails_as_expected() -> None:
    works, stderr = sharing.sharing_works("file_system")
    assert works, stderr[-2000:]
    works, stderr = sharing.sharing_works("file_descriptor")
    assert works or sharing.SHARING_FAILURE in stderr, stderr[-2000:]
