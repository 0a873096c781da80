"""Running on a CPU: what the processor can do, the fastest safe configuration for it,
compilation with a visible warm-up, and time estimates.

bfloat16 is only fast where the CPU multiplies it natively (AVX-512 BF16 or AMX);
elsewhere oneDNN emulates it and a model call becomes over 100× slower than float32,
so bfloat16 is chosen only after checking for those features. Without them, float32
runs its 3×3 convolutions by Winograd's algorithm or one unfolded matrix product
(:mod:`deblurdiff.ops.winograd`), 1.2× a whole model call on AVX2. Memory freed by one
tensor is kept in the process for the next (:func:`keep_freed_memory`): otherwise every
large tensor arrives as fresh pages that the kernel faults in one by one (115,000 page
faults in a 512² model call). Everything chosen
here keeps results within rounding of float32 (bfloat16 where native: the pipeline's GPU
precision); nothing that costs quality is turned on by default.

Typical use (app or CLI, once at start)::

    config = choose_cpu_config()
    logger.info("CPU configuration: %s", config.describe())
    pipe = load_pipeline(model, device="cpu", dtype=config.dtype)
    timing = prepare_cpu_pipeline(pipe, config, progress=lambda message: logger.info(message))  # compiles if config.compile
    estimate = estimate_cpu_seconds(width, height, steps, config=config, timing=timing)
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import time
import types
from dataclasses import dataclass, field
from typing import Callable

import torch

from .ops.geglu import enable_split_geglu
from .ops.winograd import WinogradBudget, enable_winograd, filter_transform_seconds
from .tiling import padded

__all__ = [
    "CPUConfig",
    "CPUFeatures",
    "CPUTiming",
    "choose_cpu_config",
    "compile_for_cpu",
    "cpu_features",
    "describe_cpu",
    "enable_cpu_winograd",
    "measure_cpu_timing",
    "estimate_cpu_seconds",
    "keep_freed_memory",
    "prepare_cpu_pipeline",
]

#: Set to "1" to compile the networks on the CPU. Off by default: measured side by side
#: (benchmarks/results/cpu_model_call.md) it saved 9% of a float32 call and nothing in
#: bfloat16, for 10-15 minutes of compilation at start on a 2-core machine.
COMPILE_ENV = "DEBLURDIFF_CPU_COMPILE"

#: Set to "0" to run float32 3×3 convolutions with oneDNN instead of Winograd's
#: F(4×4, 3×3) and unfolded matrix products (deblurdiff/ops/winograd.py).
WINOGRAD_ENV = "DEBLURDIFF_CPU_WINOGRAD"

#: Set to "0" to leave the C allocator's settings alone (see keep_freed_memory).
KEEP_MEMORY_ENV = "DEBLURDIFF_CPU_KEEP_MEMORY"

#: At most this share of the machine's memory (and never more than
#: WINOGRAD_MAX_BYTES) holds transformed Winograd filters; convolutions beyond it run
#: directly. A 512² image needs about 2.8 GB: 1.6 GB for the UNet, ControlNet and LKPN,
#: 1.2 GB for the VAE (benchmarks/results/cpu_model_call.md, cpu_estimate.txt).
WINOGRAD_MEMORY_SHARE = 0.15
WINOGRAD_MAX_BYTES = 4 * 2**30

# oneDNN's ISA names, lowest first; a cap below the native-bf16 ones disables them.
_ONEDNN_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI",
                "AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10_1_512_AMX",
                "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16")
_BF16_ISA = _ONEDNN_ISAS.index("AVX512_CORE_BF16")
_AMX_ISA = _ONEDNN_ISAS.index("AVX512_CORE_AMX")


@dataclass(frozen=True)
class CPUFeatures:
    """What the processor offers to PyTorch, after any ISA caps set in the environment."""

    model: str
    flags: frozenset = field(repr=False)
    capability: str  # ATen's vector ISA (torch.backends.cpu.get_cpu_capability())
    threads: int
    avx512_bf16: bool
    amx: bool
    isa_cap: str | None = None  # ONEDNN_MAX_CPU_ISA, when set

    @property
    def native_bf16(self) -> bool:
        """bfloat16 matrix products run in hardware (AVX-512 BF16 or AMX) for oneDNN."""
        return self.avx512_bf16 or self.amx

    @property
    def vector_extensions(self) -> str:
        names = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"]
        return " ".join(n for n in names if n in self.flags) or "none of " + " ".join(names)


def _cpuinfo() -> tuple[str, frozenset]:
    model, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def _isa_allows(cap: str | None, index: int) -> bool:
    if not cap:
        return True
    cap = cap.strip().upper()
    if cap in ("ALL", "DEFAULT"):
        return True
    return cap in _ONEDNN_ISAS and _ONEDNN_ISAS.index(cap) >= index


@functools.lru_cache(maxsize=None)
def _features(cap: str | None, aten: str | None) -> CPUFeatures:
    model, flags = _cpuinfo()
    capability = torch.backends.cpu.get_cpu_capability()
    avx512_bf16 = "avx512_bf16" in flags and _isa_allows(cap, _BF16_ISA) and capability.startswith("AVX512")
    amx = "amx_bf16" in flags and "amx_tile" in flags and _isa_allows(cap, _AMX_ISA)
    return CPUFeatures(model, flags, capability, torch.get_num_threads(), avx512_bf16, amx, cap)


def cpu_features() -> CPUFeatures:
    """This machine's CPU (model name, flags from /proc/cpuinfo, ATen's ISA), honouring
    the ``ONEDNN_MAX_CPU_ISA`` and ``ATEN_CPU_CAPABILITY`` caps."""
    return _features(os.environ.get("ONEDNN_MAX_CPU_ISA"), os.environ.get("ATEN_CPU_CAPABILITY"))


# ----------------------------------------------------------------------------------
# The configuration
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CPUConfig:
    """How the networks run on the CPU. ``compile``: torch.compile (Inductor, weights
    frozen into the graph) for the warmed-up image size; other sizes run eagerly.
    ``winograd``: float32 3×3 convolutions by Winograd's F(4×4, 3×3) on feature maps of
    32 pixels and more, by one unfolded matrix product on smaller ones
    (:func:`deblurdiff.ops.winograd.enable_winograd`; float32-level results).
    ``keep_memory``: freed memory stays in the process (:func:`keep_freed_memory`;
    results unchanged)."""

    dtype: torch.dtype = torch.float32
    compile: bool = False
    channels_last: bool = False
    winograd: bool = False
    keep_memory: bool = False
    warmup_size: tuple[int, int] = (512, 512)
    reason: str = ""

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(self.dtype, str(self.dtype))

    def describe(self) -> str:
        parts = [self.dtype_name, "torch.compile (Inductor, frozen weights)" if self.compile else "eager"]
        if self.winograd:
            parts.append("Winograd 3×3 convolutions")
        if self.channels_last:
            parts.append("channels-last")
        if self.keep_memory:
            parts.append("freed memory kept for reuse")
        text = ", ".join(parts)
        return f"{text} — {self.reason}" if self.reason else text


def _switch(env: str, requested: bool | None, default: bool) -> bool:
    if requested is not None:
        return bool(requested)
    value = os.environ.get(env, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def choose_cpu_config(features: CPUFeatures | None = None, *, dtype: str | torch.dtype | None = None,
                      compile: bool | None = None, winograd: bool | None = None,
                      keep_memory: bool | None = None) -> CPUConfig:
    """The fastest configuration that keeps float32-level results on this CPU.

    bfloat16 where the CPU has native bf16 (AVX-512 BF16 or AMX), else float32 with
    Winograd convolutions (unless ``winograd=False`` or ``DEBLURDIFF_CPU_WINOGRAD=0``);
    eager unless ``compile=True`` or ``DEBLURDIFF_CPU_COMPILE=1``; freed memory kept for
    reuse where the C library allows it, unless ``keep_memory=False`` or
    ``DEBLURDIFF_CPU_KEEP_MEMORY=0``. ``dtype``
    ("fp32", "bf16" or a torch dtype) overrides the choice; bfloat16 requested on a CPU
    without native support raises a ValueError saying why."""
    features = features or cpu_features()
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in names:
            raise ValueError(f"CPU dtype must be one of fp32, bf16 or auto, got {dtype!r}")
        dtype = names[dtype]
    if dtype in (None, "auto"):
        if features.native_bf16:
            dtype = torch.bfloat16
            reason = "native bfloat16 (" + ("AMX" if features.amx else "AVX-512 BF16") + ")"
        else:
            dtype = torch.float32
            reason = "no native bfloat16 on this CPU (neither AVX-512 BF16 nor AMX): float32"
    elif dtype == torch.bfloat16:
        if not features.native_bf16:
            raise ValueError(
                "bfloat16 was requested, but this CPU has neither AVX-512 BF16 nor AMX: bfloat16 would be "
                "emulated and over 100× slower than float32. Use float32 on this CPU."
            )
        reason = "bfloat16 as requested (native on this CPU)"
    elif dtype == torch.float32:
        reason = "float32 as requested"
    else:
        raise ValueError(f"CPU dtype must be float32 or bfloat16, got {dtype}")
    use_compile = _switch(COMPILE_ENV, compile, False)
    reason += "; compiled" if use_compile else f"; eager (set {COMPILE_ENV}=1 to compile)"
    # Winograd runs float32 only; bfloat16 convolutions are oneDNN's (fast where native).
    use_winograd = dtype == torch.float32 and _switch(WINOGRAD_ENV, winograd, True)
    use_keep_memory = _switch(KEEP_MEMORY_ENV, keep_memory, True) and _glibc()
    return CPUConfig(dtype=dtype, compile=use_compile, winograd=use_winograd, keep_memory=use_keep_memory,
                     reason=reason)


# ----------------------------------------------------------------------------------
# The C allocator
# ----------------------------------------------------------------------------------

# glibc's mallopt() parameters (malloc.h); the values are C ints.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Allocations above this still get pages of their own (none at 512², a few above 2048²).
KEEP_MEMORY_MMAP_THRESHOLD = 2**30
#: The heap is given back to the kernel only when this much is free at its top.
KEEP_MEMORY_TRIM_THRESHOLD = 2**31 - 1


def _glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.lru_cache(maxsize=None)
def keep_freed_memory() -> bool:
    """Keep the memory of freed tensors in the process for the next ones (glibc only;
    process-wide, once). Returns whether the settings took effect.

    glibc gives every allocation above its mmap threshold (128 KiB, raised as it goes up
    to 32 MiB) pages of its own and hands them back to the kernel when it is freed; the
    next tensor of that size is zero-filled again, one page fault per 4 KiB. A 512²
    float32 model call made 115,000 such faults (450 MB). Raising the mmap threshold (to
    1 GiB) serves those tensors from the heap, and raising the trim threshold (to 2 GiB)
    keeps the heap's freed memory: the heap grows over the first calls, then is reused
    without new faults. On 2 AVX2 cores of a virtual machine, where faults are dear, a
    model call went from 7.33 to 7.15 s side by side in one benchmark
    (benchmarks/results/cpu_model_call.md). The price is memory: the process keeps its
    peak working set between calls (0.3 GB more resident at 512²) instead of returning
    it. Results are unchanged."""
    if not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, KEEP_MEMORY_MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, KEEP_MEMORY_TRIM_THRESHOLD)))


# ----------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------

#: Inductor options for CPU inference: weights become graph constants (oneDNN prepacks
#: convolution and linear weights once instead of at every call).
INDUCTOR_OPTIONS = {"freezing": True}


#: Networks smaller than this (UNet parameters) are not compiled: compiling takes
#: minutes whatever the size, and saves little on small models (e.g. ``random-tiny``).
MIN_COMPILE_PARAMETERS = 50_000_000


def _shape_key(args, kwargs) -> tuple:
    return tuple(tuple(a.shape) + (a.dtype,) for a in (*args, *kwargs.values()) if torch.is_tensor(a))


def compile_for_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """Compile ``module`` (in place) for inputs of the shapes it is warmed up with.

    Calls are dispatched on their tensor shapes: shapes seen while
    ``module._cpu_compile_open`` is true (set by :func:`prepare_cpu_pipeline` during the
    warm-up) run the compiled graph, any other shape runs eagerly, so that an unusual
    image size never triggers minutes of compilation inside a request."""
    if getattr(module, "_cpu_compiled", None) is not None:
        return module
    eager_forward = module.forward
    compiled = torch.compile(eager_forward, dynamic=False, options=INDUCTOR_OPTIONS)
    module._cpu_compiled = compiled
    module._cpu_compiled_shapes = set()
    module._cpu_compile_open = False

    def forward(self, *args, **kwargs):
        key = _shape_key(args, kwargs)
        if key in self._cpu_compiled_shapes:
            # Anything else that would recompile (another guidance batch, scale, grad
            # mode…) runs eagerly instead of compiling for minutes inside a request.
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    return self._cpu_compiled(*args, **kwargs)
            except RuntimeError as exc:
                if "fail_on_recompile" not in str(exc):
                    raise
                return eager_forward(*args, **kwargs)
        if self._cpu_compile_open and not torch.is_grad_enabled():
            out = self._cpu_compiled(*args, **kwargs)
            self._cpu_compiled_shapes.add(key)
            return out
        return eager_forward(*args, **kwargs)

    module.forward = types.MethodType(forward, module)
    return module


# ----------------------------------------------------------------------------------
# Preparing the pipeline, and timing it
# ----------------------------------------------------------------------------------


@dataclass
class CPUTiming:
    """Seconds measured at the warm-up size after compilation (per megapixel)."""

    step_s_per_mpx: float
    fixed_s_per_mpx: float
    width: int
    height: int


def winograd_budget_bytes() -> int:
    """Bytes that transformed Winograd filters may take on this machine."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    return int(min(WINOGRAD_MAX_BYTES, WINOGRAD_MEMORY_SHARE * total))


