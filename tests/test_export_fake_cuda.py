"""torch.export of the UNet, ControlNet and LKPN as ZeroGPU exports them, on CUDA, without a GPU.

The tiny networks' weights and inputs are fake CUDA tensors (``FakeTensorMode``: shapes,
dtypes and devices, no data), so EAC dispatches to its Triton backend as on the GPU,
and :func:`deblurdiff.space.aoti.export_network` runs as it does at the Space's start-up:
dynamic latent height and width, batch 1 and 2. The LKPN's graph must hold the Triton
operator (which Inductor then compiles into the program), not the PyTorch one.

Fake CUDA tensors need a torch built with CUDA (the Space's; no device is used): a
CPU-only build cannot even index them, so there the module is skipped.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from deblurdiff.space import aoti

from conftest import tiny_pipeline

pytest.importorskip("triton")

TRITON_OP = "deblurdiff.eac_triton_forward.default"
TORCH_OP = "deblurdiff.eac_torch_forward.default"
LATENT = (136, 264)  # sides of 8 * odd


def _fake_cuda_works() -> bool:
    try:
        with FakeTensorMode():
            torch.empty(2, 3, device="cuda")[:, None]
        return True
    except RuntimeError:
        return False


if not _fake_cuda_works():
    pytest.skip(f"torch {torch.__version__} is built without CUDA: fake CUDA tensors cannot be indexed",
                allow_module_level=True)


def _to_fake_cuda(module: torch.nn.Module) -> None:
    """Replace every parameter and buffer by a fake CUDA tensor of its shape and strides
    (inside the active FakeTensorMode)."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for key, t in store.items():
                if t is None:
                    continue
                fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                store[key] = torch.nn.Parameter(fake, t.requires_grad) if isinstance(t, torch.nn.Parameter) else fake


@pytest.fixture(scope="module")
def programs():
    import importlib

    eac_module = importlib.import_module("deblurdiff.ops.eac")
    patch = pytest.MonkeyPatch()
    patch.setenv(eac_module.BACKEND_ENV, "triton")
    pipe = tiny_pipeline().to(torch.float16)
    try:
        with FakeTensorMode():
            for name in aoti.NETWORKS:
                _to_fake_cuda(getattr(pipe, name))
            modules = aoti._modules(pipe)
            out = {}
            for batch in (1, 2):
                inputs = aoti.example_inputs(pipe, batch, *LATENT)
                assert inputs["lkpn"][0].is_cuda and inputs["lkpn"][0].dtype == torch.float16
                for name in aoti.NETWORKS:
                    out[name, batch] = aoti.export_network(modules[name], inputs[name])
        yield out
    finally:
        patch.undo()


def _targets(program) -> list[str]:
    return [str(node.target) for node in program.graph.nodes if node.op == "call_function"]


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", aoti.NETWORKS)
def test_exported_from_fake_cuda(programs, name, batch):
    program = programs[name, batch]
    assert "sample" in program.graph_signature.user_inputs
    sample = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "sample")
    shape = sample.meta["val"].shape
    assert shape[0] == batch and sample.meta["val"].device.type == "cuda"
    # Height and width are symbolic (8 * a latent unit), the batch is not.
    assert all(isinstance(side, torch.SymInt) for side in shape[2:]), shape
    assert not isinstance(shape[0], torch.SymInt)
    targets = _targets(program)
    assert TORCH_OP not in targets
    assert targets.count(TRITON_OP) == (1 if name == "lkpn" else 0), name
