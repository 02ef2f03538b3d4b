"""Small helpers: rank-zero logging."""

from __future__ import annotations

import logging

import pytest

from cause_lightning.utils import get_logger


def test_info_comes_from_rank_zero_only(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = get_logger("cause_lightning.test_utils")
    with caplog.at_level(logging.INFO, logger="cause_lightning.test_utils"):
        monkeypatch.setenv("RANK", "0")
        log.info("from rank 0")
        monkeypatch.setenv("RANK", "1")
        log.info("from rank 1")
        log.warning("warning from rank 1")
    assert [r.getMessage() for r in caplog.records] == ["from rank 0", "warning from rank 1"]
