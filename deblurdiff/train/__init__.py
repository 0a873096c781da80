"""Training DeblurDiff (ControlNet + LKPN on a frozen Stable Diffusion 2.1): synthetic
degradation, datasets, the accelerate training loop and evaluation.

``python -m deblurdiff.train --config configs/train_example.yaml``, or in Python
``from deblurdiff.train.train import train; train("configs/train_example.yaml")``.
"""

from .config import DataConfig, ModelConfig, OptimConfig, TrainConfig, ValidationConfig, load_config
from .degradation import DegradationConfig, degrade

__all__ = [
    "DataConfig",
    "DegradationConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "ValidationConfig",
    "degrade",
    "load_config",
]

