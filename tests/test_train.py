"""The training loop, checkpoints, resuming and evaluation, with tiny random models on CPU."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from deblurdiff import DeblurDiffPipeline
from deblurdiff.train import __main__ as train_cli
from deblurdiff.train import evaluate as evaluate_mod
from deblurdiff.train.config import ModelConfig
from deblurdiff.train.train import find_checkpoints, load_components, train

STEPS = 50


def make_images(folder, count=4, size=64):
    """Smooth, colourful test images (structure for the blur to destroy)."""
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        image = np.stack(
            [
                np.sin(2 * np.pi * (x * (i + 1) + y)),
                np.cos(2 * np.pi * y * (i + 2)),
                np.sin(2 * np.pi * (x + y) * (i + 1)),
            ],
            -1,
        )
        PIL.Image.fromarray(((image * 0.5 + 0.5) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def tiny_config(output_dir, sharp_dir, **training):
    options = dict(batch_size=2, learning_rate=1e-3, log_every=10, checkpoint_every=25)
    options.update(training)
    return {
        "output_dir": str(output_dir),
        "seed": 0,
        "model": {"init": "tiny-random"},
        "data": {"type": "synthetic", "sharp_dir": str(sharp_dir), "resolution": 64, "num_workers": 0},
        "training": options,
        "validation": {"every_steps": STEPS, "num_images": 2, "num_inference_steps": 2},
    }


# Tiny models gain nothing from intra-op threads; on a busy machine their spinning slows them.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("data") / "sharp")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("run")
    return train(tiny_config(out, data_dir, max_steps=STEPS))


@pytest.mark.slow
def test_tiny_training_run_lowers_the_loss(run):
    losses = [row["loss"] for row in run["history"]]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"first 10 steps: {first:.4f}, last 10 steps: {last:.4f}")
    assert last < 0.85 * first
    # The LKPN's own term (z_s towards the sharp latent) falls too.
    lkpn = [row["lkpn_loss"] for row in run["history"]]
    assert np.mean(lkpn[-10:]) < 0.7 * np.mean(lkpn[:10])


@pytest.mark.slow
def test_checkpoints_are_pipeline_folders_with_training_state(run):
    out = run["output_dir"]
    checkpoints = find_checkpoints(out)
    assert [c.name for c in checkpoints] == ["checkpoint-0000025", "checkpoint-0000050"]
    last = checkpoints[-1]
    index = json.loads((last / "model_index.json").read_text())
    assert index["_class_name"] == "DeblurDiffPipeline"
    assert {"vae", "text_encoder", "tokenizer", "unet", "controlnet", "lkpn", "scheduler"} <= set(index)
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == STEPS
    assert (last / "training_state" / "optimizer.bin").is_file()
    # Frozen weights are stored once and hard-linked into each checkpoint where possible.
    frozen = os.path.join(out, "frozen-components", "unet", "diffusion_pytorch_model.safetensors")
    linked = last / "unet" / "diffusion_pytorch_model.safetensors"
    assert linked.is_file() and linked.stat().st_size == os.stat(frozen).st_size


@pytest.mark.slow
def test_checkpoint_round_trips_through_the_pipeline(run):
    pipe = DeblurDiffPipeline.from_pretrained(run["pipeline_dir"])
    pipe.set_progress_bar_config(disable=True)
    # The saved ControlNet is the trained one (no EMA: the raw weights in the training state).
    state = load_file(os.path.join(run["last_checkpoint"], "training_state", "model.safetensors"))
    for name, tensor in pipe.controlnet.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    out = pipe(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert out.size == (64, 64) and out.mode == "RGB"


@pytest.mark.slow
def test_validation_grid_and_log(run):
    grid = PIL.Image.open(os.path.join(run["output_dir"], "validation", f"step-{STEPS:07d}.png"))
    assert grid.size == (3 * 64 + 2 * 4, 2 * 64 + 4)  # blurry | restored | sharp, two rows
    rows = [json.loads(line) for line in open(os.path.join(run["output_dir"], "log.jsonl"))]
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == [10, 20, 30, 40, 50]
    assert {"noise_loss", "lkpn_loss", "lr", "sec_per_step"} <= set(losses[0])
    assert any("validation_psnr" in r for r in rows)


@pytest.mark.slow
def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, data_dir):
    """EMA, gradient accumulation and a checkpoint in the middle of an epoch; the second leg
    goes through the command line with a JSON config."""
    options = dict(
        batch_size=1, gradient_accumulation_steps=2, use_ema=True, ema_decay=0.5, checkpoint_every=3, log_every=1
    )
    straight = train(tiny_config(tmp_path / "a", data_dir, max_steps=5, **options))
    config = tiny_config(tmp_path / "b", data_dir, max_steps=3, **options)
    config["validation"]["every_steps"] = 0
    (tmp_path / "b.json").write_text(json.dumps(config))
    assert train_cli.main(["--config", str(tmp_path / "b.json")]) == 0
    args = ["--config", str(tmp_path / "b.json"), "--set", "training.max_steps=5", "--resume", "latest"]
    assert train_cli.main(args) == 0
    resumed = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl") if '"loss"' in line]
    expected = [r["loss"] for r in straight["history"]]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([r["loss"] for r in resumed], expected, rtol=1e-6)
    # With EMA, the exported ControlNet holds the averaged weights, not the raw ones.
    checkpoint = tmp_path / "b" / "checkpoint-0000005"
    exported = load_file(str(checkpoint / "controlnet" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(checkpoint / "training_state" / "model.safetensors"))
    assert any(not torch.equal(exported[k], raw[k]) for k in raw)


@pytest.mark.slow
def test_continue_from_a_pipeline_with_pixel_loss_bf16_and_checkpointing(tmp_path, run, data_dir):
    config = tiny_config(tmp_path, data_dir, max_steps=2, pixel_loss_weight=0.1, gradient_checkpointing=True,
                         mixed_precision="bf16", checkpoint_every=0, log_every=1)
    config["model"] = {"init": "pipeline", "path": run["pipeline_dir"]}
    config["validation"]["every_steps"] = 2
    result = train(config)
    assert all(np.isfinite(r["pixel_loss"]) and r["pixel_loss"] > 0 for r in result["history"])
    assert os.path.isfile(os.path.join(result["pipeline_dir"], "model_index.json"))


def test_stable_diffusion_init_copies_the_unet_encoder(tmp_path):
    """A Stable Diffusion folder (here: tiny components in its layout) gives a ControlNet
    that starts as the UNet's encoder with zero hint channels, and a fresh LKPN."""
    from deblurdiff.models.configs import build_components

    parts = build_components("tiny", seed=1)
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        parts[name].save_pretrained(tmp_path / name)
    lkpn = dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                layers_per_block=1, attention_head_dim=16)
    components = load_components(ModelConfig(init="stable-diffusion", path=str(tmp_path), lkpn=lkpn))
    unet, controlnet = components["unet"], components["controlnet"]
    torch.testing.assert_close(controlnet.conv_in.weight[:, :4], unet.conv_in.weight)
    assert controlnet.conv_in.weight[:, 4:].abs().sum() == 0
    for name, tensor in unet.down_blocks.state_dict().items():
        torch.testing.assert_close(controlnet.down_blocks.state_dict()[name], tensor)
    assert components["lkpn"].config.cross_attention_dim == unet.config.cross_attention_dim
    assert components["scheduler"].config.prediction_type == "epsilon"


