"""The authors' checkpoint, fetched by itself: downloaded once, verified, converted once, cached.

With no ``--model``, :func:`official_pipeline` returns ``<cache>/official/diffusers-<dtype>/``
made from the authors' ``model.pth``. The authors publish no checksum, so a download's SHA-256
is recorded once it passes :func:`verify_checkpoint_file`; a file that fails a check is deleted,
never loaded. The README's "First run" section tells the rest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Callable

import torch

from ..parsing import dtype_name, env_flag
from ..models.single_file import COMPONENTS, file_sha256 as sha256_of

OFFICIAL_FOLDER_ID = "1CUtnUKbu_zTyjJ17F95UYyh2SDzCOHeW"
OFFICIAL_FOLDER_URL = f"https://drive.google.com/drive/folders/{OFFICIAL_FOLDER_ID}"
OFFICIAL_FILENAME = "model.pth"
OFFICIAL_LABEL = "kkkls/DeblurDiff official checkpoint"
#: Published by nobody yet: set it to pin the exact file (the first successful download
#: records its SHA-256 and size in ``model.pth.sha256``).
OFFICIAL_SHA256: str | None = None
#: 1.8 B parameters: about 7.2 GB in float32 (3.6 GB in half precision).
APPROX_DOWNLOAD_GB = 7.2

CACHE_ENV = "DEBLURDIFF_CACHE"
NO_DOWNLOAD_ENV = "DEBLURDIFF_NO_DOWNLOAD"
COMPLETE_MARKER = "deblurdiff_cache.json"
DOWNLOAD_ATTEMPTS = 2
#: Channels per attention head in every network of the checkpoint (shapes cannot tell).
ATTENTION_HEAD_DIM = 64

#: Writes the checkpoint to the given path, or raises. The default is :func:`gdown_download`.
Downloader = Callable[[Path], None]


class WeightsUnavailableError(RuntimeError):
    """The official weights could not be fetched or prepared; the message says what to do."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def official_dir() -> Path:
    """``<cache>/official``: ``<cache>`` is ``$DEBLURDIFF_CACHE``, else ``deblurdiff/`` in the HF cache."""
    from huggingface_hub import constants

    hf_home = Path(os.environ.get("HF_HOME") or constants.HF_HOME).expanduser()
    return Path(os.environ.get(CACHE_ENV) or hf_home / "deblurdiff").expanduser() / "official"


def manual_steps() -> str:
    target = official_dir() / OFFICIAL_FILENAME
    return (
        "To get the weights by hand:\n"
        f"  1. Open {OFFICIAL_FOLDER_URL} (the checkpoint link in the authors' README, "
        f"github.com/kkkls/DeblurDiff) in a browser and download {OFFICIAL_FILENAME} "
        f"(about {APPROX_DOWNLOAD_GB:.0f} GB).\n"
        f"  2. Either move it to {target} (it is verified and converted at the next start), "
        f"or pass it directly: --model path/to/{OFFICIAL_FILENAME} (or set DEBLURDIFF_MODEL)."
    )


