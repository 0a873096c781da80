import numpy as np
import pytest

from deblurdiff.train.blur_kernels import (
    apply_kernel,
    defocus_kernel,
    linear_motion_kernel,
    motion_kernel,
)


def _check_kernel(k, size):
    assert k.shape == (size, size)
    assert k.dtype == np.float64
    assert np.all(k >= 0)
    assert k.sum() == pytest.approx(1.0, abs=1e-9)


def _centroid(k):
    ys, xs = np.indices(k.shape)
    return (k * ys).sum(), (k * xs).sum()


@pytest.mark.parametrize("size", [3, 15, 31, 63])
def test_motion_kernel_is_normalised(size):
    for seed in range(5):
        _check_kernel(motion_kernel(size, seed), size)


def test_motion_kernel_deterministic_for_seed():
    a = motion_kernel(31, 123, intensity=0.5)
    b = motion_kernel(31, np.random.default_rng(123), intensity=0.5)
    c = motion_kernel(31, 124, intensity=0.5)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_motion_kernel_is_centred_and_spans_kernel():
    k = motion_kernel(41, 7)
    cy, cx = _centroid(k)
    assert abs(cy - 20) < 0.5 and abs(cx - 20) < 0.5
    rows, cols = np.nonzero(k > 0)
    span = max(rows.max() - rows.min(), cols.max() - cols.min())
    assert span >= 30  # trajectory fills the kernel
    # a real stroke, not a blob: covers few of the pixels
    assert (k > 0).mean() < 0.5


def test_motion_kernel_rejects_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        motion_kernel(16, 0)
    with pytest.raises(ValueError, match="intensity"):
        motion_kernel(15, 0, intensity=1.5)
    with pytest.raises(TypeError):
        motion_kernel(15.0, 0)


def test_linear_motion_kernel():
    k = linear_motion_kernel(9, 0)
    _check_kernel(k, k.shape[0])
    assert k.shape[0] % 2 == 1
    c = k.shape[0] // 2
    # horizontal: all mass on the centre row, spread over ~9 pixels
    assert k[c].sum() == pytest.approx(1.0)
    assert 9 <= np.count_nonzero(k[c] > 1e-6) <= 11
    # vertical
    kv = linear_motion_kernel(9, 90)
    np.testing.assert_allclose(kv, k.T, atol=1e-12)
    # diagonal at 45 degrees rises to the right (y axis points down)
    kd = linear_motion_kernel(12, 45, size=15)
    _check_kernel(kd, 15)
    assert kd[2, 12] > 0 and kd[12, 2] > 0 and kd[2, 2] == 0
    cy, cx = _centroid(kd)
    assert abs(cy - 7) < 1e-6 and abs(cx - 7) < 1e-6


def test_linear_motion_kernel_edge_cases():
    k0 = linear_motion_kernel(0, 33)
    assert k0.shape == (3, 3) and k0[1, 1] == 1.0
    with pytest.raises(ValueError, match="does not fit"):
        linear_motion_kernel(20, 0, size=11)
    with pytest.raises(ValueError):
        linear_motion_kernel(-1, 0)


def test_defocus_kernel():
    k = defocus_kernel(5)
    _check_kernel(k, 11)
    np.testing.assert_allclose(k, k.T, atol=1e-12)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-12)
    # flat inside, zero in the corners, partial coverage on the rim
    assert k[5, 5] == pytest.approx(k[5, 3])
    assert k[0, 0] == 0
    assert 0 < k[5, 0] < k[5, 5]
    # area of the disk ~ pi r^2 pixels
    assert (k / k.max()).sum() == pytest.approx(np.pi * 25, rel=0.02)
    assert defocus_kernel(0.2).tolist() == [[1.0]]
    assert defocus_kernel(5.6).shape == (13, 13)
    _check_kernel(defocus_kernel(3.5, size=21), 21)


def test_apply_kernel_identity_and_dtypes():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    delta = np.zeros((5, 5))
    delta[2, 2] = 1
    out = apply_kernel(img, delta)
    assert out.dtype == np.uint8 and out.shape == img.shape
    np.testing.assert_array_equal(out, img)
    grey = rng.random((17, 9)).astype(np.float32)
    out = apply_kernel(grey, delta)
    assert out.dtype == np.float32 and out.shape == grey.shape
    np.testing.assert_allclose(out, grey, atol=1e-6)


def test_apply_kernel_matches_direct_convolution_and_preserves_mean():
    rng = np.random.default_rng(1)
    img = rng.random((24, 28))
    k = motion_kernel(7, 3)
    out = apply_kernel(img, k, mode="wrap")
    # direct circular convolution
    ref = np.zeros_like(img)
    for dy in range(7):
        for dx in range(7):
            ref += k[dy, dx] * np.roll(img, (dy - 3, dx - 3), axis=(0, 1))
    np.testing.assert_allclose(out, ref, atol=1e-10)
    assert out.mean() == pytest.approx(img.mean())
    # a shifted delta shifts the image (true convolution, not correlation)
    shift = np.zeros((3, 3))
    shift[1, 2] = 1.0
    moved = apply_kernel(img, shift, mode="wrap")
    np.testing.assert_allclose(moved, np.roll(img, 1, axis=1), atol=1e-10)


def test_apply_kernel_blurs_and_rejects_bad_input():
    img = np.zeros((31, 31), dtype=np.uint8)
    img[15, 15] = 255
    out = apply_kernel(img.astype(np.float64), defocus_kernel(4))
    assert out.max() < 255 / 10 and out.sum() == pytest.approx(255.0)
    with pytest.raises(ValueError):
        apply_kernel(np.zeros((4, 4, 3, 2)), defocus_kernel(1))
    with pytest.raises(ValueError):
        apply_kernel(img, np.ones(3))
    with pytest.raises(ValueError):
        apply_kernel(img, defocus_kernel(1), mode="nearest")
