"""Windowed spatial transformers (deblurdiff.models.windowed_attention)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FLOAT32_ROUNDING
from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from deblurdiff.models import LatentControlNetModel, LKPNModel
from deblurdiff.models.configs import build_components
from deblurdiff.models.windowed_attention import (
    _set_window,
    _window_index,
    attention_windows,
    enable_windowed_attention,
)


def window_starts(side: int, k: int) -> list[int]:
    """The first pixel of each window the package places along one dimension."""
    return _window_index(side, k, torch.device("cpu"))[:, 0].tolist()


def expected_starts(side: int, k: int) -> list[int]:
    """Independent derivation: ceil(side / k) windows of min(k, side), the first at 0,
    spaced by ceil((side - k) / (n - 1)), the last one ending at the edge."""
    k = min(k, side)
    n = math.ceil(side / k)
    if n == 1:
        return [0]
    step = math.ceil((side - k) / (n - 1))
    return [min(i * step, side - k) for i in range(n)]


@pytest.mark.parametrize("side", [1, 8, 63, 64, 65, 72, 96, 127, 128, 129, 130, 200, 257])
@pytest.mark.parametrize("k", [8, 16, 32, 64])
def test_window_positions_match_the_reference(side, k):
    starts = window_starts(side, k)
    assert starts == expected_starts(side, k)
    width = min(k, side)
    covered = torch.zeros(side)
    for s in starts:
        covered[s : s + width] += 1
    assert covered.min() >= 1 and starts[-1] + width == side


def test_known_positions():
    assert window_starts(64, 64) == [0]
    assert window_starts(65, 64) == [0, 1]
    assert window_starts(72, 64) == [0, 8]
    assert window_starts(96, 64) == [0, 32]
    assert window_starts(130, 64) == [0, 33, 66]
    assert window_starts(48, 32) == [0, 16]


def _block(seed=0) -> Transformer2DModel:
    torch.manual_seed(seed)
    block = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=4,
        cross_attention_dim=12, use_linear_projection=True,
    ).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))  # proj_out is zero-initialised
    return block


def _reference_windows(block, x, context, k):
    """Each sample on its own, window by window, averaged (the reference's loop)."""
    outs = []
    for b in range(x.shape[0]):
        h, w = x.shape[-2:]
        total, count = torch.zeros_like(x[b : b + 1]), torch.zeros(1, 1, h, w)
        kh, kw = min(k, h), min(k, w)
        for i in expected_starts(h, k):
            for j in expected_starts(w, k):
                part = x[b : b + 1, :, i : i + kh, j : j + kw]
                y = Transformer2DModel.forward(block, part, encoder_hidden_states=context[b : b + 1]).sample
                total[..., i : i + kh, j : j + kw] += y - part
                count[..., i : i + kh, j : j + kw] += 1
        outs.append(total / count + x[b : b + 1])
    return torch.cat(outs)


@torch.no_grad()
@pytest.mark.parametrize("hw", [(20, 13), (9, 16)])
def test_windows_with_a_batch_match_per_sample_windows(hw):
    block = _block()
    _set_window(block, 8)
    x, context = torch.randn(3, 16, *hw), torch.randn(3, 5, 12)
    ours = block(x, encoder_hidden_states=context).sample
    ours_tuple = block(x, encoder_hidden_states=context, return_dict=False)[0]
    expected = _reference_windows(block, x, context, 8)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours, ours_tuple)
    glob = Transformer2DModel.forward(block, x, encoder_hidden_states=context).sample
    assert (ours - glob).abs().max() > 1e-3  # the windows matter


@torch.no_grad()
def test_one_window_is_global_attention_exactly():
    c = build_components("tiny")
    unet = c["unet"]
    x, t, text = torch.randn(2, 4, 64, 48), torch.tensor([500, 500]), torch.randn(2, 77, unet.config.cross_attention_dim)
    windowed = unet(x, t, encoder_hidden_states=text).sample
    enable_windowed_attention(unet, None)
    # Windows are laid out differently in memory: equal up to float32 rounding.
    torch.testing.assert_close(unet(x, t, encoder_hidden_states=text).sample, windowed, **FLOAT32_ROUNDING)
    enable_windowed_attention(unet)
    x = torch.randn(1, 4, 72, 40)
    windowed = unet(x, t[:1], encoder_hidden_states=text[:1]).sample
    enable_windowed_attention(unet, None)
    assert not torch.allclose(unet(x, t[:1], encoder_hidden_states=text[:1]).sample, windowed, rtol=1e-4, atol=1e-4)


