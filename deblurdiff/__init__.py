"""DeblurDiff: real-world image deblurring with generative diffusion models."""

__version__ = "0.1.0"

from .models import LatentControlNetModel, LKPNModel
from .pipeline import DeblurDiffPipeline, DeblurDiffPipelineOutput

__all__ = ["DeblurDiffPipeline", "DeblurDiffPipelineOutput", "LKPNModel", "LatentControlNetModel"]
