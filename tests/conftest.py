"""Shared fixtures: hermetic environment, Hydra compose helpers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tiny import TINY, compose_config

# Set before anything imports wandb / huggingface_hub, and inherited by CLI subprocesses.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")
# Tiny tensors: thread start-up costs more than it saves, and tests share two cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _hermetic_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")


@pytest.fixture
def compose(tmp_path: Path) -> Iterator[Callable[..., object]]:
    """Compose the project config with overrides; every path points into ``tmp_path``."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cause_lightning.__main__ import config_dir

    GlobalHydra.instance().clear()
    initialize_config_dir(config_dir=config_dir(), version_base="1.3")

    def _compose(*overrides: str, paths: Path | None = None) -> object:
        return compose_config(paths or tmp_path, *overrides)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture
def tiny(compose: Callable[..., object], shared_data_dir: Path) -> Callable[..., object]:
    """Compose a small, fast run (``tests/tiny.py``) on the session's mosaic data."""

    def _tiny(*overrides: str, base: list[str] = TINY) -> object:
        return compose(*base, f"data.module.root={shared_data_dir / 'mosaic'}", *overrides)

    return _tiny


@pytest.fixture(scope="session")
def shared_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory per session, so generated datasets are made once."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def full_fp32_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA products in full float32, so a GPU result can be compared with the CPU's at 1e-4.

    cuDNN convolutions (the patch embedding) default to TF32 on Ampere and newer GPUs, which
    differs from float32 by about 1e-3 relative: a precision choice, not a placement bug.
    """
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
