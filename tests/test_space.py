"""The Space configuration and `python -m deblurdiff.space deploy`, offline (the Hub
client is replaced by a recorder)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.version import Version

from deblurdiff.space import deploy as space

ROOT = Path(__file__).resolve().parents[1]


def front_matter(text: str) -> dict:
    meta, _ = space.split_front_matter(text)
    return meta


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(requirements: str) -> set[str]:
    """Every distribution a requirements text names (pinned or not, extras and markers aside)."""
    return {normalise(re.split(r"[=<>!~; \[@]", line.strip(), maxsplit=1)[0])
            for line in requirements.splitlines() if line.strip() and not line.lstrip().startswith(("#", "-"))}


def pins(requirements: str) -> dict[str, str]:
    out = {}
    for line in requirements.splitlines():
        line = line.split(";")[0].strip()
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==", 1)
            out[normalise(name.split("[")[0].strip())] = version.strip()  # extras aside
    return out


PLATFORM = {"gradio", "spaces", "huggingface-hub"}


def check_zerogpu_config(meta: dict, requirements: str) -> None:
    assert str(meta["python_version"]) == space.SPACE_PYTHON
    assert meta["suggested_hardware"] == space.ZEROGPU["hardware"]
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py"
    # gradio comes from the front matter's sdk_version, so it is the table's.
    assert str(meta["sdk_version"]) == space.ZEROGPU["platform"]["gradio"]
    versions = pins(requirements)
    assert versions["torch"] == space.SPACE_TORCH
    assert "triton" not in names(requirements)  # torch brings the triton it was built with
    # What the platform manages is not pinned (nor named) by the Space.
    assert not PLATFORM & names(requirements)


def test_supported_versions_are_listed_oldest_first():
    # SPACE_PYTHON and SPACE_TORCH take the last entry as the newest: an entry added out of
    # order (or a malformed one) would silently pick an older stack.
    for key in ("python", "torch"):
        versions = [Version(v) for v in space.ZEROGPU[key]]
        assert versions == sorted(versions) and len(set(versions)) == len(versions), key
    assert space.SPACE_PYTHON == max(space.ZEROGPU["python"], key=Version)
    assert space.SPACE_TORCH == max(space.ZEROGPU["torch"], key=Version)


def test_table_names_real_hub_values():
    from huggingface_hub import SpaceHardware

    assert space.ZEROGPU["hardware"] in {h.value for h in SpaceHardware}
    assert space.ZEROGPU["source"].startswith("https://huggingface.co/docs/hub/") and space.ZEROGPU["checked"]
    assert {normalise(n) for n in space.ZEROGPU["platform"]} == PLATFORM == space.PLATFORM_PACKAGES


def test_platform_versions_are_the_local_pins():
    # The local stack tests the same gradio, spaces and huggingface_hub as the Space gets.
    local = pins((ROOT / "requirements.txt").read_text())
    assert {normalise(n): v for n, v in space.ZEROGPU["platform"].items()} == {n: local[n] for n in PLATFORM}


def test_repository_readme_front_matter_is_valid_for_zerogpu():
    meta = front_matter((ROOT / "README.md").read_text(encoding="utf-8"))
    check_zerogpu_config(meta, space.staged_requirements())
    import gradio

    assert str(meta["sdk_version"]) == gradio.__version__


def test_staged_requirements_leave_platform_packages_out():
    text = ("torch==2.13.0\ngradio[mcp]==6.31.0\nGradio==6.31.0\nspaces>=0.51\nhuggingface-hub==2.4.0\n"
            "Huggingface_Hub==2.4.0 ; python_version >= '3.10'\ndiffusers==0.42.1\ngradio_client==2.7.2\n")
    out = space.space_requirements(text)
    assert not PLATFORM & names(out)
    # Look-alike names are kept: only the platform's own distributions are dropped.
    assert names(out) == {"torch", "diffusers", "gradio-client"}


def test_requirements_command_prints_what_deploy_stages(capsys):
    hub = RecordingHub()
    assert space.main(["deploy", "me/deblur", "--no-hardware"], api=hub) == 0
    capsys.readouterr()
    assert space.main(["requirements"]) == 0
    staged = capsys.readouterr().out
    assert staged == hub.uploaded["requirements.txt"].decode()
    assert space.main(["requirements", "--platform"]) == 0
    full = capsys.readouterr().out
    assert full.startswith(staged)
    assert pins(full[len(staged):]) == {normalise(n): v for n, v in space.ZEROGPU["platform"].items()}


@pytest.mark.skipif(os.environ.get("DEBLURDIFF_CI_STACK") != "space",
                    reason="checks the Space's stack; CI's second leg sets DEBLURDIFF_CI_STACK=space")
def test_running_on_the_space_stack():
    import importlib.metadata as md

    import torch

    assert sys.version_info[:2] == Version(space.SPACE_PYTHON).release[:2]
    assert Version(torch.__version__).base_version == space.SPACE_TORCH
    for name, version in space.ZEROGPU["platform"].items():
        assert md.version(name) == version, name
    staged = pins(space.staged_requirements())
    for name, version in staged.items():
        assert Version(md.version(name)).base_version == version, name


def test_space_requirements_replace_torch_and_keep_the_rest():
    text = "# comment\ntorch==2.13.0\ndiffusers==0.42.1\ntriton==3.9.0; platform_system == \"Linux\"\n\npillow==12.3.0\n"
    out = pins(space.space_requirements(text))
    assert out == {"torch": space.SPACE_TORCH, "diffusers": "0.42.1", "pillow": "12.3.0"}


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
    assert {"app.py", "requirements.txt", "README.md", "deblurdiff/__init__.py", "deblurdiff/space/app.py",
            "deblurdiff/pipeline/pipeline_deblurdiff.py", "deblurdiff/ops/eac.py", "deblurdiff/models/lkpn.py",
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


def test_requirements_command_runs_without_torch():
    """CI writes the Space's requirements with a bare interpreter, before anything is installed."""
    import subprocess

    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['space', 'requirements'];"
            "runpy.run_module('deblurdiff.space.deploy', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"torch=={space.SPACE_TORCH}" in result.stdout
