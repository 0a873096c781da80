"""Running on a CPU: what the processor can do, the fastest safe configuration for it, and its
measured speed (time estimates: deblurdiff.pipeline.estimates). bfloat16 is fast only where the CPU multiplies
it natively (AVX-512 BF16 or AMX), over 100× slower than float32 elsewhere; float32 runs its 3×3
convolutions by Winograd's algorithm or one unfolded matrix product (:mod:`deblurdiff.cpu.winograd`),
1.4× a whole model call on AVX2. Nothing chosen here changes results beyond rounding.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..parsing import env_flag, parse_dtype
from .winograd import WinogradBudget, enable_winograd, filter_transform_seconds

#: Set to "0" to run float32 3×3 convolutions with oneDNN instead of Winograd's
#: F(4×4, 3×3) and unfolded matrix products (deblurdiff/cpu/winograd.py).
WINOGRAD_ENV = "DEBLURDIFF_CPU_WINOGRAD"

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
    capability: str  # ATen's vector ISA (torch.backends.cpu.get_cpu_capability())
    threads: int
    avx512_bf16: bool
    amx: bool
    isa_cap: str | None = None  # ONEDNN_MAX_CPU_ISA, when set

    @property
    def native_bf16(self) -> bool:
        """bfloat16 matrix products run in hardware (AVX-512 BF16 or AMX) for oneDNN."""
        return self.avx512_bf16 or self.amx


@functools.lru_cache(maxsize=None)
def _model_name() -> str:
    """The processor's name for logs (torch does not report it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _isa_allows(cap: str | None, index: int) -> bool:
    cap = (cap or "ALL").strip().upper()
    return cap in ("ALL", "DEFAULT") or (cap in _ONEDNN_ISAS and _ONEDNN_ISAS.index(cap) >= index)


def cpu_features() -> CPUFeatures:
    """This machine's CPU as torch reports it (its cpuinfo checks and ATen's ISA),
    honouring the ``ONEDNN_MAX_CPU_ISA`` and ``ATEN_CPU_CAPABILITY`` caps."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    capability = torch.backends.cpu.get_cpu_capability()
    avx512_bf16 = (torch.cpu._is_avx512_bf16_supported() and _isa_allows(cap, _BF16_ISA)
                   and capability.startswith("AVX512"))
    amx = torch.cpu._is_amx_tile_supported() and _isa_allows(cap, _AMX_ISA)
    return CPUFeatures(_model_name(), capability, torch.get_num_threads(), avx512_bf16, amx, cap)



@dataclass(frozen=True)
class CPUConfig:
    """How the networks run on the CPU; ``winograd``: float32 3×3 convolutions by
    :func:`deblurdiff.cpu.winograd.enable_winograd` (float32-level results)."""

    dtype: torch.dtype = torch.float32
    winograd: bool = False
    warmup_size: tuple[int, int] = (512, 512)
    reason: str = ""

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def describe(self) -> str:
        text = self.dtype_name + (", Winograd 3×3 convolutions" if self.winograd else "")
        return f"{text} — {self.reason}" if self.reason else text


def choose_cpu_config(features: CPUFeatures | None = None, *, dtype: str | torch.dtype | None = None,
                      winograd: bool | None = None) -> CPUConfig:
    """The fastest configuration that keeps float32-level results on this CPU: native bf16
    where there is one, else float32 with Winograd convolutions (unless ``winograd=False`` or
    ``DEBLURDIFF_CPU_WINOGRAD=0``). ``dtype`` overrides the choice; bfloat16 without native
    support raises a ValueError saying why."""
    features = features or cpu_features()
    if isinstance(dtype, str) and dtype != "auto":
        try:
            dtype = parse_dtype(dtype, allowed=("fp32", "bf16"))
        except ValueError:
            raise ValueError(f"CPU dtype must be one of fp32, bf16 or auto, got {dtype!r}") from None
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
    # Winograd runs float32 only; bfloat16 convolutions are oneDNN's (fast where native).
    use_winograd = dtype == torch.float32 and (env_flag(WINOGRAD_ENV, True) if winograd is None else bool(winograd))
    return CPUConfig(dtype=dtype, winograd=use_winograd, reason=reason)



@dataclass
class CPUTiming:
    """Seconds of one step and of the rest, measured on a ``width`` × ``height`` image."""

    step_seconds: float
    fixed_seconds: float
    width: int
    height: int


def enable_cpu_winograd(*modules: torch.nn.Module) -> WinogradBudget:
    """Winograd convolutions for ``modules``, their filters sharing this machine's budget."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 * 2**30
    budget = WinogradBudget(int(min(WINOGRAD_MAX_BYTES, WINOGRAD_MEMORY_SHARE * total)))
    for module in modules:
        enable_winograd(module, budget=budget)
    return budget


def prepare_cpu_pipeline(pipe, config: CPUConfig, progress: Callable[[str], None] | None = None,
                         measure: bool = True) -> CPUTiming | None:
    """Apply ``config`` to a CPU pipeline (dtype, Winograd convolutions) and time it at
    ``config.warmup_size`` (``measure=False``: None) for ``SpeedModel.measured_cpu``."""
    say = progress or (lambda message: None)
    # Denormal activations slow float32 CPU kernels severalfold; flushing them changes
    # results far below float32 rounding of the outputs.
    torch.set_flush_denormal(True)
    if pipe.unet.dtype != config.dtype:
        pipe.to(dtype=config.dtype)
    if config.winograd and config.dtype == torch.float32:
        enable_cpu_winograd(pipe.unet, pipe.controlnet, pipe.lkpn, pipe.vae)
    if not measure:
        return None
    say("Measuring the speed on this CPU…")
    return measure_cpu_timing(pipe, *config.warmup_size)


@torch.no_grad()
def measure_cpu_timing(pipe, width: int = 512, height: int = 512, steps: int = 2) -> CPUTiming:
    """Time one ``steps``-step call on a grey image: seconds per step (the last step) and
    the rest (VAE encode + decode, colour fix). Transforming Winograd filters, which the
    first call at a size does once, is left out of the rest."""
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
    return CPUTiming(step, max(total - steps * step, 0.0), width, height)


def describe_cpu(features: CPUFeatures | None = None) -> str:
    """One line for logs and benchmark records."""
    f = features or cpu_features()
    cap = f", oneDNN ISA capped at {f.isa_cap}" if f.isa_cap else ""
    return (f"{f.model}; {f.threads} threads; ATen ISA {f.capability}{cap}; "
            f"AVX-512 BF16: {'yes' if f.avx512_bf16 else 'no'}; AMX: {'yes' if f.amx else 'no'}; native bf16: {'yes' if f.native_bf16 else 'no'}; torch {torch.__version__}")
