"""The single-file converter: formats, error reporting, architecture inference, CLI, round trips.

The checkpoint is the parity fixture (a small reference ControlLDM in the official
layout, see scripts/make_parity_fixtures.py). Nothing here reaches the network.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FLOAT32_ROUNDING
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from deblurdiff import convert
from deblurdiff.models.single_file import (
    CheckpointError,
    TokenizerUnavailableError,
    convert_deblurdiff_checkpoint,
    load_single_file_components,
    load_tokenizer,
    read_checkpoint,
)
from deblurdiff.models import LatentControlNetModel, LKPNModel
from deblurdiff.models.configs import SIZES, build_components, text_config
from deblurdiff.pipeline.pipeline_deblurdiff import DeblurDiffPipeline

FIXTURES = Path(__file__).parent / "fixtures" / "parity"
CHECKPOINT = FIXTURES / "checkpoint.safetensors"
META = json.loads((FIXTURES / "metadata.json").read_text())
HEAD_DIM = META["attention_head_dim"]


@pytest.fixture(scope="module")
def state_dict():
    return load_file(str(CHECKPOINT))


def small_vocab_tokenizer(directory: Path) -> Path:
    """A character-level CLIP tokenizer whose ids fit the fixture's 1000-token vocabulary
    (start/end of text are its last two ids, as in the fixture)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"!": 0}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = META["vocab_size"] - 2
    vocab["<|endoftext|>"] = META["vocab_size"] - 1
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!")
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(directory)
    return directory


def test_pth_ckpt_and_safetensors_load_the_same(state_dict, tmp_path):
    torch.save(state_dict, tmp_path / "model.pth")
    torch.save({"state_dict": state_dict, "global_step": 3}, tmp_path / "model.ckpt")
    shutil.copy(CHECKPOINT, tmp_path / "model.safetensors")
    for name in ("model.pth", "model.ckpt", "model.safetensors"):
        loaded = read_checkpoint(tmp_path / name)
        assert loaded.keys() == state_dict.keys(), name
        assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict), name
    with pytest.raises(ValueError, match="Unsupported checkpoint format"):
        (tmp_path / "model.onnx").write_bytes(b"")
        read_checkpoint(tmp_path / "model.onnx")


def test_pth_converts_like_safetensors(state_dict, tmp_path):
    torch.save(state_dict, tmp_path / "model.pth")
    a = convert_deblurdiff_checkpoint(read_checkpoint(tmp_path / "model.pth"), attention_head_dim=HEAD_DIM)
    b = convert_deblurdiff_checkpoint(read_checkpoint(CHECKPOINT), attention_head_dim=HEAD_DIM)
    for name in a:
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_every_key_problem_is_reported_in_one_error(state_dict):
    sd = dict(state_dict)
    sd["unet.input_blocks.1.0.extra.weight"] = torch.zeros(3)  # unknown, known prefix
    sd["ema.decay"] = torch.zeros(())  # unknown prefix
    sd["kpn.bias"] = torch.zeros(3)  # unknown inside the LKPN
    del sd["controlnet.zero_convs.1.0.weight"]  # missing
    del sd["clip.model.transformer.resblocks.0.mlp.c_fc.bias"]  # missing (text encoder)
    sd["vae.decoder.conv_in.weight"] = torch.zeros(32, 4, 1, 1)  # mis-shaped
    with pytest.raises(CheckpointError) as info:
        convert_deblurdiff_checkpoint(sd, attention_head_dim=HEAD_DIM)
    err = info.value
    assert set(err.unknown_keys) == {"unet.input_blocks.1.0.extra.weight", "ema.decay", "kpn.bias"}
    assert err.missing_keys == [
        "controlnet.controlnet_down_blocks.1.weight",
        "text_encoder.encoder.layers.0.mlp.fc1.bias",
    ]
    assert [(k.split(" ")[0], a, b) for k, a, b in err.mismatched_keys] == [
        ("vae.decoder.conv_in.weight", (32, 4, 1, 1), (32, 4, 3, 3))
    ]
    message = str(err)
    for key in ("ema.decay", "kpn.bias", "controlnet_down_blocks.1.weight", "vae.decoder.conv_in.weight"):
        assert key in message


def test_unreadable_architecture_and_missing_networks_are_reported(state_dict):
    sd = {k: v for k, v in state_dict.items() if not k.startswith("kpn.")}
    del sd["unet.input_blocks.0.0.weight"]
    with pytest.raises(CheckpointError) as info:
        convert_deblurdiff_checkpoint(sd, attention_head_dim=HEAD_DIM)
    err = info.value
    assert "unet.input_blocks.0.0.weight" in err.missing_keys
    assert any("no lkpn weights" in m for m in err.other)
    assert any(m.startswith("unet:") for m in err.other)


def test_wrong_head_size_is_a_checkpoint_error(state_dict):
    with pytest.raises(CheckpointError, match="attention head size 64"):
        convert_deblurdiff_checkpoint(state_dict)  # 32-channel levels cannot have 64-channel heads


def test_ignored_text_entries_and_ldm_prefixes(state_dict):
    sd = {("model.diffusion_model." + k[5:] if k.startswith("unet.") else k): v for k, v in state_dict.items()}
    sd["clip.model.visual.proj"] = torch.zeros(4, 4)  # a visual tower is ignored
    sd["clip.model.attn_mask"] = torch.zeros(77, 77)
    components = convert_deblurdiff_checkpoint(sd, attention_head_dim=HEAD_DIM)
    # The reference keeps the text tower's last layer in the checkpoint; the penultimate
    # output never runs it, so the encoder has one layer fewer.
    layers = META["configs"]["clip"]["text_cfg"]["layers"]
    assert components["text_encoder"].config.num_hidden_layers == layers - 1


