"""What the web app and the command line share: user input (numbers may be text) checked into
:class:`RestoreOptions` or an :class:`InvalidInputError` saying what was wrong, and the restore call."""

from __future__ import annotations

import math
import numbers
import re
import secrets
import time
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .image_io import InvalidInputError
from .parsing import parse_flag
from .pipeline.pipeline_deblurdiff import DEFAULT_STEPS, SAMPLERS

MIN_STEPS, MAX_STEPS = 1, 100
DEFAULT_GUIDANCE, MIN_GUIDANCE, MAX_GUIDANCE = 1.0, 1.0, 10.0
MIN_SEED, MAX_SEED = 0, 2**32 - 1
#: Seed value (besides None and an empty string) meaning "draw one at random".
RANDOM_SEED = -1

#: Tiling of large images: "auto" lets the pipeline decide.
TILING_CHOICES = ("auto", "on", "off")
DEFAULT_TILING = "auto"
DEFAULT_SAMPLER = "ddpm"
#: Longest prompt accepted (the text encoder reads 77 tokens anyway).
MAX_PROMPT_CHARS = 1000
UNTRAINED_LABEL = "UNTRAINED"
UNTRAINED_WARNING = (
    "UNTRAINED development weights (random-tiny): the output is NOT a deblurred image, "
    "it only exercises the code."
)
_MAX_STEM_CHARS = 100


def _to_number(value, label: str, hint: str, whole: bool) -> float | int:
    """A user-supplied number: int, float, numpy scalar or numeric text (as web forms send)."""
    number = value
    if isinstance(value, str):
        if not value.strip():
            raise InvalidInputError(f"{label} is empty. Please enter a number ({hint}).")
        try:
            number = int(value)  # exact however long; float() would make a long one inf
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise InvalidInputError(f"{label} must be a number ({hint}); got {value!r}.") from None
    if isinstance(number, (bool, np.bool_)):
        raise InvalidInputError(f"{label} must be a number ({hint}), not {value!r}.")
    if not isinstance(number, numbers.Real):
        raise InvalidInputError(f"{label} must be a number ({hint}); got a value of type '{type(value).__name__}'.")
    if isinstance(number, numbers.Integral):
        if abs(number) > 2**64:  # far outside every range here, and beyond what float() takes
            raise InvalidInputError(f"{label} must be {hint}; got a number far too large.")
        return int(number) if whole else float(number)
    if not math.isfinite(number):
        kind = "whole number" if whole else "number"
        raise InvalidInputError(f"{label} must be a finite {kind} ({hint}); got {number}.")
    if not whole:
        return float(number)
    if not float(number).is_integer():
        raise InvalidInputError(f"{label} must be a whole number ({hint}); got {number:g}.")
    return int(number)


def in_range(value, label: str, low, high, *, whole: bool = True) -> float | int:
    """``value`` as a number from ``low`` to ``high`` (a whole one unless ``whole=False``)."""
    show = str if whole else (lambda x: f"{x:g}")
    hint = f"{'a whole number ' if whole else ''}from {show(low)} to {show(high)}"
    number = _to_number(value, label, hint, whole)
    if not low <= number <= high:
        raise InvalidInputError(f"{label} must be between {show(low)} and {show(high)}; got {show(number)}.")
    return number


def validate_seed(value) -> int:
    """A whole number in [MIN_SEED, MAX_SEED]; None, "" or RANDOM_SEED draw one at random."""
    hint = f"a whole number from {MIN_SEED} to {MAX_SEED}, or {RANDOM_SEED} for a random seed"
    random = value is None or (isinstance(value, str) and not value.strip())
    seed = RANDOM_SEED if random else _to_number(value, "The seed", hint, whole=True)
    if seed == RANDOM_SEED:
        return secrets.randbelow(MAX_SEED + 1)
    if not MIN_SEED <= seed <= MAX_SEED:
        raise InvalidInputError(f"The seed must be {hint}; got {seed}.")
    return seed


def _flag(value, default: bool | None, error: str) -> bool:
    """A user-supplied switch: a boolean or its word ("true", "off", ...); ``default`` for None."""
    flag = default if value is None else parse_flag(value)
    if flag is None:
        raise InvalidInputError(f"{error}; got {value!r}.")
    return flag


def parse_tiling(value) -> bool | None:
    """``"auto"`` → None (the pipeline decides), ``"on"`` → True, ``"off"`` → False."""
    if value is None or str(value).strip().lower() in ("auto", ""):
        return None
    return _flag(value, None, f"Tiling must be one of {', '.join(TILING_CHOICES)}")


def validate_prompt(value, label: str, default: str | None) -> str | None:
    """The prompt as given ("" included); ``default`` when it is None."""
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidInputError(f"The {label} must be text; got a value of type '{type(value).__name__}'.")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidInputError(
            f"The {label} is too long ({len(value)} characters; at most {MAX_PROMPT_CHARS} are accepted)."
        )
    return value


def validate_sampler(value) -> str:
    sampler = DEFAULT_SAMPLER if value in (None, "") else value
    if sampler not in SAMPLERS:
        raise InvalidInputError(f"The sampler must be one of {', '.join(SAMPLERS)}; got {value!r}.")
    return sampler


def is_untrained(pipe) -> bool:
    return bool(getattr(pipe, "untrained", False))


