"""CPU configuration: feature checks, the dtype choice, Winograd preparation, estimates."""

from __future__ import annotations

import pytest
import torch

from deblurdiff.cpu import tuning as cpu
from deblurdiff.pipeline import estimates
from deblurdiff.cpu.tuning import CPUConfig, CPUFeatures, CPUTiming, choose_cpu_config
from deblurdiff.pipeline.estimates import SpeedModel
from deblurdiff.pipeline.loading import pick_dtype


def estimate_cpu_seconds(width, height, steps, guidance_scale=1.0, *, config, timing=None, tiled=False):
    """What the app estimates on this CPU: measured ``timing``, else the defaults for ``config``."""
    speed = SpeedModel.measured_cpu(config, timing) if timing else SpeedModel.default("cpu", cpu_config=config)
    return speed.seconds(width, height, steps, guidance_scale, tiled)


def features(bf16: bool = False, amx: bool = False) -> CPUFeatures:
    return CPUFeatures("test CPU", "AVX512" if bf16 else "AVX2", 2, bf16, amx)


def test_float32_without_native_bf16():
    config = choose_cpu_config(features())
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

    from deblurdiff.cpu.winograd import winograd_bytes

    direct, fast = tiny_pipeline(), tiny_pipeline()
    cpu.prepare_cpu_pipeline(fast, CPUConfig(dtype=torch.float32, winograd=True), measure=False)
    budget = fast.unet.conv_in._winograd_budget  # shared by the four networks
    image = torch.rand(1, 3, 256, 192, generator=torch.Generator().manual_seed(0))
    outputs = [pipe(image, num_inference_steps=2, generator=torch.Generator().manual_seed(1), output_type="np").images
               for pipe in (direct, fast)]
    assert sum(winograd_bytes(m) for m in (fast.unet, fast.controlnet, fast.lkpn, fast.vae)) > 0
    assert abs(outputs[0] - outputs[1]).max() < 1e-4
    assert 0 < budget.used <= budget.max_bytes <= cpu.WINOGRAD_MAX_BYTES
    assert fast.vae.decoder.conv_in._winograd_budget is budget


@pytest.mark.parametrize("bf16, amx, name", [(True, False, "AVX-512 BF16"), (False, True, "AMX")])
def test_bfloat16_with_native_support(bf16, amx, name):
    config = choose_cpu_config(features(bf16, amx))
    assert config.dtype == torch.bfloat16
    assert name in config.describe()


def test_bfloat16_requested_without_native_support_is_refused():
    with pytest.raises(ValueError, match="neither AVX-512 BF16 nor AMX"):
        choose_cpu_config(features(), dtype="bf16")
    assert choose_cpu_config(features(), dtype="fp32").dtype == torch.float32
    with pytest.raises(ValueError, match="fp32, bf16 or auto"):
        choose_cpu_config(features(), dtype="int4")


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
    # Tiled: each step runs the networks once per 512² tile (9 cover 1024²), more than untiled.
    nine_tiles = estimate_cpu_seconds(1024, 1024, 10, config=config, tiled=True)
    assert nine_tiles > large
    steps_only = nine_tiles - estimate_cpu_seconds(1024, 1024, 0, config=config, tiled=True)
    assert steps_only == pytest.approx(9 * 10 * step)


def _timed_run(monkeypatch, transforms: float = 0.0):
    """A stand-in pipeline on a fake clock: encode 3 s (``transforms`` of it transforming
    filters, once), steps 2 s each, decode 1 s."""
    clock = {"now": 0.0, "transforms": 0.0}
    monkeypatch.setattr(cpu.time, "perf_counter", lambda: clock["now"])
    monkeypatch.setattr(cpu, "filter_transform_seconds", lambda: clock["transforms"])

    def pipe(image, num_inference_steps, callback_on_step_end, **kwargs):
        clock["now"] += 3.0
        clock["transforms"] += transforms
        for i in range(num_inference_steps):
            clock["now"] += 2.0
            callback_on_step_end(pipe, i, 0, {})
        clock["now"] += 1.0

    return pipe


