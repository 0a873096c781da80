"""EAC (element-wise adaptive convolution): reference, PyTorch path, Triton kernels, dispatch.

The reference is checked against a per-pixel loop that spells out the definition and
with gradcheck; the PyTorch path and the Triton kernels are checked against the
reference (forward, grad_x, grad_kernels) in float64 on the same rounded inputs.

The Triton kernels run under the Triton interpreter on CPU. ``TRITON_INTERPRET`` only
takes effect if it is set before the kernels are defined, so they run in a child
process: this file, started as ``python tests/test_eac.py --triton-interpret`` with
the variable set, checks the Triton cases and prints the errors as JSON.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # when started as a script
    sys.path.insert(0, str(ROOT))

from deblurdiff.ops import eac  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import baselines  # noqa: E402  (the benchmarks' baselines)
from baselines import eac_reference  # noqa: E402

eac_module = importlib.import_module("deblurdiff.ops.eac")  # the module (``ops.eac`` is the function)
eac_pytorch = importlib.import_module("deblurdiff.ops.eac_pytorch")

# Largest error allowed, relative to max(1, max |reference|). (The Triton interpreter
# rounds float32 -> bfloat16 toward zero, about twice the error of the GPU's rounding.)
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


def _half_supported_on_cpu() -> bool:
    try:
        a = torch.ones(4, dtype=torch.float16)
        torch.mul(a, a, out=torch.empty_like(a))
        a.float().addcmul_(a.float(), a.float())
        return True
    except RuntimeError:
        return False


CPU_DTYPES = [torch.float32, torch.bfloat16] + ([torch.float16] if _half_supported_on_cpu() else [])


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    """These tests choose backends themselves."""
    monkeypatch.delenv(eac_module.BACKEND_ENV, raising=False)


def make_inputs(B, C, G, k, H, W, dtype, layout="contiguous", seed=0):
    """x, kernels, grad_out in ``dtype``; ``layout`` makes them non-contiguous.

    strided: x channels-last, kernels a window of a wider tensor, grad_out transposed;
    expanded: x a row slice, grad_out broadcast (zero strides).
    """
    gen = torch.Generator().manual_seed(seed)
    K = G * k * k
    x = torch.randn(B, C, H, W, generator=gen).to(dtype)
    kernels = torch.randn(B, K, H, W, generator=gen).to(dtype)
    grad = torch.randn(B, C, H, W, generator=gen).to(dtype)
    if layout == "strided":
        x = x.contiguous(memory_format=torch.channels_last)
        wider = torch.zeros(B, K, H, W + 3, dtype=dtype)
        wider[..., 1 : W + 1] = kernels
        kernels = wider[..., 1 : W + 1]
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "expanded":
        taller = torch.zeros(B, C, H + 2, W, dtype=dtype)
        taller[:, :, 1 : H + 1] = x
        x = taller[:, :, 1 : H + 1]
        grad = grad[:1, :, :1].expand(B, C, H, W)
    elif layout != "contiguous":
        raise ValueError(layout)
    return x, kernels, grad


def errors_against_reference(fn, B, C, G, k, H, W, dtype, residual, layout="contiguous", **kwargs):
    """Relative max errors of ``fn`` vs the float64 reference: forward, grad_x, grad_kernels."""
    x, kernels, grad = make_inputs(B, C, G, k, H, W, dtype, layout)
    x.requires_grad_(True)
    kernels.requires_grad_(True)
    out = fn(x, kernels, residual=residual, groups=G, **kwargs)
    assert out.shape == (B, C, H, W) and out.dtype == dtype
    got = [out, *torch.autograd.grad(out, (x, kernels), grad)]
    assert got[1].shape == x.shape and got[2].shape == kernels.shape
    assert got[1].dtype == dtype and got[2].dtype == dtype
    xd = x.detach().double().requires_grad_(True)
    kd = kernels.detach().double().requires_grad_(True)
    ref_out = eac_reference(xd, kd, residual=residual, groups=G)
    want = [ref_out, *torch.autograd.grad(ref_out, (xd, kd), grad.double())]
    return [
        ((a.double() - r).abs().max() / max(1.0, r.abs().max().item())).item() for a, r in zip(got, want)
    ]


def naive_eac(x, kernels, G, k, residual=False):
    """The definition, one output value at a time."""
    B, C, H, W = x.shape
    kv = kernels.reshape(B, G, k, k, H, W)
    out = torch.zeros_like(x)
    for b in range(B):
        for c in range(C):
            g = c // (C // G)
            for h in range(H):
                for w in range(W):
                    total = 0.0
                    for i in range(k):
                        for j in range(k):
                            hh, ww = h + i - k // 2, w + j - k // 2
                            if 0 <= hh < H and 0 <= ww < W:
                                total += kv[b, g, i, j, h, w].item() * x[b, c, hh, ww].item()
                    out[b, c, h, w] = total + (x[b, c, h, w].item() if residual else 0.0)
    return out


# The reference --------------------------------------------------------------------------


@pytest.mark.parametrize("G,k,residual", [(2, 3, False), (4, 3, True), (1, 5, False)])
def test_reference_matches_definition(G, k, residual):
    x, kernels, _ = make_inputs(2, 4, G, k, 4, 5, torch.float64, seed=1)
    want = naive_eac(x, kernels, G, k, residual)
    torch.testing.assert_close(eac_reference(x, kernels, residual, groups=G), want, rtol=1e-12, atol=1e-12)


def test_reference_shift_direction():
    # A kernel whose only tap is (i, j) = (0, 1) reads the pixel one row up.
    x = torch.arange(20.0, dtype=torch.float64).view(1, 1, 4, 5)
    kernels = torch.zeros(1, 9, 4, 5, dtype=torch.float64)
    kernels[:, 1] = 1.0
    out = eac_reference(x, kernels)
    torch.testing.assert_close(out[0, 0, 1:], x[0, 0, :-1])
    assert (out[0, 0, 0] == 0).all()


@pytest.mark.parametrize("G,residual", [(2, True), (4, False)])
def test_reference_gradcheck(G, residual):
    x, kernels, _ = make_inputs(1, 4, G, 3, 4, 5, torch.float64, seed=2)
    assert torch.autograd.gradcheck(
        lambda a, b: eac_reference(a, b, residual, groups=G),
        (x.requires_grad_(True), kernels.requires_grad_(True)),
    )


# The PyTorch paths ----------------------------------------------------------------------

SHAPES = [  # B, C, G, k, H, W
    (2, 4, 4, 5, 7, 13),
    (1, 4, 2, 3, 9, 5),
    (3, 6, 3, 7, 6, 11),
    (2, 4, 1, 5, 1, 1),
]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=lambda d: NAMES[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}G{}k{}_{}x{}".format(*s))
@pytest.mark.parametrize("residual", [False, True])
def test_torch_path(shape, dtype, residual):
    errors = errors_against_reference(eac_module.eac_torch, *shape, dtype, residual)
    assert max(errors) <= TOL[dtype], errors


@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: NAMES[d])
def test_torch_path_non_contiguous(layout, dtype):
    errors = errors_against_reference(eac_module.eac_torch, 2, 4, 2, 5, 7, 13, dtype, True, layout)
    assert max(errors) <= TOL[dtype], errors


@pytest.mark.parametrize("block", [1, 20, 100])
def test_torch_path_blocks(monkeypatch, block):
    # Tiny blocks: row blocks inside a plane, and several planes per block (x threads).
    monkeypatch.setattr(eac_pytorch, "_BLOCK", block)
    for G in (1, 4):
        errors = errors_against_reference(eac_module.eac_torch, 2, 4, G, 5, 9, 6, torch.float32, True)
        assert max(errors) <= TOL[torch.float32], (G, errors)


@pytest.mark.parametrize("threads", [1, 3])
def test_torch_path_threads(threads):
    # The block size depends on the thread count; also under inference mode.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for G in (2, 4):
            errors = errors_against_reference(eac_module.eac_torch, 3, 4, G, 5, 67, 129, torch.float32, True)
            assert max(errors) <= TOL[torch.float32], (G, errors)
        x, kernels, _ = make_inputs(2, 4, 4, 5, 70, 130, torch.bfloat16)
        with torch.inference_mode():
            out = eac(x, kernels, residual=True)
        want = eac_reference(x.double(), kernels.double(), residual=True)
        assert ((out.double() - want).abs().max() / want.abs().max()).item() <= TOL[torch.bfloat16]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fn", [baselines.eac_unfold, baselines.eac_shifted], ids=["unfold", "shifted"])
def test_baselines(fn):
    errors = errors_against_reference(fn, 2, 6, 3, 5, 7, 13, torch.float32, True)
    assert max(errors) <= TOL[torch.float32], errors


def test_torch_path_float64_exact_and_gradcheck():
    errors = errors_against_reference(eac_module.eac_torch, 2, 4, 2, 3, 7, 13, torch.float64, True)
    assert max(errors) <= TOL[torch.float64], errors
    x, kernels, _ = make_inputs(1, 4, 2, 3, 4, 5, torch.float64, "strided", seed=3)
    assert torch.autograd.gradcheck(
        lambda a, b: eac_module.eac_torch(a, b, True, groups=2),
        (x.requires_grad_(True), kernels.requires_grad_(True)),
    )


def test_only_one_gradient():
    x, kernels, grad = make_inputs(1, 4, 4, 3, 5, 6, torch.float64)
    ref_x, ref_k = torch.autograd.grad(
        eac_reference(x.requires_grad_(True), kernels.requires_grad_(True)), (x, kernels), grad
    )
    (gk,) = torch.autograd.grad(eac(x.detach(), kernels), kernels, grad)
    (gx,) = torch.autograd.grad(eac(x, kernels.detach()), x, grad)
    torch.testing.assert_close(gk, ref_k)
    torch.testing.assert_close(gx, ref_x)


def test_mixed_dtypes_promote():
    x, kernels, _ = make_inputs(1, 4, 4, 5, 6, 7, torch.float32)
    out = eac(x, kernels.to(torch.bfloat16), residual=True)
    assert out.dtype == torch.float32
    want = eac_reference(x.double(), kernels.to(torch.bfloat16).double(), residual=True)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# Shapes and dispatch ----------------------------------------------------------------------


@pytest.mark.parametrize("C,K,want", [(4, 100, (4, 5)), (4, 36, (4, 3)), (4, 50, (2, 5)), (4, 25, (1, 5)),
                                      (3, 147, (3, 7)), (1, 49, (1, 7))])
def test_geometry_inferred(C, K, want):
    assert eac_module.eac_geometry(torch.zeros(2, C, 3, 4), torch.zeros(2, K, 3, 4)) == want


@pytest.mark.parametrize(
    "x_shape,k_shape,groups,message",
    [
        ((1, 4, 8, 8), (1, 101, 8, 8), None, "G\\*k\\*k channels with odd k"),
        ((1, 4, 8, 8), (1, 64, 8, 8), None, "G\\*k\\*k channels with odd k"),  # k = 4
        ((1, 4, 8, 8), (1, 64, 8, 8), 4, "G\\*k\\*k channels with odd k"),
        ((1, 4, 8, 8), (1, 100, 8, 9), None, "spatial size mismatch"),
        ((1, 4, 8, 8), (2, 100, 8, 8), None, "batch mismatch"),
        ((1, 4, 8, 8), (1, 75, 8, 8), 3, "multiple of the number of kernel groups"),
        ((4, 8, 8), (1, 100, 8, 8), None, "must be 4-D"),
    ],
)
def test_shape_errors(x_shape, k_shape, groups, message):
    for fn in (eac, eac_reference, eac_module.eac_torch):
        with pytest.raises(ValueError, match=message):
            fn(torch.zeros(x_shape), torch.zeros(k_shape), groups=groups)


class OpRecorder(TorchDispatchMode):
    """Records the name of every operator that reaches the dispatcher."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


