"""Numerical parity with the reference implementation (kkkls/DeblurDiff).

``tests/fixtures/parity`` holds a small reference ``ControlLDM`` with random weights, in
the official checkpoint layout, and what the reference computed with it (written by
``scripts/make_parity_fixtures.py``). The checkpoint is converted with our converter and
every output is compared in float32: largest relative error (max |ours - ref| / max |ref|)
below 1e-4. ``pytest -s`` prints the errors.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from deblurdiff.models.single_file import convert_deblurdiff_checkpoint, read_checkpoint
from deblurdiff.models.configs import SCHEDULER_CONFIG, make_scheduler, make_test_tokenizer
from deblurdiff.pipeline.pipeline_deblurdiff import DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT, DeblurDiffPipeline, reference_timesteps

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
TOLERANCE = 1e-4
ERRORS: dict[str, float] = {}


@pytest.fixture(scope="module")
def meta():
    return json.loads((FIXTURES / "metadata.json").read_text())


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIXTURES / "outputs.safetensors"))


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if ERRORS:
        width = max(map(len, ERRORS))
        print("\nparity with the reference, largest relative error per output (float32):")
        for name, err in ERRORS.items():
            print(f"  {name:<{width}}  {err:.2e}")


@pytest.fixture(scope="module")
def pipe(meta):
    torch.manual_seed(0)
    components = convert_deblurdiff_checkpoint(
        read_checkpoint(FIXTURES / "checkpoint.safetensors"), attention_head_dim=meta["attention_head_dim"]
    )
    pipe = DeblurDiffPipeline(**components, tokenizer=make_test_tokenizer(), scheduler=make_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check(name: str, ours: torch.Tensor, theirs: torch.Tensor, tol: float = TOLERANCE) -> None:
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs reference {tuple(theirs.shape)}"
    ours, theirs = ours.detach().double(), theirs.double()
    err = ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30)).item()
    ERRORS[name] = err
    print(f"parity {name}: max relative error {err:.2e}")
    assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def test_fixture_matches_the_pipeline_defaults(meta):
    assert meta["negative_prompt"] == DEFAULT_NEGATIVE_PROMPT
    assert meta["latent_scale"] == pytest.approx(0.18215)


def test_converted_weights_are_float32(pipe):
    # The fixture checkpoint is stored in float16; conversion defaults to float32.
    for name in ("vae", "text_encoder", "unet", "controlnet", "lkpn"):
        assert getattr(pipe, name).dtype == torch.float32, name


def test_vae_posterior_and_decoding(pipe, ref):
    moments = pipe.vae_moments(ref["image"])
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    check("vae posterior mean", mean, ref["vae_mean"])
    check("vae posterior std", std, ref["vae_std"])
    condition = (mean + std * ref["vae_noise"]) * pipe.vae.config.scaling_factor
    check("vae sample c (recorded noise)", condition, ref["condition"])
    check("vae decode", pipe.decode_latents(ref["condition"]), ref["decoded"])


def test_text_embeddings(pipe, ref):
    with torch.no_grad():
        embeds = pipe.text_encoder(ref["token_ids"]).last_hidden_state
    check("text negative prompt", embeds[:1], ref["text_negative"])
    check('text ""', embeds[1:], ref["text_empty"])


def test_one_model_call(pipe, ref):
    x, c, text = ref["x_t"], ref["condition"], ref["text_empty"]
    t = ref["timestep"]
    with torch.no_grad():
        kernels = pipe.lkpn.predict_kernels(c, x, t, text)
    check("lkpn kernels", kernels, ref["kernels"])
    eps, z_s = pipe.make_denoiser(c, text)(x, t)
    check("lkpn z_s", z_s, ref["z_s"])
    check("eps", eps, ref["eps"])


def test_model_call_above_the_attention_window(pipe, ref, meta):
    """At a 96×80 latent the reference attends within overlapping windows (64 at the first
    level, 32 in the UNets' middle block); global attention gives a clearly different result."""
    x, c, text = ref["large_x_t"], ref["large_condition"], ref["text_empty"]
    assert list(x.shape[-2:]) == meta["large_latent_size"]
    eps, z_s = pipe.make_denoiser(c, text)(x, ref["timestep"])
    check("lkpn z_s, 96x80 latent (windowed attention)", z_s, ref["large_z_s"])
    check("eps, 96x80 latent (windowed attention)", eps, ref["large_eps"])
    try:
        pipe.set_attention_window(None)
        eps_global, z_s_global = pipe.make_denoiser(c, text)(x, ref["timestep"])
    finally:
        pipe.set_attention_window()
    for name, ours, theirs in (("z_s", z_s_global, ref["large_z_s"]), ("eps", eps_global, ref["large_eps"])):
        err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        ERRORS[f"{name}, 96x80 latent, global attention (must differ)"] = err
        assert err > 100 * TOLERANCE, f"{name}: global attention matches the windowed reference ({err:.1e})"


def test_guided_model_call(pipe, ref, meta):
    denoise = pipe.make_denoiser(
        ref["condition"], ref["text_empty"], ref["text_negative"], guidance_scale=meta["cfg_scale"]
    )
    eps, _ = denoise(ref["x_t"], ref["timestep"])
    check(f"eps, guidance {meta['cfg_scale']:g}", eps, ref["eps_guided"])


def _scheduler(meta) -> DDPMScheduler:
    scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    scheduler.set_timesteps(meta["sampler_steps"])
    return scheduler


def test_scheduler_matches_the_reference_sampler(ref, meta):
    scheduler = _scheduler(meta)
    timesteps = scheduler.timesteps
    assert timesteps.tolist() == ref["schedule_timesteps"].flip(0).tolist()
    assert timesteps[: meta["steps_run"]].tolist() == meta["sampler_timesteps_run"]
    alphas = scheduler.alphas_cumprod.double()
    n = len(timesteps)
    for i, t in enumerate(timesteps.tolist()):
        index = n - 1 - i  # the reference indexes its coefficients by position in ascending order
        prev = scheduler.previous_timestep(t)
        a_t = alphas[t]
        a_prev = alphas[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = 1 - a_t / a_prev
        ours = {
            "sqrt_recip_alphas_cumprod": (1 / a_t).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / a_t - 1).sqrt(),
            "posterior_variance": scheduler._get_variance(t).double() if prev >= 0 else torch.tensor(0.0),
            "posterior_mean_coef1": a_prev.sqrt() * beta / (1 - a_t),
            "posterior_mean_coef2": (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t),
        }
        for name, value in ours.items():
            theirs = ref[f"schedule_{name}"][index].double()
            # diffusers accumulates alphas_cumprod in float32, the reference in float64.
            assert value.item() == pytest.approx(theirs.item(), rel=TOLERANCE, abs=1e-12), (name, t)


def test_three_sampling_steps(pipe, ref, meta, monkeypatch):
    scheduler = _scheduler(meta)
    c, text = ref["condition"], ref["text_empty"]
    x = ref["sample_x_T"]
    noise = []
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: noise.pop().to(kw.get("dtype")))
    for i, t in enumerate(scheduler.timesteps[: meta["steps_run"]]):
        eps, z_s = pipe.make_denoiser(c, text)(x, t)
        noise.append(ref[f"sample_noise_{i}"])
        x = scheduler.step(eps, t, x).prev_sample
        assert not noise, "the scheduler did not draw the step's noise"
        check(f"sampling step {i + 1} (t={int(t)}) z_s", z_s, ref[f"sample_z_s_{i}"])
        check(f"sampling step {i + 1} (t={int(t)}) x", x, ref[f"sample_x_{i}"])


