import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from deblurdiff import image_io
from deblurdiff.image_io import (
    BUILTIN_MAX_PIXELS,
    DEFAULT_GUIDANCE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_SEED,
    MAX_STEPS,
    MIN_GUIDANCE,
    MIN_STEPS,
    InvalidInputError,
    LoadedImage,
    load_image,
    load_image_with_notes,
    max_pixels_from_env,
    validate_parameters,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(autouse=True)
def _pil_limit_untouched():
    before = Image.MAX_IMAGE_PIXELS
    yield
    assert Image.MAX_IMAGE_PIXELS == before, "the global Pillow pixel limit must be restored"


def _close(a, b, tol=3):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def _bilevel_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A 1-bit greyscale PNG; by default all black, compressed to almost nothing."""
    if idat is None:
        row = b"\x00" * (1 + (width + 7) // 8)
        comp = zlib.compressobj(9)
        idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# ---------------------------------------------------------------- plain inputs


def test_constants():
    assert BUILTIN_MAX_PIXELS == 4096 * 4096 == 16_777_216
    assert DEFAULT_MAX_PIXELS == max_pixels_from_env()
    assert (MIN_STEPS, MAX_STEPS, DEFAULT_STEPS) == (1, 100, 50)
    assert (MIN_GUIDANCE, MAX_GUIDANCE, DEFAULT_GUIDANCE) == (1.0, 10.0, 1.0)
    assert MAX_SEED == 2**32 - 1


def test_all_source_types_give_the_same_rgb_image(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    path = tmp_path / "photo.png"
    Image.fromarray(arr).save(path)
    data = path.read_bytes()
    with open(path, "rb") as fh:
        from_file = load_image(fh)
    sources = [str(path), path, data, bytearray(data), io.BytesIO(data), Image.open(path), arr]
    for src in sources + [from_file]:
        img = src if isinstance(src, Image.Image) and src is from_file else load_image(src)
        assert img.mode == "RGB" and img.size == (90, 70)
        np.testing.assert_array_equal(np.asarray(img), arr)
    loaded = load_image_with_notes(path)
    assert isinstance(loaded, LoadedImage)
    assert loaded.notes == [] and not loaded.upscaled
    assert loaded.source_format == "PNG" and loaded.original_size == (90, 70)


# ---------------------------------------------------------------- bad files


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("This is a shopping list, not a picture.\nMilk\nEggs\n")
    with pytest.raises(InvalidInputError) as err:
        load_image(path)
    msg = str(err.value)
    assert "notes.jpg" in msg and "text file" in msg and "PNG, JPEG" in msg
    assert str(tmp_path) not in msg  # only the file name is shown


def test_other_non_images_are_named():
    with pytest.raises(InvalidInputError, match="PDF document"):
        load_image(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    with pytest.raises(InvalidInputError, match="HEIC"):
        load_image(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    with pytest.raises(InvalidInputError, match="not recognised"):
        load_image(bytes(range(256)) * 4)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidInputError, match=r"'empty.png' is empty \(0 bytes\)"):
        load_image(path)
    with pytest.raises(InvalidInputError, match="empty"):
        load_image(b"")
    with pytest.raises(InvalidInputError, match="empty"):
        load_image(io.BytesIO())


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(InvalidInputError, match=r"'missing.png' was not found.*check that the path"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match="is a folder"):
        load_image(tmp_path)


def test_no_input_and_unsupported_types():
    with pytest.raises(InvalidInputError, match="No image was provided"):
        load_image(None)
    with pytest.raises(InvalidInputError, match="Unsupported input of type 'dict'"):
        load_image({"path": "x.png"})
    with pytest.raises(InvalidInputError, match="web address"):
        load_image("https://example.com/cat.jpg")
    with pytest.raises(InvalidInputError, match="not a valid path"):
        load_image("bad\x00name.png")
    with pytest.raises(InvalidInputError, match="binary mode"):
        load_image(io.StringIO("hello"))


def test_truncated_jpeg_is_refused(tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InvalidInputError) as err:
        load_image(path)
    msg = str(err.value)
    assert "'cut.jpg'" in msg and "truncated" in msg and "re-upload" in msg


def test_corrupted_png_is_refused():
    buf = io.BytesIO()
    Image.new("RGB", (80, 80), RED).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IDAT") + 4
    data[start : start + 20] = b"\xff" * 20  # garbage compressed data
    with pytest.raises(InvalidInputError, match="(damaged|truncated).*re-save or re-upload"):
        load_image(bytes(data))


# ---------------------------------------------------------------- frames


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_image_uses_first_frame(fmt):
    frames = [Image.new("RGB", (80, 64), c) for c in (RED, GREEN, BLUE)]
    buf = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kwargs)
    loaded = load_image_with_notes(buf.getvalue())
    assert loaded.image.size == (80, 64)
    assert _close(loaded.image.getpixel((40, 32)), RED)
    assert any("3 frames" in n and "first frame" in n for n in loaded.notes)


def test_multipage_tiff_uses_first_page():
    pages = [Image.new("RGB", (64, 64), c) for c in (GREEN, RED)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    loaded = load_image_with_notes(buf.getvalue())
    assert loaded.image.getpixel((0, 0)) == GREEN
    assert any("2 pages" in n for n in loaded.notes)


# ---------------------------------------------------------------- modes


def test_rgba_transparency_is_composited_on_white():
    arr = np.zeros((64, 80, 4), dtype=np.uint8)
    arr[:, 40:] = (0, 0, 255, 255)  # opaque blue right half, transparent black left half
    arr[:, 20:40, 3] = 128  # half-transparent black
    buf = io.BytesIO()
    Image.fromarray(arr, "RGBA").save(buf, "PNG")
    loaded = load_image_with_notes(buf.getvalue())
    img = loaded.image
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == WHITE
    assert _close(img.getpixel((30, 5)), (127, 127, 127), tol=1)
    assert img.getpixel((60, 5)) == BLUE
    assert any("white" in n for n in loaded.notes)
    # the same through a numpy array
    np.testing.assert_array_equal(np.asarray(load_image(arr)), np.asarray(img))


def test_la_and_palette_transparency():
    la = Image.new("LA", (64, 64), (0, 0))
    la.paste((50, 255), (32, 0, 64, 64))
    img = load_image(la)
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((40, 0)) == (50, 50, 50)

    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (32, 0, 64, 64))
    buf = io.BytesIO()
    pal.save(buf, "GIF", transparency=0)
    img = load_image(buf.getvalue())
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((40, 0)) == BLUE

    # fully opaque alpha: no note about white filling
    loaded = load_image_with_notes(Image.new("RGBA", (64, 64), (10, 20, 30, 255)))
    assert loaded.image.getpixel((0, 0)) == (10, 20, 30) and loaded.notes == []


def test_greyscale_l():
    loaded = load_image_with_notes(Image.new("L", (70, 64), 100))
    assert loaded.image.mode == "RGB" and loaded.image.getpixel((3, 3)) == (100, 100, 100)
    assert any("Greyscale" in n for n in loaded.notes)
    assert load_image(Image.new("1", (64, 64), 1)).getpixel((0, 0)) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_greyscale_is_scaled_not_clipped(tmp_path, fmt):
    values = np.array([0, 257, 1000, 32896, 40000, 65535], dtype=np.uint16)
    arr = np.tile(np.repeat(values, 12), (64, 1))  # 64 x 72
    path = tmp_path / f"deep.{fmt.lower()}"
    Image.fromarray(arr).save(path, fmt)
    assert Image.open(path).mode.startswith("I;16")
    loaded = load_image_with_notes(path)
    got = np.asarray(loaded.image)[0, ::12, 0]
    assert got.tolist() == [0, 1, 4, 128, 156, 255]  # round(v / 257)
    assert any("16-bit" in n for n in loaded.notes)


def test_32bit_and_float_greyscale_modes():
    i16_range = Image.fromarray(np.full((64, 64), 65535, dtype=np.int32))
    assert i16_range.mode == "I"
    assert load_image(i16_range).getpixel((0, 0)) == WHITE
    i8_range = Image.fromarray(np.full((64, 64), 200, dtype=np.int32))
    assert load_image(i8_range).getpixel((0, 0)) == (200, 200, 200)
    f = Image.fromarray(np.full((64, 64), 0.5, dtype=np.float32))
    assert f.mode == "F" and load_image(f).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (80, 64), (0, 255, 255, 0)).save(path, "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    loaded = load_image_with_notes(path)
    assert loaded.image.mode == "RGB"
    assert _close(loaded.image.getpixel((40, 32)), RED, tol=8)
    assert any("CMYK" in n for n in loaded.notes)


def test_embedded_non_srgb_profile_is_converted():
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    renamed = icc.replace("sRGB".encode("utf-16-be"), "Test".encode("utf-16-be"))
    assert renamed != icc
    img = Image.new("RGB", (64, 64), (200, 100, 50))
    img.info["icc_profile"] = renamed
    loaded = load_image_with_notes(img)
    assert _close(loaded.image.getpixel((0, 0)), (200, 100, 50), tol=2)
    assert any("Test built-in" in n and "sRGB" in n for n in loaded.notes)
    img.info["icc_profile"] = icc  # already sRGB: nothing to do
    assert load_image_with_notes(img).notes == []


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((70, 100, 3), dtype=np.uint8)
    arr[:, :50] = RED
    arr[:, 50:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(arr).save(path, "JPEG", exif=exif, quality=95)
    loaded = load_image_with_notes(path)
    assert loaded.image.size == (70, 100)
    assert _close(loaded.image.getpixel((35, 10)), RED, tol=10)  # left side is now on top
    assert _close(loaded.image.getpixel((35, 90)), BLUE, tol=10)
    assert any("EXIF orientation" in n for n in loaded.notes)


# ---------------------------------------------------------------- sizes


def test_small_image_is_upscaled_with_a_note(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (20, 30), GREEN).save(path)
    loaded = load_image_with_notes(path)
    assert loaded.image.size == (64, 96)
    assert loaded.upscaled and loaded.original_size == (20, 30)
    assert any("20×30" in n and "64×96" in n for n in loaded.notes)
    img = load_image(path)
    assert img.info["deblurdiff_original_size"] == (20, 30)
    assert any("upscaled" in n for n in img.info["deblurdiff_notes"])


def test_small_image_refused_when_upscaling_is_off():
    with pytest.raises(InvalidInputError) as err:
        load_image(Image.new("RGB", (20, 30)), upscale_small=False)
    assert "20×30" in str(err.value) and "at least 64 pixels" in str(err.value)


def test_extremely_narrow_image_is_refused():
    with pytest.raises(InvalidInputError, match="too narrow"):
        load_image(np.zeros((1, 5000), dtype=np.uint8), max_pixels=200_000)


def test_image_over_max_pixels_is_refused():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "PNG")
    with pytest.raises(InvalidInputError) as err:
        load_image(buf.getvalue(), max_pixels=10_000)
    msg = str(err.value)
    assert "300×200" in msg and "10,000 pixels" in msg and "downscale" in msg
    assert load_image(buf.getvalue(), max_pixels=60_000).size == (300, 200)
    with pytest.raises(InvalidInputError, match="300×200"):
        load_image(np.zeros((200, 300, 3), dtype=np.uint8), max_pixels=10_000)


def test_large_image_refused_before_decoding(monkeypatch):
    data = _bilevel_png(6000, 6000)  # 36 MP, a few kB on disk
    assert len(data) < 50_000

    def _no_decoding(self, *args, **kwargs):
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decoding)
    with pytest.raises(InvalidInputError) as err:
        load_image(data)
    msg = str(err.value)
    assert "6000×6000" in msg and "16,777,216 pixels" in msg


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(_bilevel_png(100_000, 100_000, idat=zlib.compress(b"\x00" * 100)))
    assert path.stat().st_size < 200

    def _no_decoding(self, *args, **kwargs):
        raise AssertionError("pixel data must not be decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_decoding)
    with pytest.raises(InvalidInputError) as err:
        load_image(path)
    msg = str(err.value)
    assert "bomb.png" in msg and "decompression bomb" in msg
    assert "10,000,000,000 pixels" in msg and "16,777,216 pixels" in msg


def test_pillow_limit_is_raised_only_temporarily(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), RED).save(buf, "PNG")
    # Pillow alone would refuse this as a bomb (10,000 > 2 * 1000 pixels).
    assert load_image(buf.getvalue(), max_pixels=20_000).size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(InvalidInputError, match="100×100"):
        load_image(buf.getvalue(), max_pixels=5_000)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_max_pixels_from_env():
    var = image_io.MAX_PIXELS_ENV_VAR
    assert var == "DEBLURDIFF_MAX_PIXELS"
    assert max_pixels_from_env({}) == 4096 * 4096
    assert max_pixels_from_env({var: "25000000"}) == 25_000_000
    assert max_pixels_from_env({var: "2.5e7"}) == 25_000_000
    assert max_pixels_from_env({var: "5000x4000"}) == 20_000_000
    with pytest.warns(RuntimeWarning, match=var):
        assert max_pixels_from_env({var: "lots"}) == 4096 * 4096
    with pytest.warns(RuntimeWarning):
        assert max_pixels_from_env({var: "-5"}) == 4096 * 4096


def test_invalid_options_are_programming_errors():
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(img, max_pixels=0)
    with pytest.raises(ValueError, match="min_side"):
        load_image(img, min_side=1.5)


# ---------------------------------------------------------------- numpy


def test_numpy_inputs():
    grey = np.full((64, 70), 77, dtype=np.uint8)
    assert load_image(grey).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(grey[..., None]).getpixel((0, 0)) == (77, 77, 77)
    assert load_image(np.full((64, 64, 3), 0.5, dtype=np.float32)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.full((64, 64, 3), 1.01)).getpixel((0, 0)) == WHITE  # tiny overshoot clipped
    assert load_image(np.full((64, 64, 3), 65535, dtype=np.uint16)).getpixel((0, 0)) == WHITE
    assert load_image(np.full((64, 64, 3), 32896, dtype=np.uint16)).getpixel((0, 0)) == (128,) * 3
    assert load_image(np.full((64, 64), 200, dtype=np.int64)).getpixel((0, 0)) == (200,) * 3
    assert load_image(np.ones((64, 64), dtype=bool)).getpixel((0, 0)) == WHITE
    strided = np.zeros((128, 128, 3), dtype=np.uint8)[::2, ::2]
    assert load_image(strided).size == (64, 64)


@pytest.mark.parametrize(
    "arr, expected",
    [
        (np.full((64, 64, 3), 255.0), r"from 255 to 255.*\[0, 1\].*divide it by 255"),
        (np.full((64, 64, 3), -1.0), r"\[-1, 1\].*\(arr \+ 1\) / 2"),
        (np.full((64, 64, 3), np.nan), "NaN or infinite"),
        (np.zeros((3, 64, 64), dtype=np.float32), "channels-first"),
        (np.zeros((1, 64, 64, 3), dtype=np.uint8), "batch dimension"),
        (np.zeros((64, 64, 2), dtype=np.uint8), r"shape \(64, 64, 2\); expected"),
        (np.zeros((0, 64, 3), dtype=np.uint8), "empty"),
        (np.full((64, 64), 1000, dtype=np.int32), "values from 1000 to 1000"),
        (np.full((64, 64), "a"), "unsupported data type"),
    ],
)
def test_bad_numpy_inputs(arr, expected):
    with pytest.raises(InvalidInputError, match=expected):
        load_image(arr)


# ---------------------------------------------------------------- parameters


def test_validate_parameters_accepts_and_normalises():
    p = validate_parameters(50, 42, 1.0)
    assert p == (50, 42, 1.0) and p.steps == 50 and p.seed == 42 and p.guidance_scale == 1.0
    assert type(p.steps) is int and type(p.seed) is int and type(p.guidance_scale) is float
    assert validate_parameters("20", " 7 ", "2.5") == (20, 7, 2.5)
    assert validate_parameters(30.0, 3.0, 4) == (30, 3, 4.0)
    assert validate_parameters(np.int64(1), np.uint32(MAX_SEED), np.float32(10.0)) == (1, MAX_SEED, 10.0)
    assert validate_parameters(MAX_STEPS, 0, MIN_GUIDANCE).steps == 100
    assert validate_parameters() [0] == DEFAULT_STEPS


@pytest.mark.parametrize("seed", [None, -1, "-1", "", "  "])
def test_random_seed(seed):
    seeds = {validate_parameters(10, seed, 1.0).seed for _ in range(5)}
    assert all(0 <= s <= MAX_SEED for s in seeds)
    assert len(seeds) > 1


@pytest.mark.parametrize(
    "steps, seed, guidance, expected",
    [
        (0, 1, 1.0, r"steps must be between 1 and 100; got 0"),
        (101, 1, 1.0, r"steps must be between 1 and 100; got 101"),
        (12.5, 1, 1.0, r"steps must be a whole number .*got 12.5"),
        (float("nan"), 1, 1.0, r"steps must be a finite whole number"),
        (float("inf"), 1, 1.0, r"steps must be a finite whole number"),
        (True, 1, 1.0, r"steps must be a number .*not True"),
        ("many", 1, 1.0, r"steps must be a number .*got 'many'"),
        ("", 1, 1.0, r"number of steps is empty"),
        ([5], 1, 1.0, r"got a value of type 'list'"),
        (10, -2, 1.0, r"seed must be a whole number from 0 to 4294967295, or -1 .*got -2"),
        (10, 2**32, 1.0, r"seed must be .*got 4294967296"),
        (10, 1.5, 1.0, r"seed must be a whole number"),
        (10, "abc", 1.0, r"seed must be a number"),
        (10, False, 1.0, r"seed must be a number .*not False"),
        (10, 1, 0.5, r"guidance scale must be between 1 and 10; got 0.5"),
        (10, 1, 10.5, r"guidance scale must be between 1 and 10; got 10.5"),
        (10, 1, float("nan"), r"guidance scale must be a finite number"),
        (10, 1, "inf", r"guidance scale must be a finite number"),
        (10, 1, "1,5", r"guidance scale must be a number .*got '1,5'"),
        (10, 1, None, r"guidance scale must be a number .*'NoneType'"),
    ],
)
def test_validate_parameters_rejects(steps, seed, guidance, expected):
    with pytest.raises(InvalidInputError, match=expected):
        validate_parameters(steps, seed, guidance)


def test_invalid_input_error_is_a_value_error():
    assert issubclass(InvalidInputError, ValueError)
    assert math.isclose(validate_parameters(1, 1, "7.25").guidance_scale, 7.25)


# ---------------------------------------------------------------- shipped examples


def test_shipped_examples_load():
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "examples"
    records = json.loads((folder / "examples.json").read_text(encoding="utf-8"))
    assert 4 <= len(records) <= 6
    total = 0
    for rec in records:
        path = folder / rec["file"]
        total += path.stat().st_size
        loaded = load_image_with_notes(path)
        assert loaded.image.mode == "RGB"
        assert loaded.image.size == (rec["width"], rec["height"])
        assert 384 <= max(loaded.image.size) <= 640
        assert "public domain" in rec["license"].lower() or "cc0" in rec["license"].lower()
    assert total < 1_000_000
