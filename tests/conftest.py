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

#: Tolerance for float32 results of the same computation by models loaded or laid out
#: differently in memory: kernels may then sum in another order (never compare bitwise).
FLOAT32_ROUNDING = dict(rtol=1e-5, atol=1e-6)

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


# ---------------------------------------------------------------- the web app, served in-process


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(demo) -> str:
    """Launch ``demo`` on a free local port without blocking; returns its URL."""
    from deblurdiff.space.app import launch

    port = free_port()
    launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: tiny models gain nothing from more, and torch's worker threads
    would spin against a test server's threads or a busy machine's other work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def random_tiny_pipe():
    from deblurdiff.pipeline.loading import load_pipeline

    return load_pipeline("random-tiny", device="cpu")
