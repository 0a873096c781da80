"""The service layer: validated options, one restored image, its PNG metadata."""

import pytest
from conftest import random_image, tiny_pipeline
from PIL import Image

from deblurdiff.image_io import InvalidInputError
from deblurdiff.pipeline import DEFAULT_NEGATIVE_PROMPT
from deblurdiff.service import RestoreOptions, make_options, png_metadata, restore


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_make_options_validates_and_keeps_what_was_given():
    options = make_options(steps="3", seed="7", guidance_scale="2.5", prompt="a cat", negative_prompt="", tiling="on", sampler="ddim")
    assert options == RestoreOptions(steps=3, seed=7, guidance_scale=2.5, prompt="a cat", negative_prompt="", tiled=True, sampler="ddim")
    assert make_options().negative_prompt is None and make_options().sampler == "ddpm"
    assert 0 <= make_options(seed=None).seed < 2**32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps must be between"),
        (dict(tiling="sometimes"), "Tiling must be one of"),
        (dict(sampler="euler"), "sampler must be one of"),
        (dict(prompt=3), "prompt must be text"),
        (dict(negative_prompt="x" * 2000), "negative prompt is too long"),
    ],
)
def test_make_options_refuses_bad_input(kwargs, message):
    with pytest.raises(InvalidInputError, match=message):
        make_options(**kwargs)


def test_pipeline_kwargs_pass_the_negative_prompt_only_when_given():
    assert "negative_prompt" not in RestoreOptions().pipeline_kwargs()
    assert RestoreOptions(negative_prompt="").pipeline_kwargs()["negative_prompt"] == ""
    kwargs = RestoreOptions(steps=4, guidance_scale=3.0, tiled=False, sampler="ddim").pipeline_kwargs()
    assert (kwargs["num_inference_steps"], kwargs["guidance_scale"], kwargs["tiled"], kwargs["sampler"]) == (4, 3.0, False, "ddim")


def test_restore_reports_steps_and_stops_when_asked(pipe):
    image = random_image(64, 64)
    seen = []
    result = restore(pipe, image, RestoreOptions(steps=3), on_step=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)] and not result.interrupted and result.image.size == (64, 64)
    seen.clear()
    stopped = restore(pipe, image, RestoreOptions(steps=10), on_step=lambda d, t: seen.append(d), should_stop=lambda: len(seen) >= 2)
    assert stopped.interrupted and seen == [1, 2]


def test_png_metadata_records_the_options(pipe, tmp_path):
    options = RestoreOptions(steps=2, seed=5, guidance_scale=2.0, negative_prompt=DEFAULT_NEGATIVE_PROMPT, return_lkpn_image=True)
    result = restore(pipe, random_image(64, 64), options)
    assert result.lkpn_image is not None
    path = tmp_path / "out.png"
    result.image.save(path, pnginfo=png_metadata(result, model="owner/weights", untrained=True, extra={"source": "a.jpg"}))
    text = Image.open(path).text
    assert text["deblurdiff:steps"] == "2" and text["deblurdiff:seed"] == "5" and text["deblurdiff:guidance_scale"] == "2"
    assert text["deblurdiff:negative_prompt"] == DEFAULT_NEGATIVE_PROMPT and text["deblurdiff:sampler"] == "ddpm"
    assert text["deblurdiff:model"] == "owner/weights" and "UNTRAINED" in text["deblurdiff:warning"]
    assert text["deblurdiff:source"] == "a.jpg" and "deblurdiff:return_lkpn_image" not in text
