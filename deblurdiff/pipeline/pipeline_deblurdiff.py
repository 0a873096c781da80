"""DeblurDiffPipeline: a blurry image in, a sharp one out.

Every step: ``z_s = LKPN(c, x_t)`` (the blurry latent ``c`` deblurred by per-pixel
kernels), then ``eps = UNet(x_t, residuals=ControlNet(x_t, hint=cat(c, z_s)))`` and a
sampler step, as in the reference (kkkls/DeblurDiff). Networks run in the pipeline's
dtype; latents and sampler arithmetic stay float32. Options are in ``__call__``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import hf_hub_download
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

from ..models import LatentControlNetModel, LKPNModel
from ..models import tokenizer as open_clip_tokenizer
from ..models.controlnet import batched_timesteps
from ..models.windowed_attention import DEFAULT_WINDOW, enable_windowed_attention, ensure_attention_layout
from .estimates import available_memory, is_guided
from .estimates import should_tile as _should_tile_for_memory
from .tiling import (SIZE_MULTIPLE, TILE_SIZE, TILE_STRIDE, blend_weights, check_tiling, latent_windows, tiled_map,
                     vae_decode_tiled, vae_encode_tiled)

# diffusers finds a saved folder's own components (here the OpenCLIP tokenizer) only among imported
# modules, under the module path model_index.json records; folders saved before the package had
# subpackages record it as deblurdiff.tokenizer.
sys.modules.setdefault("deblurdiff.tokenizer", open_clip_tokenizer)

logger = logging.get_logger(__name__)

DEFAULT_PROMPT = ""
DEFAULT_NEGATIVE_PROMPT = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"
DEFAULT_STEPS = 50
SAMPLERS = ("ddpm", "ddim", "dpmsolver++")
PROMPT_EMBEDS_FILE = "prompt_embeds.safetensors"
_PROMPT_EMBEDS_FORMAT = "deblurdiff-prompt-embeds-1"


@dataclass
class DeblurDiffPipelineOutput(BaseOutput):
    """``images``: the restored images; ``lkpn_images``: the last step's ``z_s`` decoded, when asked for."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    lkpn_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


def image_to_tensor(image) -> torch.Tensor:
    """A PIL image, an array or a (B, 3, H, W) tensor in [0, 1] -> float32 (B, 3, H, W) in [0, 1].

    The one rule for arrays (the input loader uses it too): H×W greyscale, H×W×3 RGB or H×W×4
    RGBA composited onto white; bool, uint8 (0-255), uint16 (0-65535), other integers in 0-255,
    or floats in [0, 1] (an overshoot of 0.02 is clipped). PIL images are read as RGB(A).
    """
    if isinstance(image, torch.Tensor):
        return (image if image.ndim == 4 else image[None]).float()
    if isinstance(image, PIL.Image.Image):
        image = image if image.mode == "RGB" else image.convert("RGBA")
    a = np.asarray(image)
    a = a[..., None] if a.ndim == 2 else a
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        hint = ", which looks channels-first: use arr.transpose(1, 2, 0)" if a.ndim == 3 and a.shape[0] in (1, 3, 4) else ""
        hint = ", with a batch dimension: pass a list of images" if a.ndim == 4 else hint
        raise ValueError(f"expected an image of shape (H, W), (H, W, 3) or (H, W, 4), got {a.shape}{hint}")
    if a.size == 0:
        raise ValueError(f"the image is empty (shape {a.shape})")
    if a.dtype == np.uint8 or a.dtype == np.bool_:
        a = a.astype(np.float32) / (255.0 if a.dtype == np.uint8 else 1.0)
    elif a.dtype.kind in "iu":
        top = 65535 if a.dtype == np.uint16 else 255
        if a.min() < 0 or a.max() > top:
            raise ValueError(f"{a.dtype} values must be in 0-{top}, got {a.min()} to {a.max()} (uint16 holds 16-bit data)")
        a = a.astype(np.float32) / top
    elif a.dtype.kind == "f":
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError("it contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if lo < -0.02 or hi > 1.02:
            hint = " (divide 0-255 data by 255)" if lo >= 0 and hi <= 255 else " ((arr + 1) / 2 maps [-1, 1] to it)" if lo >= -1.02 and hi <= 1.02 else ""
            raise ValueError(f"float values must be in [0, 1], got {lo:.4g} to {hi:.4g}{hint}")
        a = a.clip(0.0, 1.0)
    else:
        raise ValueError(f"unsupported data type {a.dtype}: use uint8, uint16, bool or float")
    if a.shape[2] == 4:
        a = a[..., :3] * a[..., 3:] + (1.0 - a[..., 3:])
    return torch.from_numpy(a).permute(2, 0, 1).expand(3, -1, -1)[None].contiguous()


def images_to_batch(image) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``image_to_tensor`` of an image or a list of them (which may differ in size if they pad
    alike), zero-padded to multiples of 64, and each image's ``(height, width)``."""
    tensors = [image_to_tensor(im) for im in (image if isinstance(image, (list, tuple)) else [image])]
    if not tensors:
        raise ValueError("`image` is empty")
    sizes = [tuple(t.shape[-2:]) for t in tensors for _ in range(t.shape[0])]
    padded = [pad_to_multiple(t) for t in tensors]
    if len({t.shape[-2:] for t in padded}) > 1:
        raise ValueError(
            "images in a batch must pad to the same size (multiples of "
            f"{SIZE_MULTIPLE} pixels); got sizes (height, width) {sizes}"
        )
    return torch.cat(padded), sizes


def reference_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The reference's spaced-DDPM timesteps (``space_timesteps``), descending: rounded
    running sums of the stride ``(T - 1) / (n - 1)`` (a closed form differs by one for some
    counts). One step samples at ``T - 1``, where the reference's t = 0 cannot denoise."""
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and {num_train_timesteps}, got {num_inference_steps}"
        )
    if num_inference_steps == 1:
        return [num_train_timesteps - 1]
    stride = (num_train_timesteps - 1) / (num_inference_steps - 1)
    positions = itertools.accumulate([stride] * (num_inference_steps - 1), initial=0.0)
    return [round(position) for position in positions][::-1]


