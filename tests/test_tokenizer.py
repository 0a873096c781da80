"""The packaged OpenCLIP tokenizer: ids equal the reference's ``tokenize`` (recorded by
``scripts/make_parity_fixtures.py tokenizer``), with no network and no download."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from deblurdiff.models import single_file
from deblurdiff.models.configs import make_test_tokenizer
from deblurdiff.models.single_file import load_tokenizer
from deblurdiff.models.tokenizer import DEFAULT_VOCAB_PATH, OpenCLIPTokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_parity.json"
RECORDED = json.loads(FIXTURE.read_text())
CASES = RECORDED["cases"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def encode(tokenizer, prompts):
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def test_fixture_covers_the_required_kinds_of_prompt():
    prompts = [c["prompt"] for c in CASES]
    assert len(prompts) >= 30
    assert "" in prompts
    assert any(sum(i != 0 for i in c["ids"]) == RECORDED["context_length"] for c in CASES), "none longer than 77 tokens"
    assert any("&amp;" in p for p in prompts) and any(ord(ch) > 0xFFFF for p in prompts for ch in p)


@pytest.mark.parametrize("case", CASES, ids=[f"{i}:{c['prompt'][:24]!r}" for i, c in enumerate(CASES)])
def test_ids_equal_the_reference(tokenizer, case):
    assert encode(tokenizer, [case["prompt"]])[0].tolist() == case["ids"]


def test_a_batch_equals_the_reference(tokenizer):
    ids = encode(tokenizer, [c["prompt"] for c in CASES])
    assert ids.tolist() == [c["ids"] for c in CASES]


def test_default_tokenizer_is_the_packaged_one_with_openclip_conventions(tokenizer):
    assert isinstance(tokenizer, OpenCLIPTokenizer)
    assert Path(tokenizer.vocab_file) == DEFAULT_VOCAB_PATH
    assert len(tokenizer) == tokenizer.vocab_size == 49408
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 49406, 49407)
    assert tokenizer.model_max_length == 77


def test_loads_without_network_access(tmp_path):
    """A child process where any socket connection fails, and the Hub is off."""
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise OSError('network disabled in this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from deblurdiff.models.single_file import load_tokenizer\n"
        "tok = load_tokenizer()\n"
        "print(tok('a cat').input_ids)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[49406, 320, 2368, 49407]"


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / DEFAULT_VOCAB_PATH.name).is_file()
    again = load_tokenizer(tmp_path / "tok")
    assert isinstance(again, OpenCLIPTokenizer)
    prompts = [c["prompt"] for c in CASES[:8]]
    assert encode(again, prompts).tolist() == encode(tokenizer, prompts).tolist()


def test_decode_gives_the_cleaned_text_back(tokenizer):
    ids = tokenizer("A  Photo of a CAT &amp; a dog!").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat & a dog !"
    assert tokenizer.decode(ids).startswith("<start_of_text> a photo")
    # "!" shares id 0 with the padding: inside the text it is kept, after the end it is not.
    padded = encode(tokenizer, ["wow !~"])[0].tolist()
    assert 0 in padded[1 : padded.index(tokenizer.eos_token_id)]
    assert tokenizer.decode(padded, skip_special_tokens=True) == "wow !~"


def test_tokenizer_override_still_accepted(tmp_path):
    """``--tokenizer`` keeps working for a CLIPTokenizer folder (vocab.json + merges.txt)."""
    from transformers import CLIPTokenizer

    from deblurdiff.models.configs import make_test_tokenizer

    make_test_tokenizer(tmp_path / "clip")
    tok = load_tokenizer(tmp_path / "clip")
    assert isinstance(tok, CLIPTokenizer) and not isinstance(tok, OpenCLIPTokenizer)


@pytest.mark.slow
def test_vocabulary_ships_in_the_built_package(tmp_path):
    """The vocabulary (and its licence) are package data: a wheel built from the project holds them."""
    import shutil
    import zipfile

    root = Path(__file__).parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "deblurdiff", src / "deblurdiff", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pyproject.toml", src)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "wheel").glob("deblurdiff-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert f"deblurdiff/data/{DEFAULT_VOCAB_PATH.name}" in names
    assert "deblurdiff/data/LICENSE-CLIP-vocabulary.txt" in names


def test_the_official_checkpoint_loads_with_no_tokenizer_argument():
    """``--model model.pth`` needs nothing from the network: the packaged tokenizer is used."""
    from deblurdiff.models.single_file import load_single_file_components
    from test_convert import CHECKPOINT, HEAD_DIM

    components = load_single_file_components(CHECKPOINT, attention_head_dim=HEAD_DIM)
    assert isinstance(components["tokenizer"], OpenCLIPTokenizer)


def test_a_hub_tokenizer_in_the_cache_loads_without_asking_the_hub(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--owner--tok" / "snapshots" / ("0" * 40)
    make_test_tokenizer(snapshot)
    (tmp_path / "hub" / "models--owner--tok" / "refs").mkdir()
    (tmp_path / "hub" / "models--owner--tok" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def probed(*args, **kwargs):
        raise AssertionError("the Hub was asked for a tokenizer that is in the cache")

    monkeypatch.setattr(single_file, "_hub_reachable", probed)
    tok = single_file.load_tokenizer("owner/tok")
    assert len(tok.get_vocab()) > 2 and tok("abc").input_ids[0] == 49406
