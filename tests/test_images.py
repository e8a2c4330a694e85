"""The decoding contract: any readable image in any mode becomes (size, size, 3) uint8 RGB;
anything else, or anything too large, becomes a one-line ImageError."""

import hashlib
import io
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFilter, JpegImagePlugin

from pipeline.errors import ImageError
from pipeline.images import (DEFAULT_MAX_PIXELS, RESIZE_BITS, content_hash, decode_image, read_and_decode, resize,
                             resize_weights)

from pipeline_helpers import RED, encode, noise, png_chunk, quadrants

WHITE, BLACK = (255, 255, 255), (0, 0, 0)


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    if transparent:
        image.paste(1, (0, 0, 8, 8))
        image.info["transparency"] = 1
    return image


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a 1-bit width x height image but carries no valid pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"not zlib data") + png_chunk(b"IEND", b"")


MODES = {
    "RGB": (Image.new("RGB", (8, 8), RED), "PNG", RED),
    "L": (Image.new("L", (8, 8), 128), "PNG", (128, 128, 128)),
    "1-bit": (Image.new("1", (8, 8), 1), "PNG", WHITE),
    "LA opaque": (Image.new("LA", (8, 8), (0, 255)), "PNG", BLACK),
    "LA transparent": (Image.new("LA", (8, 8), (0, 0)), "PNG", WHITE),
    "RGBA opaque": (Image.new("RGBA", (8, 8), (255, 0, 0, 255)), "PNG", RED),
    "RGBA transparent": (Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG", WHITE),
    "RGBA half": (Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG", (255, 127, 127)),
    "P": (palette_image(transparent=False), "PNG", RED),
    "P transparent": (palette_image(transparent=True), "PNG", WHITE),
    "P in GIF": (palette_image(transparent=False), "GIF", RED),
    "CMYK JPEG": (Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", RED),
    "I;16 white": (Image.new("I;16", (8, 8), 65535), "PNG", WHITE),
    "I;16 mid": (Image.new("I;16", (8, 8), 32896), "PNG", (128, 128, 128)),
    "I;16 dark": (Image.new("I;16", (8, 8), 1028), "PNG", (4, 4, 4)),
    "I TIFF": (Image.new("I", (8, 8), 32896), "TIFF", (128, 128, 128)),
    "F TIFF 0..1": (Image.new("F", (8, 8), 0.5), "TIFF", (128, 128, 128)),
    "F TIFF 0..255": (Image.new("F", (8, 8), 100.0), "TIFF", (100, 100, 100)),
    "BMP": (Image.new("RGB", (8, 8), RED), "BMP", RED),
    "WebP": (Image.new("RGB", (8, 8), RED), "WEBP", RED),
    "YCbCr TIFF": (Image.new("RGB", (8, 8), RED).convert("YCbCr"), "TIFF", RED),
}


@pytest.mark.parametrize("name", MODES)
def test_every_mode_decodes_to_rgb_uint8(name):
    image, fmt, expected = MODES[name]
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode == image.mode or fmt in ("JPEG", "WEBP")
    pixels = decode_image(data, 16)
    assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - expected).max() <= 12, pixels[0, 0]


def test_transparent_pixels_become_white_without_bleeding():
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[:, :8] = (255, 0, 0, 255)  # the right half is transparent black
    decoded = decode_image(encode(Image.fromarray(pixels), "PNG"), 16)
    assert (decoded[:, :8] == RED).all()
    assert (decoded[:, 8:] == WHITE).all()


@pytest.mark.parametrize("width, height", [(40, 10), (10, 40), (500, 375), (333, 1000), (24, 24), (7, 3)])
def test_resize_is_pillows_bilinear_in_exact_integers(width, height):
    """Pillow's triangle filter, widened when shrinking; our integer weights stay within one level of Pillow's."""
    image = noise(width, height, seed=width)
    decoded = decode_image(encode(image, "PNG"), 24)
    np.testing.assert_array_equal(decoded, resize(np.asarray(image), 24))
    pillow = np.asarray(image.resize((24, 24), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(decoded - pillow).max() <= 1


def _resize_tap_by_tap(pixels: np.ndarray, size: int) -> np.ndarray:
    """The definition, written out: each output pixel is its taps' weighted sum, rounded, per pass."""
    def one_pass(rows):  # along the first axis
        index, weights = resize_weights(rows.shape[0], size)
        total = sum(rows[index[:, tap]].astype(np.int64) * weights[:, tap, None, None] for tap in range(index.shape[1]))
        return np.clip((total + (1 << (RESIZE_BITS - 1))) >> RESIZE_BITS, 0, 255).astype(np.uint8)

    across = one_pass(pixels.transpose(1, 0, 2)).transpose(1, 0, 2)
    return one_pass(across)


@pytest.mark.parametrize("height, width, size", [(313, 500, 299), (500, 313, 299), (1, 1, 299), (3, 1000, 224),
                                                 (299, 299, 299), (150, 120, 224), (2000, 1500, 299)])
def test_resize_equals_its_tap_by_tap_definition(height, width, size):
    """resize runs as sparse integer matrix products for speed; every pixel must equal the plain sum."""
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize(pixels, size), _resize_tap_by_tap(pixels, size))


def test_resize_to_the_same_size_changes_nothing():
    pixels = np.asarray(noise(24, 24))
    np.testing.assert_array_equal(resize(pixels, 24), pixels)


@pytest.mark.parametrize("orientation, transpose", [(6, Image.Transpose.ROTATE_270), (8, Image.Transpose.ROTATE_90)])
def test_exif_orientation_is_applied(orientation, transpose):
    wide = quadrants(96, 48)
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode_image(encode(wide, "JPEG", quality=95, exif=exif), 32).astype(int)
    as_if_tall = decode_image(encode(wide.transpose(transpose), "PNG"), 32)
    as_stored = decode_image(encode(wide, "PNG"), 32)
    assert np.abs(decoded - as_if_tall).mean() < 6
    assert np.abs(decoded - as_stored).mean() > 60


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert (decode_image(data, 8) == RED).all()


def test_format_is_detected_by_content_not_name(tmp_path):
    path = tmp_path / "really_a_bitmap.jpg"
    path.write_bytes(encode(Image.new("RGB", (8, 8), RED), "BMP"))
    key, pixels = read_and_decode(path, 8)
    assert key == hashlib.sha256(path.read_bytes()).hexdigest() == content_hash(path.read_bytes())
    assert (pixels == RED).all()


@pytest.mark.parametrize("width, height", [(1, 1), (5000, 3), (3, 5000)])
def test_tiny_and_extreme_aspect_ratios(width, height):
    pixels = decode_image(encode(noise(width, height), "PNG"), 32)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8


def test_large_jpegs_are_scaled_while_decoding(monkeypatch):
    draft_sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        draft_sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    photo = quadrants(1800, 1000).filter(ImageFilter.GaussianBlur(20))
    data = encode(photo, "JPEG", quality=95)
    decoded = decode_image(data, 100)
    assert draft_sizes == [(225, 125)]  # 8x smaller, still at least 100 on both sides
    full = np.asarray(photo.resize((100, 100), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(decoded - full).mean() < 4


def test_pillow_does_not_clip_a_jpeg_just_above_the_size():
    pixels = decode_image(encode(noise(201, 450), "JPEG"), 100)
    assert pixels.shape == (100, 100, 3)


def test_decompression_bomb_refused_from_the_header():
    # the pixel data is garbage: reaching the decoder would give a different error
    with pytest.raises(ImageError) as error:
        decode_image(png_header_only(30000, 30000), 32)
    assert str(error.value) == (f"image is 30000x30000 = 900000000 pixels, above the limit of {DEFAULT_MAX_PIXELS}; "
                                "fix: raise data.max_image_pixels if you trust this file")


def test_the_pixel_limit_is_configurable_both_ways():
    data = encode(noise(10, 10), "PNG")
    assert decode_image(data, 4, max_pixels=100).shape == (4, 4, 3)
    with pytest.raises(ImageError, match="10x10 = 100 pixels, above the limit of 99"):
        decode_image(data, 4, max_pixels=99)


def test_pillows_own_limit_does_not_preempt_a_raised_limit():
    data = png_header_only(14000, 14000)  # 196M pixels: above Pillow's fixed refusal threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as error:
            decode_image(data, 32, max_pixels=10**9)
    assert "limit" not in str(error.value)  # it got past both limits and failed on the garbage pixel data


def _truncated_jpeg():
    data = encode(noise(64, 64), "JPEG")
    return data[: len(data) // 2]


def _truncated_png():
    data = encode(noise(64, 64), "PNG")
    return data[: len(data) // 2]


BAD_BYTES = {
    "empty": (b"", "empty file"),
    "truncated JPEG": (_truncated_jpeg(), "truncated image data"),
    "truncated PNG": (_truncated_png(), "truncated image data"),
    "random bytes": (np.random.default_rng(1).bytes(4096), "cannot identify image file"),
    "HTML page": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "cannot identify image file"),
    "text": (b"hello, world\n", "cannot identify image file"),
    "EPS (never handed to Ghostscript)": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n", "cannot identify"),
}


@pytest.mark.parametrize("name", BAD_BYTES)
def test_bad_bytes_raise_a_one_line_image_error(name, tmp_path):
    data, reason = BAD_BYTES[name]
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    for call in (lambda: decode_image(data, 32), lambda: read_and_decode(path, 32)):
        with pytest.raises(ImageError) as error:
            call()
        assert reason in str(error.value) and "\n" not in str(error.value)


def test_unreadable_files_raise_image_error(tmp_path):
    with pytest.raises(ImageError, match=r"cannot read the file \(Is a directory\)"):
        read_and_decode(tmp_path, 32)
    with pytest.raises(ImageError, match=r"cannot read the file \(No such file or directory\)"):
        read_and_decode(tmp_path / "gone.jpg", 32)


def test_permission_denied_raises_image_error(tmp_path, monkeypatch):
    """chmod 000 does not stop root (CI runs as root), so the denial is injected."""
    path = tmp_path / "secret.png"
    path.write_bytes(encode(noise(4, 4), "PNG"))

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(ImageError, match="Permission denied"):
        read_and_decode(path, 32)


def test_decoding_in_threads_matches_decoding_in_sequence():
    blobs = [encode(noise(300 + i, 200, seed=i), "JPEG" if i % 2 else "PNG") for i in range(24)]
    sequential = [decode_image(blob, 64) for blob in blobs]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda blob: decode_image(blob, 64), blobs))
    for one, other in zip(sequential, threaded):
        np.testing.assert_array_equal(one, other)


def test_real_photos_decode(flowers5):
    for folder in sorted((flowers5 / "train").iterdir()):
        for path in sorted(folder.glob("*.jpg"))[:2]:
            key, pixels = read_and_decode(path, 224)
            assert len(key) == 64 and pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8
            assert pixels.std() > 10  # a photo, not a flat grey failure


@pytest.mark.parametrize("name", ["imageNotFound.gif", "formica.jpeg"])
def test_hymenoptera_oddities_decode(hymenoptera, name):
    _, pixels = read_and_decode(hymenoptera / "train" / "ants" / name, 224)
    assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8 and pixels.std() > 5


def test_importing_the_library_changes_no_global_state():
    """A notebook that imports us keeps Pillow's decompression-bomb guard, its logging and warning filters."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import logging, warnings; from PIL import Image\n"
            "import h5py, matplotlib.figure, numpy, scipy.sparse, sklearn.linear_model, tqdm  # theirs, not ours\n"
            "before = (Image.MAX_IMAGE_PIXELS, list(logging.getLogger().handlers), list(warnings.filters))\n"
            "import pipeline, pipeline.extract, pipeline.predict, pipeline.train, pipeline.evaluate\n"
            "after = (Image.MAX_IMAGE_PIXELS, list(logging.getLogger().handlers), list(warnings.filters))\n"
            "assert before == after, (before, after)\n"
            "assert Image.MAX_IMAGE_PIXELS is not None")
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True)
