"""Plain ``nn.Module`` building blocks: frozen backbones, CAUSE heads, probes, concept bank."""

from cause_lightning.models.backbones import FrozenBackbone, build_backbone, list_backbones
from cause_lightning.models.bank import ConceptBank
from cause_lightning.models.heads import (
    LinearProbe,
    MLPHead,
    ProjectionHead,
    TRHead,
    build_head,
    ema_update,
    head_spec,
)
from cause_lightning.models.probes import ClusterProbe

__all__ = [
    "FrozenBackbone",
    "build_backbone",
    "list_backbones",
    "MLPHead",
    "TRHead",
    "ProjectionHead",
    "LinearProbe",
    "ClusterProbe",
    "ConceptBank",
    "build_head",
    "ema_update",
    "head_spec",
]
