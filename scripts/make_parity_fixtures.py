"""Record the reference implementation's outputs for the parity tests (run by hand).

    python scripts/make_parity_fixtures.py REF_DIR OUT_DIR
    python scripts/make_parity_fixtures.py tokenizer REF_DIR tests/fixtures/tokenizer_parity.json

REF_DIR is a checkout of the authors' repository (kkkls/DeblurDiff); OUT_DIR is normally
``tests/fixtures/parity``. The reference needs ``einops``, ``omegaconf`` and ``ftfy``
(not dependencies of this project: install them in a throw-away environment).

The reference ``ControlLDM`` is built at a small size with random weights (every layer
randomised, zero-initialised ones included, and rounded to float16 so that the
checkpoint can be stored in half precision without changing what was computed), and
its state dict is saved in the official layout (prefixes ``unet.``, ``controlnet.``,
``kpn.``, ``vae.``, ``clip.``). Recorded, all in float32 with fixed seeds:

* VAE: posterior mean/std of a [0, 1] image, the noise of the reference's posterior
  sample and that sample (the blurry latent ``c``), and the decoding of ``c``;
* text: embeddings of the default negative prompt and of ``""`` (token ids are recorded:
  OpenCLIP's ids, and the ids remapped into the small vocabulary that was run);
* one model call (``eps`` and the LKPN output ``z_s``, and the LKPN's kernels) and one
  classifier-free-guided call;
* one model call at a 96×80 latent (random blurry latent, no VAE), where the reference's
  windowed attention differs from global attention;
* three steps of the reference's spaced DDPM sampler (5-step schedule) with the
  injected noise, and the sampler's schedule (timesteps and coefficients);
* the key -> shape list of the FULL-size reference state dict (built on the meta
  device), for the converter's architecture test;
* ``timesteps.json.gz``: the reference's ``space_timesteps`` for every step count from 2
  to 1000 (ascending, stored as differences);
* ``end_to_end.safetensors`` (+ ``end_to_end.json``): the reference's own inference path
  (``utils.pipeline.Pipeline.run``: padding to 64, guidance, better start, tiled mode,
  cropping, colour fix, uint8) on a 200×136 image, several settings, with the global
  random generator seeded before each run. It needs a VAE that downsamples 8× (the one
  above downsamples 4×, which the reference's pipeline does not support), so the same
  model with such a VAE is run; only that VAE's weights are stored
  (``end_to_end_vae.safetensors``), the rest is ``checkpoint.safetensors``.

Substitutions that let the reference run on a CPU: ``cupy`` is stubbed (never called);
the CUDA EAC kernel is replaced by ``eac_reference`` (benchmarks/baselines.py), which is first
checked against a literal transcription of that kernel's index arithmetic; the LKPN's
hard-coded UNet is shrunk.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from baselines import eac_reference  # noqa: E402

SEED = 0
HEAD_DIM = 16
LATENT_SCALE = 0.18215
VOCAB = 1000  # the real 49408-token embedding alone would be several MB
MODEL_T = 500
CFG_SCALE = 3.0
SAMPLER_STEPS = 5
STEPS_RUN = 3
IMAGE_HW = (32, 48)  # non-square on purpose; the VAE below downsamples 4x
LARGE_LATENT_HW = (96, 80)  # above the reference's 64×64 attention windows
NEGATIVE_PROMPT = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"

SMALL = dict(
    unet=dict(
        use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=32,
        attention_resolutions=[1], num_res_blocks=1, channel_mult=[1, 2], num_head_channels=HEAD_DIM,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=1,
        context_dim=32, legacy=False,
    ),
    # The LKPN keeps the reference's in/out channels (8 -> 4·5·5); two layers per block.
    lkpn_unet=dict(
        use_checkpoint=False, model_channels=32, channel_mult=[1, 1], attention_resolutions=[1],
        num_res_blocks=2, num_head_channels=HEAD_DIM, context_dim=32,
    ),
    vae=dict(
        embed_dim=4,
        ddconfig=dict(
            double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=32,
            ch_mult=[1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0,
        ),
    ),
    clip=dict(
        embed_dim=32,
        vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=16),
        text_cfg=dict(context_length=77, vocab_size=VOCAB, width=32, heads=32 // HEAD_DIM, layers=3),
        layer="penultimate",
    ),
)
SMALL["controlnet"] = {k: v for k, v in SMALL["unet"].items() if k != "out_channels"} | {"hint_channels": 8}

_LKPN_OVERRIDES: dict = {}


def import_reference(ref_dir: Path):
    """Import the reference's modules with the CPU substitutions described above."""
    sys.path.insert(0, str(ref_dir))
    sys.dont_write_bytecode = True  # leave the reference checkout as it is
    cupy = types.ModuleType("cupy")
    cupy._util = types.SimpleNamespace(memoize=lambda **kw: (lambda f: f))
    cupy.RawKernel = None
    cupy.ndarray = type("ndarray", (), {})  # einops probes the modules already imported
    sys.modules.setdefault("cupy", cupy)

    import model.lkpn as lkpn_module
    from model.unet import UNetModel

    def eac_cpu(input, weight, bias=None, stride=1, padding=0, dilation=1):
        b, _, k, _, h, w = weight.shape
        assert stride == 1 and dilation == 1 and padding == (k - 1) // 2 and bias is None
        return eac_reference(input, weight.reshape(b, -1, h, w))

    lkpn_module._idynamic_cuda = eac_cpu
    lkpn_module.UNetModel = lambda **kw: UNetModel(**{**kw, **_LKPN_OVERRIDES})

    from model.cldm import ControlLDM
    from model.gaussian_diffusion import Diffusion
    from model.open_clip import tokenize
    from utils.sampler import SpacedSampler, space_timesteps

    return types.SimpleNamespace(
        ControlLDM=ControlLDM, Diffusion=Diffusion, SpacedSampler=SpacedSampler, tokenize=tokenize,
        space_timesteps=space_timesteps,
    )


