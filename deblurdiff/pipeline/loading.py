"""A model reference to a ready pipeline, for the app, the CLI and scripts: a diffusers folder,
a Hub repo id, the official single-file checkpoint (``model.pth``/``.ckpt``/``.safetensors``) or
``random-tiny`` (untrained, for development); with none, the authors' checkpoint (``weights.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..parsing import HUB_REPO_ID, parse_dtype

MODEL_ENV = "DEBLURDIFF_MODEL"
TOKENIZER_ENV = "DEBLURDIFF_TOKENIZER"
RANDOM_TINY = "random-tiny"
SINGLE_FILE_SUFFIXES = (".pth", ".ckpt", ".pt", ".safetensors")


class ModelUnavailableError(RuntimeError):
    """The weights could not be found or loaded; the message says what to do."""


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    from ..cpu.tuning import choose_cpu_config

    if requested and requested != "auto":
        dtype = parse_dtype(requested)
        if device.type == "cpu" and dtype == torch.bfloat16:
            choose_cpu_config(dtype="bf16")  # raises, saying why, where bf16 is not native
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    # bfloat16 only where the CPU computes it natively (AVX-512 BF16 or AMX); else float32.
    return choose_cpu_config().dtype


def describe_missing_model() -> str:
    from .weights import manual_steps

    return (
        "No DeblurDiff weights are configured. Without `--model` (or the "
        f"`{MODEL_ENV}` environment variable) the authors' checkpoint is downloaded and converted "
        "on the first start; otherwise pass a diffusers-layout folder or Hub repo id, or the official "
        "checkpoint `model.pth` (converted when loaded).\n" + manual_steps()
    )


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_download: bool | None = None,
    downloader=None,
):
    """Load a DeblurDiffPipeline on ``device`` (default: best available) in ``dtype``; ``model``
    defaults to ``$DEBLURDIFF_MODEL``, else the authors' checkpoint, fetched and converted once
    (:func:`deblurdiff.pipeline.weights.official_pipeline`). ``ModelUnavailableError`` says what to do."""
    from .pipeline_deblurdiff import DeblurDiffPipeline

    model = model or os.environ.get(MODEL_ENV)
    tokenizer = tokenizer or os.environ.get(TOKENIZER_ENV)
    device = device if isinstance(device, torch.device) else pick_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(device, dtype)
    official = None
    if not model:
        from .weights import WeightsUnavailableError, official_pipeline

        try:
            model = official = official_pipeline(
                dtype, allow_download=allow_download, downloader=downloader, tokenizer=tokenizer
            )
        except WeightsUnavailableError as exc:
            raise ModelUnavailableError(str(exc)) from None

    model = str(model)
    try:
        if model == RANDOM_TINY:
            from ..models.configs import build_components

            pipe = DeblurDiffPipeline(**build_components("tiny"))
        elif model.lower().endswith(SINGLE_FILE_SUFFIXES):
            if not Path(model).is_file():
                raise ModelUnavailableError(f"Checkpoint file not found: {model}. {describe_missing_model()}")
            pipe = DeblurDiffPipeline.from_single_file(model, tokenizer=tokenizer, torch_dtype=dtype)
        else:
            if not Path(model).is_dir() and not HUB_REPO_ID.fullmatch(model):
                raise ModelUnavailableError(f"Model folder not found: {model}. {describe_missing_model()}")
            pipe = DeblurDiffPipeline.from_pretrained(model, dtype=dtype)
    except ModelUnavailableError:
        raise
    except Exception as exc:  # network, missing files, corrupt weights: all end the same way for a user
        if official is not None:  # made from the cached checkpoint: rebuilt at the next start
            import shutil

            shutil.rmtree(official, ignore_errors=True)
            raise ModelUnavailableError(
                f"The cached conversion {official} could not be loaded ({type(exc).__name__}: {exc}); it was "
                "deleted and is made again from the downloaded checkpoint at the next start."
            ) from None
        raise ModelUnavailableError(f"Could not load DeblurDiff weights from {model!r}: {exc}") from exc

    pipe.untrained = model == RANDOM_TINY
    # Cast only what is not in ``dtype`` yet (casting loaded models makes diffusers warn).
    if any(m.dtype != dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module)):
        pipe.to(dtype=dtype)
    pipe.to(device=device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
