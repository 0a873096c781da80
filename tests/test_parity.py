"""Numerical parity with the reference implementation (kkkls/DeblurDiff).

``tests/fixtures/parity`` holds a small reference ``ControlLDM`` with random weights, in
the official checkpoint layout, and what the reference computed with it (written by
``scripts/make_parity_fixtures.py``). The checkpoint is converted with our converter and
every output is compared in float32: largest relative error (max |ours - ref| / max |ref|)
below 1e-4. ``pytest -s`` prints the errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from deblurdiff.convert import convert_deblurdiff_checkpoint, read_checkpoint
from deblurdiff.models.configs import SCHEDULER_CONFIG, make_scheduler, make_test_tokenizer
from deblurdiff.pipeline import DEFAULT_NEGATIVE_PROMPT, DeblurDiffPipeline

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
    eps, z_s = pipe.predict_noise(x, t, c, text)
    check("lkpn z_s", z_s, ref["z_s"])
    check("eps", eps, ref["eps"])


def test_model_call_above_the_attention_window(pipe, ref, meta):
    """At a 96×80 latent the reference attends within overlapping windows (64 at the first
    level, 32 in the UNets' middle block); global attention gives a clearly different result."""
    x, c, text = ref["large_x_t"], ref["large_condition"], ref["text_empty"]
    assert list(x.shape[-2:]) == meta["large_latent_size"]
    eps, z_s = pipe.predict_noise(x, ref["timestep"], c, text)
    check("lkpn z_s, 96x80 latent (windowed attention)", z_s, ref["large_z_s"])
    check("eps, 96x80 latent (windowed attention)", eps, ref["large_eps"])
    try:
        pipe.set_attention_window(None)
        eps_global, z_s_global = pipe.predict_noise(x, ref["timestep"], c, text)
    finally:
        pipe.set_attention_window()
    for name, ours, theirs in (("z_s", z_s_global, ref["large_z_s"]), ("eps", eps_global, ref["large_eps"])):
        err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        ERRORS[f"{name}, 96x80 latent, global attention (must differ)"] = err
        assert err > 100 * TOLERANCE, f"{name}: global attention matches the windowed reference ({err:.1e})"


def test_guided_model_call(pipe, ref, meta):
    eps, _ = pipe.predict_noise(
        ref["x_t"], ref["timestep"], ref["condition"], ref["text_empty"],
        negative_prompt_embeds=ref["text_negative"], guidance_scale=meta["cfg_scale"],
    )
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
        eps, z_s = pipe.predict_noise(x, t, c, text)
        noise.append(ref[f"sample_noise_{i}"])
        x = scheduler.step(eps, t, x).prev_sample
        assert not noise, "the scheduler did not draw the step's noise"
        check(f"sampling step {i + 1} (t={int(t)}) z_s", z_s, ref[f"sample_z_s_{i}"])
        check(f"sampling step {i + 1} (t={int(t)}) x", x, ref[f"sample_x_{i}"])


def test_tokenizer_matches_open_clip(ref, meta):
    """OpenCLIP's tokenisation of the default prompts, recorded by the reference, equals the
    packaged tokenizer's (tests/test_tokenizer.py checks many more prompts)."""
    from deblurdiff.convert import load_tokenizer

    tokenizer = load_tokenizer()
    ids = tokenizer(
        [meta["negative_prompt"], ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert ids.tolist() == ref["openclip_ids"].tolist()
