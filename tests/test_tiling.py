"""Tiling, samplers, better start and reduced precision (tiny random models, CPU).

Tolerances stated here:
* one tile covering the image: tiled == untiled, bit for bit (the same code path);
* tiled VAE vs untiled on the tiny random VAE, 256×320 px in 128-px tiles every 64 px:
  relative RMS error < 0.25 (encoder moments, measured 0.16) and < 0.6 (decoder,
  measured 0.49). Random weights have no locality, so a tile's missing context and its
  own GroupNorm statistics weigh far more than with trained weights; what these bounds
  guard is the blending (a wrong weight or offset gives errors of order 1);
* bf16 vs fp32, same seed, 4 steps: PSNR > 35 dB (measured ~50 dB); fp16 vs fp32: PSNR > 45 dB
  (measured ~70 dB).
"""

import warnings

import numpy as np
import pytest
import torch

from deblurdiff import DeblurDiffPipeline
from deblurdiff.models.configs import build_components
from deblurdiff.pipeline.pipeline_deblurdiff import low_frequency
from conftest import FLOAT32_ROUNDING, random_image
from deblurdiff.pipeline.estimates import available_memory, estimate_peak_memory, should_tile
from deblurdiff.pipeline.tiling import (
    Window,
    blend_weights,
    check_tiling,
    count_tiles,
    gaussian_weights,
    sliding_windows,
    tile_starts,
    tiled_map,
    vae_decode_tiled,
    vae_encode_tiled,
)


def run(pipe, image, seed=0, **kw):
    kw.setdefault("num_inference_steps", 3)
    kw.setdefault("output_type", "pt")
    return pipe(image, generator=torch.Generator().manual_seed(seed), **kw).images


def relative_rms(a, b):
    return ((a - b).pow(2).mean() / b.pow(2).mean()).sqrt().item()


def psnr(a, b):
    return (10 * torch.log10(1 / (a - b).pow(2).mean())).item()


# ---------------------------------------------------------------- windows and weights
@pytest.mark.parametrize("length,tile,stride", [(64, 64, 32), (100, 64, 32), (130, 64, 48), (40, 64, 32), (64, 16, 16)])
def test_tile_starts_cover_the_length(length, tile, stride):
    starts = tile_starts(length, tile, stride)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + size] = True
    assert covered.all()


def test_windows_cover_the_grid_with_equal_sizes():
    windows = sliding_windows(45, 70, 16, 12)
    assert len({(w.height, w.width) for w in windows}) == 1
    count = torch.zeros(45, 70)
    for w in windows:
        count[w.slices()] += 1
        assert w.top + w.height <= 45 and w.left + w.width <= 70
    assert count.min() >= 1
    # A grid smaller than a tile is one window, clipped.
    assert sliding_windows(6, 7, 16, 8) == [Window(0, 0, 6, 7)]


def test_gaussian_weights_are_the_references():
    """Standard deviation 0.1 of the side; columns centred at (w - 1) / 2, rows at h / 2
    (the reference's half-pixel asymmetry)."""
    w = gaussian_weights(64, 48)
    assert w.shape == (64, 48) and w.min() > 0 and w.max() <= 1
    torch.testing.assert_close(w, w.flip(1))  # columns: symmetric about (48 - 1) / 2
    torch.testing.assert_close(w[32 - 5], w[32 + 5])  # rows: symmetric about 64 / 2
    assert w[:, 23].argmax() == 32
    # exp(-d² / (2·(0.1·n)²)): rows 10 apart on a 50-pixel side
    w = gaussian_weights(50, 50)
    assert (w[15, 20] / w[25, 20]).item() == pytest.approx(np.exp(-(10**2) / (2 * 5.0**2)), rel=1e-6)


@pytest.mark.parametrize("factor", [1, 8])
def test_blend_weights_are_a_partition_of_unity(factor):
    windows = sliding_windows(20, 28, 8, 5)
    weights = blend_weights(windows, 20, 28, factor)
    total = torch.zeros(1, 1, 20 * factor, 28 * factor)
    for win, w in zip(windows, weights):
        assert w.min() > 0
        total[(..., *win.slices(factor))] += w
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)


def test_tiled_map_reassembles_a_pointwise_function():
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(0))
    windows = sliding_windows(24, 40, 8, 6)
    # A map that upsamples ×8 and one that halves resolution... here: identity and ×8 nearest.
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=8, mode="nearest")  # noqa: E731
    (same,) = tiled_map(lambda t: t * 2, [x], windows, blend_weights(windows, 24, 40))
    torch.testing.assert_close(same, x * 2, atol=1e-5, rtol=1e-5)
    (big,) = tiled_map(up, [x], windows, blend_weights(windows, 24, 40, 8), out_factor=8)
    torch.testing.assert_close(big, up(x), atol=1e-5, rtol=1e-5)


