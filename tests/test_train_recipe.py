"""Training from scratch as the authors do: an identity LKPN, windowed attention from the first
step, and their recipe (configs/train_official.yaml), with the smallest random models on CPU."""

import copy
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from conftest import FLOAT32_ROUNDING
from deblurdiff.models import LKPNModel
from deblurdiff.models.configs import make_test_tokenizer, text_config, unet_config
from deblurdiff.models.windowed_attention import attention_windows, enable_windowed_attention
from deblurdiff.train.config import ModelConfig, TrainConfig, apply_overrides, load_config, read_config_file
from deblurdiff.train.data import build_dataset
from deblurdiff.train.train import Trainer, load_components

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "train_official.yaml"
# The smallest LKPN of the SD topology: 8 channels at the first level, attention there.
LKPN = dict(block_out_channels=[8, 16], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
            layers_per_block=1, attention_head_dim=8, norm_num_groups=8)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A Stable Diffusion folder (diffusers layout) of the smallest models whose latents are
    1/8 of the image (4 VAE levels) and whose UNet attends at its first level (window 64)."""
    folder = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(unet_config((8, 16), 1, 8, 32, 1), norm_num_groups=8))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=8, scaling_factor=0.18215)
    text_encoder = CLIPTextModel(text_config(hidden_size=32, layers=1, heads=4))
    for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder),
                       ("tokenizer", make_test_tokenizer())):
        part.save_pretrained(folder / name)
    return folder


def make_pairs(root: Path, count: int, size: int) -> Path:
    rng = np.random.default_rng(size)
    y, x = np.mgrid[0:size, 0:size] / size
    for sub in ("sharp", "blurry"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        sharp = np.stack([np.sin(2 * np.pi * (x * (i + 1) + y)), np.cos(4 * np.pi * y), np.sin(6 * np.pi * x)], -1)
        sharp = (sharp * 0.5 + 0.5) * 255
        blurry = np.clip(sharp + rng.normal(0, 20, sharp.shape), 0, 255)
        PIL.Image.fromarray(sharp.astype(np.uint8)).save(root / "sharp" / f"{i}.png")
        PIL.Image.fromarray(blurry.astype(np.uint8)).save(root / "blurry" / f"{i}.png")
    return root


def recipe(tmp_path, sd_folder, pairs, *overrides) -> TrainConfig:
    """configs/train_official.yaml on the smallest models and a few pairs."""
    values = apply_overrides(read_config_file(RECIPE), [
        f"output_dir={tmp_path / 'run'}", f"model.path={sd_folder}", f"data.root={pairs}", "data.num_workers=0",
        *overrides,
    ])
    values["model"]["lkpn"] = LKPN
    return TrainConfig.from_dict(values)


def first_step(trainer: Trainer) -> dict:
    """The tensors of the first training step (no update): c, x_t, t, text, z_s and the UNet's
    noise prediction, caught on their way through the models."""
    seen = {}
    hooks = [
        trainer.lkpn.register_forward_hook(
            lambda m, args, out: seen.update(c=args[0], x_t=args[1], t=args[2], text=args[3], z_s=out)
        ),
        trainer.unet.register_forward_hook(lambda m, args, out: seen.update(eps=out.sample)),
    ]
    with torch.no_grad():
        trainer.compute_loss(next(iter(trainer.loader)), trainer.step_generator(0))
    for hook in hooks:
        hook.remove()
    return seen


def layout(model) -> dict:
    """Each spatial transformer's window ("unset": none given) and forward, by name."""
    return {
        name: (getattr(model.get_submodule(name), "attention_window", "unset"),
               model.get_submodule(name).__dict__.get("forward"))
        for name in attention_windows(model)
    }


# ----------------------------------------------------------------------------- the LKPN at step 0
def test_a_fresh_lkpn_is_the_identity_and_learns():
    torch.manual_seed(0)
    lkpn = LKPNModel(**LKPN, cross_attention_dim=32).zero_init()
    c, x_t = torch.randn(2, 4, 24, 16), torch.randn(2, 4, 24, 16)
    z_s = lkpn(c, x_t, torch.tensor([10, 900]), torch.randn(2, 77, 32))
    torch.testing.assert_close(z_s, c, **FLOAT32_ROUNDING)
    # Only the output layers are zero: the rest keeps its random initialisation, and the
    # first gradient reaches the output convolution.
    assert lkpn.unet.conv_in.weight.abs().sum() > 0
    assert lkpn.unet.down_blocks[0].attentions[0].proj_in.weight.abs().sum() > 0
    torch.nn.functional.mse_loss(z_s, torch.randn_like(c)).backward()
    assert lkpn.unet.conv_out.weight.grad.abs().sum() > 0


def test_loaded_lkpn_weights_are_untouched(tmp_path):
    torch.manual_seed(1)
    lkpn = LKPNModel(**LKPN, cross_attention_dim=32)  # diffusers' initialisation: not the identity
    lkpn.save_pretrained(tmp_path / "lkpn")
    loaded = LKPNModel.from_pretrained(tmp_path / "lkpn")
    saved = lkpn.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, saved[name], rtol=0, atol=0)
    c = torch.randn(1, 4, 16, 16)
    z_s = loaded(c, torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32))
    assert (z_s - c).abs().max() > 1e-3


