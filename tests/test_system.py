"""Small helpers: rank-zero logging, the cores of a rank."""

from __future__ import annotations

import logging
import os

import pytest

from cause_lightning.core.logs import get_logger
from cause_lightning.core.system import cores_per_rank


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


def test_cores_per_rank_shares_the_node_unless_slurm_gave_each_rank_a_task(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert cores_per_rank(4) == 10  # four ranks share the node's 40 cores
    # +launcher=slurm: one task per GPU, --cpus-per-task=8 each (the task may see more cores
    # when the cluster does not bind tasks to theirs, or only its own when it does)
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    assert cores_per_rank(4) == 8
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cores_per_rank(4) == 8  # bound: its own 8 cores, not 8 / 4
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")  # one task for all ranks: shared again
    assert cores_per_rank(4) == 2