def enable_cpu_winograd(*modules: torch.nn.Module) -> None:
    """Winograd convolutions for ``modules``, their filters sharing this machine's budget."""
    budget = WinogradBudget(winograd_budget_bytes())
    for module in modules:
        enable_winograd(module, budget=budget)


def _networks(pipe):
    return (pipe.unet, pipe.controlnet, pipe.lkpn.unet)


def prepare_cpu_pipeline(pipe, config: CPUConfig, progress: Callable[[str], None] | None = None,
                         measure: bool = True) -> CPUTiming | None:
    """Apply ``config`` to a CPU pipeline (dtype, memory format, compilation) and, when
    compiling, warm up at ``config.warmup_size`` now, reporting through ``progress``.

    Returns the per-megapixel step and fixed (VAE) times measured after the warm-up
    (``measure=False``: None), for :func:`estimate_cpu_seconds`."""
    say = progress or (lambda message: None)
    # Denormal activations slow float32 CPU kernels severalfold; flushing them changes
    # results far below float32 rounding of the outputs.
    torch.set_flush_denormal(True)
    # Contiguous GEGLU halves: same results within float32 rounding, a few % per layer.
    for module in _networks(pipe):
        enable_split_geglu(module)
    if config.keep_memory and not keep_freed_memory():
        say("Could not change the C allocator's settings: freed memory goes back to the system.")
    if pipe.unet.dtype != config.dtype:
        pipe.to(dtype=config.dtype)
    if config.channels_last:
        for module in (pipe.unet, pipe.controlnet, pipe.lkpn, pipe.vae):
            module.to(memory_format=torch.channels_last)
    if config.winograd and config.dtype == torch.float32:
        enable_cpu_winograd(pipe.unet, pipe.controlnet, pipe.lkpn, pipe.vae)
    width, height = config.warmup_size
    small = sum(p.numel() for p in pipe.unet.parameters()) < MIN_COMPILE_PARAMETERS
    if config.compile and small:
        say("Not compiling: the networks are too small for compilation to pay off.")
    if config.compile and not small:
        for module in _networks(pipe):
            compile_for_cpu(module)
            module._cpu_compile_open = True
        say(f"Compiling the networks for {width}×{height} images on the CPU (a few minutes, once)…")
        start = time.perf_counter()
        try:
            pipe.warmup(height, width, num_inference_steps=1)
        finally:
            for module in _networks(pipe):
                module._cpu_compile_open = False
        say(f"Compiled in {time.perf_counter() - start:.0f} s.")
    if not measure:
        return None
    say("Measuring the speed on this CPU…")
    return measure_cpu_timing(pipe, width, height)


