import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, features

from deblurdiff import image_io
from deblurdiff.image_io import InvalidInputError, LoadedImage, load_image_with_notes, max_pixels_from_env

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def load_image(source, **kwargs):
    return load_image_with_notes(source, **kwargs).image


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
    assert loaded.notes == [] and loaded.size == loaded.original_size
    assert loaded.source_format == "PNG" and loaded.original_size == (90, 70)


# ---------------------------------------------------------------- bad files


def test_text_file_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("This is a shopping list, not a picture.\nMilk\nEggs\n")
    with pytest.raises(InvalidInputError) as err:
        load_image(path)
    msg = str(err.value)
    assert "'notes.jpg' is not an image" in msg and "PNG, JPEG, HEIC" in msg
    assert str(tmp_path) not in msg  # only the file name is shown


@pytest.mark.parametrize(
    "data",
    [
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",  # a PDF
        b"PK\x03\x04" + bytes(60),  # a ZIP archive (or an office document)
        b"<!DOCTYPE html><html><body>a page, not the picture</body></html>",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,  # a HEIC header, no image in it
        bytes(range(256)) * 4,
    ],
)
def test_non_images_get_the_generic_message(data):
    with pytest.raises(InvalidInputError, match=r"The uploaded file is not an image that can be read.*Please upload a photo in PNG"):
        load_image(data)


def _heic_with_orientation(arr, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "HEIF", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _left_red_right_blue(h=70, w=100):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = RED
    arr[:, w // 2 :] = BLUE
    return arr


def test_heic_photos_are_read_upright(tmp_path):
    data = _heic_with_orientation(_left_red_right_blue(), 6)  # shown rotated 90° clockwise
    assert data[4:12] == b"ftypheic"
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    for source in (path, data, io.BytesIO(data)):
        loaded = load_image_with_notes(source)
        assert loaded.source_format == "HEIF" and loaded.image.mode == "RGB"
        assert loaded.image.size == (70, 100)
        assert _close(loaded.image.getpixel((35, 10)), RED, tol=12)  # the left side is now on top
        assert _close(loaded.image.getpixel((35, 90)), BLUE, tol=12)
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, 32:] = (0, 0, 255, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "HEIF", quality=-1)
    loaded = load_image_with_notes(buf.getvalue())
    assert _close(loaded.image.getpixel((5, 5)), WHITE, tol=6) and _close(loaded.image.getpixel((50, 5)), BLUE, tol=12)
    assert any("white" in n for n in loaded.notes)


def test_heic_size_is_checked_before_decoding(monkeypatch):
    data = _heic_with_orientation(np.zeros((200, 300, 3), dtype=np.uint8), 1)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a, **k: pytest.fail("pixel data must not be decoded"))
    with pytest.raises(InvalidInputError, match="300×200 pixels"):
        load_image(data, max_pixels=10_000)


def test_damaged_heic_is_refused():
    data = bytearray(_heic_with_orientation(_left_red_right_blue(), 1))
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    with pytest.raises(InvalidInputError, match="(damaged|truncated|not an image)"):
        load_image(bytes(data))


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow build has no AVIF support")
def test_avif_photos_are_read_upright():
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(_left_red_right_blue()).save(buf, "AVIF", quality=95, exif=exif.tobytes())
    loaded = load_image_with_notes(buf.getvalue())
    assert loaded.source_format == "AVIF" and loaded.image.size == (70, 100)
    assert _close(loaded.image.getpixel((35, 10)), RED, tol=12) and _close(loaded.image.getpixel((35, 90)), BLUE, tol=12)
    assert "AVIF" in image_io.SUPPORTED_FORMATS


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


