"""Turning an image file's bytes into the backbone's input pixels, the same way in every stage.

Extraction runs `decode_image` in a thread pool (Pillow releases the GIL while decoding),
so it changes no Pillow setting and no warning filter per call. Any failure becomes an
`ImageError` with a short reason, which the cache records against that one file.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

RESAMPLE = Image.Resampling.BILINEAR  # the final resize: an export must resize with the same filter
DECODE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # never EPS (runs Ghostscript) or rarer decoders
DEFAULT_MAX_PIXELS = 178_956_970  # the size at which Pillow itself gives up; data.max_image_pixels changes it
# names this decoding in cache fingerprints: change it whenever the pixels it produces would change
DECODE_ID = f"pillow:exif-transpose,alpha-on-white,16bit-scaled,jpeg-draft,{RESAMPLE.name.lower()}:v1"

# Our per-call limit replaces Pillow's process-wide one, which would otherwise refuse an image
# before a raised data.max_image_pixels is consulted (and warn from inside the thread pool).
Image.MAX_IMAGE_PIXELS = None


def content_hash(data: bytes) -> str:
    """sha256 hex of a file's bytes: an image's identity in the cache and in split assignment."""
    return hashlib.sha256(data).hexdigest()


def read_and_decode(path: Path, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, np.ndarray]:
    """(content hash, pixels) from a single read of the file, so both describe the same bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read the file ({exc.strerror or exc})") from None
    return content_hash(data), decode_image(data, size, max_pixels=max_pixels)


def decode_image(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any JPEG, PNG, GIF, BMP, WebP or TIFF (by content, not name) as RGB uint8 of shape (size, size, 3)."""
    if not data:
        raise ImageError("empty file")
    try:
        with Image.open(io.BytesIO(data), formats=DECODE_FORMATS) as image:
            width, height = image.size  # from the header: no pixel memory allocated yet
            if width * height <= max_pixels:
                return _decode(image, size)
    except Exception as exc:  # Pillow signals bad input with many exception types
        raise ImageError(_reason(exc)) from None
    raise ImageError(f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; "
                     "fix: raise data.max_image_pixels if you trust this file")


def _decode(image: Image.Image, size: int) -> np.ndarray:
    image.draft("RGB", (size, size))  # JPEG only: the DCT scales down while decoding, never below size
    image = ImageOps.exif_transpose(image)
    return np.array(_to_rgb(image).resize((size, size), RESAMPLE))  # writable, owns its memory


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: deep greys scaled (Pillow's convert would clip them), transparency over white."""
    if image.mode == "F" or image.mode.startswith("I"):
        return Image.fromarray(_grey_to_8bit(np.asarray(image))).convert("RGB")
    if image.has_transparency_data:
        background = Image.new("RGBA", image.size, "white")
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _grey_to_8bit(pixels: np.ndarray) -> np.ndarray:
    """Integer greys are taken as 16-bit (what 16-bit PNG and TIFF decode to); float greys as 0..1
    when they fit there, else as 0..255."""
    if pixels.dtype.kind == "f":
        pixels = np.nan_to_num(pixels.astype(np.float64))
        scaled = pixels * 255 if pixels.max() <= 1 else pixels
    else:
        scaled = pixels / 257
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _reason(exc: Exception) -> str:
    """One short line saying why an image could not be decoded."""
    if isinstance(exc, UnidentifiedImageError):
        return f"not an image Pillow can read as {', '.join(DECODE_FORMATS)} (cannot identify image file)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "truncated" in text:
        return "truncated image data"
    return f"cannot decode: {text[:200]}"
