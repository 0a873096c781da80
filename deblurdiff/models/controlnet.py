"""The latent-hint ControlNet of DeblurDiff.

A copy of the SD UNet's encoder and middle block whose input convolution takes
``cat(x_t, hint)`` (4 + 8 channels: the blurry latent ``c`` and the LKPN output
``z_s``). Unlike the pixel-space ControlNet there is no conditioning embedding:
the hint already lives in latent space. Thirteen zero convolutions (one per
encoder skip connection plus the middle block) give the residuals that are
added to the frozen UNet's.
"""

from __future__ import annotations

import torch
from torch import nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.controlnets.controlnet import zero_module
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2DCrossAttn, get_down_block

from .windowed_attention import DEFAULT_WINDOW, enable_windowed_attention


#: The SD 2.1 encoder's blocks: cross-attention at the first three levels.
SD_DOWN_BLOCKS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)


class LatentControlNetModel(ModelMixin, ConfigMixin):
    """ControlNet conditioned on a latent hint concatenated to the noisy latent;
    ``attention_window``: the same window at every level (``None``: global attention)."""

    _supports_gradient_checkpointing = True
    # The reference's ControlNet uses the same attention window at every level.
    attention_window_per_level = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        hint_channels: int = 8,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        down_block_types: tuple[str, ...] = SD_DOWN_BLOCKS,
        layers_per_block: int = 2,
        attention_head_dim: int = 64,
        cross_attention_dim: int = 1024,
        use_linear_projection: bool = True,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        attention_window: int | None = DEFAULT_WINDOW,
    ):
        super().__init__()
        first = block_out_channels[0]
        time_embed_dim = first * 4
        self.conv_in = nn.Conv2d(in_channels + hint_channels, first, kernel_size=3, padding=1)
        self.time_proj = Timesteps(first, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(first, time_embed_dim)

        self.down_blocks = nn.ModuleList()
        self.controlnet_down_blocks = nn.ModuleList([zero_module(nn.Conv2d(first, first, 1))])
        out_ch = first
        for i, block_type in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            is_final = i == len(block_out_channels) - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=in_ch,
                    out_channels=out_ch,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final,
                    resnet_eps=norm_eps,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim,
                    num_attention_heads=max(out_ch // attention_head_dim, 1),
                    attention_head_dim=attention_head_dim,
                    downsample_padding=1,
                    use_linear_projection=use_linear_projection,
                )
            )
            # One zero conv per resnet output and one per downsampler output.
            for _ in range(layers_per_block + (0 if is_final else 1)):
                self.controlnet_down_blocks.append(zero_module(nn.Conv2d(out_ch, out_ch, 1)))

        mid_ch = block_out_channels[-1]
        self.mid_block = UNetMidBlock2DCrossAttn(
            in_channels=mid_ch,
            temb_channels=time_embed_dim,
            resnet_eps=norm_eps,
            resnet_act_fn="silu",
            cross_attention_dim=cross_attention_dim,
            num_attention_heads=max(mid_ch // attention_head_dim, 1),
            resnet_groups=norm_num_groups,
            use_linear_projection=use_linear_projection,
        )
        self.controlnet_mid_block = zero_module(nn.Conv2d(mid_ch, mid_ch, 1))
        enable_windowed_attention(self, attention_window)

    @classmethod
    def from_unet(cls, unet, hint_channels: int = 8) -> "LatentControlNetModel":
        """Initialise from a UNet's encoder, as the reference does for training: weights
        copied, the extra input channels of ``conv_in`` zero, the zero convolutions zero."""
        cfg = unet.config
        heads = cfg.attention_head_dim
        heads = heads[0] if isinstance(heads, (list, tuple)) else heads
        controlnet = cls(
            in_channels=cfg.in_channels,
            hint_channels=hint_channels,
            block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=tuple(cfg.down_block_types),
            layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.block_out_channels[0] // heads,
            cross_attention_dim=cfg.cross_attention_dim,
            use_linear_projection=cfg.use_linear_projection,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
        )
        for name in ("time_embedding", "down_blocks", "mid_block"):
            getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        with torch.no_grad():
            controlnet.conv_in.weight.zero_()
            controlnet.conv_in.weight[:, : cfg.in_channels].copy_(unet.conv_in.weight)
            controlnet.conv_in.bias.copy_(unet.conv_in.bias)
        return controlnet if unet.dtype == torch.float32 else controlnet.to(unet.dtype)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        hint: torch.Tensor,
        conditioning_scale: float = 1.0,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Returns ``(down_block_residuals, mid_block_residual)`` for
        ``UNet2DConditionModel(down_block_additional_residuals=..., mid_block_additional_residual=...)``."""
        emb = self.time_embedding(self.time_proj(batched_timesteps(timestep, sample.shape[0], sample.device)).to(sample.dtype))

        h = self.conv_in(torch.cat([sample, hint], dim=1))
        skips = [h]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=encoder_hidden_states)
            else:
                h, res = block(hidden_states=h, temb=emb)
            skips.extend(res)
        h = self.mid_block(h, emb, encoder_hidden_states=encoder_hidden_states)

        down = tuple(zc(s) * conditioning_scale for zc, s in zip(self.controlnet_down_blocks, skips))
        return down, self.controlnet_mid_block(h) * conditioning_scale


def batched_timesteps(timestep, batch: int, device) -> torch.Tensor:
    """One timestep per sample: a number or a one-element tensor repeated, else as given."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=device)
    t = t.reshape(-1).to(device)
    return t.expand(batch) if t.numel() == 1 else t