def test_tile_parameters_are_checked():
    check_tiling(512, 256)
    for size, stride in [(500, 256), (0, 8), (512, 0), (512, 100), (512, 520)]:
        with pytest.raises(ValueError, match="tile_"):
            check_tiling(size, stride)
    assert count_tiles(512, 512, 512, 256) == 1
    assert count_tiles(2048, 2048, 512, 256) == 49


# ---------------------------------------------------------------- tiled VAE
def test_tiled_vae_matches_untiled_within_tolerance(pipe):
    image = torch.rand(1, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    moments = pipe.vae_moments(image)
    tiled = vae_encode_tiled(pipe.vae_moments, image, 128, 64)
    assert tiled.shape == moments.shape
    # Unblended seams, and the tiny VAE sees far beyond a 128-pixel tile: loosely close.
    assert relative_rms(tiled[:, :4], moments[:, :4]) < 0.5
    # Each tile overwrites the previous ones (the reference's tiled encoder): the last
    # tile's region is that tile encoded on its own.
    last = pipe.vae_moments(image[..., 128:256, 192:320])
    torch.testing.assert_close(tiled[..., 16:32, 24:40], last, **FLOAT32_ROUNDING)  # a view vs a copy

    latents = moments[:, :4] * pipe.vae.config.scaling_factor
    decoded = pipe.decode_latents(latents)
    decoded_tiled = pipe.decode_latents(latents, tiled=True, tile_size=128, tile_stride=64)
    assert decoded_tiled.shape == decoded.shape == (1, 3, 256, 320)
    assert relative_rms(decoded_tiled, decoded) < 0.6

    # One tile covering everything is the untiled computation.
    torch.testing.assert_close(vae_encode_tiled(pipe.vae_moments, image, 512, 256), moments, **FLOAT32_ROUNDING)
    torch.testing.assert_close(vae_decode_tiled(pipe.decode_latents, latents, 512, 256), decoded, **FLOAT32_ROUNDING)


# ---------------------------------------------------------------- tiled diffusion
def test_tiled_condition_is_the_posterior_mode_and_untiled_a_sample(pipe):
    """As in the reference: untiled, ``c`` is a posterior sample (one per guidance branch);
    tiled, every tile's posterior mode."""
    image = torch.rand(1, 3, 128, 192, generator=torch.Generator().manual_seed(0))
    scale = pipe.vae.config.scaling_factor
    mode = pipe.vae_moments(image)[:, :4] * scale
    tiled = pipe.encode_condition(image, tiled=True, tile_size=128, tile_stride=64, num_samples=2)
    first_tile = pipe.vae_moments(image[..., :128])[:, :4] * scale
    torch.testing.assert_close(tiled[:1, :, :, :8], first_tile[..., :8])  # only the first tile covers it
    assert torch.equal(tiled[:1], tiled[1:])  # both branches read the same mode
    torch.testing.assert_close(pipe.encode_condition(image, tiled=True, tile_size=256, tile_stride=128), mode)
    cond, uncond = pipe.encode_condition(image, torch.Generator().manual_seed(0), num_samples=2).chunk(2)
    # drawn like the reference: the conditional branch's noise first, then the other's
    mean, logvar = pipe.vae_moments(image).chunk(2, dim=1)
    g = torch.Generator().manual_seed(0)
    for latent in (cond, uncond):
        noise = torch.randn(mean.shape, generator=g)
        torch.testing.assert_close(latent, (mean + torch.exp(0.5 * logvar) * noise) * scale)


def test_tiled_sampling_over_several_tiles(pipe):
    image = random_image(130, 190)  # padded to 192 × 192: 2 × 2 tiles of 128 px
    tiles = dict(tiled=True, tile_size=128, tile_stride=64, num_inference_steps=2)
    a = run(pipe, image, **tiles)
    assert a.shape == (1, 3, 130, 190) and torch.isfinite(a).all()
    assert torch.equal(a, run(pipe, image, **tiles))
    assert not torch.equal(a, run(pipe, image, tiled=False, num_inference_steps=2))

    out = pipe(image, generator=torch.Generator().manual_seed(0), guidance_scale=2.0, return_lkpn_images=True,
               **tiles)
    assert out.images[0].size == out.lkpn_images[0].size == (190, 130)


def test_peak_memory_estimate_grows_with_the_image():
    small, large = estimate_peak_memory(512, 512), estimate_peak_memory(1024, 1024)
    assert 0 < small < large
    # linear in latent pixels (padded to 64): equal steps in pixels, equal steps in bytes
    middle = estimate_peak_memory(640, 1024)  # 80 × 128 latent pixels, halfway
    assert middle - small == pytest.approx(large - middle, rel=1e-6)
    assert estimate_peak_memory(500, 500) == small
    assert estimate_peak_memory(1024, 1024, guided=True) >= large
    # half precision: half of float32's
    assert estimate_peak_memory(1024, 1024, torch.float16) == pytest.approx(large / 2, abs=1)


def test_should_tile_only_when_memory_does_not_fit():
    need = estimate_peak_memory(2048, 2048)
    assert should_tile(2048, 2048, available_bytes=need - 1)
    assert not should_tile(2048, 2048, available_bytes=need)
    assert not should_tile(2048, 2048, available_bytes=None)  # unknown: untiled, like the reference
    assert not should_tile(500, 500, available_bytes=0)  # one tile anyway
    # A 1920×1080 frame on a 48 GB GPU slice runs untiled in half precision.
    assert not should_tile(1080, 1920, 40 * 2**30, torch.float16, guided=True)
    assert available_memory("cpu") is None or available_memory("cpu") > 0


def test_tiling_switches_on_only_when_memory_does_not_fit(pipe, monkeypatch):
    assert pipe.memory_budget is None  # default: the device's free memory
    assert pipe.should_tile(64, 64, tiled=True) and not pipe.should_tile(4096, 4096, tiled=False)
    monkeypatch.setattr(pipe, "memory_budget", estimate_peak_memory(2048, 2048))
    assert not pipe.should_tile(2048, 2048) and pipe.should_tile(2112, 2048)

    calls = []
    original = pipe.vae_moments
    monkeypatch.setattr(pipe, "vae_moments", lambda x: calls.append(x.shape) or original(x))
    image = random_image(192, 192)
    run(pipe, image, num_inference_steps=1, output_type="latent", tile_size=128, tile_stride=64)
    assert calls == [(1, 3, 192, 192)]  # fits: one untiled encode
    calls.clear()
    monkeypatch.setattr(pipe, "memory_budget", estimate_peak_memory(192, 192) - 1)
    run(pipe, image, num_inference_steps=1, output_type="latent", tile_size=128, tile_stride=64)
    assert calls == [(1, 3, 128, 128)] * 4


# ---------------------------------------------------------------- samplers and start
@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("dpmsolver++", 4), ("dpmsolver++", 1), ("ddim", 1)])
def test_fast_samplers_run_and_are_deterministic(pipe, sampler, steps):
    image = random_image(64, 96)
    a = run(pipe, image, sampler=sampler, num_inference_steps=steps)
    b = run(pipe, image, sampler=sampler, num_inference_steps=steps)
    assert a.shape == (1, 3, 64, 96) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, run(pipe, image, sampler=sampler, num_inference_steps=steps, seed=1))
    scheduler = pipe.get_scheduler(sampler)
    assert scheduler is not pipe.scheduler and len(scheduler.timesteps) == steps
    assert int(scheduler.timesteps[0]) == 999


