"""The authors' checkpoint fetched by itself: download, verification, conversion, cache, and
every failure's message. Offline: the downloader is replaced by one that serves the tiny
parity checkpoint (a small reference ControlLDM in the official layout) from the fixtures."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deblurdiff.pipeline import weights
from deblurdiff.pipeline.loading import ModelUnavailableError, load_pipeline

from test_convert import HEAD_DIM, small_vocab_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "parity"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny checkpoint as the downloader would serve it (a torch zip archive, like model.pth)."""
    path = tmp_path_factory.mktemp("served") / "model.pth"
    torch.save(load_file(str(FIXTURES / "checkpoint.safetensors")), path)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    # The fixture's text tower has 1000 tokens; the packaged tokenizer's ids go to 49407.
    return str(small_vocab_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    for name in ("DEBLURDIFF_MODEL", "DEBLURDIFF_TOKENIZER", weights.NO_DOWNLOAD_ENV, "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(weights, "ATTENTION_HEAD_DIM", HEAD_DIM)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FixtureDownloader:
    """Serves the fixture checkpoint; ``plan`` says what each call delivers instead."""

    def __init__(self, source: Path, *plan):
        self.source, self.plan, self.calls = source, list(plan), 0

    def __call__(self, destination: Path) -> None:
        self.calls += 1
        what = self.plan.pop(0) if self.plan else "good"
        data = self.source.read_bytes()
        if isinstance(what, BaseException):
            raise what
        if what == "truncated":
            data = data[: len(data) // 2]
        elif what == "corrupted":  # same size, a few bytes changed inside a tensor
            middle = len(data) // 2
            data = data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 8]) + data[middle + 8 :]
        elif what == "html":
            data = b"<!DOCTYPE html><html><body>Google Drive - Too many users have viewed or downloaded this file recently.</body></html>"
        elif what == "other":
            buffer = destination.with_suffix(".tmp")
            torch.save({"model.weight": torch.ones(3)}, buffer)
            data = buffer.read_bytes()
            buffer.unlink()
        destination.write_bytes(data)


def start(downloader=None, dtype="fp32", tokenizer=None, **kwargs):
    return load_pipeline(None, tokenizer=tokenizer, device="cpu", dtype=dtype, downloader=downloader, **kwargs)


def official(tmp_path) -> Path:
    return tmp_path / "cache" / "official"


def test_first_start_downloads_verifies_converts_and_caches(served, tokenizer_dir, tmp_path, capsys):
    downloader = FixtureDownloader(served)
    pipe = start(downloader, tokenizer=tokenizer_dir)
    log = capsys.readouterr().err
    assert downloader.calls == 1
    root = official(tmp_path)
    record = json.loads((root / "model.pth.sha256").read_text())
    assert record["sha256"] == sha256(served) == sha256(root / "model.pth")
    assert record["size"] == served.stat().st_size
    folder = root / "diffusers-fp32"
    assert (folder / weights.COMPLETE_MARKER).is_file()
    assert json.loads((folder / weights.COMPLETE_MARKER).read_text())["source_sha256"] == record["sha256"]
    assert list(folder.glob("unet/*.safetensors")) and not list(folder.rglob("*.bin"))
    assert not list(root.glob("*.unverified.pth")) and not list(root.glob("*.partial"))
    for step in ("Downloading", "Verifying", "Verified: SHA-256", "Converting", "Converted"):
        assert step in log
    # The cached weights are the checkpoint's (both float16-rounded values, read in float32).
    expected = load_file(str(FIXTURES / "checkpoint.safetensors"))["vae.decoder.conv_out.weight"].float()
    torch.testing.assert_close(pipe.vae.decoder.conv_out.weight.detach(), expected, rtol=0, atol=0)
    assert not pipe.untrained


def test_second_start_loads_the_cache_without_the_downloader(served, tokenizer_dir, tmp_path, capsys):
    start(FixtureDownloader(served), tokenizer=tokenizer_dir)
    capsys.readouterr()

    def must_not_download(destination):
        raise AssertionError("the downloader was called although the cache is complete")

    pipe = start(must_not_download, allow_download=False)
    log = capsys.readouterr().err
    for step in ("Downloading", "Verifying", "Checking", "Converting"):  # no download, hashing or conversion
        assert step not in log
    assert pipe.unet is not None


@pytest.fixture
def native_bf16(monkeypatch):
    """This CPU as one that runs bfloat16 natively, so that a bf16 conversion is allowed
    whatever machine the tests run on (these tests are about the files, not the speed)."""
    from deblurdiff.cpu import tuning as cpu

    import dataclasses

    features = dataclasses.replace(cpu.cpu_features(), avx512_bf16=True)
    monkeypatch.setattr(cpu, "cpu_features", lambda: features)


def test_each_dtype_is_converted_once_from_the_verified_file(served, tokenizer_dir, tmp_path, native_bf16):
    downloader = FixtureDownloader(served)
    start(downloader, tokenizer=tokenizer_dir)
    pipe = start(downloader, dtype="bf16", tokenizer=tokenizer_dir)
    assert downloader.calls == 1
    assert pipe.unet.dtype == torch.bfloat16
    assert weights.is_complete(official(tmp_path) / "diffusers-bf16")
    assert any(f.stat().st_size for f in (official(tmp_path) / "diffusers-bf16").glob("unet/*.safetensors"))


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "html", "other"])
def test_a_bad_download_is_refused_and_fetched_again(served, tokenizer_dir, tmp_path, capsys, damage):
    downloader = FixtureDownloader(served, damage, "good")
    start(downloader, tokenizer=tokenizer_dir)
    log = capsys.readouterr().err
    assert downloader.calls == 2
    assert "Refused the downloaded file" in log
    reason = {
        "truncated": "truncated",
        "corrupted": "CRC",
        "html": "web page instead of the file",
        "other": "not the DeblurDiff checkpoint",
    }[damage]
    assert reason in log
    assert sha256(official(tmp_path) / "model.pth") == sha256(served)


