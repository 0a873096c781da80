"""Synthetic degradation, training datasets and the training configuration."""

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from deblurdiff.train.config import TrainConfig, apply_overrides, load_config
from deblurdiff.train.data import PairedDataset, SyntheticBlurDataset, build_dataset, match_pairs
from deblurdiff.train.degradation import (
    KERNEL_TYPES,
    DegradationConfig,
    add_gaussian_noise,
    degrade,
    gaussian_kernel,
    jpeg_compress,
    random_kernel,
    resize_bilinear,
    sample_rng,
)

REPO = Path(__file__).resolve().parents[1]


def smooth_image(h=48, w=64, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(1, 4, size=3)
    return np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (f[i] * x + (i + 1) * y)) for i in range(3)], -1).astype(
        np.float32
    )


# ----------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("sigma", [0.1, 1.0, 5.0, 12.0])
def test_isotropic_gaussian_is_normalised_symmetric_and_centred(sigma):
    k = gaussian_kernel(41, sigma)
    assert k.shape == (41, 41) and k.min() >= 0
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(k, k.T, atol=1e-15)
    np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-15)
    assert np.unravel_index(k.argmax(), k.shape) == (20, 20)


def test_isotropic_gaussian_has_the_requested_spread():
    k = gaussian_kernel(41, 3.0)
    ax = np.arange(41) - 20
    var_x = (k.sum(0) * ax**2).sum()
    assert math.sqrt(var_x) == pytest.approx(3.0, rel=1e-3)


def test_anisotropic_gaussian_is_elongated_along_theta():
    horizontal = gaussian_kernel(41, 6.0, 1.0, 0.0)
    assert horizontal[20, 30] > horizontal[30, 20]
    vertical = gaussian_kernel(41, 6.0, 1.0, math.pi / 2)
    np.testing.assert_allclose(vertical, horizontal.T, atol=1e-12)
    assert horizontal.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", KERNEL_TYPES)
def test_every_kernel_type_is_normalised_with_the_configured_size(kind):
    config = DegradationConfig(kernel_list=[kind], kernel_prob=[1.0])
    for seed in range(5):
        drawn, k = random_kernel(sample_rng(seed, 0), config)
        assert drawn == kind
        assert k.shape == (41, 41) and k.dtype == np.float64
        assert k.min() >= 0 and k.sum() == pytest.approx(1.0, abs=1e-9)


def test_kernel_types_follow_their_probabilities():
    config = DegradationConfig(kernel_list=["iso", "aniso", "motion"], kernel_prob=[0.2, 0.0, 0.8])
    kinds = [random_kernel(sample_rng(0, i), config)[0] for i in range(300)]
    assert "aniso" not in kinds
    assert 0.7 < kinds.count("motion") / len(kinds) < 0.9


# ----------------------------------------------------------------------------- chain
def test_degrade_is_deterministic_for_a_seed_and_varies_with_it():
    image = smooth_image()
    a = degrade(image, sample_rng(7, 3))
    b = degrade(image, sample_rng(7, 3))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, degrade(image, sample_rng(7, 4)))
    assert not np.array_equal(a, degrade(image, sample_rng(8, 3)))
    assert not np.array_equal(a, degrade(image, sample_rng(7, 3, epoch=1)))


def test_degrade_keeps_shape_dtype_and_range():
    image = smooth_image(50, 70)
    for i in range(10):
        out = degrade(image, sample_rng(0, i))
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.min() >= 0 and out.max() <= 1


def test_drawn_parameters_stay_in_their_ranges():
    config = DegradationConfig(downsample_range=[2, 4], noise_range=[3, 5], jpeg_range=[60, 70])
    image = smooth_image(32, 32)
    for i in range(20):
        _, info = degrade(image, sample_rng(1, i), config, return_info=True)
        assert 2 <= info["scale"] <= 4
        assert 3 <= info["noise_sigma"] <= 5
        assert 60 <= info["jpeg_quality"] <= 70
        assert info["kernel_type"] in config.kernel_list
        assert info["kernel"].sum() == pytest.approx(1.0)


def test_near_identity_degradation_leaves_the_image_in_place():
    config = DegradationConfig(
        kernel_list=["iso"], kernel_prob=[1], blur_sigma=[0.1, 0.1], downsample_range=[1, 1],
        noise_range=None, jpeg_range=None,
    )
    image = smooth_image()
    np.testing.assert_allclose(degrade(image, sample_rng(0, 0), config), image, atol=1e-5)


def test_blur_lowers_high_frequencies():
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    config = DegradationConfig(kernel_list=["iso"], kernel_prob=[1], blur_sigma=[3, 3],
                               downsample_range=[1, 1], noise_range=None, jpeg_range=None)
    out = degrade(image, sample_rng(0, 0), config)
    assert np.abs(np.diff(out, axis=1)).mean() < 0.2 * np.abs(np.diff(image, axis=1)).mean()


def test_noise_jpeg_and_resize_helpers():
    image = smooth_image(32, 32)
    noisy = add_gaussian_noise(image, 15, np.random.default_rng(0))
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert (noisy - image).std() == pytest.approx(15 / 255, rel=0.15)
    smooth = smooth_image(128, 128)
    assert np.abs(jpeg_compress(smooth, 100) - smooth).mean() < 0.01
    assert np.abs(jpeg_compress(smooth, 30) - smooth).mean() > np.abs(jpeg_compress(smooth, 95) - smooth).mean()
    small = resize_bilinear(image, 8, 8)
    assert small.shape == (8, 8, 3)
    assert resize_bilinear(np.full((5, 7, 3), 0.25, np.float32), 13, 11) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "bad",
    [
        dict(kernel_size=40),
        dict(kernel_list=["iso", "box"], kernel_prob=[0.5, 0.5]),
        dict(kernel_list=["iso"], kernel_prob=[0.5, 0.5]),
        dict(blur_sigma=[3, 1]),
        dict(downsample_range=[0.5, 2]),
        dict(jpeg_range=[0, 100]),
        dict(motion_size=[3, 61]),
    ],
)
def test_invalid_degradation_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        DegradationConfig(**bad)