def test_window_sizes_per_level():
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1, cross_attention_dim=8,
        attention_head_dim=2, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    windows = enable_windowed_attention(unet)
    assert {k: v for k, v in windows.items() if k.endswith("attentions.0")} == {
        "down_blocks.0.attentions.0": 64, "down_blocks.1.attentions.0": 32, "down_blocks.2.attentions.0": 16,
        "mid_block.attentions.0": 8,
        "up_blocks.1.attentions.0": 16, "up_blocks.2.attentions.0": 32, "up_blocks.3.attentions.0": 64,
    }
    controlnet = LatentControlNetModel(
        block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1, cross_attention_dim=8,
        attention_head_dim=4,
    )
    assert set(attention_windows(controlnet).values()) == {64}
    assert {controlnet.get_submodule(n).attention_window for n in attention_windows(controlnet)} == {64}
    lkpn = LKPNModel(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=4)
    assert lkpn.unet.mid_block.attentions[0].attention_window == 8
    assert LKPNModel(
        block_out_channels=(8, 8), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), norm_num_groups=4,
        cross_attention_dim=8, attention_head_dim=4, attention_window=None,
    ).unet.down_blocks[0].attentions[0].attention_window is None


def test_state_dict_keys_unchanged_and_config_round_trip(tmp_path):
    c = build_components("tiny")
    fresh = UNet2DConditionModel.from_config(c["unet"].config)
    assert list(c["unet"].state_dict()) == list(fresh.state_dict())
    controlnet = c["controlnet"]
    keys = list(controlnet.state_dict())
    enable_windowed_attention(controlnet, 32)
    assert list(controlnet.state_dict()) == keys
    controlnet.register_to_config(attention_window=None)
    controlnet.save_pretrained(tmp_path / "cn")
    loaded = LatentControlNetModel.from_pretrained(tmp_path / "cn")
    assert loaded.config.attention_window is None
    assert loaded.mid_block.attentions[0].attention_window is None
    assert list(loaded.state_dict()) == keys


def test_pipeline_windows_follow_the_controlnet():
    from deblurdiff.pipeline.pipeline_deblurdiff import DeblurDiffPipeline

    c = build_components("tiny")
    c["unet"] = UNet2DConditionModel.from_config(c["unet"].config)  # no windows set yet
    pipe = DeblurDiffPipeline(**c)
    assert pipe.unet.mid_block.attentions[0].attention_window == 32
    pipe.set_attention_window(None)
    assert pipe.controlnet.config.attention_window is None and pipe.lkpn.config.attention_window is None
    assert all(pipe.unet.get_submodule(n).attention_window is None for n in attention_windows(pipe.unet))


class _BlockCall(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, context):
        return self.block(x, encoder_hidden_states=context).sample


@torch.no_grad()
def test_export_with_dynamic_sizes_covers_every_window_count():
    """One exported program (height and width symbolic) gives the reference's windows at
    sizes with 1, 2 and 3 x 4 windows: nothing was specialised on the example's size."""
    from deblurdiff.space.aoti import export_network

    block = _block(seed=3)
    _set_window(block, 64)
    program = export_network(_BlockCall(block), (torch.randn(1, 16, 24, 16), torch.randn(1, 5, 12)), max_side=256)
    run = program.module()
    for hw in [(8, 8), (72, 40), (136, 200)]:
        x, context = torch.randn(1, 16, *hw), torch.randn(1, 5, 12)
        expected = _reference_windows(block, x, context, 64)
        torch.testing.assert_close(run(x, context), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_ahead_of_time_compiled_block_covers_every_window_count():
    """Inductor (ahead of time, on the CPU) compiles the exported block from the example
    size the ZeroGPU path uses; the compiled code gives the reference's windows with one
    window as well as with several (it once dropped the window index, or failed on the
    scatter that adds the windows back)."""
    import shutil

    from deblurdiff.space.aoti import EXAMPLE_LATENT, export_network

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("needs a C++ compiler")
    block = _block(seed=4)
    _set_window(block, 64)
    program = export_network(_BlockCall(block), (torch.randn(1, 16, *EXAMPLE_LATENT), torch.randn(1, 5, 12)))
    compiled = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(program))
    for hw in [(8, 8), (72, 40)]:
        x, context = torch.randn(1, 16, *hw), torch.randn(1, 5, 12)
        torch.testing.assert_close(compiled(x, context), _reference_windows(block, x, context, 64),
                                   rtol=1e-5, atol=1e-5)