@torch.no_grad()
def measure_cpu_timing(pipe, width: int = 512, height: int = 512, steps: int = 2) -> CPUTiming:
    """Time one ``steps``-step call on a grey image: seconds per step (the last step) and
    the rest (VAE encode + decode, colour fix), per megapixel. Transforming Winograd
    filters, which the first call at a size does once, is left out of the rest."""
    stamps = []

    def stamp(p, i, t, kwargs):
        stamps.append(time.perf_counter())
        return {}

    image = torch.full((1, 3, height, width), 0.5)
    one_off = filter_transform_seconds()
    start = time.perf_counter()
    pipe(image, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt",
         callback_on_step_end=stamp)
    total = time.perf_counter() - start - (filter_transform_seconds() - one_off)
    step = stamps[-1] - stamps[-2] if len(stamps) >= 2 else total / (steps + 1)
    mpx = padded(width) * padded(height) / 1e6
    return CPUTiming(step / mpx, max(total - steps * step, 0.0) / mpx, width, height)


# Seconds per megapixel at 512×512: (one step, VAE encode + decode and the rest), full-size
# random weights, 2 threads. Used until the pipeline has been timed on this machine;
# scaled by thread count. bfloat16: an AMD EPYC with AVX-512 BF16 (benchmarks/
# bench_inference.py, bench_model.py). float32, chosen on CPUs without native bf16: an AMD
# EPYC with AVX2 only, 3-step runs with Winograd convolutions and kept memory (27.8 s per
# step per megapixel, 51.0 s for the rest; benchmarks/results/cpu_estimate.txt), given
# here without Winograd (times WINOGRAD_SPEEDUP).
REFERENCE_THREADS = 2
DEFAULT_CPU_SPEEDS = {
    ("float32", False): (38.9, 70.4),
    ("float32", True): (38.9 / 1.09, 70.4),  # compiled: 1.43× vs 1.31× the reference per call
    ("bfloat16", False): (6.5, 28.8),
    ("bfloat16", True): (6.5, 28.8),  # compiled: 2.09× vs 2.10× the reference per call
}
# Winograd convolutions (float32): (per step, VAE encode + decode) speed-ups measured at
# 512² on 2 AVX2 cores, Intel Xeon capped at AVX2 (benchmarks/results/cpu_estimate.txt):
# 39.1 -> 27.9 s per step per megapixel, VAE 24.8 -> 18.0 s.
WINOGRAD_SPEEDUP = (1.40, 1.38)
# Time grows faster than the pixel count (activations outgrow the caches; the VAE's
# middle attention is global): per-step time ∝ megapixels ** 1.25 and VAE time ∝
# megapixels ** 1.14, from float32 eager at 512² and 1024² (5.7× and 4.9× for 4× pixels).
STEP_EXPONENT = 1.25
FIXED_EXPONENT = 1.14


