"""GEGLU with its halves projected apart (CPU inference) against diffusers' GEGLU."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.activations import GEGLU

import deblurdiff.ops.geglu as geglu
from deblurdiff.ops.geglu import disable_split_geglu, enable_split_geglu, split_geglu


def layer(dim_in: int, dim_out: int, bias: bool = True, seed: int = 0) -> GEGLU:
    torch.manual_seed(seed)
    return GEGLU(dim_in, dim_out, bias=bias).eval()


@pytest.mark.parametrize("shape, dim_out, bias", [((1, 37, 24), 40, True), ((3, 5, 24), 7, False), ((9, 24), 1, True)])
def test_split_matches_diffusers_within_float32_rounding(shape, dim_out, bias):
    g = layer(shape[-1], dim_out, bias, seed=dim_out)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = GEGLU.forward(g, x)
        out = split_geglu(x, g.proj.weight, g.proj.bias)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_enabled_layers_run_split_only_for_cpu_inference(monkeypatch):
    net = torch.nn.Sequential(layer(8, 6), torch.nn.Linear(6, 6), layer(6, 4, seed=1))
    assert enable_split_geglu(net) == 2
    calls = []
    monkeypatch.setattr(geglu, "split_geglu", lambda *a: calls.append(1) or split_geglu(*a))
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        fast = net(x)
    assert len(calls) == 2
    calls.clear()
    slow = net(x.requires_grad_())  # recording gradients: diffusers' forward, differentiable
    slow.sum().backward()
    assert calls == [] and x.grad is not None
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-6)
    disable_split_geglu(net)
    with torch.no_grad():
        net(x)
    assert calls == []


def test_cpu_preparation_splits_the_networks_geglu():
    from conftest import tiny_pipeline

    from deblurdiff.cpu import CPUConfig, prepare_cpu_pipeline

    pipe = tiny_pipeline()
    prepare_cpu_pipeline(pipe, CPUConfig(), measure=False)
    layers = [m for net in (pipe.unet, pipe.controlnet, pipe.lkpn) for m in net.modules() if isinstance(m, GEGLU)]
    assert layers and all("forward" in m.__dict__ for m in layers)
