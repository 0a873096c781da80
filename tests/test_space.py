"""The Space configuration and `python -m deblurdiff.space deploy`, offline (the Hub
client is replaced by a recorder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deblurdiff import space

ROOT = Path(__file__).resolve().parents[1]


def front_matter(text: str) -> dict:
    meta, _ = space.split_front_matter(text)
    return meta


def pins(requirements: str) -> dict[str, str]:
    out = {}
    for line in requirements.splitlines():
        line = line.split(";")[0].strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


def check_zerogpu_config(meta: dict, requirements: str) -> None:
    assert str(meta["python_version"]) in space.ZEROGPU["python"]
    assert meta["suggested_hardware"] == space.ZEROGPU["hardware"]
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    versions = pins(requirements)
    assert versions["torch"] in space.ZEROGPU["torch"]
    assert "triton" not in versions  # torch brings the triton it was built with


def test_table_is_consistent():
    from huggingface_hub import SpaceHardware

    assert space.ZEROGPU["hardware"] in {h.value for h in SpaceHardware}
    assert space.SPACE_PYTHON in space.ZEROGPU["python"] and space.SPACE_TORCH in space.ZEROGPU["torch"]
    assert space.ZEROGPU["source"].startswith("https://huggingface.co/docs/hub/") and space.ZEROGPU["checked"]


def test_repository_readme_front_matter_is_valid_for_zerogpu():
    meta = front_matter((ROOT / "README.md").read_text(encoding="utf-8"))
    check_zerogpu_config(meta, space.space_requirements((ROOT / "requirements.txt").read_text()))
    import gradio

    assert str(meta["sdk_version"]) == gradio.__version__


def test_space_requirements_replace_torch_and_keep_the_rest():
    text = "# comment\ntorch==2.13.0\ndiffusers==0.42.1\ntriton==3.9.0; platform_system == \"Linux\"\n\nspaces==0.51.3\n"
    out = pins(space.space_requirements(text))
    assert out == {"torch": space.SPACE_TORCH, "diffusers": "0.42.1", "spaces": "0.51.3"}


class RecordingHub:
    """Stands in for ``huggingface_hub.HfApi``: records calls and the uploaded files."""

    def __init__(self, fail: dict | None = None):
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.fail = fail or {}

    def _record(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if name in self.fail:
            raise self.fail[name]

    def whoami(self):
        self._record("whoami")
        return {"name": "someone"}

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", *args, **kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs)
        folder = Path(kwargs["folder_path"])
        self.uploaded = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def add_space_variable(self, *args, **kwargs):
        self._record("add_space_variable", *args, **kwargs)

    def request_space_hardware(self, *args, **kwargs):
        self._record("request_space_hardware", *args, **kwargs)

    def named(self, name):
        return [(args, kwargs) for n, args, kwargs in self.calls if n == name]


def test_deploy_uploads_what_the_space_needs(capsys):
    hub = RecordingHub()
    assert space.main(["deploy", "me/deblur", "--model", "me/deblurdiff-diffusers"], api=hub) == 0
    files = set(hub.uploaded)
    assert {"app.py", "requirements.txt", "README.md", "deblurdiff/__init__.py", "deblurdiff/app.py",
            "deblurdiff/pipeline.py", "deblurdiff/ops/eac.py", "deblurdiff/models/lkpn.py",
            "examples/examples.json"} <= files
    assert not [f for f in files if f.split("/")[0] in {"tests", "benchmarks", "scripts", ".git", "configs"}]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or "/train/" in f]
    # Every example image listed by the app's example file is there.
    assert any(f.startswith("examples/") and f.endswith(".jpg") for f in files)

    meta = front_matter(hub.uploaded["README.md"].decode("utf-8"))
    check_zerogpu_config(meta, hub.uploaded["requirements.txt"].decode())
    (repo_args, repo_kwargs), = hub.named("create_repo")
    assert repo_args == ("me/deblur",) and repo_kwargs["repo_type"] == "space" and repo_kwargs["space_sdk"] == "gradio"
    assert repo_kwargs["exist_ok"] is True
    (upload_kwargs,) = [kwargs for _, kwargs in hub.named("upload_folder")]
    assert upload_kwargs["repo_id"] == "me/deblur" and upload_kwargs["repo_type"] == "space"
    (variable_args, _), = hub.named("add_space_variable")
    assert variable_args == ("me/deblur", "DEBLURDIFF_MODEL", "me/deblurdiff-diffusers")
    assert hub.named("request_space_hardware")[0][0] == ("me/deblur", space.ZEROGPU["hardware"])
    assert capsys.readouterr().out.strip().splitlines()[-1] == "https://huggingface.co/spaces/me/deblur"


def test_deploy_without_model_sets_no_variable():
    hub = RecordingHub()
    assert space.main(["deploy", "me/deblur", "--no-hardware"], api=hub) == 0
    assert hub.named("add_space_variable") == [] and hub.named("request_space_hardware") == []


@pytest.mark.parametrize("repo", ["deblur", "me/", "/x", "a/b/c", "me/bad name"])
def test_bad_space_name(repo, capsys):
    hub = RecordingHub()
    assert space.main(["deploy", repo], api=hub) == 2
    err = capsys.readouterr().err
    assert "owner/name" in err and "Traceback" not in err
    assert hub.calls == []


def _http_error(status: int):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("GET", "https://huggingface.co/api/whoami-v2")
    return HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=request))


def test_auth_failure_is_one_clear_line(capsys):
    from huggingface_hub.errors import LocalTokenNotFoundError

    for error in (_http_error(401), LocalTokenNotFoundError("no token")):
        hub = RecordingHub(fail={"whoami": error})
        assert space.main(["deploy", "me/deblur"], api=hub) == 2
        err = capsys.readouterr().err
        assert "hf auth login" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert hub.named("upload_folder") == []


def test_forbidden_upload_is_reported(capsys):
    hub = RecordingHub(fail={"create_repo": _http_error(403)})
    assert space.main(["deploy", "someone-else/deblur"], api=hub) == 2
    assert "write access" in capsys.readouterr().err


def test_hardware_refusal_is_a_warning(capsys):
    hub = RecordingHub(fail={"request_space_hardware": _http_error(402)})
    assert space.main(["deploy", "me/deblur"], api=hub) == 0
    out = capsys.readouterr().out
    assert "warning: could not switch the Space to ZeroGPU" in out
    assert out.strip().splitlines()[-1] == "https://huggingface.co/spaces/me/deblur"


def test_space_readme_front_matter_parses_as_yaml():
    text = space.space_readme((ROOT / "README.md").read_text(encoding="utf-8"))
    block = text.split("---\n")[1]
    assert yaml.safe_load(block)["title"] == "DeblurDiff"
