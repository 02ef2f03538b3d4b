"""The cluster probe's starting points and restarts (method.md §6.1): k-means++ seeding on head
tokens, centroid sets fitted side by side, the kept set chosen by held-out modularity; the
reference's per-rank schedule; and the refusal of bad probe settings before any training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from cause_lightning.artifacts.io import load_artifact
from cause_lightning.config import stage_module
from cause_lightning.core.specs import builtin_head_spec
from cause_lightning.models import LinearProbe, build_backbone, build_head
from cause_lightning.modules.probe import (
    ProbeModule,
    restart_losses,
    restart_objectives,
    sample_split,
)
from cause_lightning.ops import modularity_loss
from cause_lightning.ops.kmeans import spherical_kmeans_plus_plus
from cause_lightning.run import run


def _clustered_tokens(images: int, tokens: int, clusters: int, dim: int, seed: int):
    """Tokens ``[M, N, D]`` around ``clusters`` orthogonal directions, and the directions."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:clusters]
    labels = torch.randint(clusters, (images, tokens), generator=generator)
    noise = 0.05 * torch.randn(images, tokens, dim, generator=generator)
    return centres[labels] + noise, centres


def test_kmeans_plus_plus_seeding_is_deterministic_per_seed() -> None:
    points = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))

    def seeds(seed: int) -> torch.Tensor:
        return spherical_kmeans_plus_plus(points, 5, torch.Generator().manual_seed(seed))

    assert torch.equal(seeds(3), seeds(3))
    assert not torch.equal(seeds(3), seeds(4))
    # The seeds are distinct rows of the normalised points.
    unit = F.normalize(points, dim=1)
    matches = (seeds(3) @ unit.T).isclose(torch.tensor(1.0)).nonzero()[:, 1]
    assert matches.unique().numel() == 5
    with pytest.raises(ValueError, match="num_clusters=5"):
        spherical_kmeans_plus_plus(points[:4], 5, torch.Generator())


def test_sets_fitted_side_by_side_get_the_gradient_of_lone_runs() -> None:
    tokens, _ = _clustered_tokens(3, 20, 4, 8, seed=1)
    sets = torch.randn(3, 4, 8, requires_grad=True)
    restart_losses(tokens, sets, 0.1).sum().backward()
    for index in range(3):
        alone = sets.detach()[index].clone().requires_grad_(True)
        modularity_loss(tokens, alone, temperature=0.1).backward()
        assert torch.allclose(sets.grad[index], alone.grad, atol=1e-7)


def test_fixed_samples_are_disjoint_and_seeded() -> None:
    seeding, selection = sample_split(100, 30, seed=0)
    assert len(seeding) == len(selection) == 30 and not set(seeding) & set(selection)
    assert sample_split(100, 30, seed=0) == (seeding, selection)
    assert sample_split(100, 30, seed=1) != (seeding, selection)
    small = sample_split(5, 30, seed=0)  # fewer images than wanted: halved
    assert len(small[0]) == 3 and len(small[1]) == 2 and not set(small[0]) & set(small[1])


def _module(restarts: int, num_classes: int = 4) -> ProbeModule:
    backbone = build_backbone("tiny_vit")
    head = build_head(builtin_head_spec("mlp", backbone.embed_dim, 8, 0.1))
    return stage_module(
        "probe",
        backbone,
        head=head,
        linear=LinearProbe(8, num_classes),
        lr=4e-3,
        cluster_lr=4e-3,
        num_classes=num_classes,
        init="reference",
        restarts=restarts,
        debug_checks=True,
    )


def test_restart_selection_keeps_the_set_with_the_best_held_out_modularity() -> None:
    tokens, centres = _clustered_tokens(6, 40, 4, 8, seed=2)
    collapsed = centres[:1].repeat(4, 1) + 0.01 * torch.eye(8)[4:]  # one cluster for all
    halfway = torch.cat([centres[:2], centres[:2]])  # two of the four clusters
    scattered = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    sets = torch.stack([collapsed, centres, halfway, scattered])  # S C R; the truth is set 1
    objectives = restart_objectives(tokens, sets, temperature=0.1, chunk=4)
    assert int(objectives.argmax()) == 1
    assert len(set(objectives.tolist())) == 4  # the restarts really differ

    module = _module(restarts=4)
    with torch.no_grad():
        module.centroids.copy_(sets)
    unscored = module.export()["fit"]
    assert unscored["kept"] == 0 and unscored["objectives"] == [None] * 4  # nothing to choose by
    # Checkpoints refuse non-finite tensors: the not-yet-scored state must be finite.
    state = module.state_dict().values()
    assert all(torch.isfinite(v).all() for v in state if v.is_floating_point())
    module.objectives.copy_(objectives)
    module.scored.fill_(True)
    payload = module.export()
    assert payload["fit"]["kept"] == 1
    assert payload["fit"]["objectives"] == pytest.approx(objectives.tolist())
    assert torch.equal(payload["centroids"], centres)