def test_a_file_refused_twice_is_never_kept(served, tmp_path):
    downloader = FixtureDownloader(served, "truncated", "corrupted")
    with pytest.raises(ModelUnavailableError) as info:
        start(downloader)
    message = str(info.value)
    assert "refused 2 times" in message and weights.OFFICIAL_FOLDER_URL in message
    assert sorted(p.name for p in official(tmp_path).iterdir()) == [".lock"]  # nothing that could be loaded


def test_a_checkpoint_changed_on_disk_is_refused_and_fetched_again(served, tokenizer_dir, tmp_path, capsys,
                                                                   native_bf16):
    downloader = FixtureDownloader(served)
    start(downloader, tokenizer=tokenizer_dir)
    cached = official(tmp_path) / "model.pth"
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    capsys.readouterr()
    start(downloader, dtype="bf16", tokenizer=tokenizer_dir)  # a new conversion reads the file again
    log = capsys.readouterr().err
    assert "SHA-256 differs" in log and downloader.calls == 2
    assert sha256(cached) == sha256(served)


def test_a_checkpoint_placed_by_hand_is_verified_and_used(served, tokenizer_dir, tmp_path, capsys):
    official(tmp_path).mkdir(parents=True)
    shutil.copy(served, official(tmp_path) / "model.pth")
    start(None, tokenizer=tokenizer_dir, allow_download=False)
    assert "Verified: SHA-256" in capsys.readouterr().err
    assert json.loads((official(tmp_path) / "model.pth.sha256").read_text())["sha256"] == sha256(served)


def test_a_broken_cached_conversion_is_deleted_and_rebuilt(served, tokenizer_dir, tmp_path):
    downloader = FixtureDownloader(served)
    start(downloader, tokenizer=tokenizer_dir)
    folder = official(tmp_path) / "diffusers-fp32"
    for f in folder.glob("unet/*.safetensors"):
        f.write_bytes(b"not safetensors")
    with pytest.raises(ModelUnavailableError, match="deleted and is made again"):
        start(downloader, tokenizer=tokenizer_dir)
    assert not folder.exists()
    start(downloader, tokenizer=tokenizer_dir)
    assert weights.is_complete(folder) and downloader.calls == 1


@pytest.mark.parametrize(
    "failure, expected",
    [
        ("network", "No network"),
        ("quota", "too many users"),
        ("disk", "disk is full"),
        ("incomplete", "stopped before the end"),
    ],
)
def test_every_download_failure_has_a_specific_message_with_the_manual_steps(served, tmp_path, failure, expected):
    import gdown.exceptions
    import requests

    error = {
        "network": requests.exceptions.ConnectionError("Failed to resolve 'drive.google.com'"),
        "quota": gdown.exceptions.FileURLRetrievalError(
            "Failed to retrieve file url: Too many users have viewed or downloaded this file recently."
        ),
        "disk": OSError(errno.ENOSPC, "No space left on device"),
        "incomplete": gdown.exceptions.DownloadError("Download is incomplete: received 10 bytes but the server announced 99 bytes"),
    }[failure]
    with pytest.raises(ModelUnavailableError) as info:
        start(FixtureDownloader(served, error))
    message = str(info.value)
    assert expected in message
    assert weights.OFFICIAL_FOLDER_URL in message and "--model path/to/model.pth" in message
    assert "Traceback" not in message
    assert not (official(tmp_path) / "model.pth").exists()


