"""Loading user images for the model, with a message for the user when that cannot be done.

:func:`load_image_with_notes` takes a path, bytes, a binary file, a PIL image or an array (by the
pipeline's rule, :func:`deblurdiff.pipeline.pipeline_deblurdiff.image_to_tensor`) and returns 8-bit RGB plus notes on
what was done: the size checked from the header before decoding, HEIC/HEIF (``pillow-heif``) and
AVIF read, the first frame or page, EXIF orientation, transparency onto white, 16-bit greyscale
scaled, ICC profiles to sRGB, small images upscaled (or refused). :func:`read_header` tells the
size and notes from the header alone. Problems raise :class:`InvalidInputError`, whose message is
shown verbatim. The pixel limit (4096 × 4096) is ``DEBLURDIFF_MAX_PIXELS``, read at import, as a
count (``25000000``) or a size (``5000x5000``); Pillow's own bomb limit is left as it is.
"""

from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError, features
from pillow_heif import register_heif_opener

register_heif_opener()


class InvalidInputError(ValueError):
    """The user's input cannot be used. ``str(err)`` is a message for the user."""


MAX_PIXELS_ENV_VAR = "DEBLURDIFF_MAX_PIXELS"
BUILTIN_MAX_PIXELS = 4096 * 4096
#: Images whose short side is below this are upscaled (or refused).
DEFAULT_MIN_SIDE = 64
#: The formats named in messages (AVIF where this Pillow build reads it).
SUPPORTED_FORMATS = "PNG, JPEG, HEIC, " + ("AVIF, " if features.check("avif") else "") + "WebP, BMP, TIFF or GIF"
_WHITE = (255, 255, 255, 255)


def max_pixels_from_env(environ: dict | None = None) -> int:
    """The pixel limit from ``DEBLURDIFF_MAX_PIXELS``; an invalid value warns and gives the built-in one."""
    raw = str((os.environ if environ is None else environ).get(MAX_PIXELS_ENV_VAR) or "").strip()
    if not raw:
        return BUILTIN_MAX_PIXELS
    text = raw.replace("_", "").replace(",", "")
    size = re.fullmatch(r"(\d+)\s*[x×*]\s*(\d+)", text, re.IGNORECASE)
    try:
        value = int(size[1]) * int(size[2]) if size else float(text)
    except ValueError:
        value = 0
    if value > 0 and math.isfinite(value) and value == int(value):
        return int(value)
    warnings.warn(f"Ignoring {MAX_PIXELS_ENV_VAR}={raw!r}: expected a positive pixel count such as 16777216 or a "
                  f"size such as 4096x4096. Using {BUILTIN_MAX_PIXELS} pixels.", RuntimeWarning, stacklevel=2)
    return BUILTIN_MAX_PIXELS


DEFAULT_MAX_PIXELS = max_pixels_from_env()


@dataclass
class LoadedImage:
    """An 8-bit RGB image ready for the model; ``notes`` on the conversions applied, its size
    before upscaling (after the EXIF rotation) and the decoder's format (None for arrays)."""

    image: Image.Image
    notes: list[str] = field(default_factory=list)
    original_size: tuple[int, int] = (0, 0)
    source_format: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


# Messages ------------------------------------------------------------------------------


def _dims(size) -> str:
    return f"{size[0]}×{size[1]}"


def _limit_text(max_pixels: int) -> str:
    side = math.isqrt(max_pixels)
    return f"{max_pixels:,} pixels ({max_pixels / 1e6:.3g} megapixels, {'e.g.' if side * side == max_pixels else 'about'} {side}×{side})"


def _too_large(size, max_pixels: int, name: str) -> InvalidInputError:
    w, h = size
    scale = math.sqrt(max_pixels / (w * h))
    smaller = (max(1, int(w * scale)), max(1, int(h * scale)))
    return InvalidInputError(
        f"{name} is too large: {_dims(size)} pixels ({w * h / 1e6:.3g} megapixels), but the limit is "
        f"{_limit_text(max_pixels)}. Please downscale it (for example to {_dims(smaller)}) and try again."
    )