def test_tokenizer_matches_open_clip(ref, meta):
    """OpenCLIP's tokenisation of the default prompts, recorded by the reference, equals the
    packaged tokenizer's (tests/test_tokenizer.py checks many more prompts)."""
    from deblurdiff.models.single_file import load_tokenizer

    tokenizer = load_tokenizer()
    ids = tokenizer(
        [meta["negative_prompt"], ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.tolist() == ref["openclip_ids"].tolist()


# ---------------------------------------------------------------------- every step count
def test_timesteps_match_the_reference_for_every_step_count(pipe):
    """``space_timesteps`` as the reference computed it, for 2..1000 steps (its float
    accumulation of the stride makes some counts differ from a closed form by one)."""
    with gzip.open(FIXTURES / "timesteps.json.gz", "rt") as f:
        recorded = json.load(f)["differences"]
    scheduler = make_scheduler()
    for count in range(2, 1001):
        theirs = np.cumsum(recorded[str(count)]).tolist()[::-1]
        assert reference_timesteps(count) == theirs, count
        # what the pipeline's DDPM sampler actually runs
        assert pipe.set_timesteps(count, scheduler=scheduler).tolist() == theirs, count
    assert reference_timesteps(1) == [999]  # documented difference: the reference's t = 0 cannot denoise


# ---------------------------------------------------------------------- end to end
UINT8_SHARE = 0.999  # pixels within ±1 of the reference's uint8 output


@pytest.fixture(scope="module")
def e2e():
    meta = json.loads((FIXTURES / "end_to_end.json").read_text())
    return meta, load_file(str(FIXTURES / "end_to_end.safetensors"))


@pytest.fixture(scope="module")
def e2e_pipe(meta, ref):
    """The fixture model with the 8×-downsampling VAE the reference's pipeline needs, and
    the text embeddings the reference computed for its default prompts."""
    state = read_checkpoint(FIXTURES / "checkpoint.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("vae.")}
    state.update(read_checkpoint(FIXTURES / "end_to_end_vae.safetensors"))
    torch.manual_seed(0)
    components = convert_deblurdiff_checkpoint(state, attention_head_dim=meta["attention_head_dim"])
    pipe = DeblurDiffPipeline(**components, tokenizer=make_test_tokenizer(), scheduler=make_scheduler())
    pipe.set_prompt_embeds({DEFAULT_PROMPT: ref["text_empty"], DEFAULT_NEGATIVE_PROMPT: ref["text_negative"]})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_like_the_reference(pipe, image: np.ndarray, settings: dict, case: dict):
    """``pipe(image)`` with the case's settings and a generator seeded like the reference's
    global one; returns the uint8 output and the final latents."""
    final = {}

    def keep_latents(p, i, t, kwargs):
        final["latents"] = kwargs["latents"]

    result = pipe(
        image,
        num_inference_steps=settings["steps"],
        guidance_scale=case["cfg_scale"],
        better_start=case["better_start"],
        tiled=case["tiled"],
        tile_size=settings["tile_size"],
        tile_stride=settings["tile_stride"],
        generator=torch.Generator().manual_seed(case["seed"]),
        callback_on_step_end=keep_latents,
    ).images[0]
    return np.asarray(result), final["latents"]


E2E_CASES = ("plain", "guidance3", "better_start", "guidance3_better_start", "tiled", "tiled_guidance3_better_start")


@pytest.mark.slow
@pytest.mark.parametrize("name", E2E_CASES)
def test_end_to_end_matches_the_reference_pipeline(e2e_pipe, e2e, name):
    """The reference's own inference path (padding to 64, posterior samples per guidance
    branch, better start, tiled mode, cropping, colour fix, uint8) against ``pipe(image)``
    on a 200×136 image: latents within 1e-4 relative, uint8 within ±1 on 99.9% of pixels
    (float32 rounding can move a value across an integer)."""
    settings, recorded = e2e
    case = settings["cases"][name]
    image = recorded["image"][0].permute(1, 2, 0).numpy()
    assert image.shape[:2] == tuple(settings["image_size"])
    if case["tiled"]:
        from deblurdiff.pipeline.tiling import count_tiles

        assert count_tiles(*image.shape[:2], settings["tile_size"], settings["tile_stride"]) >= 4
    output, latents = run_like_the_reference(e2e_pipe, image, settings, case)
    check(f"end to end {name}: final latents", latents, recorded[f"{name}_latents"])
    theirs = recorded[f"{name}_output"][0].numpy().astype(np.int16)
    assert output.shape == theirs.shape
    diff = np.abs(output.astype(np.int16) - theirs)
    within = float((diff <= 1).mean())
    ERRORS[f"end to end {name}: share of uint8 values that differ"] = float((diff > 0).mean())
    ERRORS[f"end to end {name}: share of uint8 values off by more than 1"] = 1 - within
    ERRORS[f"end to end {name}: largest uint8 difference"] = float(diff.max())
    assert within >= UINT8_SHARE, f"{name}: only {within:.4%} of pixels within ±1 (largest difference {diff.max()})"
