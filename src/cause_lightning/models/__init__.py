"""Plain ``nn.Module`` building blocks: frozen backbones, CAUSE heads, probes, concept bank."""

from cause_lightning.models.backbones import FrozenBackbone, build_backbone, list_backbones
from cause_lightning.models.bank import ConceptBank
from cause_lightning.models.contract import HeadTraits, build_head, head_spec, head_traits
from cause_lightning.models.heads import LinearProbe, MLPHead, ProjectionHead, TRHead, ema_update
from cause_lightning.models.timm_backbone import build_timm_backbone

__all__ = [
    "FrozenBackbone",
    "build_backbone",
    "build_timm_backbone",
    "list_backbones",
    "MLPHead",
    "TRHead",
    "ProjectionHead",
    "LinearProbe",
    "ConceptBank",
    "HeadTraits",
    "build_head",
    "ema_update",
    "head_spec",
    "head_traits",
]
