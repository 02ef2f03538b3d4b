"""benchmarks/bench_crf.py runs end to end at toy sizes (its timings are not checked)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydensecrf")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
try:
    import bench_crf
finally:
    sys.path.pop(0)

TOY = ["--size", "32", "--classes", "4", "--iterations", "2", "--repeats", "1"]


def test_pictures_are_square_uint8_for_every_kind() -> None:
    rng = np.random.default_rng(0)
    for kind in (*bench_crf.PHOTOS, *bench_crf.SYNTHETIC):
        image = bench_crf.picture(kind, 24, rng)
        assert image.shape == (24, 24, 3) and image.dtype == np.uint8, kind
        assert image.flags["C_CONTIGUOUS"] and image.std() > 0, kind
    with pytest.raises(ValueError, match="unknown picture"):
        bench_crf.picture("moon", 24, rng)


def test_lattice_table_prints_synthetic_and_photo_rows(capsys: pytest.CaptureFixture) -> None:
    bench_crf.main(["--lattice", *TOY])
    out = capsys.readouterr().out
    for kind in bench_crf.SYNTHETIC:
        assert f"{kind} (synthetic)" in out
    for kind in bench_crf.PHOTOS:
        assert f"{kind} (photo)" in out
    assert "photos, mean" in out
    seconds = bench_crf.real_photo_crf_seconds(size=32, classes=4, iterations=2)
    assert 0.0 < seconds < 60.0


@pytest.mark.parametrize("mode", [[], ["--eval", "--images", "2", "--batch", "1"]])
def test_pool_modes_run(mode: list[str], capsys: pytest.CaptureFixture) -> None:
    bench_crf.main([*mode, *TOY, "--workers", "1"])
    out = capsys.readouterr().out
    assert ("images/s" if mode else "pool speed-up over serial") in out