def eac_ops(*args, **kwargs) -> tuple[torch.Tensor, list[str]]:
    """``eac(*args, **kwargs)`` and the deblurdiff operators it ran."""
    with OpRecorder() as recorder:
        out = eac(*args, **kwargs)
    return out, [name for name in recorder.ops if name.startswith("deblurdiff::")]


def test_dispatch_on_cpu(monkeypatch):
    x, kernels, _ = make_inputs(1, 4, 4, 5, 6, 7, torch.float32)
    want = eac_reference(x.double(), kernels.double(), residual=True)
    out, ops = eac_ops(x, kernels, residual=True)
    assert ops == ["deblurdiff::eac_torch_forward"]
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(eac_module.BACKEND_ENV, "torch")
    assert eac_ops(x, kernels, residual=True)[1] == ["deblurdiff::eac_torch_forward"]
    # Forcing Triton is honoured: on CPU tensors (no interpreter) it fails instead of
    # silently falling back; an explicit argument wins over the variable.
    monkeypatch.setenv(eac_module.BACKEND_ENV, "triton")
    module = eac_module._triton_module()[0]
    if module is None or not module.INTERPRETED:
        with pytest.raises((ValueError, RuntimeError), match="triton"):
            eac(x, kernels)
    assert eac_ops(x, kernels, backend="torch")[1] == ["deblurdiff::eac_torch_forward"]
    monkeypatch.setenv(eac_module.BACKEND_ENV, "cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        eac(x, kernels)
    monkeypatch.delenv(eac_module.BACKEND_ENV)
    with pytest.raises(ValueError, match="backend must be one of"):
        eac(x, kernels, backend="fast")


def test_backward_runs_only_the_needed_gradient_operators():
    x, kernels, grad = make_inputs(1, 4, 4, 5, 6, 7, torch.float32)
    x.requires_grad_(True)
    with OpRecorder() as recorder:
        torch.autograd.grad(eac(x, kernels, residual=True), x, grad)
    assert [n for n in recorder.ops if n.startswith("deblurdiff::")] == [
        "deblurdiff::eac_torch_forward", "deblurdiff::eac_torch_grad_x"]


def test_triton_backend_refuses_cpu_tensors():
    x, kernels, _ = make_inputs(1, 4, 4, 5, 6, 7, torch.float32)
    module = eac_module._triton_module()[0]
    if module is not None and module.INTERPRETED:
        pytest.skip("the Triton interpreter runs on CPU tensors")
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        eac(x, kernels, backend="triton")


def test_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from deblurdiff.ops import eac\n"
        "import importlib; m = importlib.import_module('deblurdiff.ops.eac')\n"
        "x = torch.randn(1, 4, 5, 6, requires_grad=True); k = torch.randn(1, 100, 5, 6)\n"
        "eac(x, k, residual=True).sum().backward()\n"
        "assert m._triton_module()[0] is None and x.grad.shape == x.shape\n"
        "try:\n    eac(x, k, backend='triton')\nexcept RuntimeError as e:\n    assert 'triton' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop(eac_module.BACKEND_ENV, None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr


# Triton kernels, under the interpreter ----------------------------------------------------

# (id, B, C, G, k, H, W, dtype, residual, layout, config (BLOCK_H, BLOCK_W, warps) or None)
TRITON_CASES = []
for _dtype in ("float32", "float16", "bfloat16"):
    TRITON_CASES += [
        (f"{_dtype}-B2C4G4k5-7x13-residual", 2, 4, 4, 5, 7, 13, _dtype, True, "contiguous", None),
        (f"{_dtype}-B1C4G2k3-9x13-strided-tiles", 1, 4, 2, 3, 9, 13, _dtype, False, "strided", (4, 8, 4)),
        (f"{_dtype}-B2C3G1k7-5x6-expanded-residual", 2, 3, 1, 7, 5, 6, _dtype, True, "expanded", None),
        # Row width and strides multiples of 8: the kernels round them to ALIGN.
        (f"{_dtype}-B2C4G4k5-5x24-aligned-residual", 2, 4, 4, 5, 5, 24, _dtype, True, "contiguous", None),
    ]
TRITON_CASES += [
    ("float32-B1C4G4k5-1x1", 1, 4, 4, 5, 1, 1, "float32", True, "contiguous", None),
    ("float32-B1C6G3k3-6x70-default-tiles", 1, 6, 3, 3, 6, 70, "float32", False, "contiguous", None),
    ("float16-B1C4G2k3-6x16-aligned-tiles", 1, 4, 2, 3, 6, 16, "float16", False, "contiguous", (4, 8, 4)),
]
ALIGNED_CASES = [case for case in TRITON_CASES if "aligned" in case[0]]


def _run_triton_cases() -> dict:
    """In the interpreter process: errors of each Triton case, and of ``eac`` dispatching to it."""
    eac_triton_module = importlib.import_module("deblurdiff.ops.eac_triton")
    results = {"interpreted": eac_triton_module.INTERPRETED, "cases": {}}
    for case_id, B, C, G, k, H, W, dtype, residual, layout, config in TRITON_CASES:
        results["cases"][case_id] = errors_against_reference(
            eac_triton_module.eac_triton, B, C, G, k, H, W, getattr(torch, dtype), residual, layout,
            config=config,
        )
    results["cases"]["dispatch-float32"] = errors_against_reference(
        eac, 1, 4, 4, 5, 6, 7, torch.float32, True, backend="triton"
    )
    # The environment variable forces the Triton operator (here on CPU tensors).
    os.environ[eac_module.BACKEND_ENV] = "triton"
    x, kernels, _ = make_inputs(1, 4, 4, 5, 6, 7, torch.float32)
    out, ops = eac_ops(x, kernels, residual=True)
    want = eac_reference(x.double(), kernels.double(), residual=True)
    results["forced_ops"] = ops
    results["forced_error"] = ((out.double() - want).abs().max() / want.abs().max()).item()
    return results


@pytest.fixture(scope="module")
def triton_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop(eac_module.BACKEND_ENV, None)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--triton-interpret"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c[0])
def test_triton_cases_cover_both_alignments(case):
    """The "aligned" cases run the kernels with ALIGN = 8 (rounding the row width and
    strides), the others with 1."""
    eac_triton = pytest.importorskip("deblurdiff.ops.eac_triton")
    _, B, C, G, k, H, W, dtype, residual, layout, _ = case
    x, kernels, grad = make_inputs(B, C, G, k, H, W, getattr(torch, dtype), layout)
    want = eac_triton.ALIGN if case in ALIGNED_CASES else 1
    assert eac_triton.alignment(W, x, kernels, grad) == want


def test_triton_interpreter_active(triton_results):
    assert triton_results["interpreted"]


def test_backend_variable_forces_triton(triton_results):
    assert triton_results["forced_ops"] == ["deblurdiff::eac_triton_forward"]
    assert triton_results["forced_error"] <= TOL[torch.float32]


@pytest.mark.slow
@pytest.mark.parametrize("case", TRITON_CASES + [("dispatch-float32", 1, 4, 4, 5, 6, 7, "float32")],
                         ids=lambda c: c[0])
def test_triton_kernels(triton_results, case):
    errors = triton_results["cases"][case[0]]
    assert max(errors) <= TOL[getattr(torch, case[7])], dict(zip(["out", "grad_x", "grad_kernels"], errors))


if __name__ == "__main__" and "--triton-interpret" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    print(json.dumps(_run_triton_cases()))
