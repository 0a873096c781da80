"""Shared test helpers: tiny random pipelines (never deblurring anything) and random images."""

import numpy as np
import PIL.Image
import pytest

from deblurdiff import DeblurDiffPipeline
from deblurdiff.models.configs import build_components


def tiny_pipeline(seed: int = 0) -> DeblurDiffPipeline:
    pipe = DeblurDiffPipeline(**build_components("tiny", seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_image(h: int, w: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    """A tiny random pipeline shared by a module's tests (files may override it)."""
    return tiny_pipeline()
