"""The text encoder is only needed for custom prompts: saved folders carry the default
prompts' embeddings and loading defers the text encoder (tiny random models)."""

import pytest
import torch

from deblurdiff import DeblurDiffPipeline, load_pipeline
from deblurdiff.models.configs import build_components
from conftest import FLOAT32_ROUNDING, random_image, tiny_pipeline
from deblurdiff.pipeline.pipeline_deblurdiff import (
    DEFAULT_NEGATIVE_PROMPT,
    DEFAULT_PROMPT,
    PROMPT_EMBEDS_FILE,
    load_prompt_embeds,
    save_prompt_embeds,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return pipe, folder


def image():
    return random_image(64, 64)


def run(pipe, **kw):
    return pipe(image(), num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images


def test_save_writes_the_default_prompt_embeddings(saved):
    pipe, folder = saved
    stored = load_prompt_embeds(folder / PROMPT_EMBEDS_FILE)
    assert set(stored) == {DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT}
    for prompt, embeds in stored.items():
        assert embeds.dtype == torch.float32
        torch.testing.assert_close(embeds, pipe.encode_prompt(prompt), **FLOAT32_ROUNDING)


def test_loading_defers_the_text_encoder_until_a_custom_prompt(saved):
    pipe, folder = saved
    loaded = DeblurDiffPipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder is None and loaded.tokenizer is not None
    # Default prompts (with guidance: both of them) need no text encoder.
    torch.testing.assert_close(run(loaded), run(pipe), **FLOAT32_ROUNDING)
    torch.testing.assert_close(run(loaded, guidance_scale=3.0), run(pipe, guidance_scale=3.0), **FLOAT32_ROUNDING)
    assert loaded.text_encoder is None
    # A custom prompt loads it, once.
    custom = loaded.encode_prompt("a sharp photo")
    assert loaded.text_encoder is not None
    torch.testing.assert_close(custom, pipe.encode_prompt("a sharp photo"))
    encoder = loaded.text_encoder
    loaded.encode_prompt("another prompt")
    assert loaded.text_encoder is encoder


def test_eager_loading_is_still_available(saved):
    _, folder = saved
    assert DeblurDiffPipeline.from_pretrained(folder, lazy_text_encoder=False).text_encoder is not None


def test_folder_without_embeddings_loads_the_text_encoder(saved, tmp_path):
    pipe, _ = saved
    super(DeblurDiffPipeline, pipe).save_pretrained(tmp_path)  # the plain diffusers layout
    assert not (tmp_path / PROMPT_EMBEDS_FILE).exists()
    assert DeblurDiffPipeline.from_pretrained(tmp_path).text_encoder is not None


def test_load_pipeline_defers_the_text_encoder(saved):
    _, folder = saved
    pipe = load_pipeline(str(folder), device="cpu", dtype="fp32")
    assert pipe.text_encoder is None
    assert run(pipe).shape == (1, 3, 64, 64)


def test_lazily_loaded_pipeline_saves_a_complete_folder(saved, tmp_path):
    _, folder = saved
    loaded = DeblurDiffPipeline.from_pretrained(folder)
    loaded.save_pretrained(tmp_path)
    assert (tmp_path / "text_encoder").is_dir() and (tmp_path / PROMPT_EMBEDS_FILE).is_file()
    assert DeblurDiffPipeline.from_pretrained(tmp_path, lazy_text_encoder=False).text_encoder is not None


def test_components_without_text_encoder_use_given_embeddings(saved, tmp_path):
    pipe, _ = saved
    components = build_components("tiny", seed=0)
    components["text_encoder"] = None
    bare = DeblurDiffPipeline(**components)
    bare.set_progress_bar_config(disable=True)
    path = tmp_path / "embeds.safetensors"
    save_prompt_embeds(path, {p: pipe.encode_prompt(p) for p in (DEFAULT_PROMPT, DEFAULT_NEGATIVE_PROMPT)})
    bare.set_prompt_embeds(path)
    torch.testing.assert_close(run(bare), run(pipe), **FLOAT32_ROUNDING)
    with pytest.raises(RuntimeError, match="no text encoder"):
        bare.encode_prompt("a custom prompt")
