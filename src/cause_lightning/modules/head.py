"""Stage 2 (front door): concept-wise contrastive training of the segmentation head (method.md §5).

The student head and projection learn; the teacher (EMA, 0.99) runs in training mode, as in the
reference, and its sampled projections fill a per-concept bank after each step. The linear probe
learns on the teacher's detached features, so labels never reach the head.

Under DDP the reference keeps one bank per process and uses the process's own images as in-batch
candidates (``sync_bank=False``). With ``sync_bank=True`` every rank all-gathers the step's sampled
tokens and teacher projections in global sample order: the in-batch candidates of the local
anchors are the global batch, and every rank appends the same global entries to an identical bank
with an identically seeded draw. Each rank's loss is the mean of its ``B`` (or ``2B``) terms, and
DDP's gradient average over equal shards is then the gradient of the mean over all terms: the
result equals one process on the global batch (docs/scaling.md).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from cause_lightning.core.bounds import COUNT, FRACTION, POSITIVE, SEED, SIMILARITY
from cause_lightning.metrics import supervised_metrics
from cause_lightning.models import ConceptBank, LinearProbe, ProjectionHead, ema_update
from cause_lightning.models.contract import head_traits
from cause_lightning.modules.base import (
    BANK_STREAM,
    OptimizerFactory,
    SchedulerFactory,
    StageModule,
    linear_probe_loss,
    step_generator,
    upsample_to,
)
from cause_lightning.ops import (
    DEFAULT_CONTRASTIVE_MEMORY_BYTES,
    concept_contrastive_terms,
    contrastive_mean,
    grid_sample_tokens,
    nearest_concept,
)

__all__ = ["HeadModule"]


class HeadModule(StageModule):
    """Student/teacher head with concept-wise contrastive loss and a detached linear probe.

    Every hyper-parameter comes from ``method.head`` (conf/method/cause.yaml); none has a default
    here, so a module built from Python gets exactly the values a run of the command line gets.

    Args:
        backbone: Frozen backbone (``embed_dim``, ``patch_size``).
        head: The student head, built by the pipeline from ``conf/head`` (``build_head``); the
            teacher starts as a copy. Its traits say what it is fed (``per_token`` heads get the
            grid-sampled tokens, every other head the whole patch grid).
        clusterbook: Stage-1 clusterbook ``[K, D]`` (frozen).
        num_classes: C, classes of the linear probe.
        lr: Learning rate (absolute; the pipeline's effective value).
        window: Grid-sampling window.
        ema_decay: Teacher EMA decay.
        projection_dim: P, width of the projection head.
        temperature: Contrastive temperature.
        pos_thresh: Concept similarity above which a pair is positive.
        neg_thresh: Concept similarity below which a pair is negative.
        bank_capacity: Teacher projections kept per concept.
        bank_keep: Fraction of each concept's entries of a step appended to the bank.
        sync_bank: Under DDP, use the global batch as in-batch candidates and keep one identical
            bank on every rank (equal to one process on the global batch); ``False`` keeps the
            reference's per-process bank and candidates.
        contrastive_memory_mb: Working memory of one block of anchors in the contrastive loss
            (MiB; ``None``: the default of :func:`~cause_lightning.ops.concept_contrastive_terms`);
            the gradient is formed in the same pass, so no block is recomputed.
        debug_checks: Check index ranges and the loss's finiteness at every step (each check reads
            a value back from the device, so the step then also gives the loss only the bank's
            used slots). Off: the step never waits for the device, and the loss is checked at the
            end of each epoch and before each checkpoint.
        optimizer: Optimiser factory (``method.head.optimizer``, which holds the weight decay).
        scheduler: Per-epoch schedule factory (None = constant lr, the reference).
        seed: Seed of the per-step grid sampling and bank subset draws.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        clusterbook: torch.Tensor,
        num_classes: Annotated[int, COUNT],
        lr: float,
        window: Annotated[int, COUNT],
        ema_decay: Annotated[float, FRACTION],
        projection_dim: Annotated[int, COUNT],
        temperature: Annotated[float, POSITIVE],
        pos_thresh: Annotated[float, SIMILARITY],
        neg_thresh: Annotated[float, SIMILARITY],
        bank_capacity: Annotated[int, COUNT],
        bank_keep: Annotated[float, FRACTION],
        sync_bank: bool,
        contrastive_memory_mb: Annotated[int | None, COUNT],
        debug_checks: bool,
        optimizer: OptimizerFactory | None,
        scheduler: SchedulerFactory | None,
        seed: Annotated[int, SEED],
    ) -> None:
        super().__init__(backbone, seed=seed, optimizer=optimizer, scheduler=scheduler)
        self.save_hyperparameters(
            ignore=["backbone", "head", "clusterbook", "optimizer", "scheduler"]
        )
        dim = int(backbone.embed_dim)
        if clusterbook.ndim != 2 or clusterbook.shape[1] != dim:
            raise ValueError(
                f"clusterbook has shape {tuple(clusterbook.shape)}, backbone width is {dim}: "
                "it was trained for another backbone; re-run stage=mediator"
            )
        self.register_buffer("clusterbook", clusterbook.detach().float().clone())
        self.traits = head_traits(head)
        self.head = head
        self.projection = ProjectionHead(self.head.reduced_dim, projection_dim)
        # The teacher starts as a copy of the student and is only moved by the EMA.
        self.head_ema = copy.deepcopy(self.head).requires_grad_(False)
        self.projection_ema = copy.deepcopy(self.projection).requires_grad_(False)
        self.linear = LinearProbe(self.head.reduced_dim, num_classes)
        self.bank = ConceptBank(
            clusterbook.shape[0],
            capacity=bank_capacity,
            dim=projection_dim,
            keep_fraction=bank_keep,
        )
        self.val_linear = supervised_metrics(num_classes, "val/linear/")
        self._pending_bank: tuple[torch.Tensor, torch.Tensor, torch.Generator] | None = None

    def _contrastive_memory_bytes(self) -> int:
        megabytes = self.hparams.contrastive_memory_mb
        return DEFAULT_CONTRASTIVE_MEMORY_BYTES if megabytes is None else int(megabytes) << 20

    def _student_teacher(
        self, features: torch.Tensor, batch_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's sampled tokens and their nearest concepts, the student's and the teacher's
        projections of them, and the teacher's full grid (for the linear probe).

        The nearest concepts are found once per step: a head that needs the clusterbook gets
        those of the whole grid (student and teacher alike), and the sampled tokens' are the same
        values gathered at the sampled positions; the loss and the bank take these.

        Returns:
            ``(tokens [B, N, D], concepts [B, N], student [B, N, P], teacher [B, N, P],
            teacher grid [B, R, h, w])``.
        """
        window = self.hparams.window
        check = bool(self.hparams.debug_checks)
        index = self.grid_index(features, window, batch_idx)  # B N
        tokens, _ = grid_sample_tokens(features, window, index, validate=check)  # B N D
        if self.traits.per_token:
            # Each output depends on its own token only: sampling first is equal and much cheaper
            # (method.md §5.4).
            strip = tokens.transpose(1, 2).unsqueeze(-1)  # B D N 1
            student_tok = self.projection(self.head(strip)).squeeze(-1).transpose(1, 2)  # B N P
            with torch.no_grad():
                teacher_tok = self.projection_ema(self.head_ema(strip)).squeeze(-1).transpose(1, 2)
                teacher = self.head_ema(features)  # B R h w, separate full-grid pass for the probe
            concepts = nearest_concept(tokens, self.clusterbook)  # B N
            return tokens, concepts, student_tok, teacher_tok, teacher
        # Any other head may mix positions (attention, convolutions): it sees the whole grid and
        # its outputs are sampled after.
        given: dict[str, torch.Tensor] = {}
        concepts = None
        if self.traits.needs_clusterbook:
            batch, _, height, width = features.shape
            grid = nearest_concept(features.flatten(2).transpose(1, 2), self.clusterbook)  # B hw
            given["concepts"] = grid
            picked, _ = grid_sample_tokens(
                grid.view(batch, 1, height, width), window, index, validate=False
            )  # B N 1
            concepts = picked.squeeze(-1)  # B N
        with torch.no_grad():
            teacher = self.head_ema(features, **given)  # B R h w
            teacher_proj = self.projection_ema(teacher)  # B P h w
        student_proj = self.projection(self.head(features, **given))  # B P h w
        student_tok, _ = grid_sample_tokens(student_proj, window, index, validate=check)  # B N P
        teacher_tok, _ = grid_sample_tokens(teacher_proj, window, index, validate=check)
        if concepts is None:
            concepts = nearest_concept(tokens, self.clusterbook)  # B N
        return tokens, concepts, student_tok, teacher_tok, teacher

    def _matmul_dtype(self) -> torch.dtype | None:
        """Half-precision projection products under a mixed-precision trainer (as the reference's
        AMP runs them): the bank term is the largest matmul of the stage."""
        precision = str(self._trainer.precision) if self._trainer is not None else ""
        return {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features = self.extract(batch["image"])  # B D h w
        tokens, concepts, student_tok, teacher_tok, teacher = self._student_teacher(
            features, batch_idx
        )
        world, rank = self.world()
        synced = bool(self.hparams.sync_bank) and world > 1
        anchor_index = None
        if synced:
            # Candidates and bank entries of the global batch; the anchors stay local.
            anchor_index = self.global_rows(tokens.shape[0])  # B
            tokens = self.gather_global(tokens)  # (B W) N D
            concepts = self.gather_global(concepts)  # (B W) N
            teacher_tok = self.gather_global(teacher_tok)  # (B W) N P
        # A synced bank (and one process) draws its subset identically on every rank; separate
        # per-process banks (reference) draw independently.
        keys = (rank,) if world > 1 and not synced else ()
        generator = step_generator(self.seed, BANK_STREAM, self.global_step, batch_idx, *keys)
        check = bool(self.hparams.debug_checks)
        product = self._matmul_dtype()
        # Without checks the static-shape bank as it is: no copy, no size read back (None before
        # the first step). A checked step reads values back anyway, so it also skips empty slots.
        slots = self.bank.used_slots() if check else self.bank.slots()
        bank, bank_concepts, bank_valid = slots if slots is not None else (None, None, None)
        terms, empty = concept_contrastive_terms(
            tokens,
            student_tok,
            teacher_tok,
            self.clusterbook,
            bank=bank,
            bank_concepts=bank_concepts,
            temperature=self.hparams.temperature,
            pos_thresh=self.hparams.pos_thresh,
            neg_thresh=self.hparams.neg_thresh,
            anchor_index=anchor_index,
            matmul_dtype=product,
            bank_valid=bank_valid,
            memory_bytes=self._contrastive_memory_bytes(),
            validate=check,
            concepts=concepts,
        )
        loss_front = contrastive_mean(terms, bank_valid)
        loss_linear = linear_probe_loss(
            self.linear(teacher.detach()), batch["label"], self.hparams.num_classes
        )
        loss = loss_front + loss_linear
        if check:
            self.check_finite(loss, loss_front=loss_front, loss_linear=loss_linear)
        else:
            self.defer_finite_check(loss)
        with torch.no_grad():
            # Stored normalised, in the dtype of the loss's product: the bank is used as it is.
            entries = F.normalize(teacher_tok.detach().flatten(0, 1).float(), dim=-1)  # BN P
            entries = entries.to(product or torch.float32)
        self._pending_bank = (concepts.flatten(), entries, generator)
        batch_size = student_tok.shape[0]
        self.log_progress("train/loss_front", loss_front, batch_size=batch_size)
        self.log("train/loss_linear", loss_linear, batch_size=batch_size)
        self.log("train/empty_pos_terms", empty.sum().float(), batch_size=batch_size)
        self.log("train/bank_size", self.bank.count.sum().float(), batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.finish_step()

    def finish_step(self) -> None:
        """After the optimiser step: teacher EMA, then the bank from this step's teacher tokens."""
        if self._pending_bank is None:  # done already (a checkpoint callback ran it first)
            return
        ema_update(self.head_ema, self.head, self.hparams.ema_decay)
        ema_update(self.projection_ema, self.projection, self.hparams.ema_decay)
        concepts, projections, generator = self._pending_bank
        self.bank.update(
            concepts, projections, generator=generator, validate=bool(self.hparams.debug_checks)
        )
        self._pending_bank = None

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        features = self.extract(batch["image"])
        logits = upsample_to(self.linear(self.head_ema(features)), tuple(batch["label"].shape[-2:]))
        self.val_linear.update(logits.argmax(1), batch["label"])

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_linear.compute(), prog_bar=True)
        self.val_linear.reset()

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        parameters = [
            *self.head.parameters(),
            *self.projection.parameters(),
            *self.linear.parameters(),
        ]
        return self.build_optimization(parameters, lr=self.hparams.lr)

    def export(self) -> dict[str, Any]:
        """Artifact payload of ``head.pt`` (without meta): the teacher head and the probe."""
        return {
            "head_state": {k: v.detach().clone() for k, v in self.head_ema.state_dict().items()},
            "linear_state": {k: v.detach().clone() for k, v in self.linear.state_dict().items()},
        }