def _unavailable(problem: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(f"{problem}\n{manual_steps()}")


def gdown_download(destination: Path) -> None:
    """Download ``model.pth`` from the authors' Drive folder with gdown (resumable, size-checked)."""
    import gdown

    files = gdown.download_folder(id=OFFICIAL_FOLDER_ID, skip_download=True, quiet=True, timeout=(30, 120))
    matches = [f for f in files or [] if Path(f.path).name == OFFICIAL_FILENAME]
    if not matches:
        names = ", ".join(Path(f.path).name for f in files or []) or "nothing"
        raise FileNotFoundError(f"the authors' Drive folder holds no {OFFICIAL_FILENAME} (it lists: {names})")
    result = gdown.download(id=matches[0].id, output=str(destination), quiet=False, resume=True, retries=3, timeout=(30, 300))
    if not result:
        raise RuntimeError("gdown reported a failed download")


def describe_download_error(exc: BaseException) -> str:
    """What went wrong, in words, for the errors a download meets."""
    text = str(exc)
    lowered = text.lower()
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"The disk is full: free at least {APPROX_DOWNLOAD_GB * 2:.0f} GB for the download and its conversion ({exc})."
    name = type(exc).__name__
    if "too many users" in lowered or "many accesses" in lowered or "quota" in lowered:
        return (
            "Google Drive refused the download: too many users have downloaded the file recently "
            "(Drive's daily quota). Try again in a few hours, or download it in a browser."
        )
    network_types = ("ConnectionError", "Timeout", "ConnectTimeout", "ReadTimeout", "MaxRetryError", "NameResolutionError", "gaierror")
    if any(t in name for t in network_types) or "name or service not known" in lowered or "failed to resolve" in lowered:
        return f"No network: Google Drive cannot be reached ({name})."
    if "incomplete" in lowered:
        return f"The download stopped before the end ({text.splitlines()[0]}). Start again to resume it."
    if name == "FileURLRetrievalError":
        return f"Google Drive did not give out the file: {' '.join(text.split())}"
    return f"The download failed: {name}: {text}"


def verify_checkpoint_file(path: Path) -> str | None:
    """``None`` when ``path`` is a complete, intact DeblurDiff checkpoint; else the reason."""
    from ..models.single_file import CheckpointError, read_checkpoint, split_checkpoint

    if not path.is_file():
        return "the download produced no file"
    if path.stat().st_size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return (
            "Google Drive sent a web page instead of the file (usually its download quota: too many users "
            "have downloaded it recently)"
        )
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                if any(r.CRC for r in archive.infolist()):  # CRC-32 of every record: catches damaged bytes
                    bad = archive.testzip()
                    if bad is not None:
                        return f"the file is damaged (record {bad} fails its CRC check)"
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            return f"the file is truncated or damaged ({exc})"
    try:
        state_dict = read_checkpoint(path)
    except (CheckpointError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return f"the file is not a readable PyTorch checkpoint, or is truncated ({first})"
    parts, _ = split_checkpoint(state_dict)
    missing = [c for c in COMPONENTS if c not in parts]
    if missing:
        return f"the file is not the DeblurDiff checkpoint (no weights for {', '.join(missing)})"
    return None


def _staging_path(checkpoint: Path) -> Path:
    """Where a download lands until it is verified (same suffix: it is read as a checkpoint)."""
    return checkpoint.with_name(f"{checkpoint.stem}.unverified{checkpoint.suffix}")


def _record_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + ".sha256")


def read_record(checkpoint: Path) -> dict | None:
    try:
        return json.loads(_record_path(checkpoint).read_text())
    except (OSError, ValueError):
        return None


def _remove(*paths: Path) -> None:
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def check_recorded(checkpoint: Path, record: dict, report=_stderr) -> str | None:
    """``None`` when a cached checkpoint matches its ``record`` (SHA-256 and size), else the reason."""
    size, recorded = checkpoint.stat().st_size, record.get("size")
    if size != recorded:
        then = f"{recorded:,} bytes" if isinstance(recorded, int) else "no size"
        return f"its size changed since it was verified ({size:,} bytes now, {then} recorded)"
    report(f"Checking {checkpoint.name} against its recorded SHA-256 ...")
    if sha256_of(checkpoint) != record.get("sha256"):
        return "its SHA-256 differs from the one recorded when it was downloaded (the file changed on disk)"
    return None


def accept(candidate: Path, checkpoint: Path, report=_stderr) -> None:
    """Verify ``candidate``; move it to ``checkpoint`` with its record, or raise ValueError."""
    size = candidate.stat().st_size
    report(f"Verifying the download ({size / 1e6:,.1f} MB): archive CRCs, tensors, the five networks ...")
    problem = verify_checkpoint_file(candidate)
    if problem:
        raise ValueError(problem)
    sha = sha256_of(candidate)
    if OFFICIAL_SHA256 and sha != OFFICIAL_SHA256:
        raise ValueError(f"its SHA-256 {sha} is not the published {OFFICIAL_SHA256}")
    record = dict(sha256=sha, size=size, source=OFFICIAL_FOLDER_URL, filename=OFFICIAL_FILENAME)
    os.replace(candidate, checkpoint)
    _record_path(checkpoint).write_text(json.dumps(record, indent=1) + "\n")
    report(f"Verified: SHA-256 {sha} (recorded in {_record_path(checkpoint).name}).")


def fetch_checkpoint(root: Path, downloader: Downloader | None, report=_stderr) -> Path:
    """Download into ``root/model.unverified.pth`` and accept it (``DOWNLOAD_ATTEMPTS`` tries)."""
    downloader = downloader or gdown_download
    checkpoint = root / OFFICIAL_FILENAME
    staging = _staging_path(checkpoint)
    reason = None
    for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
        if staging.exists():  # a complete transfer from a start that stopped before checking it
            report(f"Found an unverified download from an earlier start: {staging}")
        else:
            again = f" (attempt {attempt} of {DOWNLOAD_ATTEMPTS})" if attempt > 1 else ""
            report(f"Downloading the DeblurDiff checkpoint (about {APPROX_DOWNLOAD_GB:.1f} GB, once) "
                   f"from the authors' Google Drive folder into {root}{again} ...")
            try:
                downloader(staging)
            except Exception as exc:  # network, Drive, disk: every failure becomes a message
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    _remove(staging)
                raise _unavailable(describe_download_error(exc)) from None
        try:
            accept(staging, checkpoint, report)
            return checkpoint
        except ValueError as exc:
            reason = str(exc)
            report(f"Refused the downloaded file: {reason}. It was deleted.")
            _remove(staging)
        except OSError as exc:
            _remove(staging)
            raise _unavailable(describe_download_error(exc)) from None
    raise _unavailable(f"The downloaded file was refused {DOWNLOAD_ATTEMPTS} times: {reason}.")


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "model_index.json").is_file()


