"""Names and switches as users write them (command line, environment, UI): the one
place for dtype names, true/false words and Hub repo ids."""

from __future__ import annotations

import os
import re

import torch

#: The dtype names accepted everywhere (``--dtype``, folder names, logs).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}

#: A Hub repo id, ``owner/name``.
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_dtype(name: str, allowed=tuple(DTYPES)) -> torch.dtype:
    """``"fp16"`` (or ``"float16"``, ``"half"``) -> ``torch.float16``; anything outside
    ``allowed`` raises a ValueError naming the choices."""
    key = _ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
    if key not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(allowed)}; got {name!r}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"fp16"``."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return str(dtype).removeprefix("torch.")


def parse_flag(value) -> bool | None:
    """True for 1/true/yes/on, False for 0/false/no/off (any case), None otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    return True if text in _TRUE else False if text in _FALSE else None


def env_flag(name: str, default: bool) -> bool:
    """The environment variable ``name`` as a switch; ``default`` when unset or unclear."""
    value = parse_flag(os.environ.get(name, ""))
    return default if value is None else value
