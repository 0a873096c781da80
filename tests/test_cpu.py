"""CPU configuration: feature checks, the dtype choice, shape-dispatched compilation, estimates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deblurdiff import cpu
from deblurdiff.cpu import CPUConfig, CPUFeatures, CPUTiming, choose_cpu_config, compile_for_cpu, estimate_cpu_seconds
from deblurdiff.loading import pick_dtype


def features(bf16: bool = False, amx: bool = False) -> CPUFeatures:
    flags = {"avx2"} | ({"avx512f", "avx512_bf16"} if bf16 else set()) | ({"amx_bf16", "amx_tile"} if amx else set())
    return CPUFeatures("test CPU", frozenset(flags), "AVX512" if bf16 else "AVX2", 2, bf16, amx)


def test_float32_without_native_bf16():
    config = choose_cpu_config(features(), compile=False)
    assert config.dtype == torch.float32
    assert "no native bfloat16" in config.describe()


def test_winograd_with_float32_only(monkeypatch):
    monkeypatch.delenv(cpu.WINOGRAD_ENV, raising=False)
    assert choose_cpu_config(features()).winograd
    assert "Winograd" in choose_cpu_config(features()).describe()
    assert not choose_cpu_config(features(bf16=True)).winograd  # bfloat16: oneDNN's convolutions
    assert not choose_cpu_config(features(bf16=True), dtype="fp32", winograd=False).winograd
    monkeypatch.setenv(cpu.WINOGRAD_ENV, "0")
    assert not choose_cpu_config(features()).winograd
    assert "Winograd" not in choose_cpu_config(features()).describe()
    assert choose_cpu_config(features(), winograd=True).winograd


def test_prepared_pipeline_runs_winograd_within_float32_rounding():
    from conftest import tiny_pipeline

    from deblurdiff.ops.winograd import winograd_bytes

    direct, fast = tiny_pipeline(), tiny_pipeline()
    cpu.prepare_cpu_pipeline(fast, CPUConfig(dtype=torch.float32, winograd=True), measure=False)
    image = torch.rand(1, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    outputs = [pipe(image, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np").images
               for pipe in (direct, fast)]
    assert sum(winograd_bytes(m) for m in (fast.unet, fast.controlnet, fast.lkpn, fast.vae)) > 0
    assert abs(outputs[0] - outputs[1]).max() < 1e-4
    assert 0 < cpu.winograd_budget_bytes() <= cpu.WINOGRAD_MAX_BYTES


@pytest.mark.parametrize("bf16, amx, name", [(True, False, "AVX-512 BF16"), (False, True, "AMX")])
def test_bfloat16_with_native_support(bf16, amx, name):
    config = choose_cpu_config(features(bf16, amx), compile=False)
    assert config.dtype == torch.bfloat16
    assert name in config.describe()


def test_bfloat16_requested_without_native_support_is_refused():
    with pytest.raises(ValueError, match="neither AVX-512 BF16 nor AMX"):
        choose_cpu_config(features(), dtype="bf16")
    assert choose_cpu_config(features(), dtype="fp32", compile=False).dtype == torch.float32
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        choose_cpu_config(features(), dtype="int4")


def test_compilation_switch(monkeypatch):
    monkeypatch.delenv(cpu.COMPILE_ENV, raising=False)
    assert not choose_cpu_config(features()).compile  # off by default: minutes at start for ~9%
    monkeypatch.setenv(cpu.COMPILE_ENV, "1")
    assert choose_cpu_config(features()).compile
    assert "compiled" in choose_cpu_config(features()).describe()
    assert not choose_cpu_config(features(), compile=False).compile
    monkeypatch.setenv(cpu.COMPILE_ENV, "0")
    assert not choose_cpu_config(features()).compile
    assert choose_cpu_config(features(), compile=True).compile


def test_keep_memory_switch(monkeypatch):
    monkeypatch.delenv(cpu.KEEP_MEMORY_ENV, raising=False)
    monkeypatch.setattr(cpu, "_glibc", lambda: True)
    assert choose_cpu_config(features()).keep_memory
    assert "freed memory kept" in choose_cpu_config(features()).describe()
    assert choose_cpu_config(features(bf16=True)).keep_memory  # whatever the dtype
    assert not choose_cpu_config(features(), keep_memory=False).keep_memory
    monkeypatch.setenv(cpu.KEEP_MEMORY_ENV, "0")
    assert not choose_cpu_config(features()).keep_memory
    assert "freed memory" not in choose_cpu_config(features()).describe()
    monkeypatch.setattr(cpu, "_glibc", lambda: False)  # another C library: nothing to set
    assert not choose_cpu_config(features(), keep_memory=True).keep_memory


# Page faults of six calls that make and free tensors of 36-80 MB as a network does, in a
# fresh process (the setting is process-wide and cannot be undone), with and without
# keep_freed_memory().
_FAULTS_SCRIPT = """
import resource, sys, torch
from deblurdiff import cpu

