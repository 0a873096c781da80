"""Robust loading and validation of user inputs (images and sampling parameters).

Shared by the web app, the API and the command line. Every problem with the
input is reported as :class:`InvalidInputError`, whose message is meant to be
shown to the user verbatim: it says what was wrong and what to do about it.

Images
------
:func:`load_image` accepts a path, raw bytes, a binary file object, a PIL image
or a numpy array and always returns an 8-bit RGB ``PIL.Image.Image``.
:func:`load_image_with_notes` returns the same image plus a list of
human-readable notes on what was done to it (e.g. "upscaled from 40×30"),
suitable for showing in a UI. Along the way it

* uses the first frame of animated GIF / WebP / APNG files and the first page
  of multi-page TIFFs;
* applies the EXIF orientation of camera photos;
* composites transparent images (RGBA, LA, PA, palette/greyscale with a
  transparent colour) onto a white background;
* converts greyscale, palette, CMYK and other colour modes to RGB, using an
  embedded ICC profile when there is one (colours are converted to sRGB);
* scales 16-bit (and 32-bit integer / float) greyscale data to 8 bits instead
  of clipping it. 16-bit RGB PNG/TIFF files are reduced to 8 bits by the
  decoder (top byte), which is within one level of exact rounding;
* upscales images whose short side is below ``min_side`` (bicubic), or
  refuses them if ``upscale_small=False``;
* refuses images larger than ``max_pixels`` *before* decoding the pixel data,
  and refuses decompression bombs (files whose header claims an enormous
  size) without decoding them.

The default pixel limit is 4096 × 4096 = 16,777,216 pixels (16.8 megapixels).
It can be changed with the ``DEBLURDIFF_MAX_PIXELS`` environment variable,
read once at import time; it accepts a pixel count (``25000000``,
``2.5e7``) or a size (``5000x5000``).

Parameters
----------
:func:`validate_parameters` normalises the sampling steps, the seed and the
guidance scale, accepting numbers or numeric strings (as web forms send) and
rejecting anything else with a specific message.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
import secrets
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "InvalidInputError",
    "LoadedImage",
    "Parameters",
    "load_image",
    "load_image_with_notes",
    "validate_parameters",
    "max_pixels_from_env",
    "MAX_PIXELS_ENV_VAR",
    "BUILTIN_MAX_PIXELS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "SUPPORTED_FORMATS",
    "DEFAULT_STEPS",
    "MIN_STEPS",
    "MAX_STEPS",
    "DEFAULT_GUIDANCE",
    "MIN_GUIDANCE",
    "MAX_GUIDANCE",
    "MIN_SEED",
    "MAX_SEED",
    "RANDOM_SEED",
]


class InvalidInputError(ValueError):
    """The user's input cannot be used. ``str(err)`` is a message for the user."""


# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

#: Environment variable overriding the default pixel limit.
MAX_PIXELS_ENV_VAR = "DEBLURDIFF_MAX_PIXELS"
#: Pixel limit used when the environment variable is unset: 4096 × 4096.
BUILTIN_MAX_PIXELS = 4096 * 4096
#: Images whose short side is below this are upscaled (or refused).
DEFAULT_MIN_SIDE = 64
#: Human-readable list of formats, for messages.
SUPPORTED_FORMATS = "PNG, JPEG, WebP, BMP, TIFF or GIF"

DEFAULT_STEPS = 50
MIN_STEPS = 1
MAX_STEPS = 100
DEFAULT_GUIDANCE = 1.0
MIN_GUIDANCE = 1.0
MAX_GUIDANCE = 10.0
MIN_SEED = 0
MAX_SEED = 2**32 - 1
#: Seed value (besides ``None`` and an empty string) meaning "pick one at random".
RANDOM_SEED = -1

_FLOAT_TOLERANCE = 0.02  # float arrays may overshoot [0, 1] by this much (then clipped)
_SIZE_RE = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\d+)\s*$", re.IGNORECASE)


