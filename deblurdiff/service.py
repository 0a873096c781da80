"""Restore one image with given options: the step the web app and the command line share.

:func:`make_options` turns user input (form, command line or API; numbers may be strings)
into validated :class:`RestoreOptions` or an :class:`InvalidInputError` for the user;
:func:`restore` / :func:`restore_batch` run the pipeline; :func:`png_metadata` records
how an output was made.
"""

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
from .pipeline import DEFAULT_STEPS, SAMPLERS

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


def _to_number(value, label: str, hint: str) -> float | int:
    """A user-supplied number: int, float, numpy scalar or numeric string (as web forms send)."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"{label} must be a number ({hint}), not {value!r}.")
    if isinstance(value, (str, bytes)):
        text = (value.decode("utf-8", "replace") if isinstance(value, bytes) else value).strip()
        if not text:
            raise InvalidInputError(f"{label} is empty. Please enter a number ({hint}).")
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        raise InvalidInputError(f"{label} must be a number ({hint}); got {value!r}.")
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise InvalidInputError(f"{label} must be a number ({hint}); got a value of type '{type(value).__name__}'.")


def _to_whole(value, label: str, hint: str) -> int:
    number = _to_number(value, label, hint)
    if isinstance(number, float):
        if not math.isfinite(number):
            raise InvalidInputError(f"{label} must be a finite whole number ({hint}); got {number}.")
        if not number.is_integer():
            raise InvalidInputError(f"{label} must be a whole number ({hint}); got {number:g}.")
    return int(number)


def validate_steps(value) -> int:
    steps = _to_whole(value, "The number of steps", f"a whole number from {MIN_STEPS} to {MAX_STEPS}")
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise InvalidInputError(f"The number of steps must be between {MIN_STEPS} and {MAX_STEPS}; got {steps}.")
    return steps


def validate_seed(value) -> int:
    """A whole number in [MIN_SEED, MAX_SEED]; None, "" or RANDOM_SEED draw one at random."""
    hint = f"a whole number from {MIN_SEED} to {MAX_SEED}, or {RANDOM_SEED} for a random seed"
    random = value is None or (isinstance(value, str) and not value.strip())
    seed = RANDOM_SEED if random else _to_whole(value, "The seed", hint)
    if seed == RANDOM_SEED:
        return secrets.randbelow(MAX_SEED + 1)
    if not MIN_SEED <= seed <= MAX_SEED:
        raise InvalidInputError(f"The seed must be {hint}; got {seed}.")
    return seed


def validate_guidance(value) -> float:
    hint = f"from {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g}"
    scale = float(_to_number(value, "The guidance scale", hint))
    if not math.isfinite(scale):
        raise InvalidInputError(f"The guidance scale must be a finite number ({hint}); got {scale}.")
    if not MIN_GUIDANCE <= scale <= MAX_GUIDANCE:
        raise InvalidInputError(f"The guidance scale must be between {MIN_GUIDANCE:g} and {MAX_GUIDANCE:g}; got {scale:g}.")
    return scale


def parse_tiling(value) -> bool | None:
    """``"auto"`` → None (the pipeline decides), ``"on"`` → True, ``"off"`` → False."""
    if value is None or value is True or value is False:
        return value
    if str(value).strip().lower() in ("auto", ""):
        return None
    flag = parse_flag(str(value))
    if flag is None:
        raise InvalidInputError(f"Tiling must be one of {', '.join(TILING_CHOICES)}; got {value!r}.")
    return flag


def validate_flag(value, label: str, default: bool) -> bool:
    """A user-supplied switch (``None``: ``default``)."""
    flag = default if value is None else parse_flag(value)
    if flag is None:
        raise InvalidInputError(f"{label} must be true or false; got {value!r}.")
    return flag


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
        """Keyword arguments for ``pipe(...)``."""
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
    randomize = validate_flag(randomize_seed, "Randomize seed", False)
    return RestoreOptions(
        steps=validate_steps(steps),
        seed=validate_seed(None if randomize else seed),
        guidance_scale=validate_guidance(guidance_scale),
        prompt=validate_prompt(prompt, "prompt", ""),
        negative_prompt=validate_prompt(negative_prompt, "negative prompt", None),
        color_fix=validate_flag(color_fix, "Colour fix", True),
        tiled=parse_tiling(tiling),
        sampler=validate_sampler(sampler),
        return_lkpn_image=validate_flag(return_lkpn_image, "Show the LKPN view", False),
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


def restore(
    pipe,
    image,
    options: RestoreOptions,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> DeblurResult:
    """Run ``pipe`` on one RGB PIL image; ``on_step(done, total)`` after every step, and
    ``should_stop()`` stops it after the current one (``interrupted=True``). The initial
    noise comes from a CPU generator: a seed starts from the same noise on every device."""
    return restore_batch(pipe, [image], options, on_step=on_step, should_stop=should_stop)[0]


def restore_batch(
    pipe,
    images,
    options: RestoreOptions,
    *,
    on_step: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> list[DeblurResult]:
    """:func:`restore` for several RGB PIL images that pad to the same size, in one
    pipeline call: each image has its own generator seeded with ``options.seed``, so each
    result is the one :func:`restore` gives (within float rounding). ``seconds`` is the
    call's time shared equally."""
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

    images = list(images)
    start = time.perf_counter()
    out = pipe(
        images,
        generator=[torch.Generator("cpu").manual_seed(options.seed) for _ in images],
        output_type="pil",
        callback_on_step_end=callback,
        **options.pipeline_kwargs(),
    )
    seconds = (time.perf_counter() - start) / len(images)
    lkpn = out.lkpn_images if options.return_lkpn_image and out.lkpn_images is not None else [None] * len(images)
    return [
        DeblurResult(image=image, lkpn_image=lkpn_image, options=options, seconds=seconds, interrupted=interrupted)
        for image, lkpn_image in zip(out.images, lkpn)
    ]


def png_metadata(result: DeblurResult, *, model: str | None, untrained: bool, extra: dict | None = None):
    """PNG text chunks recording how an output was made."""
    from PIL import PngImagePlugin

    from . import __version__

    options = asdict(result.options)
    options.pop("return_lkpn_image")
    fields = {"Software": f"deblurdiff {__version__}"}
    for key, value in options.items():
        if value is not None and value != "":
            fields[f"deblurdiff:{key}"] = f"{value:g}" if isinstance(value, float) else str(value)
    if model:
        fields["deblurdiff:model"] = str(model)
    if untrained:
        fields["deblurdiff:warning"] = UNTRAINED_WARNING
    for key, value in (extra or {}).items():
        fields[f"deblurdiff:{key}"] = str(value)
    info = PngImagePlugin.PngInfo()
    for key, value in fields.items():
        info.add_text(key, value)
    return info
