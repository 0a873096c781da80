"""Deploy the app as a ZeroGPU Gradio Space on the Hugging Face Hub.

    python -m deblurdiff.space deploy owner/space [--model owner/weights] [--private] [--token TOKEN]
    python -m deblurdiff.space requirements [--platform]

``requirements --platform`` adds pins of what the platform installs (how CI rebuilds the Space's
stack). :data:`ZEROGPU` is the one table of what ZeroGPU supports; the README's front matter and
CI are written from it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path


#: What ZeroGPU supports, from the Hub documentation (spaces-zerogpu.md), as of August 2026.
ZEROGPU = {
    "source": "https://huggingface.co/docs/hub/spaces-zerogpu",
    "checked": "2026-08",
    "python": ("3.10.13", "3.12.12"),
    "torch": ("2.8.0", "2.9.1", "2.10.0", "2.11.0"),
    # The Hub's hardware flavour for ZeroGPU (``huggingface_hub.SpaceHardware.ZERO_A10G``;
    # the name predates the current GPUs).
    "hardware": "zero-a10g",
    # NVIDIA RTX Pro 6000 Blackwell: `large` (default) is half a card, `xlarge` a whole one.
    "gpu_sizes": {"large": "48 GB", "xlarge": "96 GB"},
    # What the platform installs itself, so the Space's requirements.txt must not pin it:
    # gradio is the README's ``sdk_version``, spaces is preinstalled on ZeroGPU, and
    # huggingface_hub comes with them. These are the versions the Space is built and tested
    # with (the README's front matter and CI's Space stack use them).
    "platform": {"gradio": "6.31.0", "spaces": "0.51.3", "huggingface_hub": "2.4.0"},
}
#: The versions the Space runs (the newest supported ones).
SPACE_PYTHON = ZEROGPU["python"][-1]
SPACE_TORCH = ZEROGPU["torch"][-1]

ROOT = Path(__file__).resolve().parents[2]

# What the Space runs: the entry point, the package (the app needs neither the
# training code nor caches), the examples and the README's screenshot.
_FILES = ("app.py", "docs/screenshot.png")
_TOP_DIRS = ("deblurdiff", "examples")
_SKIP = shutil.ignore_patterns("__pycache__", "train", ".pytest_cache", "*.pyc", "*.pyo")


class DeployError(Exception):
    """A problem reported to the user as one line, without a traceback."""


def _name(line: str) -> str:
    """The normalised distribution name of a requirement line (PEP 503)."""
    name = re.split(r"[=<>!~; \[@]", line.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


#: Distribution names (normalised) that the Space's requirements.txt leaves to the platform.
PLATFORM_PACKAGES = frozenset(map(_name, ZEROGPU["platform"]))


def space_requirements(requirements: str) -> str:
    """The Space's ``requirements.txt``: torch pinned to :data:`SPACE_TORCH`, triton left to
    torch, nothing the platform installs itself (:data:`PLATFORM_PACKAGES`)."""
    # torch's wheel requires the matching triton; the platform brings the others.
    left_out = PLATFORM_PACKAGES | {"torch", "triton"}
    kept = [line.strip() for line in requirements.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and _name(line) not in left_out]
    header = "# Written by `python -m deblurdiff.space deploy` for ZeroGPU; see deblurdiff/space/deploy.py."
    return "\n".join([header, f"torch=={SPACE_TORCH}", *kept]) + "\n"


def staged_requirements(root: Path = ROOT) -> str:
    """The ``requirements.txt`` that :func:`stage` writes for the Space."""
    return space_requirements((root / "requirements.txt").read_text())


def platform_requirements() -> str:
    """Pins of what the platform installs on the Space (:data:`ZEROGPU`'s ``platform``)."""
    return "".join(f"{name}=={version}\n" for name, version in ZEROGPU["platform"].items())


def split_front_matter(readme: str) -> tuple[dict, str]:
    """``(front matter, body)`` of a README that starts with a ``---`` YAML block."""
    import yaml

    match = re.match(r"^---\n(.*?)\n---\n?", readme, re.S)
    if not match:
        raise DeployError("README.md has no front matter (a --- block at the top)")
    return yaml.safe_load(match.group(1)) or {}, readme[match.end():]


def space_readme(readme: str) -> str:
    """The README with its front matter set for ZeroGPU (gradio and Python versions, hardware)."""
    import yaml

    meta, body = split_front_matter(readme)
    meta.update(sdk="gradio", sdk_version=ZEROGPU["platform"]["gradio"], app_file="app.py",
                python_version=SPACE_PYTHON, suggested_hardware=ZEROGPU["hardware"])
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{front}---\n{body}"


def stage(directory: Path, root: Path = ROOT) -> list[str]:
    """Write the Space's files into ``directory``; returns their paths."""
    for top in _TOP_DIRS:
        shutil.copytree(root / top, directory / top, ignore=_SKIP, dirs_exist_ok=True)
    for name in _FILES:
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, directory / name)
    (directory / "requirements.txt").write_text(staged_requirements(root))
    (directory / "README.md").write_text(space_readme((root / "README.md").read_text(encoding="utf-8")), encoding="utf-8")
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def deploy(repo_id: str, model: str | None = None, *, private: bool = False, token: str | None = None,
           hardware: bool = True, api=None, root: Path = ROOT, out=print) -> str:
    """Create or update the Space ``repo_id``; returns its address."""
    # torch comes with these: `requirements` must run without it.
    from ..convert import describe_hub_error
    from ..parsing import HUB_REPO_ID
    from ..pipeline.loading import MODEL_ENV

    if not HUB_REPO_ID.fullmatch(repo_id or ""):
        raise DeployError(f"the Space must be given as owner/name, got {repo_id!r}")
    if model is not None and not model.strip():
        raise DeployError("--model is empty")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = f"https://huggingface.co/spaces/{repo_id}"
    try:
        user = api.whoami()
        out(f"logged in as {user.get('name', '?')}")
        api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="deblurdiff-space-") as directory:
            files = stage(Path(directory), root)
            out(f"uploading {len(files)} files to {repo_id}")
            # delete_patterns: files the package no longer has leave the Space.
            api.upload_folder(repo_id=repo_id, repo_type="space", folder_path=directory,
                              commit_message="Deploy DeblurDiff", delete_patterns=[f"{d}/**" for d in _TOP_DIRS])
        if model:
            api.add_space_variable(repo_id, MODEL_ENV, model.strip(),
                                   description="Weights the app loads (diffusers folder or Hub repo)")
            out(f"{MODEL_ENV} = {model.strip()}")
        else:
            out(f"no --model: the Space keeps its {MODEL_ENV} variable (without one it starts without weights)")
    except DeployError:
        raise
    except Exception as error:  # the Hub client's errors, network errors, ...
        raise DeployError(describe_hub_error(error)) from error
    if hardware:
        try:
            api.request_space_hardware(repo_id, ZEROGPU["hardware"])
        except Exception as error:  # ZeroGPU needs a PRO account or an organisation
            out(f"warning: could not switch the Space to ZeroGPU ({describe_hub_error(error)}); "
                "choose it in the Space's settings")
    out(url)
    return url


def main(argv=None, api=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deblurdiff.space", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("deploy", help="create or update a ZeroGPU Gradio Space")
    d.add_argument("space", help="the Space, as owner/name")
    d.add_argument("--model", default=None, help="weights the Space loads (sets the Space variable the app reads)")
    d.add_argument("--private", action="store_true", help="create the Space private")
    d.add_argument("--token", default=None, help="Hub token (default: the logged-in one or HF_TOKEN)")
    d.add_argument("--no-hardware", action="store_true", help="do not ask for ZeroGPU hardware")
    r = sub.add_parser("requirements", help="print the requirements.txt that deploy stages")
    r.add_argument("--platform", action="store_true",
                   help="also pin what the platform installs (gradio, spaces, huggingface_hub)")
    args = parser.parse_args(argv)
    if args.command == "requirements":
        print(staged_requirements() + (platform_requirements() if args.platform else ""), end="")
        return 0
    try:
        deploy(args.space, args.model, private=args.private, token=args.token, hardware=not args.no_hardware, api=api)
    except DeployError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