def check_eac_against_cuda_kernel() -> float:
    """``eac_reference`` vs a literal transcription of the reference's CUDA forward kernel."""
    g = torch.Generator().manual_seed(1)
    n, channels, height, width, k = 1, 4, 5, 6, 5
    for groups in (4, 2, 1):
        x = torch.randn(n, channels, height, width, generator=g, dtype=torch.float64)
        weight = torch.randn(n, groups, k, k, height, width, generator=g, dtype=torch.float64)
        bottom, wflat = x.flatten().tolist(), weight.flatten().tolist()
        pad = (k - 1) // 2
        top = []
        for index in range(n * channels * height * width):
            nn_ = index // channels // height // width
            c = (index // height // width) % channels
            h = (index // width) % height
            w = index % width
            gg = c // (channels // groups)
            value = 0.0
            for kh in range(k):
                for kw in range(k):
                    h_in, w_in = -pad + h + kh, -pad + w + kw
                    if 0 <= h_in < height and 0 <= w_in < width:
                        offset = ((nn_ * channels + c) * height + h_in) * width + w_in
                        offset_weight = ((((nn_ * groups + gg) * k + kh) * k + kw) * height + h) * width + w
                        value += wflat[offset_weight] * bottom[offset]
            top.append(value)
        expected = torch.tensor(top, dtype=torch.float64).view_as(x)
        got = eac_reference(x, weight.reshape(n, groups * k * k, height, width))
        err = (got - expected).abs().max().item()
        assert err < 1e-12, f"EAC differs from the CUDA kernel (groups={groups}): {err}"
    return err


@torch.no_grad()
def randomise(model: nn.Module, seed: int) -> None:
    """Give every layer random weights: zero-initialised projections would hide mapping
    errors, and so would the all-ones / all-zeros norms."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not m.weight.any():
            m.reset_parameters()
        if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
            m.bias.copy_(0.1 * torch.randn_like(m.bias))
    for p in model.parameters():  # exactly representable in float16: the checkpoint is stored so
        p.copy_(p.half().float())


def remap_tokens(ids: torch.Tensor) -> torch.Tensor:
    """OpenCLIP ids -> ids of the small vocabulary (0 = padding stays 0; start/end last)."""
    out = 1 + ids % (VOCAB - 3)
    out[ids == 0] = 0
    out[ids == 49406] = VOCAB - 2
    out[ids == 49407] = VOCAB - 1
    return out


def full_size_shapes(ref, ref_dir: Path) -> dict[str, list[int]]:
    import yaml

    cfg = yaml.safe_load((ref_dir / "configs/inference/cldm.yaml").read_text())["params"]
    _LKPN_OVERRIDES.clear()
    with torch.device("meta"):
        model = ref.ControlLDM(**cfg)
    return {k: list(v.shape) for k, v in model.state_dict().items()}


@torch.no_grad()
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_dir", type=Path, help="checkout of kkkls/DeblurDiff")
    parser.add_argument("out_dir", type=Path, help="where to write the fixtures (tests/fixtures/parity)")
    parser.add_argument(
        "--only", choices=("all", "end-to-end"), default="all",
        help="end-to-end: only the timesteps and end-to-end fixtures (next to an existing checkpoint)",
    )
    args = parser.parse_args(argv)
    ref_dir = args.ref_dir.resolve()
    args.out_dir = args.out_dir.resolve()
    ref = import_reference(ref_dir)
    from safetensors.torch import save_file

    if args.only == "end-to-end":
        record_timesteps(ref, args.out_dir)
        record_end_to_end(ref, ref_dir, args.out_dir)
        return

    eac_err = check_eac_against_cuda_kernel()
    print(f"EAC: eac_reference == CUDA kernel transcription (max abs diff {eac_err:.1e})")

    # ------------------------------------------------------------ the small reference model
    _LKPN_OVERRIDES.clear()
    _LKPN_OVERRIDES.update(SMALL["lkpn_unet"])
    torch.manual_seed(SEED)
    cldm = ref.ControlLDM(
        unet_cfg=SMALL["unet"], vae_cfg=SMALL["vae"], clip_cfg=SMALL["clip"],
        controlnet_cfg=SMALL["controlnet"], latent_scale_factor=LATENT_SCALE,
    )
    randomise(cldm, SEED)
    cldm.eval()
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in cldm.state_dict().items()}

    g = torch.Generator().manual_seed(SEED + 1)
    out: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ VAE
    h, w = IMAGE_HW
    image = F.interpolate(torch.rand(1, 3, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    image = image.clamp(0, 1)
    posterior = cldm.vae.encode(image)
    noise = torch.randn(posterior.mean.shape, generator=g)
    torch.manual_seed(SEED + 2)
    sampled = cldm.vae_encode(image, sample=True)  # the reference's own sampling path
    torch.manual_seed(SEED + 2)
    drawn = torch.randn(posterior.mean.shape)
    assert torch.allclose(sampled, (posterior.mean + posterior.std * drawn) * LATENT_SCALE)
    c_img = (posterior.mean + posterior.std * noise) * LATENT_SCALE
    out.update(
        image=image, vae_mean=posterior.mean, vae_std=posterior.std, vae_noise=noise, condition=c_img,
        decoded=cldm.vae_decode(c_img),
    )

    # ------------------------------------------------------------ text
    openclip_ids = ref.tokenize([NEGATIVE_PROMPT, ""])
    ids = remap_tokens(openclip_ids)
    text = cldm.clip(ids)
    out.update(
        openclip_ids=openclip_ids, token_ids=ids, text_negative=text[:1].contiguous(), text_empty=text[1:].contiguous()
    )

    # ------------------------------------------------------------ one model call, and a guided one
    x_t = torch.randn(c_img.shape, generator=g)
    t = torch.tensor([MODEL_T], dtype=torch.long)
    cond = {"c_img": c_img, "c_txt": out["text_empty"]}
    uncond = {"c_img": c_img, "c_txt": out["text_negative"]}
    eps, z_s = cldm(x_t, t, cond)
    kernels = cldm.kpn.unet(x=torch.cat([c_img, x_t], 1), timesteps=t, context=out["text_empty"])
    sampler = ref.SpacedSampler(ref.Diffusion(**_diffusion_params(ref_dir)).betas)
    eps_guided, _ = sampler.predict_noise(cldm, x_t, t, cond, uncond, CFG_SCALE)
    out.update(x_t=x_t, timestep=t, eps=eps, z_s=z_s, kernels=kernels, eps_guided=eps_guided)

    # ------------------------------------------------------------ spaced DDPM sampler, noise injected
    sampler.make_schedule(SAMPLER_STEPS)
    for name in ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        out[f"schedule_{name}"] = getattr(sampler, name).clone()
    out["schedule_timesteps"] = torch.from_numpy(sampler.timesteps.astype("int64"))
    x = torch.randn(c_img.shape, generator=g)
    out["sample_x_T"] = x
    timesteps = sampler.timesteps[::-1]
    randn_like = torch.randn_like
    try:
        for i in range(STEPS_RUN):
            step_noise = torch.randn(x.shape, generator=g)
            torch.randn_like = lambda tensor, _n=step_noise, **kw: _n.clone()
            ts = torch.full((1,), int(timesteps[i]), dtype=torch.long)
            index = torch.full_like(ts, SAMPLER_STEPS - i - 1)
            x, kpn = sampler.p_sample(cldm, x, ts, index, cond, None, 1.0, None, False, -1, -1)
            out[f"sample_noise_{i}"] = step_noise
            out[f"sample_x_{i}"] = x
            out[f"sample_z_s_{i}"] = kpn
    finally:
        torch.randn_like = randn_like

    # ------------------------------------------------------------ one model call above 64×64
    # The reference attends within windows (64 at the first level, halved per level in
    # the UNets); at this latent they overlap and the last ones are clamped to the edge.
    # No VAE: the blurry latent is drawn directly.
    g_large = torch.Generator().manual_seed(SEED + 3)
    c_large = torch.randn(1, 4, *LARGE_LATENT_HW, generator=g_large) * 0.8
    x_large = torch.randn(1, 4, *LARGE_LATENT_HW, generator=g_large)
    eps_large, z_s_large = cldm(x_large, t, {"c_img": c_large, "c_txt": out["text_empty"]})
    out.update(large_condition=c_large, large_x_t=x_large, large_eps=eps_large, large_z_s=z_s_large)

    # ------------------------------------------------------------ write
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.out_dir / "checkpoint.safetensors"))
    save_file({k: v.contiguous() for k, v in out.items()}, str(args.out_dir / "outputs.safetensors"))
    shapes = full_size_shapes(ref, ref_dir)
    with gzip.open(args.out_dir / "reference_full_shapes.json.gz", "wt") as f:
        json.dump(shapes, f, separators=(",", ":"), sort_keys=True)
    metadata = dict(
        description="Reference (kkkls/DeblurDiff) outputs at a small size; see scripts/make_parity_fixtures.py",
        attention_head_dim=HEAD_DIM,
        latent_scale=LATENT_SCALE,
        vocab_size=VOCAB,
        negative_prompt=NEGATIVE_PROMPT,
        model_timestep=MODEL_T,
        cfg_scale=CFG_SCALE,
        sampler_steps=SAMPLER_STEPS,
        steps_run=STEPS_RUN,
        sampler_timesteps_run=[int(s) for s in timesteps[:STEPS_RUN]],
        image_size=list(IMAGE_HW),
        large_latent_size=list(LARGE_LATENT_HW),
        diffusion=_diffusion_params(ref_dir),
        configs=SMALL,
        checkpoint_dtype="float16 (weights rounded to float16 before the reference ran)",
        full_size_keys=len(shapes),
    )
    (args.out_dir / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
    record_timesteps(ref, args.out_dir)
    record_end_to_end(ref, ref_dir, args.out_dir)
    sizes = {p.name: p.stat().st_size for p in sorted(args.out_dir.iterdir())}
    print(json.dumps(sizes, indent=1))


# ---------------------------------------------------------------------- timesteps
def record_timesteps(ref, out_dir: Path) -> None:
    """``space_timesteps(1000, str(n))`` for n = 2..1000, ascending, as first value + differences."""
    counts = {}
    for n in range(2, 1001):
        steps = sorted(ref.space_timesteps(1000, str(n)))
        assert len(steps) == n
        counts[str(n)] = [steps[0]] + [b - a for a, b in zip(steps, steps[1:])]
    with gzip.open(out_dir / "timesteps.json.gz", "wt") as f:
        json.dump({"num_train_timesteps": 1000, "differences": counts}, f, separators=(",", ":"))


# ---------------------------------------------------------------------- end to end
E2E_IMAGE_HW = (136, 200)  # not multiples of 64: padded to 192×256, cropped back
E2E_STEPS = 4
E2E_TILE = (128, 64)  # tile size, stride (pixels): 2×3 = 6 tiles at 192×256
E2E_CASES = {
    # name: (cfg_scale, better_start, tiled, seed)
    "plain": (1.0, False, False, 10),
    "guidance3": (3.0, False, False, 11),
    "better_start": (1.0, True, False, 12),
    "guidance3_better_start": (3.0, True, False, 13),
    "tiled": (1.0, False, True, 14),
    "tiled_guidance3_better_start": (3.0, True, True, 15),
}
E2E_VAE = dict(SMALL["vae"], ddconfig=dict(SMALL["vae"]["ddconfig"], ch_mult=[1, 1, 1, 1]))


@torch.no_grad()
def record_end_to_end(ref, ref_dir: Path, out_dir: Path) -> None:
    """Run the reference's ``Pipeline.run`` (its inference path) on the small model, with
    an 8×-downsampling VAE, for every case of ``E2E_CASES``; record the uint8 outputs and
    the final latents (the sampler's result, before decoding)."""
    from safetensors.torch import load_file, save_file

    import model.clip as ref_clip
    import utils.pipeline as ref_pipeline

    core = load_file(str(out_dir / "checkpoint.safetensors"))
    _LKPN_OVERRIDES.clear()
    _LKPN_OVERRIDES.update(SMALL["lkpn_unet"])
    torch.manual_seed(SEED)
    cldm = ref.ControlLDM(
        unet_cfg=SMALL["unet"], vae_cfg=E2E_VAE, clip_cfg=SMALL["clip"],
        controlnet_cfg=SMALL["controlnet"], latent_scale_factor=LATENT_SCALE,
    )
    randomise(cldm, SEED + 4)
    # Everything but the VAE is the core fixture's model.
    missing, unexpected = cldm.load_state_dict(
        {k: v.float() for k, v in core.items() if not k.startswith("vae.")}, strict=False
    )
    assert not unexpected and all(k.startswith("vae.") for k in missing), (unexpected, missing)
    cldm.eval()
    vae_state = {k: v.detach().to(torch.float16).contiguous() for k, v in cldm.state_dict().items()
                 if k.startswith("vae.")}

    diffusion = ref.Diffusion(**_diffusion_params(ref_dir))
    pipeline = ref_pipeline.Pipeline(cldm, diffusion, None, "cpu")
    tokenize = ref_clip.tokenize
    sample = ref.SpacedSampler.sample
    latents: list[torch.Tensor] = []

    def recording_sample(self, *args, **kwargs):
        z = sample(self, *args, **kwargs)
        latents.append(z.clone())
        return z

    g = torch.Generator().manual_seed(SEED + 5)
    h, w = E2E_IMAGE_HW
    image = F.interpolate(torch.rand(1, 3, h // 8, w // 8, generator=g), size=(h, w), mode="bicubic")
    image = (image.clamp(0, 1) * 255).round().to(torch.uint8)  # (1, 3, H, W)
    lq = image.permute(0, 2, 3, 1).numpy()
    out = {"image": image}
    ref_clip.tokenize = lambda text: remap_tokens(tokenize(text))  # the small vocabulary
    ref.SpacedSampler.sample = recording_sample
    try:
        for name, (cfg, better_start, tiled, seed) in E2E_CASES.items():
            latents.clear()
            torch.manual_seed(seed)
            result = pipeline.run(
                lq, E2E_STEPS, 1.0, tiled, E2E_TILE[0], E2E_TILE[1], "", NEGATIVE_PROMPT, cfg, better_start
            )
            out[f"{name}_output"] = torch.from_numpy(result)  # (1, H, W, 3) uint8
            out[f"{name}_latents"] = latents[0]
            print(f"end to end {name}: output {tuple(result.shape)}, latents {tuple(latents[0].shape)}")
    finally:
        ref_clip.tokenize = tokenize
        ref.SpacedSampler.sample = sample
    save_file(vae_state, str(out_dir / "end_to_end_vae.safetensors"))
    save_file({k: v.contiguous() for k, v in out.items()}, str(out_dir / "end_to_end.safetensors"))
    meta = dict(
        description=(
            "The reference's Pipeline.run on the small model with an 8x VAE; see scripts/make_parity_fixtures.py"
        ),
        image_size=list(E2E_IMAGE_HW), steps=E2E_STEPS, tile_size=E2E_TILE[0], tile_stride=E2E_TILE[1],
        negative_prompt=NEGATIVE_PROMPT, prompt="",
        cases={k: dict(cfg_scale=c, better_start=b, tiled=t, seed=s) for k, (c, b, t, s) in E2E_CASES.items()},
        vae=E2E_VAE, seeding="torch.manual_seed(seed) right before Pipeline.run",
    )
    (out_dir / "end_to_end.json").write_text(json.dumps(meta, indent=1) + "\n")


def _diffusion_params(ref_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((ref_dir / "configs/inference/diffusion.yaml").read_text())["params"]


# ---------------------------------------------------------------------------- tokenizer
# Run on its own: python scripts/make_parity_fixtures.py tokenizer REF_DIR OUT_FILE
# (OUT_FILE normally tests/fixtures/tokenizer_parity.json).
TOKENIZER_PROMPTS = [
    "",
    NEGATIVE_PROMPT,
    "a photo of a cat",
    "A Photo Of A CAT",
    "MiXeD CaSe, UPPER and lower",
    "   leading and trailing spaces   ",
    "repeated    spaces\tand\ttabs\nand\n\nnewlines",
    "non\u00a0breaking\u2003spaces",
    "digits 0123456789 and 3.14159, 2024-11-28, 1,000,000",
    "room 101 has 3 doors",
    "!!!???...;;;:::",
    "punctuation runs: --- *** ### @@@ $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
    "don't, can't, it's, we're, they've, I'm, you'll, he'd",
    "DON'T SHOUT, IT'S LOUD",
    "Tom &amp; Jerry &lt;3 &gt; &quot;quoted&quot; &#39;single&#39; &copy; &#x263A;",
    "double escaped &amp;amp; and &amp;lt;tag&amp;gt;",
    "<b>html</b> <i>tags</i> stay",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe",
    "cafe\u0301 with a combining accent",
    "mojibake: caf\u00c3\u00a9 and \u00e2\u20ac\u0153quotes\u00e2\u20ac\u009d",
    "\u201ccurly quotes\u201d and \u2018single\u2019 ones",
    "full-width \uff21\uff22\uff23 \uff11\uff12\uff13",
    "ligatures: \ufb01ne \ufb02ower",
    "emoji \U0001f600\U0001f3a8\U0001f4f7 and flags \U0001f1ef\U0001f1f5",
    "family \U0001f468\u200d\U0001f469\u200d\U0001f467 with zero-width joiners",
    "\u65e5\u672c\u8a9e\u306e\u6587\u7ae0 and \u4e2d\u6587",
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0440\u0443\u0441\u0441\u043a\u0438\u0439 \u03b5\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u039f\u0394\u03a5\u03a3\u03a3\u0395\u03a5\u03a3",
    "math \u2211 \u221e \u2248 \u00b1 \u00b2 \u00bd \u2153",
    "url https://example.com/path?q=1&x=y#frag and mail a.b@example.org",
    "special tokens as text: <start_of_text> <end_of_text> <|endoftext|>",
    "tab\tseparated\tvalues",
    "control\u0007chars\u001b[31m and escapes",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "snake_case camelCase kebab-case",
    " ".join(["a sharp, detailed, high quality photograph of a mountain lake at sunrise"] * 6),
    " ".join(str(i) for i in range(120)),
    "!" * 200,
    "\U0001f600" * 90,
]


def _load_reference_tokenize(ref_dir: Path):
    """The reference's ``tokenize``, loaded from its file alone (no other reference module)."""
    import importlib.util

    path = ref_dir / "model" / "open_clip" / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("reference_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    sys.dont_write_bytecode = True  # leave the reference checkout as it is
    spec.loader.exec_module(module)
    return module.tokenize


def record_tokenizer_fixtures(ref_dir: Path, out_file: Path) -> None:
    """The reference's token ids (77 per prompt, padded with 0) for TOKENIZER_PROMPTS."""
    import ftfy

    tokenize = _load_reference_tokenize(ref_dir.resolve())
    ids = tokenize(TOKENIZER_PROMPTS)
    record = dict(
        description="kkkls/DeblurDiff model/open_clip/tokenizer.py tokenize(); see scripts/make_parity_fixtures.py",
        ftfy_version=ftfy.__version__,
        context_length=int(ids.shape[1]),
        cases=[dict(prompt=p, ids=row.tolist()) for p, row in zip(TOKENIZER_PROMPTS, ids)],
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(case, ensure_ascii=True) for case in record.pop("cases")]  # one prompt a line
    head = json.dumps(record, ensure_ascii=True, indent=1)[:-2]
    out_file.write_text(head + ',\n "cases": [\n  ' + ",\n  ".join(lines) + "\n ]\n}\n")
    print(f"{len(TOKENIZER_PROMPTS)} prompts -> {out_file}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["tokenizer"]:
        record_tokenizer_fixtures(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
