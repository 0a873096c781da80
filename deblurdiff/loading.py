"""One place that turns a model reference into a ready pipeline, for the app, the CLI and scripts.

A reference is a diffusers-layout folder, a Hub repo id, the official single-file
checkpoint (``model.pth``/``.ckpt``/``.safetensors``), or ``random-tiny`` (untrained
weights for development: never a deblurring result).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

MODEL_ENV = "DEBLURDIFF_MODEL"
TOKENIZER_ENV = "DEBLURDIFF_TOKENIZER"
RANDOM_TINY = "random-tiny"
SINGLE_FILE_SUFFIXES = (".pth", ".ckpt", ".pt", ".safetensors")
HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


class ModelUnavailableError(RuntimeError):
    """The weights could not be found or loaded; the message says what to do."""


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if requested and requested != "auto":
        if requested not in names:
            raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {requested!r}")
        if device.type == "cpu" and requested == "bf16":
            from .cpu import choose_cpu_config

            choose_cpu_config(dtype="bf16")  # raises, saying why, where bf16 is not native
        return names[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    from .cpu import choose_cpu_config

    # bfloat16 only where the CPU computes it natively (AVX-512 BF16 or AMX); else float32.
    return choose_cpu_config().dtype


def describe_missing_model() -> str:
    return (
        "No DeblurDiff weights are configured. Provide them with `--model` or the "
        f"`{MODEL_ENV}` environment variable: a diffusers-layout folder or Hub repo id, or the "
        "official checkpoint `model.pth` from the authors' repository (kkkls/DeblurDiff), "
        "which is converted when loaded (it holds no tokenizer: the Stable Diffusion 2.1-base "
        f"tokenizer is used, or pass `--tokenizer` / `{TOKENIZER_ENV}`)."
    )


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    tokenizer: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load a DeblurDiffPipeline on ``device`` (default: best available) in ``dtype``.

    Raises ``ModelUnavailableError`` with an actionable message when nothing is
    configured or the weights cannot be loaded.
    """
    from .pipeline import DeblurDiffPipeline

    model = model or os.environ.get(MODEL_ENV)
    tokenizer = tokenizer or os.environ.get(TOKENIZER_ENV)
    if not model:
        raise ModelUnavailableError(describe_missing_model())
    device = device if isinstance(device, torch.device) else pick_device(device)
    dtype = dtype if isinstance(dtype, torch.dtype) else pick_dtype(device, dtype)

    model = str(model)
    try:
        if model == RANDOM_TINY:
            from .models.configs import build_components

            pipe = DeblurDiffPipeline(**build_components("tiny"))
            pipe.untrained = True
        elif model.lower().endswith(SINGLE_FILE_SUFFIXES):
            if not Path(model).is_file():
                raise ModelUnavailableError(f"Checkpoint file not found: {model}. {describe_missing_model()}")
            pipe = DeblurDiffPipeline.from_single_file(model, tokenizer=tokenizer, torch_dtype=dtype)
        else:
            if not Path(model).is_dir() and not HUB_REPO_ID.fullmatch(model):
                raise ModelUnavailableError(f"Model folder not found: {model}. {describe_missing_model()}")
            pipe = DeblurDiffPipeline.from_pretrained(model, torch_dtype=dtype)
    except ModelUnavailableError:
        raise
    except Exception as exc:  # network, missing files, corrupt weights: all end the same way for a user
        raise ModelUnavailableError(f"Could not load DeblurDiff weights from {model!r}: {exc}") from exc

    pipe.untrained = getattr(pipe, "untrained", False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