def call():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(12 * 2**20)
    for n in (20, 9, 16, 12):
        y = torch.ones(n * 2**20)
        x = x[: 9 * 2**20] * 2 + y[: 9 * 2**20]
    del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = cpu.keep_freed_memory() if sys.argv[1] == "keep" else None
print(applied, *[call() for _ in range(6)])
"""


def _faults(mode: str) -> tuple[str, list[int]]:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], cwd=root, capture_output=True, text=True,
                            check=True)
    applied, *faults = result.stdout.split()
    return applied, [int(n) for n in faults]


@pytest.mark.skipif(not cpu._glibc(), reason="glibc's allocator only")
def test_keep_freed_memory_stops_page_faults_for_large_tensors():
    _, default = _faults("default")
    applied, kept = _faults("keep")
    assert applied == "True"
    # By default glibc maps every tensor over 32 MiB afresh: 144,000 faults of 4 KiB pages
    # per call, every call. Kept, the heap grows over the first calls, then is reused.
    assert sum(kept[-2:]) * 10 < sum(default[-2:]), (default, kept)
    assert sum(kept) < sum(default)


def test_prepare_keeps_freed_memory_when_configured(monkeypatch):
    from conftest import tiny_pipeline

    calls, messages = [], []
    monkeypatch.setattr(cpu, "keep_freed_memory", lambda: calls.append(True) and False)
    cpu.prepare_cpu_pipeline(tiny_pipeline(), CPUConfig(keep_memory=True), progress=messages.append,
                             measure=False)
    assert calls == [True]
    assert any("C allocator" in m for m in messages)  # said when it could not be applied
    cpu.prepare_cpu_pipeline(tiny_pipeline(), CPUConfig(keep_memory=False), measure=False)
    assert calls == [True]


def test_isa_cap_below_bf16_hides_native_bf16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bfloat16: it must not be chosen then."""
    assert not cpu._isa_allows("AVX2", cpu._BF16_ISA)
    assert cpu._isa_allows("AVX512_CORE_BF16", cpu._BF16_ISA)
    assert cpu._isa_allows(None, cpu._AMX_ISA)
    assert not cpu._isa_allows("AVX512_CORE_BF16", cpu._AMX_ISA)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = cpu.cpu_features()
    assert not capped.native_bf16
    assert pick_dtype(torch.device("cpu")) == torch.float32