def test_dtype(state_dict):
    components = convert_deblurdiff_checkpoint(state_dict, attention_head_dim=HEAD_DIM, torch_dtype=torch.bfloat16)
    for name, module in components.items():
        assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, name
        assert not any(p.is_meta for p in module.parameters()), name


def test_full_size_architecture_is_inferred_from_the_reference_shapes():
    """The full-size reference state dict (key -> shape, recorded from the reference built on
    the meta device) converts completely and gives the full-size configs."""
    with gzip.open(FIXTURES / "reference_full_shapes.json.gz", "rt") as f:
        shapes = json.load(f)
    sd = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    components = convert_deblurdiff_checkpoint(sd)
    full = SIZES["full"]

    def same(config, expected):
        for key, value in expected.items():
            got = config[key]
            got = list(got) if isinstance(got, (list, tuple)) else got
            assert got == (list(value) if isinstance(value, (list, tuple)) else value), key

    same(components["unet"].config, {k: v for k, v in full["unet"].items() if k != "sample_size"})
    same(components["controlnet"].config, full["controlnet"])
    same(components["lkpn"].config, full["lkpn"])
    same(components["vae"].config, full["vae"])
    text = components["text_encoder"].config
    expected_text = text_config(**full["text"])
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id", "eos_token_id"):
        assert getattr(text, key) == getattr(expected_text, key), key
    assert components["controlnet"].config.hint_channels == 8
    assert components["lkpn"].config.kernel_size == 5


def test_tokenizer_errors_say_how_to_pass_one(tmp_path):
    with pytest.raises(TokenizerUnavailableError, match="--tokenizer"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerUnavailableError, match="--tokenizer"):
        load_tokenizer(tmp_path / "empty")
    tok = load_tokenizer(small_vocab_tokenizer(tmp_path / "tok"))
    assert tok("a").input_ids == [998, tok.get_vocab()["a</w>"], 999]
    assert load_tokenizer(tok) is tok


def test_from_single_file_with_a_tokenizer_object(tmp_path):
    tok = load_tokenizer(small_vocab_tokenizer(tmp_path / "tok"))
    components = load_single_file_components(CHECKPOINT, tokenizer=tok, attention_head_dim=HEAD_DIM)
    assert components["tokenizer"] is tok
    assert components["scheduler"].config.num_train_timesteps == 1000
    pipe = DeblurDiffPipeline.from_single_file(CHECKPOINT, tokenizer=tok, attention_head_dim=HEAD_DIM)
    assert pipe.encode_prompt("").shape == (1, 77, 32)


def test_cli_writes_a_pipeline_folder(tmp_path, capsys):
    tok_dir = small_vocab_tokenizer(tmp_path / "tok")
    out = tmp_path / "pipe"
    rc = convert.main(
        [str(CHECKPOINT), str(out), "--dtype", "fp16", "--tokenizer", str(tok_dir), "--attention-head-dim", str(HEAD_DIM)]
    )
    assert rc == 0, capsys.readouterr().err
    assert (out / "model_index.json").exists()
    for name in ("unet", "controlnet", "lkpn", "vae"):
        weights = load_file(str(out / name / "diffusion_pytorch_model.safetensors"))
        assert {v.dtype for v in weights.values()} == {torch.float16}, name
    assert {v.dtype for v in load_file(str(out / "text_encoder" / "model.safetensors")).values()} == {torch.float16}

    pipe = DeblurDiffPipeline.from_pretrained(out, torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.lkpn.dtype == torch.float16
    pipe = DeblurDiffPipeline.from_pretrained(out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64)
    result = pipe(image, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert result.images.shape == (1, 3, 64, 64) and torch.isfinite(result.images).all()


def test_cli_reports_errors(tmp_path, capsys):
    sd = load_file(str(CHECKPOINT))
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "bad.safetensors"))
    tok_dir = small_vocab_tokenizer(tmp_path / "tok")
    args = ["--tokenizer", str(tok_dir), "--attention-head-dim", str(HEAD_DIM)]
    assert convert.main([str(tmp_path / "bad.safetensors"), str(tmp_path / "out"), *args]) == 1
    assert "extra.weight" in capsys.readouterr().err
    assert convert.main([str(CHECKPOINT), str(tmp_path / "out"), "--tokenizer", str(tmp_path / "nope")]) == 1
    assert "--tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["lkpn", "controlnet"])
def test_save_load_round_trip_gives_the_same_outputs(name, tmp_path):
    torch.manual_seed(0)
    model = build_components("tiny", seed=1)[name].eval()
    with torch.no_grad():  # the zero-initialised output convolutions would hide a lost weight
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / name, safe_serialization=True)
    cls = LKPNModel if name == "lkpn" else LatentControlNetModel
    loaded = cls.from_pretrained(tmp_path / name).eval()
    public = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))  # noqa: E731
    assert public(loaded.config) == public(model.config)
    g = torch.Generator().manual_seed(0)
    c, x = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    text = torch.randn(1, 77, model.config.cross_attention_dim, generator=g)
    t = torch.tensor([321])
    with torch.no_grad():
        if name == "lkpn":
            torch.testing.assert_close(loaded(c, x, t, text), model(c, x, t, text), **FLOAT32_ROUNDING)
        else:
            hint = torch.cat([c, x], 1)
            (down_a, mid_a), (down_b, mid_b) = loaded(x, t, text, hint), model(x, t, text, hint)
            for a, b in zip(down_a + (mid_a,), down_b + (mid_b,)):
                torch.testing.assert_close(a, b, **FLOAT32_ROUNDING)
