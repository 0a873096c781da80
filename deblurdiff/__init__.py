"""DeblurDiff: real-world image deblurring with generative diffusion models."""

import importlib

__version__ = "0.1.0"

# Imported on first use, so that input checks and the CLI's argument parsing stay light.
_LAZY = {
    "DeblurDiffPipeline": ".pipeline.pipeline_deblurdiff",
    "DeblurDiffPipelineOutput": ".pipeline.pipeline_deblurdiff",
    "LKPNModel": ".models",
    "LatentControlNetModel": ".models",
    "load_pipeline": ".pipeline.loading",
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
