"""``python -m deblurdiff.convert model.pth OUT --push-to-hub owner/name``, offline: the Hub
client (huggingface_hub.HfApi) is replaced by a recorder."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import huggingface_hub
import pytest
import torch

from deblurdiff import convert
from deblurdiff.pipeline.pipeline_deblurdiff import DeblurDiffPipeline
from test_convert import CHECKPOINT, HEAD_DIM, small_vocab_tokenizer

REPO = "someone/deblurdiff-test"


class RecordingHfApi:
    """Records what would be sent to the Hub; ``fail`` makes create_repo raise it."""

    made: list["RecordingHfApi"] = []
    fail: Exception | None = None

    def __init__(self, *args, **kwargs):
        self.calls = []
        RecordingHfApi.made.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        if RecordingHfApi.fail is not None:
            raise RecordingHfApi.fail
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        uploaded = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", dict(kwargs, files=uploaded)))


@pytest.fixture
def recorder(monkeypatch):
    RecordingHfApi.made, RecordingHfApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    return RecordingHfApi


def run(tmp_path, *extra):
    tok = small_vocab_tokenizer(tmp_path / "tok")
    out = tmp_path / "out"
    code = convert.main([
        str(CHECKPOINT), str(out), "--attention-head-dim", str(HEAD_DIM), "--tokenizer", str(tok), "--dtype", "fp16", *extra,
    ])
    return code, out


def test_push_uploads_the_folder_with_a_model_card(recorder, tmp_path, capsys):
    code, out = run(tmp_path, "--push-to-hub", REPO)
    assert code == 0, capsys.readouterr().err
    (api,) = recorder.made
    (create, create_args), (upload, upload_args) = api.calls
    assert create == "create_repo" and create_args["repo_id"] == REPO and create_args["exist_ok"]
    assert create_args["private"] is False and create_args["repo_type"] == "model"
    assert upload == "upload_folder" and upload_args["repo_id"] == REPO and Path(upload_args["folder_path"]) == out
    files = upload_args["files"]
    assert {"model_index.json", "README.md", "unet/config.json"} <= set(files)
    assert any(name.endswith(".safetensors") for name in files) and not any(name.endswith(".bin") for name in files)
    card = files["README.md"].decode()
    assert "license: openrail++" in card and "library_name: diffusers" in card
    assert "MIT License" in card and "CreativeML Open RAIL++-M" in card
    assert f'DeblurDiffPipeline.from_pretrained("{REPO}"' in card
    assert "@article{kong2025deblurdiff" in card and "arXiv:2502.03810" in card
    assert hashlib.sha256(CHECKPOINT.read_bytes()).hexdigest() in card
    assert f"uploaded to https://huggingface.co/{REPO}" in capsys.readouterr().out


def test_the_cards_snippet_runs_on_the_uploaded_folder(recorder, tmp_path):
    code, out = run(tmp_path, "--push-to-hub", REPO)
    assert code == 0
    card = (out / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", card, re.S)
    compile(snippet, "model card", "exec")  # valid Python
    # Its loading line, pointed at the folder as uploaded (no Hub, no GPU here).
    pipe = DeblurDiffPipeline.from_pretrained(str(out), torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16


def test_private_repo(recorder, tmp_path):
    assert run(tmp_path, "--push-to-hub", REPO, "--private")[0] == 0
    assert recorder.made[0].calls[0][1]["private"] is True


def test_a_bad_repo_id_is_refused_before_converting(recorder, tmp_path, capsys):
    code, out = run(tmp_path, "--push-to-hub", "not a repo")
    assert code == 1 and "owner/name" in capsys.readouterr().err
    assert not out.exists() and not recorder.made


def test_a_failed_upload_says_how_to_retry_and_keeps_the_folder(recorder, tmp_path, capsys):
    recorder.fail = huggingface_hub.errors.LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
    code, out = run(tmp_path, "--push-to-hub", REPO)
    err = capsys.readouterr().err
    assert code == 1
    assert "hf auth login" in err and f"hf upload {REPO} {out}" in err and "Traceback" not in err
    assert (out / "model_index.json").is_file()
