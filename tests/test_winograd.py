"""Winograd and unfolded 3×3 convolutions against float64 convolutions, and their use in models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deblurdiff.cpu.winograd import (
    WinogradBudget,
    enable_winograd,
    filter_transform_seconds,
    im2col_conv2d,
    winograd_bytes,
    winograd_conv2d,
    winograd_filters,
    winograd_matrices,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import disable_winograd  # noqa: E402  (what the benchmarks compare against)

# Largest error relative to the output's largest value, measured against float64 on
# random data (observed: F(2, 3) about 5e-7, F(4, 3) about 1e-5, direct float32 3e-7 to 5e-6).
TOLERANCE = {2: 2e-6, 4: 5e-5}


def relative_error(out: torch.Tensor, exact: torch.Tensor) -> float:
    return ((out.double() - exact).abs().max() / exact.abs().max()).item()


def case(b, c, k, h, w, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g)
    weight = torch.randn(k, c, 3, 3, generator=g) / (3 * c**0.5)
    b_ = torch.randn(k, generator=g) if bias else None
    exact = F.conv2d(x.double(), weight.double(), None if b_ is None else b_.double(), padding=1)
    return x, weight, b_, exact


@pytest.mark.parametrize("m", [2, 4])
def test_transforms_reproduce_a_one_dimensional_convolution(m):
    """Aᵀ[(G g) ⊙ (Bᵀ d)] is the valid correlation of d with g, exactly (float64)."""
    bt, g, at = winograd_matrices(m)
    d, k = torch.randn(m + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.stack([(d[i : i + 3] * k).sum() for i in range(m)])
    torch.testing.assert_close(at @ ((g @ k) * (bt @ d)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize(
    "b, c, k, h, w, bias",
    [(1, 8, 8, 16, 16, True), (1, 5, 7, 13, 9, True), (2, 16, 4, 32, 24, False), (2, 3, 6, 7, 31, True),
     (1, 1, 1, 1, 1, True), (3, 12, 20, 6, 10, False)],
)
def test_winograd_matches_the_exact_convolution(m, b, c, k, h, w, bias):
    x, weight, b_, exact = case(b, c, k, h, w, seed=h * w + c, bias=bias)
    out = winograd_conv2d(x, winograd_filters(weight, m), b_, m)
    assert out.shape == exact.shape and out.dtype == torch.float32 and out.is_contiguous()
    assert relative_error(out, exact) < TOLERANCE[m]


def test_winograd_in_float64_is_exact():
    x, weight, bias, exact = case(2, 6, 5, 11, 14, bias=True)
    out = winograd_conv2d(x.double(), winograd_filters(weight.double(), 4), bias.double(), 4)
    torch.testing.assert_close(out, exact, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("b, h, w, bias", [(1, 8, 8, True), (2, 5, 9, False), (1, 3, 1, True)])
def test_im2col_matches_the_exact_convolution(b, h, w, bias):
    x, weight, b_, exact = case(b, 10, 12, h, w, seed=h + w, bias=bias)
    out = im2col_conv2d(x, weight, b_)
    assert out.shape == exact.shape
    assert relative_error(out, exact) < 2e-6


@pytest.mark.parametrize("b, h, w", [(1, 16, 16), (2, 7, 10), (1, 1, 3)])
def test_im2col_with_stride_two_matches_the_exact_convolution(b, h, w):
    x, weight, bias, _ = case(b, 10, 12, h, w, seed=h * w, bias=True)
    exact = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), stride=2, padding=1)
    out = im2col_conv2d(x, weight, bias, stride=2)
    assert out.shape == exact.shape
    assert relative_error(out, exact) < 2e-6


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="one of"):
        winograd_matrices(3)
    with pytest.raises(ValueError, match=r"\(K, C, 3, 3\)"):
        winograd_filters(torch.zeros(4, 4, 5, 5), 2)
    with pytest.raises(ValueError, match="do not fit"):
        winograd_conv2d(torch.zeros(1, 3, 8, 8), winograd_filters(torch.zeros(4, 5, 3, 3), 2), None, 2)
    with pytest.raises(ValueError, match="one of"):
        enable_winograd(torch.nn.Conv2d(3, 3, 3, padding=1), plan=((8, 6),))


def test_only_plain_three_by_three_convolutions_are_taken_over():
    # Stride 2 is taken over too, but only ever unfolded (test_each_path_is_the_one_taken).
    for conv in (torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1, stride=2)):
        assert enable_winograd(conv) == 1
    for conv in (torch.nn.Conv2d(4, 4, 3, padding=1, stride=3), torch.nn.Conv2d(4, 4, 1),
                 torch.nn.Conv2d(4, 4, 3, padding=0), torch.nn.Conv2d(4, 4, 3, padding=1, groups=2),
                 torch.nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                 torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), torch.nn.Linear(4, 4)):
        assert enable_winograd(conv) == 0


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2)  # stride 2: only ever unfolded
        self.b = torch.nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.point = torch.nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.point(self.b(torch.relu(self.down(torch.relu(self.a(x))))))


def test_enabled_model_matches_its_direct_convolutions_at_every_size():
    net = Net().eval()
    assert enable_winograd(Net(), budget=None) == 3
    with torch.no_grad():
        # 64 -> 32 after the stride: F(4, 3) twice; 40 -> 20: F(4, 3), then F(2, 3);
        # 16 -> 8: F(2, 3), then unfolded; 8×10 -> 4×5: unfolded, the stride too.
        inputs = [torch.randn(2, 3, 64, 64), torch.randn(1, 3, 40, 36), torch.randn(1, 3, 16, 16),
                  torch.randn(1, 3, 8, 10)]
        direct = [net(x) for x in inputs]
        assert enable_winograd(net, plan=((32, 4), (16, 2)), im2col_max_size=8) == 3
        fast = [net(x) for x in inputs]
    for out, ref in zip(fast, direct):
        torch.testing.assert_close(out, ref, rtol=0, atol=5e-5 * ref.abs().max().item())
    # Filters for F(4, 3) (36 taps) and F(2, 3) (16 taps), for both convolutions.
    assert winograd_bytes(net) == 4 * (36 + 16) * (8 * 3 + 6 * 8)


def test_each_path_is_the_one_taken(monkeypatch):
    import deblurdiff.cpu.winograd as module

    calls = []
    for name in ("winograd_conv2d", "im2col_conv2d"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    conv = torch.nn.Conv2d(2, 2, 3, padding=1)
    enable_winograd(conv, plan=((32, 4),), im2col_max_size=16, budget=4 * 36 * 4)
    with torch.no_grad():
        conv(torch.randn(1, 2, 32, 40))
        conv(torch.randn(1, 2, 16, 64))  # the smaller side decides
        conv(torch.randn(1, 2, 24, 24))  # between the two: oneDNN
        conv.double()(torch.randn(1, 2, 32, 32).double())  # not float32: oneDNN
    assert calls == ["winograd_conv2d", "im2col_conv2d"]
    calls.clear()
    other = torch.nn.Conv2d(2, 2, 3, padding=1)
    enable_winograd(other, plan=((8, 2),), im2col_max_size=16, budget=0)
    with torch.no_grad():
        other(torch.randn(1, 2, 16, 16))  # no room for filters: unfolded instead
        other(torch.randn(1, 2, 32, 32))  # no room, too large to unfold: oneDNN
    assert calls == ["im2col_conv2d"]
    calls.clear()
    down = torch.nn.Conv2d(2, 2, 3, padding=1, stride=2)
    enable_winograd(down, plan=((8, 2),), im2col_max_size=16)
    with torch.no_grad():
        assert down(torch.randn(1, 2, 16, 12)).shape == (1, 2, 8, 6)  # stride 2: unfolded, never Winograd
        down(torch.randn(1, 2, 32, 32))  # too large to unfold: oneDNN
    assert calls == ["im2col_conv2d"]
    assert winograd_bytes(down) == 0


def test_filter_transforms_are_timed_once_per_size():
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).eval()
    enable_winograd(conv, plan=((32, 4), (16, 2)))
    spent = filter_transform_seconds()
    with torch.no_grad():
        conv(torch.randn(1, 8, 32, 32))
        first = filter_transform_seconds()
        conv(torch.randn(1, 8, 32, 32))  # filters kept: nothing more to transform
        assert filter_transform_seconds() == first > spent
        conv(torch.randn(1, 8, 16, 16))  # F(2, 3): transformed once more
    assert filter_transform_seconds() > first


def test_recording_gradients_runs_the_original_convolution():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    expected = conv(x)
    enable_winograd(conv)
    out = conv(x)
    assert torch.equal(out, expected) and out.requires_grad
    assert winograd_bytes(conv) == 0


def test_budget_caps_the_transformed_filters():
    nets = [Net().eval() for _ in range(2)]
    one = 4 * 36 * 8 * 3  # the first convolution's filters
    budget = WinogradBudget(one)
    for net in nets:
        enable_winograd(net, budget=budget)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = [net(x) for net in nets]
    assert [winograd_bytes(net) for net in nets] == [one, 0] and budget.used == one
    for net, out in zip(nets, outs):
        disable_winograd(net)
        with torch.no_grad():
            torch.testing.assert_close(out, net(x), rtol=0, atol=5e-5 * out.abs().max().item())


def test_changed_weights_are_transformed_again_and_disabling_restores():
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 32, 32)
    enable_winograd(conv)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(2)
        after = conv(x)
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(after, expected, rtol=0, atol=5e-5 * expected.abs().max().item())
    assert winograd_bytes(conv) == 4 * 36 * 16
    assert conv._winograd_budget.used == 4 * 36 * 16  # the old filters' bytes were given back
    disable_winograd(conv)
    assert "forward" not in conv.__dict__ and winograd_bytes(conv) == 0


def test_weights_made_in_inference_mode():
    with torch.inference_mode():
        conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        x = torch.randn(1, 4, 32, 32)
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
        enable_winograd(conv)
        out = conv(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-5 * expected.abs().max().item())
    assert winograd_bytes(conv) == 4 * 36 * 16
