"""cause_lightning: CAUSE unsupervised semantic segmentation with PyTorch Lightning and Hydra.

Submodules are imported lazily so that ``import cause_lightning`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
