"""DeblurDiffPipeline end to end with tiny random models (behaviour, not image quality)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from deblurdiff import DeblurDiffPipeline
from deblurdiff.models.configs import build_components
from deblurdiff.models.tokenizer import OpenCLIPTokenizer
from deblurdiff.pipeline.pipeline_deblurdiff import color_fix, image_to_tensor, pad_to_multiple

from conftest import random_image, tiny_pipeline


def run(pipe, image, seed=0, **kw):
    kw.setdefault("num_inference_steps", 3)
    return pipe(image, generator=torch.Generator().manual_seed(seed), **kw)


def test_pad_to_multiple_pads_right_and_bottom_with_zeros():
    x = torch.ones(1, 3, 70, 64)
    padded = pad_to_multiple(x)
    assert padded.shape == (1, 3, 128, 64)
    assert padded[:, :, :70].eq(1).all() and padded[:, :, 70:].eq(0).all()


def test_color_fix_matches_channel_statistics():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 20, generator=gen) * 0.3
    reference = torch.rand(2, 3, 16, 20, generator=gen) * 0.8 + 0.1
    fixed = color_fix(images, reference)
    torch.testing.assert_close(fixed.mean((2, 3)), reference.mean((2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std((2, 3)), reference.std((2, 3)), atol=1e-4, rtol=1e-3)


def test_image_to_tensor_accepts_pil_arrays_and_tensors():
    image = random_image(8, 12)
    from_pil = image_to_tensor(image)
    assert from_pil.shape == (1, 3, 8, 12) and from_pil.max() <= 1
    torch.testing.assert_close(image_to_tensor(np.asarray(image)), from_pil)
    torch.testing.assert_close(image_to_tensor(from_pil[0]), from_pil)
    grey = np.full((8, 12), 0.25)
    torch.testing.assert_close(image_to_tensor(grey), torch.full((1, 3, 8, 12), 0.25))
    with pytest.raises(ValueError, match=r"got \(8, 8, 2\)"):
        image_to_tensor(np.zeros((8, 8, 2)))
    with pytest.raises(ValueError, match="float values must be in"):
        image_to_tensor(np.full((8, 8, 3), 255.0))


@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
def test_output_has_input_size(pipe, size):
    image = random_image(*size)
    out = run(pipe, image).images[0]
    assert isinstance(out, PIL.Image.Image) and out.size == image.size and out.mode == "RGB"


def test_same_seed_same_output_and_different_seed_differs(pipe):
    image = random_image(64, 64)
    a = np.asarray(run(pipe, image, seed=1).images[0])
    b = np.asarray(run(pipe, image, seed=1).images[0])
    c = np.asarray(run(pipe, image, seed=2).images[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_single_step_runs(pipe):
    out = run(pipe, random_image(64, 64), num_inference_steps=1, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert pipe.scheduler.timesteps.tolist() == [999]


def test_zero_steps_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(random_image(64, 64), num_inference_steps=0)


def test_output_types(pipe):
    image = random_image(64, 96)
    pt = run(pipe, image, output_type="pt").images
    assert pt.shape == (1, 3, 64, 96) and 0 <= pt.min() and pt.max() <= 1
    np_out = run(pipe, image, output_type="np").images
    np.testing.assert_allclose(np_out[0], pt[0].permute(1, 2, 0).numpy())
    latent = run(pipe, image, output_type="latent").images
    assert latent.shape == (1, 4, 8, 16)  # the padded latent (96 -> 128 px)
    pil = np.asarray(run(pipe, image).images[0])
    # uint8 conversion truncates, as the reference does.
    assert np.array_equal(pil, (np_out[0] * 255).astype(np.uint8))


def test_color_fix_can_be_turned_off(pipe):
    image = random_image(64, 64)
    with_fix = run(pipe, image, output_type="pt").images
    without = run(pipe, image, output_type="pt", color_fix=False).images
    source = image_to_tensor(image)
    assert (with_fix.mean((2, 3)) - source.mean((2, 3))).abs().max() < 0.02
    assert not torch.allclose(with_fix, without)


def test_batched_guidance_equals_separate_branches(pipe):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    c = torch.randn(1, 4, 8, 8, generator=gen)
    t = torch.tensor(500)
    cond, neg = pipe.encode_prompt("sharp photo"), pipe.encode_prompt("blurry")
    eps_c, z_c = pipe.make_denoiser(c, cond)(x, t)
    eps_u, _ = pipe.make_denoiser(c, neg)(x, t)
    eps, z = pipe.make_denoiser(c, cond, neg, guidance_scale=4.0)(x, t)
    torch.testing.assert_close(eps, eps_u + 4.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z, z_c, atol=1e-5, rtol=1e-4)
    # The unconditional branch may read its own posterior sample, as in the reference.
    c_neg = torch.randn(1, 4, 8, 8, generator=gen)
    eps_u2, _ = pipe.make_denoiser(c_neg, neg)(x, t)
    eps2, z2 = pipe.make_denoiser(c, cond, neg, guidance_scale=4.0, negative_condition=c_neg)(x, t)
    torch.testing.assert_close(eps2, eps_u2 + 4.0 * (eps_c - eps_u2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z2, z_c, atol=1e-5, rtol=1e-4)


def test_guided_call_draws_a_posterior_sample_per_branch(pipe, monkeypatch):
    """``pipe(image, guidance_scale != 1)``: the unconditional branch's condition is a
    second posterior sample, drawn right after the conditional one (the reference's order)."""
    seen = []
    original = pipe.make_denoiser

    def spy(condition, *args, negative_condition=None, **kwargs):
        seen.append((condition, negative_condition))
        return original(condition, *args, negative_condition=negative_condition, **kwargs)

    monkeypatch.setattr(pipe, "make_denoiser", spy)
    image = random_image(64, 64)
    run(pipe, image, output_type="latent", guidance_scale=3.0, num_inference_steps=1)
    condition, negative = seen[0]
    expected = pipe.encode_condition(image_to_tensor(image), torch.Generator().manual_seed(0), num_samples=2)
    torch.testing.assert_close(torch.cat([condition, negative]), expected)
    assert not torch.equal(condition, negative)


def test_guidance_changes_the_result(pipe):
    image = random_image(64, 64)
    plain = run(pipe, image, output_type="pt").images
    guided = run(pipe, image, output_type="pt", guidance_scale=5.0).images
    assert not torch.allclose(plain, guided)


def test_prompt_embeddings_are_cached(pipe):
    first = pipe.encode_prompt("a cat")
    assert pipe.encode_prompt("a cat") is first
    assert not torch.equal(pipe.encode_prompt("a dog"), first)


def test_lkpn_images_are_returned(pipe):
    out = run(pipe, random_image(70, 90), return_lkpn_images=True)
    assert out.lkpn_images[0].size == (90, 70)


def test_callback_sees_every_step_and_can_replace_latents(pipe):
    seen = []

    def record(p, i, t, kwargs):
        seen.append((i, int(t), kwargs["latents"].shape, kwargs["restored_latents"].shape))
        return {}

    run(pipe, random_image(64, 64), num_inference_steps=4, callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["latents", "restored_latents"])
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert all(s[2] == s[3] == (1, 4, 8, 8) for s in seen)

    def zero_latents(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = run(pipe, random_image(64, 64), num_inference_steps=1, output_type="latent",
              callback_on_step_end=zero_latents).images
    assert out.abs().max() == 0


def test_interrupt_from_callback_stops_sampling(pipe):
    calls = []

    def stop(p, i, t, kwargs):
        calls.append(i)
        p.interrupt = True
        return {}

    run(pipe, random_image(64, 64), num_inference_steps=5, callback_on_step_end=stop)
    assert calls == [0]


def test_unknown_callback_tensor_is_rejected(pipe):
    with pytest.raises(ValueError, match="callback tensor"):
        run(pipe, random_image(64, 64), callback_on_step_end=lambda *a: {},
            callback_on_step_end_tensor_inputs=["noise"])


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DeblurDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    image = random_image(64, 64)
    # Differently loaded weights sit at other addresses, where MKL may round differently.
    torch.testing.assert_close(run(loaded, image, output_type="pt").images, run(pipe, image, output_type="pt").images,
                               rtol=1e-4, atol=1e-5)


def test_bfloat16_pipeline_runs_close_to_float32(tmp_path):
    components = build_components("tiny", seed=0)
    pipe = DeblurDiffPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = random_image(64, 64)
    reference = run(pipe, image, output_type="pt").images
    pipe.to(dtype=torch.bfloat16)
    half = run(pipe, image, output_type="pt").images
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    psnr = 10 * torch.log10(1 / (half - reference).pow(2).mean())
    assert psnr > 25, f"bf16 vs fp32 PSNR {psnr:.1f} dB"


@pytest.mark.slow
def test_a_list_of_images_with_a_generator_each_equals_the_images_run_alone(pipe):
    # 70×90 and 80×120 pad to the same 128×128 and run as one batch.
    images = [random_image(70, 90, seed=1), random_image(80, 120, seed=2), random_image(70, 90, seed=3)]
    seeds = [5, 6, 5]
    alone = [run(pipe, im, seed=s, output_type="np").images[0] for im, s in zip(images, seeds)]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    batched = pipe(images, generator=generators, num_inference_steps=3, output_type="np").images
    assert [b.shape for b in batched] == [(70, 90, 3), (80, 120, 3), (70, 90, 3)]
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    assert not np.allclose(batched[0], batched[2], atol=1e-3)  # the same seed, other pixels: another result
    same_size = pipe(images[::2], generator=[torch.Generator().manual_seed(s) for s in seeds[::2]],
                     num_inference_steps=3, output_type="np").images
    assert same_size.shape == (2, 70, 90, 3)
    np.testing.assert_allclose(same_size[1], alone[2], rtol=0, atol=1e-4)


def test_images_that_pad_to_different_sizes_or_a_wrong_number_of_generators_are_refused(pipe):
    with pytest.raises(ValueError, match="pad to the same size"):
        pipe([random_image(64, 64), random_image(64, 130)], num_inference_steps=1)
    with pytest.raises(ValueError, match="one per image"):
        pipe([random_image(64, 64)] * 2, generator=[torch.Generator()], num_inference_steps=1)


def test_a_saved_folder_loads_in_a_fresh_process_also_when_saved_before_the_subpackages(tmp_path):
    # diffusers resolves the tokenizer's class only among imported modules, by the path that
    # model_index.json records: a new process has imported nothing yet.
    components = build_components("tiny")
    components["tokenizer"] = OpenCLIPTokenizer()
    new, old = tmp_path / "new", tmp_path / "old"
    DeblurDiffPipeline(**components).save_pretrained(new)
    shutil.copytree(new, old)
    index = json.loads((old / "model_index.json").read_text())
    assert index["tokenizer"] == ["deblurdiff.models.tokenizer", "OpenCLIPTokenizer"]
    index["tokenizer"][0] = "deblurdiff.tokenizer"  # as folders saved by earlier versions say
    (old / "model_index.json").write_text(json.dumps(index))
    script = "import sys\nfrom deblurdiff import load_pipeline\nfor p in sys.argv[1:]:\n    print(type(load_pipeline(p).tokenizer).__name__)"
    done = subprocess.run([sys.executable, "-c", script, str(new), str(old)], capture_output=True, text=True,
                          cwd=Path(__file__).parent.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["OpenCLIPTokenizer", "OpenCLIPTokenizer"]


def test_a_scheduler_whose_step_takes_no_generator_can_be_swapped_in():
    from diffusers import UniPCMultistepScheduler

    pipe = tiny_pipeline()
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    image = random_image(64, 64)
    out = run(pipe, image, output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    assert not np.array_equal(out, run(tiny_pipeline(), image, output_type="np").images)
