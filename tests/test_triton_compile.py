"""The EAC Triton kernels compiled ahead of time for real GPUs, without a GPU.

``triton.compile`` with a ``GPUTarget`` runs the whole compiler, down to the ptxas in
the triton wheel, on any machine. Every kernel is compiled exactly as the operators
launch it: the launch comes from the project's own launchers
(``eac_triton.forward_launch`` and friends), and Triton's own argument binder turns it
into the signature, constexprs and specialisation attributes (pointer alignment,
integers divisible by 16, integers equal to 1) a launch would compile with.

Targets: sm_90 (H100/H200), sm_100 (B200) and sm_120 (RTX Pro 6000, ZeroGPU).
Shapes (the LKPN's: 4 channels, 4 groups, 5 x 5 kernels, with the residual):

* eager: a 256 x 256 latent with :func:`launch_config`'s tiles;
* AOTInductor: a 136 x 264 latent (row width 8 mod 16) with the tiles used for
  symbolic sizes. Inductor marks an integer divisible by 16 only where it can prove it;
  with the exported ``W = 8 * s`` the row width and row strides are not, exactly as here.

Checked: it compiles; ptxas spills at most 16 bytes; the loads are as wide as the
eager ones in the AOTInductor specialisation (without the kernels' ``ALIGN`` they were
all scalar); every load of a tap that is aligned with the tile (the per-pixel kernels
of the forward, the centre column everywhere) is at least 64 bits wide; the stores too.
Taps shifted along W by 1 or 2 elements start at addresses only 1 or 2 elements
aligned, and their loads are as wide as that allows (they hit the cache: ``x`` is
re-read, not streamed).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import io
import multiprocessing
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402

from deblurdiff.ops import eac_triton  # noqa: E402

if eac_triton.INTERPRETED:
    pytest.skip("TRITON_INTERPRET=1: the kernels are interpreted, not compiled", allow_module_level=True)

TARGETS = (90, 100, 120)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KERNELS = ("forward", "grad_x", "grad_kernels")
SHAPES = {"eager-256x256": (256, 256), "aoti-136x264": (136, 264)}
C, G, K = 4, 4, 5  # the LKPN's EAC
MAX_SPILL_BYTES = 16
#: Loads per program at taps aligned with the tile: the forward streams K*K per-pixel
#: kernels and reads the centre column of x (K rows); grad_x reads grad_out and the
#: kernels at the centre column; grad_kernels reads grad_out once and x's centre column.
ALIGNED_LOADS = {"forward": K * K + K, "grad_x": 2 * K, "grad_kernels": 1 + K}

_ACCESS = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)\s", re.M)


def access_widths(ptx: str) -> dict[str, collections.Counter]:
    """``{"ld": Counter(bits per instruction), "st": ...}`` of the PTX's global accesses."""
    found = {"ld": collections.Counter(), "st": collections.Counter()}
    for op, modifiers in _ACCESS.findall(ptx):
        parts = modifiers.split(".")
        vector = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = [int(p[1:]) for p in parts if re.fullmatch(r"[bufs]\d+", p)]
        assert len(bits) == 1, f"cannot read the width of ld/st.global{modifiers}"
        found[op][vector * bits[0]] += 1
    return found


def launch(kernel: str, dtype: torch.dtype, height: int, width: int, config=None, **overrides):
    """The launch the operator makes for a batch-1 latent (meta tensors: only shapes and
    strides are read)."""
    x = torch.empty(1, C, height, width, dtype=dtype, device="meta")
    kernels = torch.empty(1, G * K * K, height, width, dtype=dtype, device="meta")
    config = config or eac_triton.launch_config(height, width)
    made = {
        "forward": lambda: eac_triton.forward_launch(x, kernels, torch.empty_like(x), G, K, True, *config),
        "grad_x": lambda: eac_triton.grad_x_launch(x, kernels, torch.empty_like(x), G, K, True, *config),
        "grad_kernels": lambda: eac_triton.grad_kernels_launch(x, x, torch.empty_like(kernels), G, K, *config),
    }[kernel]()
    made.kwargs.update(overrides)
    return made


