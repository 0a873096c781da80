"""Shared test helpers: tiny random pipelines (never deblurring anything) and random images."""

import atexit
import os
import shutil
import tempfile

import numpy as np
import PIL.Image
import pytest

from deblurdiff import DeblurDiffPipeline
from deblurdiff.models.configs import build_components

# The suite never downloads the authors' checkpoint, nor reads a real cache of it:
# tests/test_weights.py serves a fixture through a replaced downloader instead.
os.environ["DEBLURDIFF_NO_DOWNLOAD"] = "1"
os.environ["DEBLURDIFF_CACHE"] = tempfile.mkdtemp(prefix="deblurdiff-test-cache-")
atexit.register(shutil.rmtree, os.environ["DEBLURDIFF_CACHE"], True)


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
