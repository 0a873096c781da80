"""Latent Kernel Prediction Network (LKPN).

An SD-style UNet reads ``cat(c, x_t)`` (blurry latent, noisy latent) and predicts a
k×k kernel for every latent pixel and channel; element-wise adaptive convolution
(EAC) applies them to ``c`` and adds ``c`` back, giving the sharper latent ``z_s``.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from ..ops import eac
from .controlnet import SD_DOWN_BLOCKS, zero_module
from .windowed_attention import DEFAULT_WINDOW, enable_windowed_attention


class LKPNModel(ModelMixin, ConfigMixin):
    """``z_s = c + EAC(c, UNet(cat(c, x_t), t, text))``; ``attention_window``: the first level's
    window (``None``: global attention). Built with diffusers' default initialisation (what
    loading overwrites); training from scratch starts from :meth:`zero_init`, the identity."""

    _supports_gradient_checkpointing = True
    # Its spatial transformers are those of its UNet (windows halved per level).
    attention_window_root = "unet"

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        kernel_size: int = 5,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512),
        down_block_types: tuple[str, ...] = SD_DOWN_BLOCKS,
        layers_per_block: int = 2,
        attention_head_dim: int = 64,
        cross_attention_dim: int = 1024,
        norm_num_groups: int = 32,
        attention_window: int | None = DEFAULT_WINDOW,
    ):
        super().__init__()
        self.unet = UNet2DConditionModel(
            in_channels=2 * latent_channels,
            out_channels=latent_channels * kernel_size * kernel_size,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple(down_block_types),
            # The decoder mirrors the encoder.
            up_block_types=tuple(t.replace("Down", "Up") for t in reversed(down_block_types)),
            layers_per_block=layers_per_block,
            # diffusers' UNet2DConditionModel reads `attention_head_dim` as heads per level.
            attention_head_dim=[max(ch // attention_head_dim, 1) for ch in block_out_channels],
            cross_attention_dim=cross_attention_dim,
            use_linear_projection=True,
            norm_num_groups=norm_num_groups,
        )
        enable_windowed_attention(self, attention_window)

    def zero_init(self) -> "LKPNModel":
        """Zero the UNet's output convolution, every residual block's output convolution
        and every spatial transformer's output projection, as the reference initialises
        its LKPN for training. The kernels are then 0 and ``z_s = c`` exactly, while
        every other layer keeps its random initialisation (so gradients flow from the
        first step). In place; returns ``self``."""
        zero_module(self.unet.conv_out)
        for module in self.unet.modules():
            if isinstance(module, ResnetBlock2D):
                zero_module(module.conv2)
            elif isinstance(module, Transformer2DModel):
                zero_module(module.proj_out)
        return self

    def predict_kernels(self, condition, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        """Per-pixel kernels, shape (B, C·k·k, h, w)."""
        merged = torch.cat([condition, sample], dim=1)
        return self.unet(merged, timestep, encoder_hidden_states=encoder_hidden_states).sample

    def forward(self, condition, sample, timestep, encoder_hidden_states) -> torch.Tensor:
        """The restored latent ``z_s`` (same shape as ``condition``)."""
        kernels = self.predict_kernels(condition, sample, timestep, encoder_hidden_states)
        return eac(condition, kernels, residual=True)
