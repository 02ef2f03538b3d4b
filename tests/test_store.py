"""Artifacts laid out by what made them: no silent overwrite, ablations reuse their inputs, one
reader for the evaluation and the Segmenter, smoke tests that touch no real artifact."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from cause_lightning.artifacts.io import ArtifactError, MissingArtifactError, load_artifact
from cause_lightning.artifacts.store import SIDECAR, ArtifactStore
from cause_lightning.run import run
from cause_lightning.segmenter import Segmenter
from tiny import TINY

# Whole epochs (8 images in batches of 4): a real run, not a smoke test.
REAL = [o for o in TINY if not o.startswith("+trainer.limit_")]


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _dirs(root: Path, prefix: str) -> list[Path]:
    return sorted(p.parent for p in root.rglob(SIDECAR) if p.parent.name.startswith(prefix))


def test_an_ablation_keeps_the_baseline_and_reuses_its_clusterbook(tiny, tmp_path: Path) -> None:
    book = run(tiny("stage=mediator"))["artifacts/clusterbook"]
    baseline = Path(run(tiny("stage=head"))["artifacts/head"])
    before = _digest(baseline)
    ablation = Path(
        run(tiny("stage=head", "method.head.temperature=0.2", "artifact_tag=hot"))["artifacts/head"]
    )
    assert ablation != baseline and _digest(baseline) == before
    # Both heads sit in the one clusterbook's directory; it was found, not copied or re-run.
    assert ablation.parent.parent == baseline.parent.parent == Path(book).parent
    assert "-hot-" in ablation.parent.name
    root = tmp_path / "artifacts"
    assert len(_dirs(root, "clusterbook")) == 1 and len(_dirs(root, "tr")) == 2
    # Later stages of the ablation find its head by its settings, whatever the label.
    probe = Path(run(tiny("stage=probe", "method.head.temperature=0.2"))["artifacts/probe"])
    assert probe.parent.parent == ablation.parent


def test_a_seed_by_temperature_sweep_gives_four_heads_over_two_clusterbooks(
    tiny, tmp_path: Path
) -> None:
    # The jobs of `-m seed=0,1 method.head.temperature=0.07,0.1`, one after the other; no job
    # names a directory.
    heads = {}
    for seed in (0, 1):
        for temperature in (0.07, 0.1):
            job = (f"seed={seed}", f"method.head.temperature={temperature}")
            if temperature == 0.07:
                run(tiny("stage=mediator", *job))
            heads[seed, temperature] = Path(run(tiny("stage=head", *job))["artifacts/head"])
    root = tmp_path / "artifacts"
    assert len(_dirs(root, "clusterbook")) == 2 and len(_dirs(root, "tr")) == 4
    assert len(set(heads.values())) == 4
    for seed in (0, 1):  # each seed's two heads share that seed's clusterbook
        assert heads[seed, 0.07].parent.parent == heads[seed, 0.1].parent.parent
    assert heads[0, 0.07].parent.parent != heads[1, 0.07].parent.parent


def test_a_directory_of_other_settings_is_refused_before_any_work(tiny) -> None:
    run(tiny("stage=mediator"))
    head = Path(run(tiny("stage=head"))["artifacts/head"])
    sidecar = head.parent / SIDECAR
    record = json.loads(sidecar.read_text())
    record["settings"]["method.head.temperature"] = 0.5  # as if another run had written it
    sidecar.write_text(json.dumps(record))
    before = _digest(head)
    with pytest.raises(ArtifactError, match=r"other settings.*method\.head\.temperature"):
        run(tiny("stage=head"))
    assert _digest(head) == before


def test_a_missing_input_names_the_stage_and_how_the_closest_one_differs(tiny) -> None:
    run(tiny("stage=mediator"))
    with pytest.raises(MissingArtifactError, match=r"stage=mediator.*method\.num_concepts"):
        run(tiny("stage=head", "method.num_concepts=16"))
    with pytest.raises(MissingArtifactError, match=r"differs: seed: 0 there, 3 now$") as refused:
        run(tiny("stage=head", "seed=3"))
    assert "module.seed" not in str(refused.value)  # a setting is named once


def test_inputs_made_on_other_hardware_are_found_when_there_is_one(tiny, caplog) -> None:
    # As a model trained on GPUs (another precision, another batch split) evaluated on a CPU.
    gpu = ["trainer.precision=64-true", "method.mediator.batch_size=2"]
    book = Path(run(tiny("stage=mediator", *gpu))["artifacts/clusterbook"])
    with caplog.at_level("INFO", logger="cause_lightning"):
        head = Path(run(tiny("stage=head"))["artifacts/head"])
    assert head.parent.parent == book.parent
    assert "trainer.precision: '64-true' there, '32-true' now" in caplog.text
    # Two such candidates: neither is taken, and the error says what to run.
    run(tiny("stage=mediator", "trainer.precision=bf16-mixed", "method.mediator.batch_size=2"))
    with pytest.raises(MissingArtifactError, match="stage=mediator"):
        run(tiny("stage=head", "method.head.temperature=0.2"))


def test_a_run_waits_for_another_making_the_same_artifact_then_keeps_it(
    tiny, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Two jobs of a sweep side by side that share the clusterbook: the second waits, then keeps it.
    from cause_lightning.stages import context

    real = context.exclusive
    held, blocked, done = threading.Event(), threading.Event(), threading.Event()

    @contextmanager
    def noted(lock: Path, waiting=None) -> Iterator[None]:  # type: ignore[no-untyped-def]
        def told() -> None:
            blocked.set()
            waiting()

        with real(lock, told):
            if not held.is_set():  # the other job: it makes the artifact once the run waits
                held.set()
                assert blocked.wait(60)
            yield

    monkeypatch.setattr(context, "exclusive", noted)
    first, second = tiny("stage=mediator"), tiny("stage=all", "stage.steps=[mediator,head]")
    made: dict[str, str] = {}

    def other_job() -> None:
        made.update(run(first))
        done.set()

    job = threading.Thread(target=other_job)
    with caplog.at_level("INFO", logger="cause_lightning"):
        job.start()
        assert held.wait(60)
        results = run(second)
    job.join(60)
    assert done.is_set() and "waiting for another run that makes" in caplog.text
    assert "=== stage mediator: kept" in caplog.text  # made once, by the other job
    book = Path(made["artifacts/clusterbook"]).parent
    assert Path(results["artifacts/head"]).parent.parent == book


def test_the_segmenter_predicts_with_the_head_the_evaluation_scored_under_the_leak(tiny) -> None:
    results = run(tiny("method.probe.reference_leak=true", "method.eval.variants=[raw,flip]"))
    probe = Path(results["artifacts/probe"])
    evaluated = Segmenter.load(results["artifacts/segmenter"])
    assembled = Segmenter.from_artifacts(probe.parent)
    leaked = load_artifact(probe, "probe", "probe")["head_state"]
    trained = load_artifact(Path(results["artifacts/head"]), "head", "head")["head_state"]
    for key, value in assembled.head.state_dict().items():
        torch.testing.assert_close(value, leaked[key], rtol=0, atol=0)
    assert any(not torch.equal(leaked[k], trained[k]) for k in leaked)
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(assembled(images), evaluated(images))


def test_smoke_runs_read_real_artifacts_and_never_write_among_them(tiny, tmp_path: Path) -> None:
    real = Path(run(tiny("stage=mediator", base=REAL))["artifacts/clusterbook"])
    assert "/debug/" not in str(real)
    before = _digest(real)
    smoke = run(tiny("stage=mediator", "debug=fdr", base=REAL))
    assert "/debug/" in smoke["artifacts/clusterbook"] and _digest(real) == before
    # A limited head run trains on the real clusterbook and writes beside the smoke ones.
    head = Path(
        run(tiny("stage=head", "+trainer.limit_train_batches=1", base=REAL))["artifacts/head"]
    )
    assert "/debug/" in str(head) and head.parent.parent.name == real.parent.name
    assert sorted(p.name for p in real.parent.iterdir()) == ["artifact.json", "clusterbook.pt"]


def test_the_listing_shows_every_artifact_with_the_settings_that_set_it_apart(tiny) -> None:
    run(tiny("stage=mediator"))
    run(tiny("stage=head"))
    run(tiny("stage=head", "method.head.ema_decay=0.5"))
    listed = run(tiny("stage=artifacts"))["artifacts/list"]
    heads = [e for e in listed if e["kind"] == "head"]
    assert [e["kind"] for e in listed].count("clusterbook") == 1 and len(heads) == 2
    assert sorted(e["settings"]["method.head.ema_decay"] for e in heads) == [0.5, 0.99]


def test_store_paths_carry_label_and_settings_digest(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    first = store.directory("clusterbook", None, {"seed": 0}, "clusterbook", "")
    again = store.directory("clusterbook", None, {"seed": 0}, "clusterbook", "")
    other = store.directory("clusterbook", None, {"seed": 1}, "clusterbook", "my run")
    assert first == again and first.name.startswith("clusterbook-")
    assert other.name.startswith("clusterbook-my_run-") and other != first
