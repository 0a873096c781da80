"""The service layer: validated options, one restored image, its PNG metadata."""

import inspect

import numpy as np
import pytest
from conftest import random_image, tiny_pipeline
from PIL import Image

from deblurdiff import service
from deblurdiff.image_io import InvalidInputError
from deblurdiff.pipeline.pipeline_deblurdiff import DEFAULT_NEGATIVE_PROMPT, DeblurDiffPipeline
from deblurdiff.service import MAX_SEED, RestoreOptions, make_options, png_metadata, restore


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


def test_steps_seed_and_guidance_accept_numbers_and_numeric_text():
    options = make_options(steps="20", seed=" 7 ", guidance_scale="2.5")
    assert (options.steps, options.seed, options.guidance_scale) == (20, 7, 2.5)
    assert type(options.steps) is int and type(options.seed) is int and type(options.guidance_scale) is float
    options = make_options(steps=30.0, seed=3.0, guidance_scale=4)
    assert (options.steps, options.seed, options.guidance_scale) == (30, 3, 4.0) and type(options.guidance_scale) is float
    options = make_options(steps=np.int64(1), seed=np.uint32(MAX_SEED), guidance_scale=np.float32(10.0))
    assert (options.steps, options.seed, options.guidance_scale) == (1, MAX_SEED, 10.0)
    assert make_options(guidance_scale="7.25").guidance_scale == 7.25


def test_defaults_are_the_pipelines_and_the_limits_hold_at_their_edges():
    call = inspect.signature(DeblurDiffPipeline.__call__).parameters
    assert make_options().steps == call["num_inference_steps"].default
    assert make_options().guidance_scale == call["guidance_scale"].default
    for name, low, high, step in (
        ("steps", service.MIN_STEPS, service.MAX_STEPS, 1),
        ("seed", service.MIN_SEED, service.MAX_SEED, 1),
        ("guidance_scale", service.MIN_GUIDANCE, service.MAX_GUIDANCE, 0.01),
    ):
        assert getattr(make_options(**{name: low}), name) == low and getattr(make_options(**{name: high}), name) == high
        with pytest.raises(InvalidInputError, match="must be"):
            make_options(**{name: high + step})
        if name != "seed":  # below the seed range is RANDOM_SEED (-1), which draws one
            with pytest.raises(InvalidInputError, match="must be between"):
                make_options(**{name: low - step})


@pytest.mark.parametrize("seed", [None, -1, "-1", "", "  "])
def test_random_seed(seed):
    seeds = {make_options(seed=seed).seed for _ in range(5)}
    assert all(0 <= s <= MAX_SEED for s in seeds) and len(seeds) > 1


@pytest.mark.parametrize(
    "steps, seed, guidance, expected",
    [
        (0, 1, 1.0, r"steps must be between 1 and 100; got 0"),
        (101, 1, 1.0, r"steps must be between 1 and 100; got 101"),
        (12.5, 1, 1.0, r"steps must be a whole number .*got 12.5"),
        (float("nan"), 1, 1.0, r"steps must be a finite whole number"),
        (float("inf"), 1, 1.0, r"steps must be a finite whole number"),
        (True, 1, 1.0, r"steps must be a number .*not True"),
        (np.bool_(True), 1, 1.0, r"steps must be a number .*not"),
        ("many", 1, 1.0, r"steps must be a number .*got 'many'"),
        ("", 1, 1.0, r"number of steps is empty"),
        ([5], 1, 1.0, r"got a value of type 'list'"),
        (10, -2, 1.0, r"seed must be a whole number from 0 to 4294967295, or -1 .*got -2"),
        (10, 2**32, 1.0, r"seed must be .*got 4294967296"),
        (10, 1.5, 1.0, r"seed must be a whole number"),
        (10, "abc", 1.0, r"seed must be a number"),
        (10, False, 1.0, r"seed must be a number .*not False"),
        (10, 1, 0.5, r"guidance scale must be between 1 and 10; got 0.5"),
        (10, 1, 10.5, r"guidance scale must be between 1 and 10; got 10.5"),
        (10, 1, float("nan"), r"guidance scale must be a finite number"),
        (10, 1, "inf", r"guidance scale must be a finite number"),
        (10, 1, "1,5", r"guidance scale must be a number .*got '1,5'"),
        (10, 1, None, r"guidance scale must be a number .*'NoneType'"),
    ],
)
def test_steps_seed_and_guidance_refuse_bad_values(steps, seed, guidance, expected):
    with pytest.raises(InvalidInputError, match=expected):
        make_options(steps=steps, seed=seed, guidance_scale=guidance)


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


@pytest.mark.parametrize("value", [10**400, -(10**400), "9" * 400])
def test_numbers_beyond_floats_range_get_a_clear_message(value):
    # JSON from the API can carry integers of any length; float() would overflow or give inf.
    with pytest.raises(InvalidInputError, match="got a number far too large"):
        service.in_range(value, "Steps", 1, 100)
    with pytest.raises(InvalidInputError, match="got a number far too large"):
        service.in_range(value, "The guidance scale", 1, 10, whole=False)
    with pytest.raises(InvalidInputError, match="got a number far too large"):
        service.validate_seed(value)
