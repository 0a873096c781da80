"""Ahead-of-time compilation path (deblurdiff.space.aoti): torch.export of the tiny networks
with dynamic height and width, checked against eager, and the replaced forwards.

Inductor compilation itself needs a GPU (ZeroGPU); here the exported programs are run
as they are, which checks what export captured: every size in the range takes the same
program, windows and EAC included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deblurdiff.space import aoti

from conftest import random_image, tiny_pipeline

# float32 rounding: the exported graph runs the same operators, sometimes decomposed.
TOL = 1e-5

# Latent sizes (multiples of 8): one attention window everywhere, and more than one
# at the first level in both directions (the tiny models' windows are 64 and 32).
SIZES = [(8, 16), (72, 40)]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline().to(torch.float32)


@pytest.fixture(scope="module")
def programs(pipe):
    return aoti.export_networks(pipe, batch_sizes=(1,))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.slow
@pytest.mark.parametrize("name", aoti.NETWORKS)
def test_exported_network_matches_eager(pipe, programs, name):
    batch = 1
    program = programs[name, batch]
    module = aoti._modules(pipe)[name]
    for height, width in SIZES:
        args = aoti.example_inputs(pipe, batch, height, width)[name]
        with torch.no_grad():
            want = module(*args)
            got = program.module()(*args)
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert g.shape == w.shape
            assert _relative(g, w) <= TOL, (name, batch, height, width)


@pytest.mark.slow
def test_eac_is_one_node_of_the_lkpn_graph(programs):
    targets = [str(node.target) for node in programs["lkpn", 1].graph.nodes]
    assert targets.count("deblurdiff.eac_torch_forward.default") == 1


@pytest.mark.slow
def test_pipeline_with_exported_programs_matches_eager(programs):
    """The replaced forwards give the eager pipeline's result, with guidance (batch 2,
    run as two batches of 1) and in tiled mode."""
    eager = tiny_pipeline().to(torch.float32)
    compiled = tiny_pipeline().to(torch.float32)
    runnable = {key: program.module() for key, program in programs.items()}
    aoti.apply_compiled(compiled, runnable)
    image = random_image(64, 128)
    for kwargs in (dict(guidance_scale=1.0), dict(guidance_scale=2.0), dict(tiled=True, tile_size=64, tile_stride=32)):
        outputs = []
        for p in (eager, compiled):
            result = p(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                       **kwargs)
            outputs.append(np.asarray(result.images[0], dtype=np.float64))
        assert np.abs(outputs[0] - outputs[1]).max() <= 1e-4, kwargs


def test_refuses_sizes_outside_the_compiled_range():
    forward = aoti.CompiledNetwork("lkpn", {1: lambda *args: args[0]}, max_side=64)
    x = torch.zeros(1, 4, 12, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        forward(x, x, 500, torch.zeros(1, 77, 32))
    x = torch.zeros(1, 4, 72, 16)
    with pytest.raises(ValueError, match="up to 64"):
        forward(x, x, 500, torch.zeros(1, 77, 32))
    unet = aoti.CompiledNetwork("unet", {1: lambda *args: args[0]})
    with pytest.raises(ValueError, match="ControlNet residuals"):
        unet(torch.zeros(1, 4, 8, 8), 500, encoder_hidden_states=torch.zeros(1, 77, 32))


def test_batches_run_in_chunks_of_the_compiled_sizes():
    calls = []

    def program(condition, sample, t, text):
        calls.append(sample.shape[0])
        return sample * 2

    forward = aoti.CompiledNetwork("lkpn", {1: program, 2: program})
    x = torch.arange(5.0).reshape(5, 1, 1, 1).expand(5, 4, 8, 8)
    out = forward(x, x, torch.tensor(500), torch.zeros(5, 77, 32))
    assert calls == [2, 2, 1]
    torch.testing.assert_close(out, x * 2)


def test_dynamic_shapes_follow_the_levels():
    h, w = torch.export.Dim("h", min=1, max=64), torch.export.Dim("w", min=1, max=64)
    args = (torch.zeros(1, 4, 24, 16), torch.zeros(1), (torch.zeros(1, 8, 12, 8), torch.zeros(1, 8, 3, 2)))
    shapes = aoti._dynamic_shapes(args, 24, 16, h, w)
    assert shapes[1] is None
    assert str(shapes[0][2]) == str(8 * h) and str(shapes[2][0][3]) == str(4 * w)
    assert shapes[2][1][2] is h and shapes[2][1][3] is w