def test_probe_stage_records_every_restart_and_keeps_the_best(tiny, tmp_path: Path) -> None:
    for stage in ("mediator", "head"):
        run(tiny(f"stage={stage}", "head=mlp"))
    restarts = "method.probe.restarts=3"
    record = load_artifact(
        run(tiny("stage=probe", "head=mlp", restarts))["artifacts/probe"], "probe", "probe"
    )
    fit = record["fit"]
    assert fit["init"] == "kmeans++" and fit["restarts"] == 3 and len(fit["objectives"]) == 3
    assert fit["kept"] == max(range(3), key=fit["objectives"].__getitem__)
    assert record["centroids"].shape == (6, 90)
    evaluated = run(
        tiny(
            "stage=eval",
            "head=mlp",
            restarts,
            "method.eval.variants=[raw]",
            "method.eval.baselines=false",
        )
    )
    report = json.loads(Path(evaluated["artifacts/metrics"]).read_text())
    assert report["cluster_probe"] == fit


def test_default_probe_is_kmeans_plus_plus_with_restarts(compose) -> None:
    # The presets pin the reference probe (tests/test_configs.py, every preset).
    method = compose().method
    assert (method.probe.init, method.probe.restarts) == ("kmeans++", 4)
    assert method.reference_schedule is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.probe.restarts=0", "method.probe.restarts=0"),
        ("method.probe.init=random", "method.probe.init='random'"),
        ("method.probe.sample_images=0", "method.probe.sample_images=0"),
        ("method.reference_world_size=0", "method.reference_world_size=0"),
    ],
)
def test_bad_probe_settings_are_refused_before_any_work(
    tiny, tmp_path: Path, override: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        run(tiny("stage=all", override))
    assert not (tmp_path / "artifacts").exists()


def test_too_few_sampled_tokens_stop_the_probe_stage_before_training(tiny, tmp_path: Path) -> None:
    for stage in ("mediator", "head"):
        run(tiny(f"stage={stage}", "head=mlp"))
    # One 64 px image at patch 8 with window 4 gives 4 tokens for 6 clusters.
    with pytest.raises(ValueError, match="sampled 4 tokens .* for 6 clusters"):
        run(tiny("stage=probe", "head=mlp", "method.probe.sample_images=1"))
    artifacts = tmp_path / "artifacts"
    assert not list(artifacts.rglob("probe.pt")) and not list(artifacts.rglob("probe-*/**/*.ckpt"))


def test_reference_schedule_iterates_rank_zeros_shard_reshuffled_per_epoch(tiny) -> None:
    cfg = tiny()
    data = instantiate(cfg.data.module, train_res=64, test_res=64, batch_size=1, seed=0)
    data.prepare_data()
    data.setup("fit")
    assert len(data.train_dataloader()) == 8
    data.reference_world_size = 4
    loader = data.train_dataloader()
    assert len(loader) == 2  # a quarter of the 8 images, as rank 0 of 4 sees them

    def epoch(number: int) -> list[int]:
        loader.sampler.set_epoch(number)
        return [int(batch["index"]) for batch in loader]

    assert epoch(0) == epoch(0) and len(set(epoch(0))) == 2
    assert any(epoch(e) != epoch(0) for e in range(1, 5))  # a new shard every epoch


class DumpStartingCentroids(pl.Callback):
    """Saves every process's centroids once seeding is done, before the first step."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(self.directory) / f"rank{trainer.global_rank}.pt"
        torch.save(pl_module.centroids.detach().cpu().clone(), path)


@pytest.mark.slow
@pytest.mark.ddp
def test_kmeans_seeding_is_the_same_on_every_ddp_process(tiny, tmp_path: Path) -> None:
    for stage in ("mediator", "head"):
        run(tiny(f"stage={stage}", "head=mlp"))

    def starting_centroids(name: str, *overrides: str) -> list[torch.Tensor]:
        directory = tmp_path / name
        directory.mkdir()
        dump = f"+callbacks.dump._target_={__name__}.DumpStartingCentroids"
        run(tiny("stage=probe", "head=mlp", dump, f"+callbacks.dump.directory={directory}",
                 *overrides))  # fmt: skip
        return [torch.load(p, weights_only=True) for p in sorted(directory.glob("rank*.pt"))]

    ddp = ["trainer=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32-true"]  # fmt: skip
    rank0, rank1 = starting_centroids("ddp", *ddp)
    (single,) = starting_centroids("single")
    (again,) = starting_centroids("again")
    (other_seed,) = starting_centroids("other_seed", "method.probe.module.seed=1")
    assert single.shape == (4, 6, 90)  # 4 restarts x 6 clusters x R
    assert torch.equal(rank0, rank1) and torch.equal(rank0, single)
    assert torch.equal(single, again)  # deterministic per seed
    assert not torch.equal(single, other_seed)
    assert all(not torch.equal(single[0], single[r]) for r in range(1, 4))  # own seed per set