def safe_stem(name: str, default: str = "image") -> str:
    """A file name stem that is safe on every platform and cannot leave its folder."""
    stem = Path(str(name).replace("\\", "/")).name
    stem = Path(stem).stem if "." in stem.lstrip(".") else stem
    stem = unicodedata.normalize("NFKC", stem)
    stem = re.sub(r"[^\w.-]+", "_", stem, flags=re.UNICODE)
    stem = re.sub(r"_+", "_", stem).strip("._-")
    stem = stem[:_MAX_STEM_CHARS].rstrip("._-")
    if not stem or stem.upper() in {"CON", "PRN", "AUX", "NUL"} or re.fullmatch(r"(?i)(COM|LPT)\d", stem):
        stem = f"{stem}_{default}" if stem else default
    return stem


@dataclass(frozen=True)
class RestoreOptions:
    """Validated settings of one run (see :func:`make_options`)."""

    steps: int = DEFAULT_STEPS
    seed: int = 0
    guidance_scale: float = DEFAULT_GUIDANCE
    prompt: str = ""
    negative_prompt: str | None = None  # None: the model's default negative prompt
    color_fix: bool = True
    tiled: bool | None = None  # None: the pipeline decides
    sampler: str = DEFAULT_SAMPLER
    return_lkpn_image: bool = False

    def pipeline_kwargs(self) -> dict:
        kwargs = {
            "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale, "prompt": self.prompt,
            "color_fix": self.color_fix, "tiled": self.tiled, "sampler": self.sampler,
            "return_lkpn_images": self.return_lkpn_image,
        }
        if self.negative_prompt is not None:
            kwargs["negative_prompt"] = self.negative_prompt
        return kwargs


def make_options(
    *,
    steps=DEFAULT_STEPS,
    seed=None,
    guidance_scale=DEFAULT_GUIDANCE,
    prompt=None,
    negative_prompt=None,
    color_fix: bool = True,
    tiling=None,
    sampler=None,
    return_lkpn_image: bool = False,
    randomize_seed=False,
) -> RestoreOptions:
    """Validate user input; ``seed=None`` or ``randomize_seed`` draws a random seed.
    Flags may be booleans or their words (``"true"``, ``"off"``, …). Raises InvalidInputError."""
    randomize = _flag(randomize_seed, False, "Randomize seed must be true or false")
    return RestoreOptions(
        steps=in_range(steps, "The number of steps", MIN_STEPS, MAX_STEPS),
        seed=validate_seed(None if randomize else seed),
        guidance_scale=in_range(guidance_scale, "The guidance scale", MIN_GUIDANCE, MAX_GUIDANCE, whole=False),
        prompt=validate_prompt(prompt, "prompt", ""),
        negative_prompt=validate_prompt(negative_prompt, "negative prompt", None),
        color_fix=_flag(color_fix, True, "Colour fix must be true or false"),
        tiled=parse_tiling(tiling),
        sampler=validate_sampler(sampler),
        return_lkpn_image=_flag(return_lkpn_image, False, "Show the LKPN view must be true or false"),
    )


@dataclass
class DeblurResult:
    image: object  # PIL.Image.Image
    lkpn_image: object | None
    options: RestoreOptions
    seconds: float
    interrupted: bool = False

    @property
    def seed(self) -> int:
        return self.options.seed

    @property
    def steps(self) -> int:
        return self.options.steps

    @property
    def guidance_scale(self) -> float:
        return self.options.guidance_scale


def restore(pipe, image, options: RestoreOptions, *, on_step=None, should_stop=None) -> DeblurResult:
    """:func:`restore_batch` for one RGB PIL image."""
    return restore_batch(pipe, [image], options, on_step=on_step, should_stop=should_stop)[0]


def restore_batch(pipe, images: list, options: RestoreOptions, *, on_step: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> list[DeblurResult]:
    """Run ``pipe`` on RGB PIL images that pad to the same size, in one call; ``should_stop()`` ends it
    after the current step (``interrupted=True``). A CPU generator seeded with ``options.seed`` per
    image: the same noise on every device, and each result the one it gives alone."""
    interrupted = False
    total = options.steps

    def callback(p, i, t, tensors):
        nonlocal interrupted
        if on_step is not None:
            on_step(min(i + 1, total), total)
        if should_stop is not None and should_stop():
            p.interrupt = True
            interrupted = True
        return {}

    start = time.perf_counter()
    out = pipe(
        images,
        generator=[torch.Generator("cpu").manual_seed(options.seed) for _ in images],
        output_type="pil",
        callback_on_step_end=callback,
        **options.pipeline_kwargs(),
    )
    seconds = (time.perf_counter() - start) / len(images)
    lkpn = out.lkpn_images or [None] * len(images)  # None unless asked for
    return [
        DeblurResult(image=image, lkpn_image=lkpn_image, options=options, seconds=seconds, interrupted=interrupted)
        for image, lkpn_image in zip(out.images, lkpn)
    ]


def png_metadata(result: DeblurResult, *, model: str | None, untrained: bool, extra: dict | None = None):
    """PNG text chunks recording how an output was made."""
    from PIL import PngImagePlugin

    from . import __version__

    fields = asdict(result.options)
    fields.pop("return_lkpn_image")
    fields.update(model=model, warning=UNTRAINED_WARNING if untrained else None, **(extra or {}))
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"deblurdiff {__version__}")
    for key, value in fields.items():
        if value is not None and value != "":
            info.add_text(f"deblurdiff:{key}", f"{value:g}" if isinstance(value, float) else str(value))
    return info