def test_unknown_degradation_key_is_rejected():
    with pytest.raises(ValueError, match="unknown degradation"):
        DegradationConfig.from_dict({"blur_sigmas": [1, 2]})


# ----------------------------------------------------------------------------- datasets
@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "sharp" / "sub").mkdir(parents=True)
    (tmp_path / "blurry" / "sub").mkdir(parents=True)
    names = ["a.png", "b.png", "sub/c.png"]
    for i, name in enumerate(names):
        h, w = (72, 80) if i else (40, 48)  # the first is smaller than the crop
        image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image.save(tmp_path / "sharp" / name)
        # Same pixels under another (lossless) extension: pairs match by name without extension.
        image.save((tmp_path / "blurry" / name).with_suffix(".bmp"))
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "sharp" / "lonely.png")
    return tmp_path


def test_pairs_match_by_name_and_skip_orphans(image_folder, capsys):
    pairs = match_pairs(image_folder / "sharp", image_folder / "blurry")
    assert [p[0].name for p in pairs] == ["a.png", "b.png", "c.png"]
    assert "without a blurry counterpart" in capsys.readouterr().out


def test_paired_dataset_crops_both_images_alike(image_folder):
    ds = PairedDataset.from_root(image_folder, resolution=64, seed=0)
    assert len(ds) == 3
    for i in range(len(ds)):
        item = ds[i]
        assert item["sharp"].shape == item["blurry"].shape == (3, 64, 64)
        assert item["sharp"].dtype == torch.float32 and item["prompt"] == ""
        assert -1 <= item["sharp"].min() and item["sharp"].max() <= 1
        assert 0 <= item["blurry"].min() and item["blurry"].max() <= 1
        # Identical source pixels: the blurry image in [0, 1] is the sharp one in [-1, 1].
        torch.testing.assert_close(item["blurry"] * 2 - 1, item["sharp"], atol=1e-6, rtol=0)


def test_synthetic_dataset_is_reproducible_and_changes_with_the_epoch(image_folder):
    ds = SyntheticBlurDataset(image_folder / "sharp", resolution=32, seed=3)
    assert len(ds) == 4
    a, b = ds[1], ds[1]
    torch.testing.assert_close(a["blurry"], b["blurry"])
    torch.testing.assert_close(a["sharp"], b["sharp"])
    assert a["sharp"].shape == a["blurry"].shape == (3, 32, 32)
    assert 0 <= a["blurry"].min() and a["blurry"].max() <= 1 and -1 <= a["sharp"].min()
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["blurry"], a["blurry"])
    other = SyntheticBlurDataset(image_folder / "sharp", resolution=32, seed=4)
    assert not torch.equal(other[1]["blurry"], a["blurry"])


def test_centre_crop_without_flip_is_the_image_centre(image_folder):
    ds = PairedDataset.from_root(image_folder, resolution=32, random_crop=False, random_flip=False)
    source = np.asarray(PIL.Image.open(image_folder / "sharp" / "b.png"))
    expected = source[20:52, 24:56].astype(np.float32) / 255
    np.testing.assert_allclose(ds[1]["blurry"].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_build_dataset_from_config(image_folder):
    config = TrainConfig.from_dict({"data": {"type": "paired", "root": str(image_folder), "resolution": 32}})
    assert isinstance(build_dataset(config.data), PairedDataset)
    config = TrainConfig.from_dict({"data": {"sharp_dir": str(image_folder / "sharp"), "resolution": 32}})
    assert isinstance(build_dataset(config.data), SyntheticBlurDataset)
    with pytest.raises(ValueError, match="sharp_dir"):
        build_dataset(TrainConfig.from_dict({}).data)


# ----------------------------------------------------------------------------- configuration
def test_example_config_loads_and_matches_the_defaults():
    config = load_config(REPO / "configs" / "train_example.yaml")
    defaults = TrainConfig().to_dict()
    loaded = config.to_dict()
    loaded["data"]["sharp_dir"] = None
    assert loaded == defaults
    assert config.training.learning_rate == 1e-4 and config.data.degradation.kernel_size == 41


def test_json_and_toml_configs_and_overrides(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"training": {"max_steps": 5}, "model": {"init": "tiny-random"}}))
    (tmp_path / "c.toml").write_text('seed = 1\n[training]\nmax_steps = 5\n[model]\ninit = "tiny-random"\n')
    a = load_config(tmp_path / "c.json", ["training.learning_rate=0.001", "data.degradation.noise_range=[0, 5]"])
    b = load_config(tmp_path / "c.toml")
    assert a.training.max_steps == b.training.max_steps == 5 and b.seed == 1
    assert a.training.learning_rate == 0.001 and a.data.degradation.noise_range == [0, 5]
    assert apply_overrides({}, ["output_dir=runs/x"]) == {"output_dir": "runs/x"}


@pytest.mark.parametrize(
    "values, match",
    [
        ({"trainig": {}}, "unknown top-level"),
        ({"training": {"lr": 1}}, "unknown key"),
        ({"model": {"init": "sd"}}, "model.init"),
        ({"training": {"mixed_precision": "fp8"}}, "mixed_precision"),
        ({"data": {"type": "video"}}, "data.type"),
    ],
)
def test_invalid_configs_are_rejected(values, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(values)