def test_32bit_and_float_greyscale_are_converted_as_pillow_does():
    values = np.repeat(np.array([0, 200, 255, 65535]), 16)  # 8-bit values kept, larger ones clipped
    for dtype, mode in ((np.int32, "I"), (np.float32, "F")):
        image = Image.fromarray(np.tile(values, (64, 1)).astype(dtype))
        assert image.mode == mode
        loaded = load_image_with_notes(image)
        assert np.asarray(loaded.image)[0, ::16].tolist() == [[0] * 3, [200] * 3, [255] * 3, [255] * 3]
        assert any("Greyscale" in n for n in loaded.notes)


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
    assert loaded.original_size == (20, 30)
    assert any("20×30" in n and "64×96" in n and "upscaled" in n for n in loaded.notes)
    assert _close(loaded.image.getpixel((32, 48)), GREEN, tol=0)


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


def test_pillow_limit_is_left_alone_and_its_refusals_get_a_message(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), RED).save(buf, "PNG")
    # Pillow refuses this as a bomb (10,000 > 2 * 1000 pixels), whatever max_pixels allows.
    with pytest.raises(InvalidInputError, match=r"10,000 pixels.*decompression bomb"):
        load_image(buf.getvalue(), max_pixels=20_000)
    assert Image.MAX_IMAGE_PIXELS == 1000
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), RED).save(buf, "PNG")  # between Pillow's limit and twice it: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(buf.getvalue(), max_pixels=20_000).size == (64, 64)


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
        (np.full((64, 64, 3), 255.0), r"\[0, 1\], got 255 to 255 \(divide 0-255 data by 255\)"),
        (np.full((64, 64, 3), -1.0), r"got -1 to -1 \(\(arr \+ 1\) / 2 maps \[-1, 1\]"),
        (np.full((64, 64, 3), np.nan), "NaN or infinite"),
        (np.zeros((3, 64, 64), dtype=np.float32), "channels-first"),
        (np.zeros((1, 64, 64, 3), dtype=np.uint8), "batch dimension"),
        (np.zeros((64, 64, 2), dtype=np.uint8), r"expected an image of shape .*got \(64, 64, 2\)"),
        (np.zeros((0, 64, 3), dtype=np.uint8), "empty"),
        (np.full((64, 64), 1000, dtype=np.int32), "int32 values must be in 0-255, got 1000 to 1000"),
        (np.full((64, 64), "a"), "unsupported data type"),
    ],
)
def test_bad_numpy_inputs(arr, expected):
    with pytest.raises(InvalidInputError, match="The image array cannot be used: .*" + expected):
        load_image(arr)


def test_arrays_follow_the_pipelines_rule():
    from deblurdiff.pipeline.pipeline_deblurdiff import image_to_tensor

    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, size=(64, 66, 4), dtype=np.uint8)
    arrays = [
        rng.integers(0, 256, size=(64, 66, 3), dtype=np.uint8),
        rng.integers(0, 65536, size=(64, 66, 3), dtype=np.uint16),
        rng.random((64, 66)),
        rgba,
    ]
    for arr in arrays:
        got = torch_from(load_image(arr))
        assert np.abs(got - image_to_tensor(arr)[0].numpy()).max() <= 0.5 / 255 + 1e-6
    # a PIL image with transparency gets the same white background as the array
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(rgba, "RGBA"))), np.asarray(load_image(rgba)))


def torch_from(image):
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255


def _encoded(fmt, **kwargs):
    rng = np.random.default_rng(5)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)).save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "HEIF"])
def test_fuzzed_files_give_an_image_or_a_message(fmt):
    """Damaged files (bytes flipped, cut short) never raise anything but InvalidInputError."""
    data = _encoded(fmt)
    rng = np.random.default_rng(len(fmt))
    for trial in range(40):
        mutated = bytearray(data)
        if trial % 4 == 0:
            mutated = mutated[: int(rng.integers(1, len(data)))]
        else:
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 9))):
                mutated[pos] = int(rng.integers(0, 256))
        try:
            loaded = load_image_with_notes(bytes(mutated))
        except InvalidInputError as exc:
            assert str(exc) and "Traceback" not in str(exc)
        else:
            assert loaded.image.mode == "RGB" and min(loaded.image.size) >= 40


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