# ----------------------------------------------------------------------------- evaluation
def test_builtin_ssim_and_psnr_match_scikit_image():
    pytest.importorskip("skimage")
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 52, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    from skimage.metrics import peak_signal_noise_ratio

    reference = evaluate_mod.ssim(a, b, backend="scikit-image")
    assert evaluate_mod.ssim(a, b, backend="builtin") == pytest.approx(reference, abs=1e-9)
    assert evaluate_mod.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255))
    assert evaluate_mod.ssim(a, a) == pytest.approx(1.0)
    y = evaluate_mod.to_y(a)
    assert y.shape == a.shape[:2] and 16 <= y.min() and y.max() <= 235


def _pairs(tmp_path, data_dir):
    from deblurdiff.train.degradation import degrade, sample_rng

    (tmp_path / "pairs" / "sharp").mkdir(parents=True)
    (tmp_path / "pairs" / "blurry").mkdir(parents=True)
    for i, path in enumerate(sorted(data_dir.iterdir())[:2]):
        sharp = np.asarray(PIL.Image.open(path))
        blurry = degrade(sharp.astype(np.float32) / 255, sample_rng(0, i))
        PIL.Image.fromarray(sharp).save(tmp_path / "pairs" / "sharp" / path.name)
        PIL.Image.fromarray((blurry * 255).round().astype(np.uint8)).save(tmp_path / "pairs" / "blurry" / path.name)
    return tmp_path / "pairs"


def test_evaluate_blurry_baseline_and_restored_folder(tmp_path, data_dir, capsys):
    pairs = _pairs(tmp_path, data_dir)
    # The sharp images themselves as "restored": perfect scores.
    code = evaluate_mod.main(
        ["--pairs", str(pairs), "--restored", str(pairs / "sharp"),
         "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv")]
    )
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["count"] == 2 and result["mean"]["ssim"] == pytest.approx(1.0)
    assert result["mean"]["psnr"] == float("inf") and result["mean"]["blurry_psnr"] < 40
    printed = capsys.readouterr().out
    assert "LPIPS" in printed and "blurry input" in printed
    assert (tmp_path / "r.csv").read_text().startswith("name,")


@pytest.mark.slow
def test_evaluate_runs_and_times_a_model(tmp_path, data_dir, run, capsys):
    pairs = _pairs(tmp_path, data_dir)
    code = evaluate_mod.main(
        ["--pairs", str(pairs), "--model", run["pipeline_dir"], "--steps", "2", "--device", "cpu",
         "--output", str(tmp_path / "restored"), "--json", str(tmp_path / "r.json")]
    )
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["mean"]["seconds"] > 0 and np.isfinite(result["mean"]["psnr"])
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == ["0.png", "1.png"]
    assert "s per image" in capsys.readouterr().out


def test_evaluate_reports_missing_inputs(tmp_path, capsys):
    assert evaluate_mod.main(["--pairs", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_stable_diffusion_init_needs_a_path():
    with pytest.raises(ValueError, match="needs model.path"):
        load_components(ModelConfig(init="stable-diffusion"))