def _empty(name: str) -> InvalidInputError:
    return InvalidInputError(f"{name} is empty (0 bytes). Please choose an image file and try again.")


# Decoding ------------------------------------------------------------------------------


def _openable(source: Any) -> tuple[Any, str]:
    """What ``Image.open`` takes for ``source``, and the name messages give it."""
    if source is None:
        raise InvalidInputError(f"No image was provided. Please upload an image ({SUPPORTED_FORMATS}).")
    if isinstance(source, (str, os.PathLike)):
        text = os.fsdecode(source)
        name = f"The file '{os.path.basename(text) or text}'"
        if re.match(r"[a-z][a-z0-9+.-]*://", text, re.IGNORECASE):
            raise InvalidInputError(
                f"'{text}' is a web address. Loading images from URLs is not supported; please download "
                "the image and upload the file instead."
            )
        if not text.strip():
            raise InvalidInputError(f"No image was provided (the file name is empty). Please upload an image ({SUPPORTED_FORMATS}).")
        if "\x00" in text:
            raise InvalidInputError("The file name contains a NUL character, so it is not a valid path.")
        if os.path.isfile(text) and os.path.getsize(text) == 0:
            raise _empty(name)
        return text, name
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), "The uploaded file"
    elif hasattr(source, "read"):
        raw = getattr(source, "name", None)
        name = f"The file '{os.path.basename(raw)}'" if isinstance(raw, str) and os.path.basename(raw) else "The uploaded file"
        try:
            data = source.read()
        except Exception as exc:
            raise InvalidInputError(f"{name} could not be read ({exc}).") from None
        if isinstance(data, str):
            raise InvalidInputError(f"{name} was opened in text mode. Please open image files in binary mode ('rb').")
    else:
        raise InvalidInputError(
            f"Unsupported input of type '{type(source).__name__}'. Please provide an image file "
            "(path, bytes or file object), a PIL image or a numpy array."
        )
    if not data:
        raise _empty(name)
    return io.BytesIO(bytes(data)), name


@contextlib.contextmanager
def _user_errors(name: str, max_pixels: int):
    """Pillow's and the system's exceptions while opening ``name``, as messages for the user."""
    try:
        with warnings.catch_warnings():
            # Pillow warns between its limit and twice it; the size is checked against max_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as exc:
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        claimed = f" ({int(claimed[1]):,} pixels)" if claimed else ""
        raise InvalidInputError(
            f"{name} declares an enormous image size{claimed} and was refused without being decoded: files "
            f"like this can exhaust the server's memory (a 'decompression bomb'). The limit is "
            f"{_limit_text(max_pixels)}; if it is a genuine photo, please downscale it and try again."
        ) from None
    except UnidentifiedImageError:
        raise InvalidInputError(
            f"{name} is not an image that can be read: the format is not recognised or the file is damaged. "
            f"Please upload a photo in {SUPPORTED_FORMATS} format."
        ) from None
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        reason = {
            FileNotFoundError: "was not found. Please check that the path is correct and the file exists",
            IsADirectoryError: "is a folder, not an image file. Please choose an image file",
            PermissionError: "cannot be read (permission denied). Please check its permissions",
        }.get(type(exc), f"could not be read ({exc.strerror or exc})")  # a subclass of one of them
        raise InvalidInputError(f"{name} {reason}.") from None
    except MemoryError:
        raise InvalidInputError(f"{name} is too large to open. The limit is {_limit_text(max_pixels)}.") from None
    except Exception as exc:  # decoders raise many exception types on bad data
        detail = str(exc).strip() or type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in detail.lower() or "end of file" in detail.lower():
            what = "is truncated (the file is incomplete, for example because a download or upload was interrupted)"
        else:
            what = "is damaged and could not be decoded"
        raise InvalidInputError(f"{name} {what}. Please re-save or re-upload the original image. "
                                f"(Details: {detail})") from None