def compile_launch(made, capability: int):
    """(compiled kernel, ptxas log) of ``made`` for ``sm_<capability>``, specialised the
    way Triton's launcher specialises it."""
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    fn = made.kernel
    args = [MockTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in made.args]  # 16-byte aligned
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **made.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, made.kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def compile_case(kernel, dtype_name, capability, shape_name, align=None) -> dict:
    """Load and store widths, spilled bytes and shared memory of one compiled case."""
    height, width = SHAPES[shape_name]
    config = None if shape_name.startswith("eager") else eac_triton.DYNAMIC_CONFIG
    overrides = {} if align is None else {"ALIGN": align}
    made = launch(kernel, DTYPES[dtype_name], height, width, config, **overrides)
    result, log = compile_launch(made, capability)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    assert spills, f"no spill report in the ptxas log:\n{log}"
    return dict(widths=access_widths(result.asm["ptx"]), spills=max(spills), shared=result.metadata.shared,
                align=made.kwargs["ALIGN"])


def _compile_star(case):
    return compile_case(*case)


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """``compiled(*case)``: the case compiled in a fresh cache (ptxas runs, and logs, every
    time). The selected cases of :func:`test_compiles_vectorised_without_spills` are
    compiled up front, in parallel on the machine's cores."""
    knobs = triton.knobs
    saved = knobs.cache.dir, knobs.nvidia.dump_ptxas_log
    knobs.cache.dir = str(tmp_path_factory.mktemp("triton-cache"))
    knobs.nvidia.dump_ptxas_log = True
    results = {}
    selected = sorted({tuple(item.callspec.params[k] for k in ("kernel", "dtype", "capability", "shape"))
                       for item in request.session.items
                       if getattr(item, "originalname", None) == "test_compiles_vectorised_without_spills"})
    if "aoti-136x264" in {case[3] for case in selected}:  # compared with the eager cases
        selected = sorted(set(selected) | {(*case[:3], "eager-256x256") for case in selected})
    workers = min(len(selected), os.cpu_count() or 1)
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            results.update(zip(selected, pool.map(_compile_star, selected)))

    def get(*case):
        if case not in results:
            results[case] = compile_case(*case)
        return results[case]

    yield get
    knobs.cache.dir, knobs.nvidia.dump_ptxas_log = saved


def test_alignment_only_when_provable():
    x = torch.empty(1, 4, 136, 264, device="meta")
    assert eac_triton.alignment(264, x) == 8
    assert eac_triton.alignment(260, torch.empty(1, 4, 8, 260, device="meta")) == 1
    assert eac_triton.alignment(264, x[..., 1:]) == 8  # a column window keeps the strides
    assert eac_triton.alignment(264, x.contiguous(memory_format=torch.channels_last)) == 1  # channel stride 1
    assert eac_triton.alignment(16, torch.empty(1, 4, 7, 16, device="meta")[:, :, :, :12]) == 8


def test_alignment_of_symbolic_sizes():
    """Under tracing (export, AOTInductor) the sizes are ``8 * s``: provably multiples."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    h, w = (env.create_symintnode(env.create_symbol(n, ConstantSource(name)), hint=n)
            for n, name in ((17, "h"), (33, "w")))
    with FakeTensorMode(shape_env=env):
        x = torch.empty(1, 4, 8 * h, 8 * w)
        odd = torch.empty(1, 4, 8 * h, 8 * w + 4)
    assert eac_triton.alignment(8 * w, x) == 8
    assert eac_triton.alignment(8 * w + 4, odd) == 1
    assert eac_triton.alignment(w, x) == 1
    assert not env.guards  # proved, not guarded


CASES = [(k, d, t, s) for s in SHAPES for t in TARGETS for d in DTYPES for k in KERNELS]


@pytest.mark.slow
@pytest.mark.parametrize("kernel,dtype,capability,shape", CASES, ids=lambda v: f"sm{v}" if isinstance(v, int) else v)
def test_compiles_vectorised_without_spills(compiled, kernel, dtype, capability, shape):
    got = compiled(kernel, dtype, capability, shape)
    loads, stores = got["widths"]["ld"], got["widths"]["st"]
    assert got["align"] == eac_triton.ALIGN
    assert got["spills"] <= MAX_SPILL_BYTES, got
    assert got["shared"] == 0, got
    wide = sum(n for bits, n in loads.items() if bits >= 64)
    assert wide >= ALIGNED_LOADS[kernel], dict(loads)
    assert stores and min(stores) >= 64, dict(stores)
    if shape.startswith("aoti"):
        assert loads == compiled(kernel, dtype, capability, "eager-256x256")["widths"]["ld"]


@pytest.mark.slow
def test_without_alignment_the_loads_are_scalar(compiled):
    """What the check catches: the row width 8 mod 16 with ALIGN=1 (the kernels before
    the fix) makes every load a single half-precision element."""
    got = compiled("forward", "float16", 90, "aoti-136x264", 1)
    assert set(got["widths"]["ld"]) == {16}, got