def max_pixels_from_env(environ: Optional[dict] = None) -> int:
    """Pixel limit from ``DEBLURDIFF_MAX_PIXELS`` (or :data:`BUILTIN_MAX_PIXELS`).

    Accepts a positive pixel count (``"25000000"``, ``"2.5e7"``) or a size
    (``"5000x5000"``). An invalid value triggers a warning and the built-in
    limit is used.
    """
    env = os.environ if environ is None else environ
    raw = env.get(MAX_PIXELS_ENV_VAR)
    if raw is None or not str(raw).strip():
        return BUILTIN_MAX_PIXELS
    text = str(raw).strip().replace("_", "").replace(",", "")
    value: Optional[int] = None
    match = _SIZE_RE.match(text)
    if match:
        value = int(match.group(1)) * int(match.group(2))
    else:
        try:
            number = float(text)
        except ValueError:
            number = float("nan")
        if math.isfinite(number) and number == int(number):
            value = int(number)
    if value is None or value <= 0:
        warnings.warn(
            f"Ignoring {MAX_PIXELS_ENV_VAR}={raw!r}: expected a positive pixel count such as "
            f"16777216 or a size such as 4096x4096. Using {BUILTIN_MAX_PIXELS} pixels.",
            RuntimeWarning,
            stacklevel=2,
        )
        return BUILTIN_MAX_PIXELS
    return value


#: Default pixel limit: ``DEBLURDIFF_MAX_PIXELS`` at import time, else 16,777,216.
DEFAULT_MAX_PIXELS = max_pixels_from_env()


# --------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------


@dataclass
class LoadedImage:
    """An input image ready for the model, with notes on how it was prepared."""

    image: Image.Image
    """8-bit RGB image."""
    notes: List[str] = field(default_factory=list)
    """Human-readable notes on conversions applied (empty if none)."""
    original_size: Tuple[int, int] = (0, 0)
    """``(width, height)`` before upscaling (after EXIF rotation)."""
    source_format: Optional[str] = None
    """Decoder format (``"JPEG"``, ``"PNG"``, ...); ``None`` for arrays and in-memory images."""

    @property
    def upscaled(self) -> bool:
        return self.image.size != self.original_size

    @property
    def size(self) -> Tuple[int, int]:
        return self.image.size


# --------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------


def _dims(size: Tuple[int, int]) -> str:
    return f"{size[0]}×{size[1]}"


def _mp(pixels: int) -> str:
    mp = pixels / 1e6
    return f"{mp:.1f} megapixels" if mp >= 0.1 else f"{mp:.2g} megapixels"


def _limit_text(max_pixels: int) -> str:
    side = int(math.isqrt(max_pixels))
    approx = "e.g. " if side * side == max_pixels else "about "
    return f"{max_pixels:,} pixels ({_mp(max_pixels)}, {approx}{side}×{side})"


def _too_large_error(size: Tuple[int, int], max_pixels: int, name: str) -> InvalidInputError:
    w, h = size
    scale = math.sqrt(max_pixels / (w * h))
    sw, sh = max(1, int(w * scale)), max(1, int(h * scale))
    return InvalidInputError(
        f"{name} is too large: {_dims(size)} pixels ({_mp(w * h)}), but the limit is "
        f"{_limit_text(max_pixels)}. Please downscale it (for example to {_dims((sw, sh))}) "
        "and try again."
    )


def _bomb_error(exc: BaseException, max_pixels: int, name: str) -> InvalidInputError:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    claimed = f" ({int(match.group(1)):,} pixels, {_mp(int(match.group(1)))})" if match else ""
    return InvalidInputError(
        f"{name} declares an enormous image size{claimed}, more than twice the limit of "
        f"{_limit_text(max_pixels)}. It was refused without being decoded because files like "
        "this can exhaust the server's memory (a 'decompression bomb'). If it is a genuine "
        "photo, please downscale it and try again."
    )


# --------------------------------------------------------------------------
# Decompression-bomb guard
# --------------------------------------------------------------------------

_PIL_LIMIT_LOCK = threading.Lock()