def test_samplers_differ_and_unknown_sampler_is_rejected(pipe):
    image = random_image(64, 64)
    outs = [run(pipe, image, sampler=s, num_inference_steps=4) for s in ("ddpm", "ddim", "dpmsolver++")]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])
    with pytest.raises(ValueError, match="sampler"):
        run(pipe, image, sampler="euler")


def test_low_frequency_keeps_flat_images_and_removes_detail():
    flat = torch.full((1, 3, 64, 64), 0.3)
    torch.testing.assert_close(low_frequency(flat), flat)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    low = low_frequency(noise)
    assert low.shape == noise.shape and low.std() < 0.2 * noise.std()
    torch.testing.assert_close(low.mean(), noise.mean(), atol=0.02, rtol=0)


def test_better_start_is_deterministic_and_changes_the_start(pipe):
    image = random_image(64, 64)
    a = run(pipe, image, better_start=True)
    assert torch.equal(a, run(pipe, image, better_start=True))
    assert not torch.equal(a, run(pipe, image))
    # With zero noise the start is the low-frequency latent scaled by sqrt(alpha_bar_999).
    seen = {}

    def grab(p, i, t, kwargs):
        p.interrupt = True
        return {}

    zeros = torch.zeros(1, 4, 8, 8)
    original = pipe.scheduler.step

    def spy(eps, t, x, **kw):
        seen.setdefault("x", x.clone())
        return original(eps, t, x, **kw)

    pipe.scheduler.step = spy
    try:
        pipe(image, num_inference_steps=2, latents=zeros, better_start=True, output_type="latent",
             generator=torch.Generator().manual_seed(0), callback_on_step_end=grab)
    finally:
        del pipe.scheduler.step
    gen = torch.Generator().manual_seed(0)
    padded = torch.from_numpy(np.asarray(image) / 255.0).permute(2, 0, 1)[None].float()
    pipe.encode_condition(padded, gen, num_samples=2)  # both branches' conditions are drawn first
    start = pipe.encode_condition(low_frequency(padded), gen)
    alpha_bar = pipe.scheduler.alphas_cumprod[999].item()
    torch.testing.assert_close(seen["x"], alpha_bar**0.5 * start, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- precision and options
@pytest.mark.parametrize("dtype,min_psnr", [(torch.bfloat16, 35.0), (torch.float16, 45.0)])
def test_half_precision_is_close_to_float32(dtype, min_psnr):
    image = random_image(64, 64)
    reference = DeblurDiffPipeline(**build_components("tiny", seed=0))
    reference.set_progress_bar_config(disable=True)
    expected = run(reference, image, num_inference_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = DeblurDiffPipeline(**build_components("tiny", seed=0)).to(dtype=dtype)
    half.set_progress_bar_config(disable=True)
    out = run(half, image, num_inference_steps=4)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert psnr(out, expected) > min_psnr, f"{dtype} vs float32: {psnr(out, expected):.1f} dB"
    # float16 runs the VAE in float32 (its config asks for it) and puts it back afterwards.
    assert half.vae.decoder.conv_in.weight.dtype == dtype and half.unet.dtype == dtype


def test_float16_vae_runs_in_float32_when_its_config_asks(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = DeblurDiffPipeline(**build_components("tiny", seed=0)).to(dtype=torch.float16)
    seen = []
    hook = half.vae.decoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    half.decode_latents(torch.zeros(1, 4, 8, 8))
    half.upcast_vae = False
    half.decode_latents(torch.zeros(1, 4, 8, 8))
    hook.remove()
    assert seen == [torch.float32, torch.float16]
    assert half.vae.decoder.conv_in.weight.dtype == torch.float16


def test_timesteps_stay_on_the_host(pipe):
    # The schedulers read them on the host; the models get one device copy per call.
    for sampler in ("ddpm", "ddim", "dpmsolver++"):
        timesteps = pipe.set_timesteps(5, torch.device("cpu"), pipe.get_scheduler(sampler))
        assert timesteps.device.type == "cpu"


# ---------------------------------------------------------------- GPU (skipped without one)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_and_tiling(dtype):
    image = random_image(256, 256)
    reference = DeblurDiffPipeline(**build_components("tiny", seed=0)).to("cuda")
    reference.set_progress_bar_config(disable=True)
    expected = run(reference, image, num_inference_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = DeblurDiffPipeline(**build_components("tiny", seed=0)).to("cuda", dtype)
    half.set_progress_bar_config(disable=True)
    out = run(half, image, num_inference_steps=4)
    assert torch.isfinite(out).all() and psnr(out, expected) > 30
    tiles = dict(num_inference_steps=4, tiled=True, tile_size=128, tile_stride=64)
    tiled, tiled_reference = run(half, image, **tiles), run(reference, image, **tiles)
    assert torch.isfinite(tiled).all() and tiled.shape == out.shape
    assert psnr(tiled, tiled_reference) > 30
    # Per-step noise comes from a device generator seeded by the CPU one: still deterministic.
    torch.testing.assert_close(run(half, image, num_inference_steps=4), out, atol=1e-3, rtol=0)


@cuda
def test_cuda_compiled_pipeline_matches_eager():
    image = random_image(128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = DeblurDiffPipeline(**build_components("tiny", seed=0)).to("cuda", torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    eager = run(pipe, image, num_inference_steps=3)
    for module in (pipe.unet, pipe.controlnet, pipe.lkpn, pipe.vae):
        module.to(memory_format=torch.channels_last)
    for module in (pipe.unet, pipe.controlnet, pipe.lkpn.unet):
        module.compile(dynamic=False)
    compiled = run(pipe, image, num_inference_steps=3)
    assert torch.isfinite(compiled).all() and psnr(compiled, eager) > 30