def test_training_from_stable_diffusion_starts_with_z_s_equal_to_c(tmp_path, sd_folder):
    lkpn = load_components(ModelConfig(init="stable-diffusion", path=str(sd_folder), lkpn=LKPN))["lkpn"]
    c = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        z_s = lkpn(c, torch.randn(1, 4, 16, 16), torch.tensor([999]), torch.randn(1, 77, 32))
    torch.testing.assert_close(z_s, c, **FLOAT32_ROUNDING)


# ----------------------------------------------------------------------------- windows from step 0
def test_training_noise_prediction_equals_the_pipelines_from_the_first_step(tmp_path, sd_folder):
    """At 576 px (a 72x72 latent, wider than the first level's 64 window) the first training
    step predicts the noise the pipeline predicts, and neither a checkpoint nor the
    pipeline built for validation changes the frozen UNet's attention."""
    pairs = make_pairs(tmp_path / "pairs", count=1, size=576)
    trainer = Trainer(recipe(tmp_path, sd_folder, pairs))
    trainer.setup()
    before = layout(trainer.unet)
    step = first_step(trainer)
    assert step["c"].shape[-2:] == (72, 72)
    torch.testing.assert_close(step["z_s"], step["c"], **FLOAT32_ROUNDING)

    pipe = trainer.build_pipeline()
    trainer.save_checkpoint()
    assert layout(trainer.unet) == before
    assert pipe.unet.down_blocks[0].attentions[0].attention_window == 64
    eps, _ = pipe.make_denoiser(step["c"], step["text"][:1])(step["x_t"], step["t"])
    torch.testing.assert_close(step["eps"], eps, **FLOAT32_ROUNDING)

    # The comparison can tell windows from global attention at this size.
    global_unet = copy.deepcopy(trainer.unet)
    enable_windowed_attention(global_unet, None)
    with torch.no_grad():
        eps_global = global_unet(step["x_t"], step["t"], encoder_hidden_states=step["text"]).sample
    assert (eps_global - eps).abs().max() > 1e3 * (step["eps"] - eps).abs().max() + 1e-5


# ----------------------------------------------------------------------------- the recipe
def test_recipe_values_are_the_authors():
    config = load_config(RECIPE)
    opt, data = config.training, config.data
    assert (opt.batch_size, opt.global_batch_size) == (1, 64)
    assert opt.accumulation_steps(1) == 64 and opt.accumulation_steps(8) == 8
    assert (opt.learning_rate, opt.adam_weight_decay, opt.lr_scheduler) == (1e-4, 0.01, "constant")
    assert (opt.noise_loss_weight, opt.lkpn_loss_weight, opt.pixel_loss_weight) == (1.0, 1.0, 0.0)
    assert (data.type, data.resolution, data.random_crop, data.random_flip) == ("paired", None, False, False)
    assert config.model.init == "stable-diffusion" and config.seed == 231
    with pytest.raises(ValueError, match="not a multiple"):
        opt.accumulation_steps(3)


def test_contradicting_accumulation_is_refused():
    values = {"training": {"global_batch_size": 64, "gradient_accumulation_steps": 4}}
    with pytest.raises(ValueError, match="contradicts"):
        TrainConfig.from_dict(values).training.accumulation_steps(1)


def test_recipe_runs_one_step_on_whole_unaltered_pairs(tmp_path, sd_folder):
    pairs = make_pairs(tmp_path / "pairs", count=2, size=64)
    # Two images per optimizer step instead of 64, to keep the test short.
    config = recipe(tmp_path, sd_folder, pairs, "training.max_steps=1", "training.global_batch_size=2",
                    "validation.every_steps=0")
    trainer = Trainer(config)
    trainer.setup()
    assert trainer.accelerator.gradient_accumulation_steps == 2
    group = trainer.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-4, 0.01)
    # Whole pairs, as stored: no crop, no flip, no degradation.
    item = build_dataset(config.data, seed=config.seed)[0]
    name = item["name"]
    sharp = np.asarray(PIL.Image.open(pairs / "sharp" / name), dtype=np.float32) / 255
    blurry = np.asarray(PIL.Image.open(pairs / "blurry" / name), dtype=np.float32) / 255
    np.testing.assert_allclose(item["sharp"].permute(1, 2, 0).numpy(), sharp * 2 - 1, atol=1e-6)
    np.testing.assert_allclose(item["blurry"].permute(1, 2, 0).numpy(), blurry, atol=1e-6)

    lkpn_before = {k: v.clone() for k, v in trainer.lkpn.state_dict().items()}
    result = trainer.train()
    assert result["global_step"] == 1
    row = result["history"][0]
    assert np.isfinite(row["loss"]) and row["loss"] == pytest.approx(row["noise_loss"] + row["lkpn_loss"])
    assert trainer.lr_scheduler.get_last_lr()[0] == 1e-4
    assert any(not torch.equal(v, lkpn_before[k]) for k, v in trainer.lkpn.state_dict().items())