def _scaled(seconds_per_mpx: float, mpx: float, at_mpx: float, exponent: float) -> float:
    """Seconds for ``mpx`` given ``seconds_per_mpx`` measured at ``at_mpx``."""
    return seconds_per_mpx * at_mpx * (mpx / at_mpx) ** exponent


def estimate_cpu_seconds(width: int, height: int, steps: int, guidance_scale: float = 1.0, *,
                         config: CPUConfig | None = None, timing: CPUTiming | None = None,
                         tiles: int | None = None, tile_size: int = 512) -> float:
    """Seconds for one image of ``width``×``height`` on this CPU.

    Uses ``timing`` (measured by :func:`prepare_cpu_pipeline`) when given, else the
    defaults measured for ``config`` on the reference machine, scaled by thread count.
    ``tiles``: the number of ``tile_size`` tiles when the image runs tiled (None:
    untiled). With a compiling configuration, networks run compiled only at the warm-up
    size (whole image, or tiles of that size) and eagerly otherwise."""
    config = config or choose_cpu_config(compile=False)
    image_mpx = padded(width) * padded(height) / 1e6
    branches = 2 if guidance_scale and float(guidance_scale) > 1.0 else 1
    default_step, default_fixed = DEFAULT_CPU_SPEEDS[(config.dtype_name, config.compile)]
    if timing is not None:
        step, fixed = timing.step_s_per_mpx, timing.fixed_s_per_mpx
        at_mpx = padded(timing.width) * padded(timing.height) / 1e6
        warm = (padded(timing.width), padded(timing.height))
    else:
        scale = REFERENCE_THREADS / max(1, torch.get_num_threads())
        step, fixed, at_mpx = default_step * scale, default_fixed * scale, 512 * 512 / 1e6
        if config.winograd:
            step, fixed = step / WINOGRAD_SPEEDUP[0], fixed / WINOGRAD_SPEEDUP[1]
        warm = config.warmup_size
    pass_size = (tile_size, tile_size) if tiles else (padded(width), padded(height))
    if config.compile and pass_size != tuple(warm):
        step *= DEFAULT_CPU_SPEEDS[(config.dtype_name, False)][0] / default_step  # runs eagerly
    pass_mpx = pass_size[0] * pass_size[1] / 1e6
    step_seconds = (tiles or 1) * _scaled(step, pass_mpx, at_mpx, STEP_EXPONENT)
    return _scaled(fixed, image_mpx, at_mpx, FIXED_EXPONENT) + steps * branches * step_seconds


def describe_cpu(features: CPUFeatures | None = None) -> str:
    """One line for logs and benchmark records."""
    f = features or cpu_features()
    cap = f", oneDNN ISA capped at {f.isa_cap}" if f.isa_cap else ""
    return (f"{f.model}; {f.threads} threads; ATen ISA {f.capability}{cap}; extensions: {f.vector_extensions}; "
            f"native bf16: {'yes' if f.native_bf16 else 'no'}; torch {torch.__version__}")