def test_estimate_at_the_measured_size_is_the_measured_time(monkeypatch):
    timing = cpu.measure_cpu_timing(_timed_run(monkeypatch), 512, 512, steps=3)
    config = CPUConfig(dtype=torch.bfloat16)
    assert estimate_cpu_seconds(512, 512, 3, config=config, timing=timing) == pytest.approx(3.0 + 3 * 2.0 + 1.0)
    assert estimate_cpu_seconds(512, 512, 20, config=config, timing=timing) == pytest.approx(4.0 + 20 * 2.0)


def test_measured_timing_is_scaled_by_the_padded_size():
    # Measured at 500² (padded to 512²): the estimate at the measured size is the measured time.
    timing = CPUTiming(step_seconds=2.0, fixed_seconds=1.0, width=500, height=500)
    assert SpeedModel.measured_cpu(CPUConfig(), timing).seconds(500, 500, 3) == pytest.approx(1.0 + 3 * 2.0)
    assert SpeedModel.measured_cpu(CPUConfig(), timing).seconds(1000, 1000, 3) > 4 * (1.0 + 3 * 2.0)


def test_timing_leaves_out_filter_transforms(monkeypatch):
    timing = cpu.measure_cpu_timing(_timed_run(monkeypatch, transforms=2.5), 512, 512, steps=3)
    assert timing.step_seconds == pytest.approx(2.0)
    assert timing.fixed_seconds == pytest.approx(3.0 + 1.0 - 2.5)


# Whole images, 3 steps, float32 with Winograd, 2 threads, AVX2 only (AMD EPYC), as
# recorded in benchmarks/results/cpu_estimate.txt: (width, height) -> measured seconds.
_MEASURED_FP32_WINOGRAD = {(512, 512): 35.2, (768, 512): 62.5, (1024, 768): 140.1}


def test_built_in_float32_estimates_match_the_recorded_measurements(monkeypatch):
    monkeypatch.setattr(estimates.torch, "get_num_threads", lambda: estimates.REFERENCE_THREADS)
    config = CPUConfig(dtype=torch.float32, winograd=True)
    for (width, height), measured in _MEASURED_FP32_WINOGRAD.items():
        estimate = estimate_cpu_seconds(width, height, 3, config=config)
        assert abs(estimate / measured - 1) < 0.15, (width, height, estimate, measured)
    # Without Winograd the same image takes longer (measured 1.4× per step).
    assert estimate_cpu_seconds(512, 512, 3, config=CPUConfig(dtype=torch.float32)) > 1.25 * 35.2


def test_measured_timing_already_includes_winograd():
    timing = CPUTiming(step_seconds=2.6, fixed_seconds=1.0, width=512, height=512)
    measured = [estimate_cpu_seconds(512, 512, 10, config=CPUConfig(dtype=torch.float32, winograd=w), timing=timing)
                for w in (False, True)]
    assert measured[0] == measured[1]  # a measurement already includes it


def test_describe_cpu_names_the_features():
    text = cpu.describe_cpu(features(bf16=True))
    assert "AVX-512 BF16: yes" in text and "AMX: no" in text and "native bf16: yes" in text
    assert torch.__version__ in text and "ATen ISA AVX512" in text


def test_features_come_from_torch(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    found = cpu.cpu_features()
    assert found.amx and not found.avx512_bf16 and found.native_bf16
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu.cpu_features().native_bf16


def test_prepare_tiny_pipeline_measures():
    from conftest import tiny_pipeline

    pipe = tiny_pipeline()
    messages = []
    config = CPUConfig(dtype=torch.float32, warmup_size=(64, 64))
    timing = cpu.prepare_cpu_pipeline(pipe, config, progress=messages.append)
    assert any("Measuring" in m for m in messages)
    assert timing.step_seconds > 0 and timing.fixed_seconds >= 0
    assert (timing.width, timing.height) == (64, 64)