def pad_to_multiple(images: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Zero-pad right and bottom so both sides are multiples of ``multiple``."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, -w % multiple, 0, -h % multiple))


def color_fix(images: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Match each channel's mean and standard deviation to ``reference`` (AdaIN)."""

    def stats(x):
        flat = x.flatten(2)
        return flat.mean(-1)[..., None, None], (flat.var(-1) + eps).sqrt()[..., None, None]

    mean, std = stats(images)
    ref_mean, ref_std = stats(reference)
    return (images - mean) / std * ref_std + ref_mean


def low_frequency(images: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """The coarsest band of an à trous wavelet decomposition (what ``better_start`` encodes)."""
    channels = images.shape[1]
    taps = torch.tensor([1.0, 2.0, 1.0], dtype=images.dtype, device=images.device) / 4
    kernel = torch.outer(taps, taps).expand(channels, 1, 3, 3)
    for level in range(levels):
        d = 2**level
        images = F.conv2d(F.pad(images, (d, d, d, d), mode="replicate"), kernel, groups=channels, dilation=d)
    return images


def encode_text(tokenizer, text_encoder, prompt: str) -> torch.Tensor:
    """(1, 77, D): the prompt padded to the context length, through the whole encoder (the
    pipeline's and the training's text conditioning)."""
    ids = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state


def save_prompt_embeds(path: str | os.PathLike, embeds: dict[str, torch.Tensor]) -> None:
    """Write ``{prompt: (1, 77, D) embedding}`` to a safetensors file (prompts in its metadata)."""
    prompts = list(embeds)
    tensors = {f"prompt_{i}": embeds[p].detach().to("cpu", torch.float32).contiguous() for i, p in enumerate(prompts)}
    save_file(tensors, str(path), metadata={"format": _PROMPT_EMBEDS_FORMAT, "prompts": json.dumps(prompts)})


def load_prompt_embeds(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by ``save_prompt_embeds``: ``{prompt: float32 CPU embedding}``."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _PROMPT_EMBEDS_FORMAT:
            raise ValueError(f"{path} is not a DeblurDiff prompt-embedding file")
        prompts = json.loads(meta["prompts"])
        return {p: f.get_tensor(f"prompt_{i}") for i, p in enumerate(prompts)}


def _find_prompt_embeds(source, hub_kwargs: dict) -> Path | None:
    """``prompt_embeds.safetensors`` of a local folder or Hub repo, or None."""
    if Path(source).is_dir():
        path = Path(source) / PROMPT_EMBEDS_FILE
        return path if path.is_file() else None
    try:
        return Path(hf_hub_download(str(source), PROMPT_EMBEDS_FILE, **hub_kwargs))
    except Exception:  # absent from the repo, offline, ...: fall back to loading the text encoder
        return None


_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "proxies", "force_download")


class DeblurDiffPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->lkpn->controlnet->unet->vae"
    _optional_components = ["text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "restored_latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        unet: UNet2DConditionModel,
        controlnet: LatentControlNetModel,
        lkpn: LKPNModel,
        scheduler: DDPMScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, controlnet=controlnet, lkpn=lkpn,
            scheduler=scheduler,
        )
        # A plain UNet just loaded attends within the ControlNet's windows, as the reference.
        if unet is not None:
            ensure_attention_layout(unet, getattr(controlnet.config, "attention_window", DEFAULT_WINDOW))
        # {prompt: (1, 77, D) embedding}: given ones (float32, CPU) and those encoded so far.
        self._prompt_embeds: dict[str, torch.Tensor] = {}
        # Called to load the text encoder the first time a prompt needs it.
        self._text_encoder_loader: Callable[[], CLIPTextModel] | None = None
        self._samplers: dict = {}
        # Bytes a call may use above the resident weights before ``tiled=None`` switches to
        # tiles; None: what the device has free at call time (estimates.available_memory).
        self.memory_budget: int | None = None
        # With float16 weights, run the VAE in float32 when its config says it overflows.
        self.upcast_vae = True

    @classmethod
    def from_single_file(cls, path, tokenizer=None, torch_dtype=None, attention_head_dim: int = 64):
        """Load the official checkpoint (``model.pth``, ``.ckpt`` or ``.safetensors``); it holds
        no tokenizer: ``tokenizer`` is a path, a Hub repo id or an object (default: the
        packaged OpenCLIP tokenizer)."""
        from ..models.single_file import load_single_file_components

        components = load_single_file_components(
            path, tokenizer=tokenizer, attention_head_dim=attention_head_dim, torch_dtype=torch_dtype
        )
        return cls(**components)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, lazy_text_encoder: bool = True, **kwargs):
        """``DiffusionPipeline.from_pretrained``; when the folder holds the default prompts'
        embeddings the text encoder is loaded only once a custom prompt needs it (unless
        ``lazy_text_encoder=False`` or ``text_encoder=`` is given)."""
        if not lazy_text_encoder or "text_encoder" in kwargs:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        path = _find_prompt_embeds(pretrained_model_name_or_path, hub_kwargs)
        stored = load_prompt_embeds(path) if path is not None else {}
        if not {DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT} <= set(stored):
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe = super().from_pretrained(pretrained_model_name_or_path, text_encoder=None, **kwargs)
        pipe.set_prompt_embeds(stored)
        dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
        pipe._text_encoder_loader = functools.partial(
            CLIPTextModel.from_pretrained,
            pretrained_model_name_or_path,
            subfolder="text_encoder",
            **({"torch_dtype": dtype} if dtype is not None else {}),
            **({"variant": kwargs["variant"]} if "variant" in kwargs else {}),
            **hub_kwargs,
        )
        return pipe

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """``DiffusionPipeline.save_pretrained`` plus the default prompts' embeddings."""
        if self.text_encoder is None and self._text_encoder_loader is not None:
            self._load_text_encoder()  # a saved folder is complete
        super().save_pretrained(save_directory, *args, **kwargs)
        embeds = {prompt: self.encode_prompt(prompt) for prompt in (DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT)
                  if prompt in self._prompt_embeds or self.text_encoder is not None}
        if embeds:
            save_prompt_embeds(Path(save_directory) / PROMPT_EMBEDS_FILE, embeds)

    def set_prompt_embeds(self, embeds: dict[str, torch.Tensor] | str | os.PathLike) -> None:
        """Embeddings used instead of the text encoder: ``{prompt: (1, 77, D)}`` or a file."""
        if not isinstance(embeds, dict):
            embeds = load_prompt_embeds(embeds)
        for prompt, value in embeds.items():
            value = value[None] if value.ndim == 2 else value
            self._prompt_embeds[prompt] = value.detach().to("cpu", torch.float32)

    def _load_text_encoder(self) -> CLIPTextModel:
        if self.text_encoder is None:
            if self._text_encoder_loader is None:
                raise RuntimeError(
                    "This pipeline has no text encoder, and only the stored prompts "
                    f"{sorted(self._prompt_embeds)} can be used; load it with a text encoder "
                    "for custom prompts."
                )
            logger.info("Loading the text encoder for a custom prompt.")
            encoder = self._text_encoder_loader()
            encoder.to(device=self._execution_device, dtype=self.unet.dtype)
            self.register_modules(text_encoder=encoder)
        return self.text_encoder

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Cached (1, 77, D) embedding of one prompt: the stored one, else the text encoder's
        (loaded if it was deferred) over the prompt padded to the context length."""
        if prompt not in self._prompt_embeds:
            if self.tokenizer is None:
                raise RuntimeError("This pipeline has no tokenizer, so it cannot encode custom prompts.")
            self._prompt_embeds[prompt] = encode_text(self.tokenizer, self._load_text_encoder(), prompt)
        return self._prompt_embeds[prompt].to(self._execution_device)

    @contextlib.contextmanager
    def _vae_precision(self):
        """The VAE in float32 for float16 weights when its config says ``force_upcast`` (as
        diffusers' SDXL pipeline upcasts it); yields the input dtype. Entered once around a tiled
        pass (an inner entry finds the VAE upcast already and does nothing)."""
        vae = self.vae
        if not (self.upcast_vae and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)):
            yield vae.dtype
            return
        vae.to(torch.float32)
        try:
            yield torch.float32
        finally:
            vae.to(torch.float16)

    @torch.no_grad()
    def vae_moments(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE posterior's mean and log-variance, (B, 8, H/8, W/8) float32, of images in [0, 1]."""
        with self._vae_precision() as dtype:
            images = images.to(device=self.vae.device, dtype=dtype)
            return self.vae.encode(images).latent_dist.parameters.float()

    @torch.no_grad()
    def encode_condition(
        self,
        images: torch.Tensor,
        generator=None,
        tiled: bool = False,
        tile_size: int = TILE_SIZE,
        tile_stride: int = TILE_STRIDE,
        sample: bool | None = None,
        num_samples: int = 1,
    ) -> torch.Tensor:
        """The scaled float32 latent of [0, 1] images, as the reference computes it: the VAE
        posterior sampled (default untiled) or its mode (default tiled). ``num_samples``
        draws (the reference draws one per guidance branch) are concatenated on the batch."""
        sample = not tiled if sample is None else sample
        scale = self.vae.config.scaling_factor

        def encode(tile):
            posterior = DiagonalGaussianDistribution(self.vae_moments(tile))
            if not sample:
                return torch.cat([posterior.mode()] * num_samples) * scale
            return torch.cat([posterior.sample(generator) for _ in range(num_samples)]) * scale

        with self._vae_precision():
            return vae_encode_tiled(encode, images, tile_size, tile_stride) if tiled else encode(images)

    @torch.no_grad()
    def decode_latents(
        self, latents: torch.Tensor, tiled: bool = False, tile_size: int = TILE_SIZE, tile_stride: int = TILE_STRIDE
    ) -> torch.Tensor:
        """Latents -> images in [-1, 1], float32; ``tiled`` decodes overlapping tiles and blends them."""

        def decode(z):
            with self._vae_precision() as dtype:
                z = z.to(device=self.vae.device, dtype=dtype)
                return self.vae.decode(z / self.vae.config.scaling_factor).sample.float()

        with self._vae_precision():
            return vae_decode_tiled(decode, latents, tile_size, tile_stride) if tiled else decode(latents)

    def make_denoiser(
        self,
        condition,
        prompt_embeds,
        negative_prompt_embeds=None,
        guidance_scale: float = 1.0,
        conditioning_scale: float = 1.0,
        windows=None,
        negative_condition=None,
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """``denoise(x, t) -> (eps, z_s)`` (float32) for a whole sampling run, ``t`` a 0-d
        tensor; casts and text batches are prepared once. Guided, both branches run as one
        batch, the unconditional one reading ``negative_condition`` (default ``condition``).
        With ``windows``, overlapping latent tiles are blended with Gaussian weights (the
        reference keeps the last tile's ``z_s``; here it is blended like ``eps``)."""
        batch, (h, w) = condition.shape[0], condition.shape[-2:]
        guided = is_guided(guidance_scale) and negative_prompt_embeds is not None
        dtype, device = self.unet.dtype, self._execution_device
        cond = condition.to(dtype)
        negative = cond if negative_condition is None else negative_condition.to(dtype)
        # Text for one tile's (or the image's) samples, the unconditional branch's after them.
        text = prompt_embeds.to(device, dtype).expand(batch, -1, -1)
        if guided:
            text = torch.cat([text, negative_prompt_embeds.to(device, dtype).expand(batch, -1, -1)])
        text = text.contiguous()

        def denoise(t, x, c, negative_c):
            n = x.shape[0]
            x = x.to(dtype)
            if guided:
                x, c = torch.cat([x, x]), torch.cat([c, negative_c])
            t = batched_timesteps(t, x.shape[0], x.device)
            restored = self.lkpn(c, x, t, text)
            down, mid = self.controlnet(
                x, t, text, hint=torch.cat([c, restored], dim=1), conditioning_scale=conditioning_scale
            )
            eps = self.unet(
                x,
                t,
                encoder_hidden_states=text,
                down_block_additional_residuals=down,
                mid_block_additional_residual=mid,
                return_dict=False,
            )[0].float()
            if guided:
                eps_cond, eps_uncond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
                restored = restored[:n]
            return eps, restored.float()

        if windows is None or len(windows) == 1:
            return lambda x, t: denoise(t, x, cond, negative)
        weights = blend_weights(windows, h, w, device=condition.device)
        return lambda x, t: tiled_map(functools.partial(denoise, t), [x, cond, negative], windows, weights)

    def get_scheduler(self, sampler: str = "ddpm"):
        """"ddpm": ``self.scheduler``; "ddim" (eta 0) and "dpmsolver++" (2nd order) are built
        from the same noise schedule."""
        name = sampler.lower()
        if name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if name == "ddpm":
            return self.scheduler
        key = (name, id(self.scheduler))
        if key not in self._samplers:
            config = dict(self.scheduler.config)
            if name == "ddim":
                scheduler = DDIMScheduler.from_config(
                    config, timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=True
                )
            else:
                scheduler = DPMSolverMultistepScheduler.from_config(
                    config, algorithm_type="dpmsolver++", solver_order=2, variance_type=None,
                    lower_order_final=True, final_sigmas_type="zero",
                )
            self._samplers = {key: scheduler}
        return self._samplers[key]

    def set_timesteps(self, num_inference_steps: int, device="cpu", scheduler=None) -> torch.Tensor:
        """Set and return ``scheduler``'s timesteps (DDPM: ``reference_timesteps``), on the CPU
        where the schedulers read them."""
        scheduler = scheduler or self.scheduler
        if isinstance(scheduler, DDPMScheduler):
            timesteps = reference_timesteps(num_inference_steps, scheduler.config.num_train_timesteps)
            scheduler.set_timesteps(timesteps=timesteps, device="cpu")
        else:
            scheduler.set_timesteps(num_inference_steps, device="cpu")
        return scheduler.timesteps

    @staticmethod
    def _device_generator(generator, device: torch.device):
        """A generator on ``device`` for the per-step noise, seeded from ``generator``."""
        gens = generator if isinstance(generator, list) else [generator]
        if generator is None or all(g.device.type == device.type for g in gens):
            return generator
        derived = [
            torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g).item())) for g in gens
        ]
        return derived if isinstance(generator, list) else derived[0]

    def should_tile(
        self, height: int, width: int, tiled: bool | None = None, tile_size: int = TILE_SIZE, guided: bool = False
    ) -> bool:
        """``tiled`` if given, else whether an untiled run's estimated peak memory exceeds
        ``self.memory_budget`` (None: the device's free memory)."""
        if tiled is not None:
            return bool(tiled)
        device = self._execution_device
        budget = self.memory_budget if self.memory_budget is not None else available_memory(device)
        return _should_tile_for_memory(height, width, budget, self.unet.dtype, guided, tile_size)

    def set_attention_window(self, window: int | None = DEFAULT_WINDOW) -> "DeblurDiffPipeline":
        """The networks' attention windows: the reference's (default) or ``None`` for global
        attention (which differs from the reference above 512 px)."""
        for model in (self.unet, self.controlnet, self.lkpn):
            enable_windowed_attention(model, window)
        for model in (self.controlnet, self.lkpn):
            model.register_to_config(attention_window=window)
        return self

    @torch.no_grad()
    def __call__(
        self,
        image,
        prompt: str = DEFAULT_PROMPT,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = 1.0,
        conditioning_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        color_fix: bool = True,
        return_lkpn_images: bool = False,
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        tiled: bool | None = None,
        tile_size: int = TILE_SIZE,
        tile_stride: int = TILE_STRIDE,
        sampler: str = "ddpm",
        better_start: bool = False,
    ):
        """Deblur ``image``: a PIL image, an HWC array, a (B, 3, H, W) tensor in [0, 1], or a list of
        images that pad to the same multiple of 64 pixels (``generator`` may then be a list, one per
        image, as in diffusers: each image gets the random numbers it would get alone).

        ``output_type``: "pil", "np" (BHWC in [0, 1]), "pt" (BCHW) or "latent". ``callback_on_step_end``
        works as in diffusers, with "latents" and "restored_latents"; ``pipe.interrupt = True`` stops.
        ``tiled``: overlapping tiles of ``tile_size`` pixels every ``tile_stride`` (the reference's tiled
        mode) for the diffusion and the VAE; None tiles only when an untiled run's estimated peak memory
        exceeds what the device has free (``should_tile``).
        ``sampler``: "ddpm" (the reference's), "ddim" or "dpmsolver++" (good in 20 steps).
        ``better_start``: start from the input's low frequencies noised to the first timestep instead
        of pure noise (``latents``, if given, is that noise).
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor {name!r} is not one of {self._callback_tensor_inputs}")
        check_tiling(tile_size, tile_stride)
        scheduler = self.get_scheduler(sampler)
        device = self._execution_device
        self.interrupt = False

        padded, sizes = images_to_batch(image)
        padded = padded.to(device)
        batch = padded.shape[0]
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for {batch} images: pass one per image")
        guided = is_guided(guidance_scale)
        use_tiles = self.should_tile(padded.shape[-2], padded.shape[-1], tiled, tile_size, guided=guided)
        tiling = dict(tiled=use_tiles, tile_size=tile_size, tile_stride=tile_stride)

        # Random numbers are drawn in the reference's order: both branches' posterior
        # samples (even unguided), the better start's, the initial noise, each step's.
        condition, negative_condition = self.encode_condition(padded, generator, num_samples=2, **tiling).chunk(2)
        prompt_embeds = self.encode_prompt(prompt)
        negative_embeds = self.encode_prompt(negative_prompt) if guided else None

        timesteps = self.set_timesteps(num_inference_steps, device, scheduler)
        if better_start:
            start = self.encode_condition(low_frequency(padded), generator, sample=True, **tiling)
        if latents is None:
            latents = randn_tensor(condition.shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)
        if better_start:
            alpha_bar = self.scheduler.alphas_cumprod[int(timesteps[0])].item()
            latents = alpha_bar**0.5 * start + (1 - alpha_bar) ** 0.5 * latents
        else:
            latents = latents * scheduler.init_noise_sigma

        windows = latent_windows(*condition.shape[-2:], tile_size, tile_stride) if use_tiles else None
        denoise = self.make_denoiser(
            condition, prompt_embeds, negative_embeds, guidance_scale, conditioning_scale, windows,
            negative_condition=negative_condition,
        )
        # A scheduler set by the caller (UniPC, PNDM, Heun, ...) may take no generator.
        step_kwargs = {}
        if "generator" in inspect.signature(scheduler.step).parameters:
            step_kwargs["generator"] = self._device_generator(generator, device)
        model_timesteps = timesteps.to(device)  # one copy: no host-device traffic in the loop

        restored = condition
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                eps, restored = denoise(latents, model_timesteps[i])
                latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    local = {"latents": latents, "restored_latents": restored}
                    kwargs = {name: local[name] for name in callback_on_step_end_tensor_inputs}
                    out = callback_on_step_end(self, i, t, kwargs) or {}
                    latents = out.get("latents", latents)
                progress.update()

        def output(z):
            return z if output_type == "latent" else self._postprocess(z, padded, sizes, color_fix, output_type, tiling)

        images, lkpn_images = output(latents), output(restored) if return_lkpn_images else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, lkpn_images)
        return DeblurDiffPipelineOutput(images=images, lkpn_images=lkpn_images)

    def _postprocess(self, latents, padded, sizes, fix_colors: bool, output_type: str, tiling: dict):
        """Decoded images cropped to their sizes (a list when sizes differ)."""
        decoded = (self.decode_latents(latents, **tiling) + 1) / 2
        same_size = len(set(sizes)) == 1
        outputs = []
        for i, (height, width) in enumerate(sizes[:1] if same_size else sizes):
            part = slice(None) if same_size else slice(i, i + 1)
            images = decoded[part, :, :height, :width]
            if fix_colors:
                images = color_fix(images, padded[part, :, :height, :width].float())
            images = images.clamp(0, 1)
            if output_type != "pt":
                images = VaeImageProcessor.pt_to_numpy(images)
            if output_type == "pil":
                # Truncation to uint8 (not rounding) matches the reference's output.
                images = [PIL.Image.fromarray(a) for a in (images * 255).astype(np.uint8)]
            outputs.append(images)
        return outputs[0] if same_size else [o[0] for o in outputs]
