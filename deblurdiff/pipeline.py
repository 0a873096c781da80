"""DeblurDiffPipeline: a blurry image in, a sharp one out.

Every step: ``z_s = LKPN(c, x_t)`` (the blurry latent ``c`` deblurred by per-pixel
kernels), then ``eps = UNet(x_t, residuals=ControlNet(x_t, hint=cat(c, z_s)))`` and a
DDPM step. Semantics follow the reference implementation (kkkls/DeblurDiff):
``c`` encodes the image in [0, 1], the sampler is its spaced DDPM, the output is
colour-fixed against the input by per-channel mean/std matching.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from .models import LatentControlNetModel, LKPNModel

DEFAULT_PROMPT = ""
DEFAULT_NEGATIVE_PROMPT = "low quality, blurry, low-resolution, noisy, unsharp, weird textures"
DEFAULT_STEPS = 50
# Latents are 1/8 of the image and the UNet downsamples 3 more times.
SIZE_MULTIPLE = 64


@dataclass
class DeblurDiffPipelineOutput(BaseOutput):
    """``images``: the restored images. ``lkpn_images``: the last step's LKPN latent
    ``z_s`` decoded (the blurry latent after the predicted kernels), when asked for."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    lkpn_images: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None


def image_to_tensor(image) -> torch.Tensor:
    """PIL image(s), uint8/float HWC array(s) or a (B, 3, H, W) tensor in [0, 1] -> float32 (B, 3, H, W) in [0, 1]."""
    if isinstance(image, torch.Tensor):
        tensor = image if image.ndim == 4 else image[None]
        return tensor.float()
    images = image if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise ValueError("`image` is empty")
    arrays = []
    for im in images:
        if isinstance(im, PIL.Image.Image):
            im = np.asarray(im.convert("RGB"))
        im = np.asarray(im)
        if im.ndim != 3 or im.shape[2] != 3:
            raise ValueError(f"expected an RGB image (H, W, 3), got an array of shape {im.shape}")
        arrays.append(im.astype(np.float32) / 255.0 if im.dtype == np.uint8 else im.astype(np.float32))
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("all images in a batch must have the same size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


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


class DeblurDiffPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->lkpn->controlnet->unet->vae"
    _callback_tensor_inputs = ["latents", "restored_latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        controlnet: LatentControlNetModel,
        lkpn: LKPNModel,
        scheduler: DDPMScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            controlnet=controlnet,
            lkpn=lkpn,
            scheduler=scheduler,
        )
        self._prompt_cache: dict = {}

    @classmethod
    def from_single_file(cls, path, tokenizer=None, torch_dtype=None, attention_head_dim: int = 64):
        """Load the official checkpoint (``model.pth``, ``.ckpt`` or ``.safetensors``, LDM layout).

        It holds no tokenizer: ``tokenizer`` is a path, a Hub repo id or a tokenizer object
        (default: Stable Diffusion 2.1-base's)."""
        from .convert import load_single_file_components

        components = load_single_file_components(
            path, tokenizer=tokenizer, attention_head_dim=attention_head_dim, torch_dtype=torch_dtype
        )
        return cls(**components)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text embedding (1, 77, D) of one prompt; cached, since the defaults never change."""
        key = (prompt, self.text_encoder.device, self.text_encoder.dtype)
        if key not in self._prompt_cache:
            ids = self.tokenizer(
                [prompt],
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.text_encoder.device)
            self._prompt_cache[key] = self.text_encoder(ids).last_hidden_state
        return self._prompt_cache[key]

    @torch.no_grad()
    def encode_condition(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """The blurry latent ``c``: the VAE posterior of the [0, 1] image, sampled, scaled."""
        images = images.to(device=self.vae.device, dtype=self.vae.dtype)
        posterior = self.vae.encode(images).latent_dist
        return posterior.sample(generator) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.float()

    # ------------------------------------------------------------------ one model call
    def predict_noise(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        condition: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        conditioning_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(eps, z_s)`` for one step. With guidance the conditional and unconditional
        branches (LKPN and ControlNet included) run as one batch."""
        batch = latents.shape[0]
        guided = guidance_scale != 1.0 and negative_prompt_embeds is not None
        text = prompt_embeds.expand(batch, -1, -1)
        if guided:
            text = torch.cat([text, negative_prompt_embeds.expand(batch, -1, -1)])
            latents, condition = torch.cat([latents, latents]), torch.cat([condition, condition])
        dtype = self.unet.dtype
        x, c, text = latents.to(dtype), condition.to(dtype), text.to(dtype)
        t = timestep.expand(x.shape[0]).to(x.device)

        restored = self.lkpn(c, x, t, text)
        down, mid = self.controlnet(x, t, text, hint=torch.cat([c, restored], dim=1), conditioning_scale=conditioning_scale)
        eps = self.unet(
            x, t, encoder_hidden_states=text, down_block_additional_residuals=down, mid_block_additional_residual=mid
        ).sample.float()
        restored = restored.float()
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            restored = restored[:batch]
        return eps, restored

    def set_timesteps(self, num_inference_steps: int, device) -> torch.Tensor:
        if num_inference_steps == 1:
            # The reference's respacing puts a lone step at t = 0, which cannot denoise
            # anything; start from the last training step instead.
            self.scheduler.set_timesteps(timesteps=[self.scheduler.config.num_train_timesteps - 1], device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    # ------------------------------------------------------------------ the call
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
    ):
        """Deblur ``image`` (PIL image, list of them, HWC array or (B, 3, H, W) tensor in [0, 1]).

        ``output_type``: "pil", "np" (float in [0, 1], BHWC), "pt" (BCHW) or "latent".
        ``callback_on_step_end(pipe, i, t, kwargs)`` gets the tensors named in
        ``callback_on_step_end_tensor_inputs`` ("latents", "restored_latents") and may
        return replacements; set ``pipe.interrupt = True`` inside it to stop early.
        """
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        for name in callback_on_step_end_tensor_inputs:
            if name not in self._callback_tensor_inputs:
                raise ValueError(f"callback tensor {name!r} is not one of {self._callback_tensor_inputs}")
        device = self._execution_device
        self.interrupt = False

        source = image_to_tensor(image).to(device)
        batch, _, height, width = source.shape
        padded = pad_to_multiple(source)

        condition = self.encode_condition(padded, generator).float()
        prompt_embeds = self.encode_prompt(prompt)
        negative_embeds = self.encode_prompt(negative_prompt) if guidance_scale != 1.0 else None

        timesteps = self.set_timesteps(num_inference_steps, device)
        if latents is None:
            latents = randn_tensor(condition.shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32)

        restored = condition
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    break
                eps, restored = self.predict_noise(
                    latents, t, condition, prompt_embeds, negative_embeds, guidance_scale, conditioning_scale
                )
                latents = self.scheduler.step(eps, t, latents, generator=generator).prev_sample
                if callback_on_step_end is not None:
                    local = {"latents": latents, "restored_latents": restored}
                    kwargs = {name: local[name] for name in callback_on_step_end_tensor_inputs}
                    out = callback_on_step_end(self, i, t, kwargs) or {}
                    latents = out.get("latents", latents)
                progress.update()

        if output_type == "latent":
            images, lkpn_images = latents, restored if return_lkpn_images else None
        else:
            images = self._postprocess(latents, source, height, width, color_fix, output_type)
            lkpn_images = (
                self._postprocess(restored, source, height, width, color_fix, output_type)
                if return_lkpn_images
                else None
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, lkpn_images)
        return DeblurDiffPipelineOutput(images=images, lkpn_images=lkpn_images)

    def _postprocess(self, latents, source, height, width, fix_colors: bool, output_type: str):
        images = (self.decode_latents(latents)[:, :, :height, :width] + 1) / 2
        if fix_colors:
            images = color_fix(images, source.float())
        images = images.clamp(0, 1)
        if output_type == "pt":
            return images
        # Truncation to uint8 (not rounding) matches the reference's output.
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return array
        return [PIL.Image.fromarray((a * 255).astype(np.uint8)) for a in array]