def _decode(source: Any, max_pixels: int, notes: list[str]) -> tuple[Image.Image, str | None]:
    """Open (unless ``source`` is a PIL image), check the size, decode and convert to RGB."""
    if isinstance(source, Image.Image):
        with _user_errors("The image", max_pixels):
            return _prepare(source, "The image", max_pixels, notes), source.format
    source, name = _openable(source)
    with _user_errors(name, max_pixels), Image.open(source) as opened:
        return _prepare(opened, name, max_pixels, notes), opened.format


def _prepare(img: Image.Image, name: str, max_pixels: int, notes: list[str]) -> Image.Image:
    """First frame, size check (on the header, before decoding), EXIF orientation, RGB."""
    if img.width * img.height > max_pixels:
        raise _too_large(img.size, max_pixels, name)
    try:
        frames = int(getattr(img, "n_frames", 1) or 1)
    except Exception:  # later frames unreadable: the first may still be fine
        frames = 1
    if frames > 1 or getattr(img, "tell", lambda: 0)():
        img.seek(0)
    img.load()
    if frames > 1:
        pages = (img.format or "").upper() == "TIFF"
        notes.append(f"The file has {frames} pages; only the first page is used." if pages
                     else f"Animated image with {frames} frames: only the first frame is used.")
    if img.width * img.height > max_pixels:  # some formats (GIF) grow while decoding
        raise _too_large(img.size, max_pixels, name)
    if img.width == 0 or img.height == 0:
        raise InvalidInputError(f"{name} has no pixels ({_dims(img.size)}). Please use a real image.")
    try:
        if img.getexif().get(ExifTags.Base.Orientation, 1) in range(2, 9):
            img = ImageOps.exif_transpose(img)
            notes.append("The photo was rotated/flipped upright according to its EXIF orientation tag.")
    except Exception:
        notes.append("The EXIF orientation tag could not be applied; the image is used as stored.")
    return _to_rgb(img, name, notes)


def _to_rgb(img: Image.Image, name: str, notes: list[str]) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: transparency onto white, 16-bit grey scaled, ICC to sRGB."""
    mode = img.mode
    if mode.startswith("I;16"):  # Pillow's own conversion clips 16-bit values at 255
        img = Image.fromarray(((np.asarray(img, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8))
        notes.append("The 16-bit image was scaled to 8 bits per channel.")
    if mode in ("L", "LA", "La", "1", "I", "F") or mode.startswith("I;16"):
        notes.append("Greyscale image: converted to RGB.")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("Transparent areas were filled with white.")
            rgba = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
        return rgba.convert("RGB")
    if mode in ("RGB", "CMYK"):
        converted = _icc_to_srgb(img, notes)
        if converted is not None:
            return converted
        if mode == "CMYK":
            notes.append("The CMYK (print) image was converted to RGB.")
    try:
        return img.convert("RGB")
    except Exception as exc:
        raise InvalidInputError(
            f"{name} uses the colour mode '{mode}', which cannot be converted to RGB ({exc}). "
            f"Please save it as an ordinary RGB {SUPPORTED_FORMATS} image."
        ) from None


def _icc_to_srgb(img: Image.Image, notes: list[str]) -> Image.Image | None:
    """An RGB/CMYK image with an embedded profile (other than sRGB) converted to sRGB, else None."""
    icc = img.info.get("icc_profile")
    if not icc:
        return None
    try:
        from PIL import ImageCms

        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        description = (ImageCms.getProfileDescription(profile) or "").strip()
        if profile.profile.xcolor_space.strip() != img.mode or (img.mode == "RGB" and "srgb" in description.lower()):
            return None
        converted = ImageCms.profileToProfile(img, profile, ImageCms.createProfile("sRGB"), outputMode="RGB")
    except Exception:  # a broken or unsupported profile: the plain conversion
        return None
    label = f" '{description}'" if description else ""
    notes.append(f"Colours were converted from the embedded colour profile{label} to sRGB.")
    return converted


def _from_array(source: Any, max_pixels: int) -> Image.Image:
    """An array as RGB by the pipeline's rule (greyscale, RGB or RGBA; uint8, uint16, bool or float)."""
    from .pipeline.pipeline_deblurdiff import image_to_tensor

    name = "The image array"
    try:
        arr = np.asarray(source)
        if arr.ndim in (2, 3) and arr.shape[0] * arr.shape[1] > max_pixels:
            raise _too_large(arr.shape[1::-1], max_pixels, name)
        tensor = image_to_tensor(arr)[0]
    except (ValueError, TypeError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"{name} cannot be used: {exc}.") from None
    return Image.fromarray(tensor.permute(1, 2, 0).mul(255).round().byte().numpy())