def test_pick_dtype_on_the_cpu_follows_the_features(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_features", lambda: features(bf16=True))
    assert pick_dtype(torch.device("cpu")) == torch.bfloat16
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    monkeypatch.setattr(cpu, "cpu_features", lambda: features())
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cpu"), "fp32") == torch.float32
    with pytest.raises(ValueError, match="100× slower"):
        pick_dtype(torch.device("cpu"), "bf16")


def test_compiled_module_runs_only_warmed_up_shapes_compiled():
    """Shapes seen during the warm-up go to the compiled graph; others run eagerly."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    expected = {s: conv(torch.ones(1, 3, s, s)) for s in (8, 16)}
    compile_for_cpu(conv)
    calls = []

    def fake_compiled(x):  # stands in for the Inductor graph (compiling takes minutes)
        calls.append(tuple(x.shape))
        return conv.__class__.forward(conv, x)

    conv._cpu_compiled = fake_compiled
    with torch.no_grad():
        conv._cpu_compile_open = True
        conv(torch.ones(1, 3, 8, 8))
        conv._cpu_compile_open = False
        assert calls == [(1, 3, 8, 8)]
        out8 = conv(torch.ones(1, 3, 8, 8))
        out16 = conv(torch.ones(1, 3, 16, 16))
    assert calls == [(1, 3, 8, 8)] * 2  # the 16×16 call ran eagerly
    torch.testing.assert_close(out8, expected[8])  # same float32 arithmetic either way
    torch.testing.assert_close(out16, expected[16])


def test_compile_for_cpu_is_idempotent():
    conv = torch.nn.Conv2d(1, 1, 1)
    compiled = compile_for_cpu(conv)._cpu_compiled
    assert compile_for_cpu(conv)._cpu_compiled is compiled


def test_estimate_scales_with_size_steps_and_guidance():
    config = CPUConfig(dtype=torch.float32)
    one = estimate_cpu_seconds(512, 512, 1, config=config)
    ten = estimate_cpu_seconds(512, 512, 10, config=config)
    guided = estimate_cpu_seconds(512, 512, 10, 3.0, config=config)
    assert ten > one
    step = (ten - one) / 9
    assert guided == pytest.approx(ten + 10 * step)  # guidance doubles the batch of the networks
    assert estimate_cpu_seconds(500, 500, 10, config=config) == pytest.approx(ten)  # padded to 512
    # 4× the pixels: more than 4× the time untiled (measured 5.7× per step); tiled, per tile.
    large = estimate_cpu_seconds(1024, 1024, 10, config=config)
    assert 4.5 * ten < large < 6 * ten
    nine_tiles = estimate_cpu_seconds(1024, 1024, 10, config=config, tiles=9)
    fixed = one - step
    assert nine_tiles - large == pytest.approx(10 * (9 * step - (large - 4 ** cpu.FIXED_EXPONENT * fixed) / 10))


def test_estimate_uses_measured_timing():
    timing = CPUTiming(step_s_per_mpx=10.0, fixed_s_per_mpx=4.0, width=512, height=512)
    config = CPUConfig(dtype=torch.bfloat16)
    mpx = 512 * 512 / 1e6
    assert estimate_cpu_seconds(512, 512, 20, config=config, timing=timing) == pytest.approx(mpx * (4 + 20 * 10))


def test_timing_leaves_out_filter_transforms(monkeypatch):
    """Encode 3 s (2.5 s of it transforming filters, once), steps 2 s each, decode 1 s."""
    clock = {"now": 0.0, "transforms": 0.0}
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(cpu, "filter_transform_seconds", lambda: clock["transforms"])

    def pipe(image, num_inference_steps, callback_on_step_end, **kwargs):
        clock["now"] += 3.0
        clock["transforms"] += 2.5
        for i in range(num_inference_steps):
            clock["now"] += 2.0
            callback_on_step_end(pipe, i, 0, {})
        clock["now"] += 1.0

    timing = cpu.measure_cpu_timing(pipe, 512, 512, steps=3)
    mpx = 512 * 512 / 1e6
    assert timing.step_s_per_mpx * mpx == pytest.approx(2.0)
    assert timing.fixed_s_per_mpx * mpx == pytest.approx(3.0 + 1.0 - 2.5)


def test_compiled_config_estimates_other_sizes_at_the_eager_speed():
    timing = CPUTiming(step_s_per_mpx=10.0, fixed_s_per_mpx=0.0, width=512, height=512)
    compiled = CPUConfig(dtype=torch.float32, compile=True)
    eager = CPUConfig(dtype=torch.float32, compile=False)
    speeds = cpu.DEFAULT_CPU_SPEEDS
    gain = speeds[("float32", False)][0] / speeds[("float32", True)][0]
    other = estimate_cpu_seconds(512, 768, 1, config=compiled, timing=timing)
    assert other == pytest.approx(gain * estimate_cpu_seconds(512, 768, 1, config=eager, timing=timing))
    # Tiles of the warm-up size run compiled.
    tiled = estimate_cpu_seconds(1024, 768, 1, config=compiled, timing=timing, tiles=6)
    assert tiled == pytest.approx(6 * estimate_cpu_seconds(512, 512, 1, config=compiled, timing=timing))


def test_winograd_config_estimates_faster_until_measured():
    direct = estimate_cpu_seconds(512, 512, 10, config=CPUConfig(dtype=torch.float32))
    fast = estimate_cpu_seconds(512, 512, 10, config=CPUConfig(dtype=torch.float32, winograd=True))
    assert direct / cpu.WINOGRAD_SPEEDUP[0] <= fast <= direct / cpu.WINOGRAD_SPEEDUP[1]
    timing = CPUTiming(step_s_per_mpx=10.0, fixed_s_per_mpx=4.0, width=512, height=512)
    measured = [estimate_cpu_seconds(512, 512, 10, config=CPUConfig(dtype=torch.float32, winograd=w), timing=timing)
                for w in (False, True)]
    assert measured[0] == measured[1]  # a measurement already includes it


def test_describe_cpu_names_the_features():
    text = cpu.describe_cpu(features(bf16=True))
    assert "avx512_bf16" in text and "native bf16: yes" in text and torch.__version__ in text


def test_prepare_tiny_pipeline_skips_compilation_and_measures():
    from conftest import tiny_pipeline

    pipe = tiny_pipeline()
    messages = []
    config = CPUConfig(dtype=torch.float32, compile=True, warmup_size=(64, 64))
    timing = cpu.prepare_cpu_pipeline(pipe, config, progress=messages.append)
    assert any("too small" in m for m in messages)
    assert not hasattr(pipe.unet, "_cpu_compiled")
    assert timing.step_s_per_mpx > 0 and timing.fixed_s_per_mpx >= 0
    assert (timing.width, timing.height) == (64, 64)


@pytest.mark.slow
def test_real_compilation_runs_warmed_up_calls_and_never_recompiles():
    """A call that would need a recompilation runs eagerly instead (compiles once, ~1 min)."""
    torch._dynamo.reset()
    linear = torch.nn.Linear(4, 3).eval()
    x = torch.randn(2, 4)
    compile_for_cpu(linear)
    with torch.no_grad():
        linear._cpu_compile_open = True
        warm = linear(x)
        linear._cpu_compile_open = False
        again = linear(x)
        other = linear(torch.randn(5, 4))
    torch.testing.assert_close(warm, again)
    assert other.shape == (5, 3)
    with torch.enable_grad():  # grad mode is guarded: this would recompile, so it runs eagerly
        linear._cpu_compiled_shapes.add(cpu._shape_key((x,), {}))
        out = linear(x)
    assert out.requires_grad