def convert_checkpoint(checkpoint: Path, target: Path, dtype: torch.dtype, tokenizer=None, report=_stderr) -> None:
    """Convert to a diffusers folder beside ``target``, renamed into place when complete."""
    import time

    from .pipeline_deblurdiff import DeblurDiffPipeline

    staging = target.with_name(target.name + ".partial")
    _remove(staging)
    report(f"Converting {checkpoint.name} to a diffusers folder ({dtype_name(dtype)}, once; about a minute) ...")
    start = time.perf_counter()
    pipe = DeblurDiffPipeline.from_single_file(
        checkpoint, tokenizer=tokenizer, attention_head_dim=ATTENTION_HEAD_DIM, torch_dtype=dtype
    )
    pipe.save_pretrained(staging, safe_serialization=True)
    record = read_record(checkpoint) or {}
    marker = dict(source_sha256=record.get("sha256"), dtype=dtype_name(dtype), source=OFFICIAL_FOLDER_URL)
    (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    _remove(target)
    os.replace(staging, target)
    report(f"Converted in {time.perf_counter() - start:.0f} s: {target}")


def official_pipeline(
    dtype: torch.dtype,
    *,
    allow_download: bool | None = None,
    downloader: Downloader | None = None,
    tokenizer=None,
    report: Callable[[str], None] = _stderr,
) -> Path:
    """The official checkpoint's diffusers folder in ``dtype``, fetched and converted once;
    raises :class:`WeightsUnavailableError` with the manual steps."""
    from filelock import FileLock

    from ..models.single_file import CheckpointError

    target = official_dir() / f"diffusers-{dtype_name(dtype)}"
    if is_complete(target):
        return target
    root = official_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unavailable(f"The cache folder {root} cannot be created: {exc}.") from None
    with FileLock(str(root / ".lock")):  # two starts at once: the second waits for the first
        if is_complete(target):
            return target
        checkpoint = root / OFFICIAL_FILENAME
        if checkpoint.exists():
            record = read_record(checkpoint)
            if record is None:  # placed there by hand: verify it like a download
                staging = _staging_path(checkpoint)
                os.replace(checkpoint, staging)
                try:
                    accept(staging, checkpoint, report)
                except ValueError as exc:
                    _remove(staging)
                    report(f"Refused {checkpoint}: {exc}. It was deleted.")
            else:
                problem = check_recorded(checkpoint, record, report)
                if problem:
                    report(f"Refused the cached {checkpoint.name}: {problem}. It was deleted.")
                    _remove(checkpoint, _record_path(checkpoint))
        if not checkpoint.exists():
            if allow_download is None:
                allow_download = not any(env_flag(name, False) for name in (NO_DOWNLOAD_ENV, "HF_HUB_OFFLINE"))
            if not allow_download:
                raise _unavailable(
                    "No DeblurDiff weights are configured (`--model` or `DEBLURDIFF_MODEL`), and downloading the "
                    f"authors' checkpoint is turned off (--no-download, {NO_DOWNLOAD_ENV}=1 or HF_HUB_OFFLINE=1) "
                    f"while it is not in the cache ({root})."
                )
            fetch_checkpoint(root, downloader, report)
        try:
            convert_checkpoint(checkpoint, target, dtype, tokenizer=tokenizer, report=report)
        except CheckpointError as exc:
            _remove(checkpoint, _record_path(checkpoint), target.with_name(target.name + ".partial"))
            raise _unavailable(f"The downloaded file is not the DeblurDiff checkpoint; it was deleted.\n{exc}") from None
        except OSError as exc:
            _remove(target.with_name(target.name + ".partial"))
            raise _unavailable(f"Could not write the converted weights: {describe_download_error(exc)}") from None
        except MemoryError:
            _remove(target.with_name(target.name + ".partial"))
            raise _unavailable("Not enough memory to convert the checkpoint (up to about 5 GB of free RAM are needed once).") from None
    return target