def _upscaled_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """``size`` enlarged so that its short side is ``min_side`` (unchanged if it already is)."""
    (w, h), short = size, min(size)
    if short >= min_side:
        return size
    scale = min_side / short
    return (min_side if w == short else max(min_side, round(w * scale)),
            min_side if h == short else max(min_side, round(h * scale)))


def _ensure_min_side(image: Image.Image, min_side: int, upscale_small: bool, max_pixels: int, notes: list[str]) -> Image.Image:
    """Upscale (or refuse) an image whose short side is under ``min_side``."""
    new_size = _upscaled_size(image.size, min_side)
    if new_size == image.size:
        return image
    if not upscale_small:
        raise InvalidInputError(
            f"The image is only {_dims(image.size)} pixels, but each side must be at least {min_side} pixels. "
            "Please use a larger image."
        )
    if new_size[0] * new_size[1] > max_pixels:
        raise InvalidInputError(
            f"The image is {_dims(image.size)} pixels: too narrow to process. It would have to be enlarged to "
            f"{_dims(new_size)} to reach the minimum side of {min_side} pixels, which exceeds the limit of "
            f"{_limit_text(max_pixels)}. Please crop it to a less extreme shape."
        )
    notes.append(
        f"The image was small ({_dims(image.size)}), so it was upscaled to {_dims(new_size)} "
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
    """``source`` as 8-bit RGB with notes. Images above ``max_pixels`` are refused before
    decoding; a short side under ``min_side`` is upscaled (refused unless ``upscale_small``).
    Raises :class:`InvalidInputError` for the user; ValueError for invalid limits themselves."""
    for label, value in (("max_pixels", max_pixels), ("min_side", min_side)):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
    notes: list[str] = []
    if isinstance(source, np.ndarray) or (hasattr(source, "__array__") and not isinstance(source, Image.Image)):
        image, fmt = _from_array(source, max_pixels), None
    else:
        image, fmt = _decode(source, max_pixels, notes)
    original_size = image.size
    image = _ensure_min_side(image, min_side, upscale_small, max_pixels, notes)
    return LoadedImage(image=image, notes=notes, original_size=original_size, source_format=fmt)


def read_header(path: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                min_side: int = DEFAULT_MIN_SIDE) -> tuple[tuple[int, int], list[str]]:
    """Size (upright, after EXIF orientation, and after any upscaling of a small image) and
    notes of the image file at ``path``, from its header alone: no pixel data is decoded,
    so this is cheap for any file size. Broken pixel data is only found when loading."""
    source, name = _openable(path)
    with _user_errors(name, max_pixels), Image.open(source) as img:
        w, h = img.size
        if w * h > max_pixels:
            raise _too_large(img.size, max_pixels, name)
        try:
            if img.format == "PNG":  # Pillow's getexif() decodes a whole PNG to look past its pixels
                raw = img.info.get("exif")
                orientation = Image.Exif().load(raw).get(0x0112, 1) if raw else 1
            else:
                orientation = img.getexif().get(0x0112, 1)
        except Exception:
            orientation = 1
    notes: list[str] = []
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if orientation in range(2, 9):
        notes.append("The photo will be rotated/flipped upright according to its EXIF orientation tag.")
    size = _upscaled_size((w, h), min_side)
    if size != (w, h):
        notes.append(f"The image is small, so it will be upscaled to {_dims(size)} (the minimum side is {min_side} "
                     "pixels); expect limited detail.")
    return size, notes