@contextmanager
def _pil_pixel_guard(max_pixels: int) -> Iterator[None]:
    """Make Pillow's own bomb check consistent with ``max_pixels``, temporarily.

    Pillow refuses images above ``2 * Image.MAX_IMAGE_PIXELS`` when opening
    them (``DecompressionBombError``, turned into a message by the caller) and
    warns above ``Image.MAX_IMAGE_PIXELS``. The warning is silenced here because
    the caller checks every header size against ``max_pixels`` itself before
    decoding, and refuses with a message naming the size. The global limit is
    left untouched unless ``max_pixels`` exceeds it, in which case it is raised
    to ``max_pixels`` for the duration of the block (under a lock) and always
    restored.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        current = Image.MAX_IMAGE_PIXELS
        if current is None or current >= max_pixels:
            yield
            return
        with _PIL_LIMIT_LOCK:
            saved = Image.MAX_IMAGE_PIXELS
            raise_it = saved is not None and saved < max_pixels
            if raise_it:
                Image.MAX_IMAGE_PIXELS = max_pixels
            try:
                yield
            finally:
                if raise_it:
                    Image.MAX_IMAGE_PIXELS = saved


# --------------------------------------------------------------------------
# Recognising what a non-image file is
# --------------------------------------------------------------------------


def _sniff(head: bytes) -> Optional[str]:
    """Describe a file that Pillow could not identify, from its first bytes."""
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "a HEIC/HEIF photo, which is not supported here (convert it to JPEG or PNG first; on an iPhone, choose Settings → Camera → Formats → Most Compatible)"
        return "a video or audio file"
    if head.startswith(b"RIFF") and head[8:12] in (b"AVI ", b"WAVE"):
        return "a video or audio file"
    if head.startswith((b"\x1aE\xdf\xa3", b"ID3", b"OggS", b"fLaC")):
        return "a video or audio file"
    if head.startswith((b"PK\x03\x04", b"\x1f\x8b", b"7z\xbc\xaf", b"Rar!")):
        return "a compressed archive (ZIP, GZIP, 7z or RAR) or an office document"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "a TIFF variant that cannot be read (for example floating-point or multi-channel data); save it as an 8- or 16-bit RGB TIFF or PNG"
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<svg", b"<?xml")) and b"<svg" in lowered:
        return "an SVG vector drawing (export it as PNG first)"
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "a web page (HTML), not an image — perhaps the link pointed to a page rather than to the picture itself"
    if head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            # A truncated multi-byte character at the end is still text.
            try:
                text = head[:-3].decode("utf-8")
            except UnicodeDecodeError:
                text = ""
        if text and sum(ch.isprintable() or ch in "\r\n\t" for ch in text) >= 0.95 * len(text):
            return "a text file"
    return None


# --------------------------------------------------------------------------
# Pixel conversions
# --------------------------------------------------------------------------


def _u16_to_u8(arr: np.ndarray) -> np.ndarray:
    """Scale 0..65535 to 0..255 with rounding (65535 → 255, 32896 → 128)."""
    a = arr.astype(np.uint32)
    return ((a * 255 + 32767) // 65535).astype(np.uint8)


def _wide_grey_to_u8(arr: np.ndarray, notes: List[str], what: str) -> np.ndarray:
    """Convert a 32-bit integer or float greyscale array to uint8.

    Integers: values within 0..255 are taken as 8-bit, within 0..65535 as
    16-bit; floats within [0, 1] as normalised. Anything else is stretched from
    its minimum to its maximum (with a note).
    """
    a = np.asarray(arr, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0.0)
        notes.append(f"The {what} image contained invalid (NaN/infinite) pixels; they were set to black.")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    is_float = np.asarray(arr).dtype.kind == "f"
    if is_float and lo >= 0.0 and hi <= 1.0:
        out = a * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        out = a
    elif lo >= 0.0 and hi <= 65535.0:
        out = a / 257.0
        notes.append(f"The {what} image was scaled from 16 bits to 8 bits per channel.")
    else:
        span = hi - lo if hi > lo else 1.0
        out = (a - lo) * (255.0 / span)
        notes.append(
            f"The {what} image has values from {lo:g} to {hi:g}; they were stretched to the 0–255 range."
        )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _flatten_alpha(img: Image.Image, notes: List[str]) -> Image.Image:
    """Composite an image with transparency onto white; returns RGB."""
    rgba = img.convert("RGBA")
    lo, _ = rgba.getchannel("A").getextrema()
    if lo < 255:
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgba = Image.alpha_composite(white, rgba)
        notes.append("Transparent areas were filled with white.")
    return rgba.convert("RGB")


def _icc_to_srgb(img: Image.Image, notes: List[str]) -> Optional[Image.Image]:
    """Convert an RGB/CMYK image with an embedded ICC profile to sRGB; None if not applicable."""
    icc = img.info.get("icc_profile")
    if not icc:
        return None
    try:
        from PIL import ImageCms

        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        expected = {"RGB": "RGB", "CMYK": "CMYK"}.get(img.mode)
        if space != expected:
            return None
        description = (ImageCms.getProfileDescription(profile) or "").strip()
        if img.mode == "RGB" and "srgb" in description.lower():
            return None
        converted = ImageCms.profileToProfile(
            img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB"
        )
    except Exception:  # a broken or unsupported profile: fall back to a plain conversion
        return None
    if converted is None:
        return None
    label = f" '{description}'" if description else ""
    notes.append(f"Colours were converted from the embedded colour profile{label} to sRGB.")
    return converted


def _to_rgb(img: Image.Image, notes: List[str], name: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (always returns a new image)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode.startswith("I;16"):
            grey = _u16_to_u8(arr)
            notes.append("The 16-bit greyscale image was scaled to 8 bits per channel.")
        else:
            what = "32-bit integer greyscale" if mode == "I" else "floating-point greyscale"
            grey = _wide_grey_to_u8(arr, notes, what)
        notes.append("Greyscale image: converted to RGB.")
        return Image.fromarray(grey, mode="L").convert("RGB")

    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "1", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        if mode in ("L", "LA", "La", "1"):
            notes.append("Greyscale image: converted to RGB.")
        return _flatten_alpha(img, notes)

    if mode == "RGB":
        return _icc_to_srgb(img, notes) or img.convert("RGB")
    if mode in ("L", "1"):
        notes.append("Greyscale image: converted to RGB.")
        return img.convert("RGB")
    if mode == "P":
        return img.convert("RGB")
    if mode == "CMYK":
        converted = _icc_to_srgb(img, notes)
        if converted is None:
            converted = img.convert("RGB")
            notes.append("The CMYK (print) image was converted to RGB.")
        return converted
    try:
        if mode == "LAB":
            from PIL import ImageCms

            transform = ImageCms.buildTransform(
                ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
            )
            return ImageCms.applyTransform(img, transform)
        return img.convert("RGB")
    except Exception as exc:
        raise InvalidInputError(
            f"{name} uses the colour mode '{mode}', which cannot be converted to RGB "
            f"({exc}). Please save it as an ordinary RGB {SUPPORTED_FORMATS} image."
        ) from None


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def _corrupt_error(exc: BaseException, name: str) -> InvalidInputError:
    detail = str(exc).strip() or type(exc).__name__
    truncated = isinstance(exc, EOFError) or "truncated" in detail.lower() or "end of file" in detail.lower()
    if truncated:
        what = "is truncated (the file is incomplete, for example because a download or upload was interrupted)"
    else:
        what = "is damaged and could not be decoded"
    return InvalidInputError(
        f"{name} {what}. Please re-save or re-upload the original image. (Details: {detail})"
    )


def _frame_count(img: Image.Image) -> int:
    try:
        return int(getattr(img, "n_frames", 1) or 1)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception:
        # Later frames are unreadable; the first one may still be fine.
        return 1


def _prepare_pil(img: Image.Image, name: str, max_pixels: int, notes: List[str]) -> Image.Image:
    """Select the first frame, check the size, decode, apply EXIF and convert to RGB.

    Must run inside :func:`_pil_pixel_guard`. Returns a new image.
    """
    if img.width <= 0 or img.height <= 0:
        raise InvalidInputError(f"{name} has no pixels ({_dims(img.size)}). Please use a real image.")
    # The pixel limit is checked on the header size, before any pixel data is decoded.
    if img.width * img.height > max_pixels:
        raise _too_large_error(img.size, max_pixels, name)

    n_frames = _frame_count(img)
    try:
        if n_frames > 1 or getattr(img, "tell", lambda: 0)() != 0:
            img.seek(0)
        img.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except MemoryError:
        raise _too_large_error(img.size, max_pixels, name) from None
    except Exception as exc:  # Pillow plugins raise many exception types on bad data
        raise _corrupt_error(exc, name) from None
    if n_frames > 1:
        if (img.format or "").upper() == "TIFF":
            notes.append(f"The file has {n_frames} pages; only the first page is used.")
        else:
            notes.append(f"Animated image with {n_frames} frames: only the first frame is used.")
    # Some formats (GIF) can grow while decoding the first frame.
    if img.width * img.height > max_pixels:
        raise _too_large_error(img.size, max_pixels, name)

    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:
        orientation = 1
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        try:
            rotated = ImageOps.exif_transpose(img)
        except Exception:
            notes.append("The EXIF orientation tag could not be applied; the image is used as stored.")
        else:
            if rotated is not None:
                img = rotated
                notes.append("The photo was rotated/flipped upright according to its EXIF orientation tag.")
    return _to_rgb(img, notes, name)


def _decode_encoded(fp: Any, name: str, max_pixels: int, notes: List[str], head: bytes) -> Tuple[Image.Image, Optional[str]]:
    """Open and decode an encoded image from a path or a binary stream."""
    try:
        with _pil_pixel_guard(max_pixels):
            try:
                opened = Image.open(fp)
            except UnidentifiedImageError:
                kind = _sniff(head)
                what = f"it looks like {kind}" if kind else "the format is not recognised or the file is damaged"
                raise InvalidInputError(
                    f"{name} is not an image that can be read: {what}. "
                    f"Please upload a photo in {SUPPORTED_FORMATS} format."
                ) from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning, InvalidInputError):
                raise
            except MemoryError:
                raise InvalidInputError(
                    f"{name} is too large to open. The limit is {_limit_text(max_pixels)}."
                ) from None
            except Exception as exc:
                raise _corrupt_error(exc, name) from None
            with opened:
                fmt = opened.format
                image = _prepare_pil(opened, name, max_pixels, notes)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, max_pixels, name) from None
    return image, fmt


def _from_array(source: Any, max_pixels: int, notes: List[str]) -> Image.Image:
    name = "The image array"
    try:
        arr = np.asarray(source)
    except Exception as exc:
        raise InvalidInputError(f"{name} could not be converted to a numpy array ({exc}).") from None
    shape = tuple(arr.shape)
    if arr.dtype == object or arr.dtype.kind in "cSUVMm":
        raise InvalidInputError(
            f"{name} has an unsupported data type ({arr.dtype}). Use uint8 (0–255), uint16 "
            "(0–65535) or float (0.0–1.0) values."
        )
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4) and arr.shape[0] in (1, 3, 4):
        raise InvalidInputError(
            f"{name} has shape {shape}, which looks like channels-first (C×H×W) layout. "
            "Please pass it as height × width × channels, e.g. arr.transpose(1, 2, 0)."
        )
    if arr.ndim == 4 and arr.shape[0] == 1:
        raise InvalidInputError(
            f"{name} has shape {shape}, with a leading batch dimension. Please pass a single "
            "image of shape H×W, H×W×3 or H×W×4, e.g. arr[0]."
        )
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise InvalidInputError(
            f"{name} has shape {shape}; expected H×W (greyscale), H×W×3 (RGB) or H×W×4 (RGBA)."
        )
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise InvalidInputError(f"{name} is empty (shape {shape}). Please pass an image with pixels.")
    if h * w > max_pixels:
        raise _too_large_error((w, h), max_pixels, name)

    kind = arr.dtype.kind
    if kind == "b":
        data = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        data = arr
    elif arr.dtype == np.uint16:
        data = _u16_to_u8(arr)
        notes.append("The 16-bit image was scaled to 8 bits per channel.")
    elif kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise InvalidInputError(
                f"{name} has integer type {arr.dtype} with values from {lo} to {hi}. Integer "
                "images must be uint8 (0–255) or uint16 (0–65535); convert it, for example with "
                "arr.astype('uint16') for 16-bit data, or pass floats in [0, 1]."
            )
        data = arr.astype(np.uint8)
    elif kind == "f":
        a = arr.astype(np.float64)
        if not np.isfinite(a).all():
            raise InvalidInputError(
                f"{name} contains NaN or infinite values. Please replace them (e.g. with "
                "numpy.nan_to_num) before passing the image."
            )
        lo, hi = float(a.min()), float(a.max())
        if lo < -_FLOAT_TOLERANCE or hi > 1.0 + _FLOAT_TOLERANCE:
            hints = []
            if lo >= 0.0 and hi <= 255.0:
                hints.append("if it holds 0–255 values, divide it by 255")
            if lo >= -1.0 - _FLOAT_TOLERANCE and hi <= 1.0 + _FLOAT_TOLERANCE:
                hints.append("if it is in [-1, 1], use (arr + 1) / 2")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise InvalidInputError(
                f"{name} has float values from {lo:.4g} to {hi:.4g}, but float images must be "
                f"in the range [0, 1]{hint}."
            )
        data = np.clip(np.rint(np.clip(a, 0.0, 1.0) * 255.0), 0, 255).astype(np.uint8)
    else:  # pragma: no cover - all numeric kinds are handled above
        raise InvalidInputError(f"{name} has an unsupported data type ({arr.dtype}).")

    data = np.ascontiguousarray(data)
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim == 2:
        notes.append("Greyscale image: converted to RGB.")
        return Image.fromarray(data, mode="L").convert("RGB")
    if data.shape[2] == 4:
        return _flatten_alpha(Image.fromarray(data, mode="RGBA"), notes)
    return Image.fromarray(data, mode="RGB")


def _display_name(path: Any) -> str:
    return f"The file '{os.path.basename(os.fspath(path)) or os.fspath(path)}'"


def _empty_error(name: str) -> InvalidInputError:
    return InvalidInputError(f"{name} is empty (0 bytes). Please choose an image file and try again.")


def _check_int_option(value: Any, label: str, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{label} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _decode_path(source: Any, max_pixels: int, notes: List[str]) -> Tuple[Image.Image, Optional[str]]:
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
        raise InvalidInputError(
            f"'{text}' looks like a web address. Loading images from URLs is not supported; "
            "please download the image and upload the file instead."
        )
    if not text.strip():
        raise InvalidInputError(f"No image was provided (the file name is empty). Please upload an image ({SUPPORTED_FORMATS}).")
    if "\x00" in text:
        raise InvalidInputError("The file name contains a NUL character, so it is not a valid path.")
    name = _display_name(text)
    path = Path(text)
    try:
        if not path.exists():
            raise InvalidInputError(f"{name} was not found. Please check that the path is correct and the file exists.")
        if path.is_dir():
            raise InvalidInputError(f"{name} is a folder, not an image file. Please choose an image file.")
        if path.stat().st_size == 0:
            raise _empty_error(name)
        with open(path, "rb") as fh:
            head = fh.read(512)
            fh.seek(0)
            return _decode_encoded(fh, name, max_pixels, notes, head)
    except PermissionError:
        raise InvalidInputError(f"{name} cannot be read (permission denied). Please check its permissions.") from None
    except InvalidInputError:
        raise
    except OSError as exc:
        raise InvalidInputError(f"{name} could not be read ({exc.strerror or exc}).") from None


def _decode_bytes(data: bytes, name: str, max_pixels: int, notes: List[str]) -> Tuple[Image.Image, Optional[str]]:
    if not data:
        raise _empty_error(name)
    return _decode_encoded(io.BytesIO(data), name, max_pixels, notes, data[:512])


def _decode_file_object(source: Any, max_pixels: int, notes: List[str]) -> Tuple[Image.Image, Optional[str]]:
    raw_name = getattr(source, "name", None)
    name = _display_name(raw_name) if isinstance(raw_name, (str, os.PathLike)) and os.fspath(raw_name) else "The uploaded file"
    try:
        if getattr(source, "seekable", lambda: False)():
            source.seek(0)
        data = source.read()
    except Exception as exc:
        raise InvalidInputError(f"{name} could not be read ({exc}).") from None
    if isinstance(data, str):
        raise InvalidInputError(f"{name} was opened in text mode. Please open image files in binary mode ('rb').")
    return _decode_bytes(bytes(data) if data else b"", name, max_pixels, notes)


def _from_pil(source: Image.Image, max_pixels: int, notes: List[str]) -> Tuple[Image.Image, Optional[str]]:
    name = "The image"
    try:
        with _pil_pixel_guard(max_pixels):
            return _prepare_pil(source, name, max_pixels, notes), source.format
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb_error(exc, max_pixels, name) from None


def _decode_any(source: Any, max_pixels: int, notes: List[str]) -> Tuple[Image.Image, Optional[str]]:
    """Decode whatever kind of source was given; returns the RGB image and its file format."""
    if source is None:
        raise InvalidInputError(f"No image was provided. Please upload an image ({SUPPORTED_FORMATS}).")
    if isinstance(source, Image.Image):
        return _from_pil(source, max_pixels, notes)
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels, notes), None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode_bytes(bytes(source), "The uploaded file", max_pixels, notes)
    if isinstance(source, (str, os.PathLike)):
        return _decode_path(source, max_pixels, notes)
    if hasattr(source, "read"):
        return _decode_file_object(source, max_pixels, notes)
    if hasattr(source, "__array__") or hasattr(source, "__array_interface__"):
        return _from_array(source, max_pixels, notes), None
    raise InvalidInputError(
        f"Unsupported input of type '{type(source).__name__}'. Please provide an image file "
        "(path, bytes or file object), a PIL image or a numpy array."
    )


def _ensure_min_side(image: Image.Image, min_side: int, upscale_small: bool, max_pixels: int, notes: List[str]) -> Image.Image:
    """Upscale (or refuse) an image whose short side is under ``min_side``."""
    original_size = image.size
    short = min(original_size)
    if short >= min_side:
        return image
    if not upscale_small:
        raise InvalidInputError(
            f"The image is only {_dims(original_size)} pixels, but each side must be at "
            f"least {min_side} pixels. Please use a larger image."
        )
    scale = min_side / short
    w, h = original_size
    new_size = (
        min_side if w == short else max(min_side, int(round(w * scale))),
        min_side if h == short else max(min_side, int(round(h * scale))),
    )
    if new_size[0] * new_size[1] > max_pixels:
        raise InvalidInputError(
            f"The image is {_dims(original_size)} pixels: too narrow to process. It would have "
            f"to be enlarged to {_dims(new_size)} to reach the minimum side of {min_side} pixels, "
            f"which exceeds the limit of {_limit_text(max_pixels)}. Please crop it to a less "
            "extreme shape."
        )
    notes.append(
        f"The image was small ({_dims(original_size)}), so it was upscaled to {_dims(new_size)} "
        f"(the minimum side is {min_side} pixels); expect limited detail."
    )
    return image.resize(new_size, Image.Resampling.BICUBIC)


def load_image_with_notes(
    source: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    upscale_small: bool = True,
) -> LoadedImage:
    """Load ``source`` as an 8-bit RGB image and describe what was done to it.

    Parameters
    ----------
    source:
        A path (``str`` / ``os.PathLike``), ``bytes``, a binary file object, a
        ``PIL.Image.Image`` or a numpy array (H×W, H×W×1, H×W×3 or H×W×4; uint8,
        uint16 or float in [0, 1]; bool is taken as black/white). Objects
        supporting ``__array__`` are accepted as arrays.
    max_pixels:
        Refuse images with more pixels than this (checked before decoding).
    min_side:
        Minimum length of the short side.
    upscale_small:
        If true, smaller images are upscaled (bicubic) so that the short side
        is exactly ``min_side``; otherwise they are refused.

    Raises
    ------
    InvalidInputError
        With a message for the user.
    ValueError
        If ``max_pixels`` or ``min_side`` themselves are invalid (a programming error).
    """
    max_pixels = _check_int_option(max_pixels, "max_pixels", 1)
    min_side = _check_int_option(min_side, "min_side", 1)
    notes: List[str] = []
    image, fmt = _decode_any(source, max_pixels, notes)
    original_size = image.size
    image = _ensure_min_side(image, min_side, upscale_small, max_pixels, notes)
    image.info = {"deblurdiff_notes": list(notes), "deblurdiff_original_size": original_size}
    return LoadedImage(image=image, notes=notes, original_size=original_size, source_format=fmt)


def load_image(
    source: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    upscale_small: bool = True,
) -> Image.Image:
    """Load ``source`` as an 8-bit RGB ``PIL.Image.Image``.

    Same as :func:`load_image_with_notes` but returns only the image. The notes
    are also available as ``image.info["deblurdiff_notes"]`` and the size before
    upscaling as ``image.info["deblurdiff_original_size"]``.
    """
    return load_image_with_notes(
        source, max_pixels=max_pixels, min_side=min_side, upscale_small=upscale_small
    ).image


# --------------------------------------------------------------------------
# Sampling parameters
# --------------------------------------------------------------------------


class Parameters(NamedTuple):
    steps: int
    seed: int
    guidance_scale: float


def _to_number(value: Any, label: str, hint: str) -> float | int:
    """Parse a user-supplied number (int, float, numpy scalar or numeric string)."""
    if isinstance(value, (bool, np.bool_)):
        raise InvalidInputError(f"{label} must be a number ({hint}), not {value!r}.")
    if isinstance(value, (str, bytes)):
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        text = text.strip()
        if not text:
            raise InvalidInputError(f"{label} is empty. Please enter a number ({hint}).")
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise InvalidInputError(f"{label} must be a number ({hint}); got {value!r}.") from None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise InvalidInputError(
        f"{label} must be a number ({hint}); got a value of type '{type(value).__name__}'."
    )


def _to_whole(value: Any, label: str, hint: str) -> int:
    number = _to_number(value, label, hint)
    if isinstance(number, float):
        if not math.isfinite(number):
            raise InvalidInputError(f"{label} must be a finite whole number ({hint}); got {number}.")
        if not number.is_integer():
            raise InvalidInputError(f"{label} must be a whole number ({hint}); got {number:g}.")
        number = int(number)
    return number


def validate_parameters(
    steps: Any = DEFAULT_STEPS,
    seed: Any = None,
    guidance_scale: Any = DEFAULT_GUIDANCE,
) -> Parameters:
    """Validate and normalise sampling parameters.

    * ``steps``: whole number in ``[MIN_STEPS, MAX_STEPS]`` (1..100).
    * ``seed``: whole number in ``[MIN_SEED, MAX_SEED]`` (0..2**32-1); ``None``,
      an empty string or ``-1`` draw a random seed, which is returned so that
      the result can be reproduced.
    * ``guidance_scale``: finite number in ``[MIN_GUIDANCE, MAX_GUIDANCE]`` (1..10).

    Numbers may be given as Python or numpy numbers, or as numeric strings.
    Integral floats (``50.0``) are accepted for whole numbers. Booleans, NaN,
    infinities and non-numeric strings are refused.

    Returns a :class:`Parameters` named tuple ``(steps, seed, guidance_scale)``
    of ``(int, int, float)``; raises :class:`InvalidInputError` otherwise.
    """
    steps_hint = f"a whole number from {MIN_STEPS} to {MAX_STEPS}"
    n_steps = _to_whole(steps, "The number of steps", steps_hint)
    if not MIN_STEPS <= n_steps <= MAX_STEPS:
        raise InvalidInputError(
            f"The number of steps must be between {MIN_STEPS} and {MAX_STEPS}; got {n_steps}."
        )

    seed_hint = f"a whole number from {MIN_SEED} to {MAX_SEED}, or {RANDOM_SEED} for a random seed"
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        n_seed = RANDOM_SEED
    else:
        n_seed = _to_whole(seed, "The seed", seed_hint)
    if n_seed == RANDOM_SEED:
        n_seed = secrets.randbelow(MAX_SEED + 1)
    elif not MIN_SEED <= n_seed <= MAX_SEED:
        raise InvalidInputError(f"The seed must be {seed_hint}; got {n_seed}.")

    guidance_hint = f"from {MIN_GUIDANCE:g} to {MAX_GUIDANCE:g}"
    g = float(_to_number(guidance_scale, "The guidance scale", guidance_hint))
    if not math.isfinite(g):
        raise InvalidInputError(f"The guidance scale must be a finite number ({guidance_hint}); got {g}.")
    if not MIN_GUIDANCE <= g <= MAX_GUIDANCE:
        raise InvalidInputError(
            f"The guidance scale must be between {MIN_GUIDANCE:g} and {MAX_GUIDANCE:g}; got {g:g}."
        )
    return Parameters(n_steps, n_seed, g)


def read_header(
    path: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> Tuple[Tuple[int, int], List[str]]:
    """Size (upright, after EXIF orientation) and notes of the image file at ``path``, from
    its header alone: no pixel data is decoded, so this is cheap for any file size. The
    same checks as :func:`load_image_with_notes` on what a header tells; a file whose
    pixel data is broken is only found out when it is loaded."""
    name = _display_name(path)
    try:
        with open(os.fspath(path), "rb") as fh:
            head = fh.read(512)
            if not head:
                raise _empty_error(name)
            fh.seek(0)
            with _pil_pixel_guard(max_pixels):
                try:
                    img = Image.open(fh)
                except UnidentifiedImageError:
                    kind = _sniff(head)
                    what = f"it looks like {kind}" if kind else "the format is not recognised or the file is damaged"
                    raise InvalidInputError(f"{name} is not an image that can be read: {what}. Please upload a photo in {SUPPORTED_FORMATS} format.") from None
                except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                    raise _bomb_error(exc, max_pixels, name) from None
                except InvalidInputError:
                    raise
                except Exception as exc:
                    raise _corrupt_error(exc, name) from None
                with img:
                    w, h = img.size
                    if w <= 0 or h <= 0:
                        raise InvalidInputError(f"{name} has no pixels ({_dims(img.size)}). Please use a real image.")
                    if w * h > max_pixels:
                        raise _too_large_error(img.size, max_pixels, name)
                    try:
                        if img.format == "PNG":  # Pillow's getexif() decodes a PNG to look past its pixel data
                            raw = img.info.get("exif")
                            orientation = Image.Exif().load(raw).get(0x0112, 1) if raw else 1
                        else:
                            orientation = img.getexif().get(0x0112, 1)
                    except Exception:
                        orientation = 1
    except OSError as exc:
        raise InvalidInputError(f"{name} could not be read ({exc.strerror or exc}).") from None
    notes: List[str] = []
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        notes.append("The photo will be rotated/flipped upright according to its EXIF orientation tag.")
    if min(w, h) < min_side:
        scale = min_side / min(w, h)
        w, h = max(min_side, round(w * scale)), max(min_side, round(h * scale))
        notes.append(f"The image is small, so it will be upscaled to {w}×{h} (the minimum side is {min_side} pixels); expect limited detail.")
    return (w, h), notes