@pytest.mark.parametrize("how", ["argument", "env", "hf_offline"])
def test_offline_without_a_cache_says_how_to_get_the_weights(served, monkeypatch, how):
    downloader = FixtureDownloader(served)
    if how == "env":
        monkeypatch.setenv(weights.NO_DOWNLOAD_ENV, "1")
    if how == "hf_offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError) as info:
        start(downloader, allow_download=False if how == "argument" else None)
    assert downloader.calls == 0
    assert "downloading the authors' checkpoint is turned off" in str(info.value) and weights.OFFICIAL_FOLDER_URL in str(info.value)


def test_gdown_downloader_finds_model_pth_in_the_authors_folder(monkeypatch, tmp_path):
    import types

    import gdown

    calls = {}
    listing = [types.SimpleNamespace(id="id-readme", path="README.txt"), types.SimpleNamespace(id="id-model", path="model.pth")]

    def download_folder(**kwargs):
        calls["folder"] = kwargs
        return listing

    def download(**kwargs):
        calls["file"] = kwargs
        Path(kwargs["output"]).write_bytes(b"x")
        return kwargs["output"]

    monkeypatch.setattr(gdown, "download_folder", download_folder)
    monkeypatch.setattr(gdown, "download", download)
    weights.gdown_download(tmp_path / "model.unverified.pth")
    assert calls["folder"]["id"] == weights.OFFICIAL_FOLDER_ID and calls["folder"]["skip_download"]
    assert calls["file"]["id"] == "id-model" and calls["file"]["output"] == str(tmp_path / "model.unverified.pth")
    assert calls["file"]["quiet"] is False and calls["file"]["resume"] is True  # progress bar; resumable

    listing.pop()
    with pytest.raises(FileNotFoundError, match="holds no model.pth"):
        weights.gdown_download(tmp_path / "again")


def test_default_cache_is_in_the_hugging_face_cache_directory(monkeypatch, tmp_path):
    monkeypatch.delenv(weights.CACHE_ENV)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert weights.official_dir() == tmp_path / "hf" / "deblurdiff" / "official"


# ---------------------------------------------------------------------------- app and CLI
def test_app_offline_without_a_cache_starts_with_a_banner_giving_the_manual_steps(tmp_path):
    from deblurdiff.space import app

    pipe, error, _ = app.load_app_model(None, device="cpu", allow_download=False)
    assert pipe is None
    banner = app.banner_text(app.DeblurApp(None, model_error=error, examples_dir=None, measure_speed=False))
    assert "cannot deblur" in banner
    assert weights.OFFICIAL_FOLDER_URL in banner and str(official(tmp_path) / "model.pth") in banner


def test_app_without_network_starts_with_a_banner_saying_so(served, monkeypatch):
    import requests

    from deblurdiff.space import app

    monkeypatch.setattr(weights, "gdown_download", FixtureDownloader(served, requests.exceptions.ConnectionError("offline")))
    pipe, error, _ = app.load_app_model(None, device="cpu")
    assert pipe is None
    banner = app.banner_text(app.DeblurApp(None, model_error=error, examples_dir=None, measure_speed=False))
    assert "No network" in banner and weights.OFFICIAL_FOLDER_URL in banner


def test_app_flags_share_and_no_download(monkeypatch):
    from deblurdiff.space import app

    seen = {}
    monkeypatch.setattr(app, "load_app_model", lambda *a, **k: seen.update(load=k) or (None, "no weights", None))
    monkeypatch.setattr(app, "launch", lambda demo, **k: seen.update(launch=k))
    app.main(["--share", "--no-download", "--no-examples"])
    assert seen["launch"]["share"] is True
    assert seen["load"]["allow_download"] is False
    app.main(["--no-examples"])
    assert seen["launch"]["share"] is None  # Gradio's default: a public link only where it makes one (Colab)
    assert seen["load"]["allow_download"] is None


def test_cli_offline_without_a_cache_exits_with_the_manual_steps(tmp_path, capsys):
    from PIL import Image

    from deblurdiff import cli

    Image.new("RGB", (64, 64)).save(tmp_path / "photo.png")
    code = cli.main([str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--no-download", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert "downloading the authors' checkpoint is turned off" in err and weights.OFFICIAL_FOLDER_URL in err and "Traceback" not in err
