"""Architectures of every component, full size (the reference's) and tiny (for tests),
and builders for randomly initialised components.

Random weights are for tests and benchmarks only: they never deblur anything.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .controlnet import LatentControlNetModel
from .lkpn import LKPNModel
from .windowed_attention import enable_windowed_attention

TEXT_CONTEXT_LENGTH = 77

# The reference's spaced DDPM sampler: 1000 steps, linear in sqrt(beta), eps prediction,
# "fixed small" posterior variance (DDPMScheduler's defaults), no clipping, timesteps
# spread like IDDPM's respacing.
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    timestep_spacing="linspace",
)


def _levels(block_out_channels, attention_levels):
    n = len(block_out_channels)
    down = ("CrossAttnDownBlock2D",) * attention_levels + ("DownBlock2D",) * (n - attention_levels)
    up = ("UpBlock2D",) * (n - attention_levels) + ("CrossAttnUpBlock2D",) * attention_levels
    return down, up


def unet_config(block_out_channels, layers_per_block, head_dim, cross_attention_dim, attention_levels):
    """SD 2.1's layout (with diffusers' defaults: 4 latent channels, flip_sin_to_cos, no frequency shift)."""
    down, up = _levels(block_out_channels, attention_levels)
    return dict(
        sample_size=64,
        block_out_channels=tuple(block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=layers_per_block,
        attention_head_dim=[max(c // head_dim, 1) for c in block_out_channels],  # heads per level
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
    )


def side_network_config(block_out_channels, layers_per_block, head_dim, cross_attention_dim, attention_levels):
    """Shared keyword arguments of LKPNModel and LatentControlNetModel."""
    down, _ = _levels(block_out_channels, attention_levels)
    return dict(
        block_out_channels=tuple(block_out_channels),
        down_block_types=down,
        layers_per_block=layers_per_block,
        attention_head_dim=head_dim,
        cross_attention_dim=cross_attention_dim,
    )


def vae_config(block_out_channels, layers_per_block, in_channels=3, out_channels=3, latent_channels=4):
    """SD's VAE (diffusers' default ``scaling_factor`` 0.18215 is SD's)."""
    n = len(block_out_channels)
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        latent_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=layers_per_block,
        sample_size=512,
    )


def text_config(hidden_size, layers, heads, vocab_size=49408):
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=TEXT_CONTEXT_LENGTH,
        hidden_act="gelu",
        projection_dim=hidden_size // 2 if hidden_size < 1024 else 512,
        pad_token_id=0,
        # Start/end of text are the vocabulary's last two ids (49406/49407 in OpenCLIP's).
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
    )


SIZES = {
    # SD 2.1-base UNet/VAE, OpenCLIP ViT-H/14 text tower up to its penultimate layer (23 of 24),
    # LKPN of base width 128; head dim 64 everywhere.
    "full": dict(
        unet=unet_config((320, 640, 1280, 1280), 2, 64, 1024, 3),
        controlnet=side_network_config((320, 640, 1280, 1280), 2, 64, 1024, 3),
        lkpn=side_network_config((128, 256, 512, 512), 2, 64, 1024, 3),
        vae=vae_config((128, 256, 512, 512), 2),
        text=dict(hidden_size=1024, layers=23, heads=16),
    ),
    # Same topology (4 VAE levels: latents are 1/8 of the image), a few thousand times smaller.
    "tiny": dict(
        unet=unet_config((32, 64), 1, 16, 32, 1),
        controlnet=side_network_config((32, 64), 1, 16, 32, 1),
        lkpn=side_network_config((32, 64), 1, 16, 32, 1),
        vae=vae_config((32, 32, 32, 32), 1),
        text=dict(hidden_size=32, layers=2, heads=4),
    ),
}


def make_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULER_CONFIG)


def make_test_tokenizer(directory: str | Path | None = None) -> CLIPTokenizer:
    """A small character-level CLIP tokenizer built locally (no download).

    Pads with id 0 like OpenCLIP; start/end-of-text take the real ids 49406/49407,
    so it drives full-size text encoders too.
    """
    if directory is None:  # the files are read once, here: nothing is left on disk
        with tempfile.TemporaryDirectory(prefix="deblurdiff-tokenizer-") as tmp:
            return make_test_tokenizer(tmp)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"
    tokens = ["!", *chars, *(c + "</w>" for c in chars)]
    vocab = {token: i for i, token in enumerate(tokens)} | {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        pad_token="!",
        model_max_length=TEXT_CONTEXT_LENGTH,
    )


def build_components(size: str = "tiny", seed: int = 0) -> dict:
    """Randomly initialised pipeline components (for tests and benchmarks only)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    spec = SIZES[size]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    enable_windowed_attention(unet)  # the reference's windows (the other models set theirs)
    return dict(
        vae=AutoencoderKL(**spec["vae"]),
        text_encoder=CLIPTextModel(text_config(**spec["text"])),
        tokenizer=make_test_tokenizer(),
        unet=unet,
        controlnet=LatentControlNetModel(**spec["controlnet"]),
        lkpn=LKPNModel(**spec["lkpn"]),
        scheduler=make_scheduler(),
    )
