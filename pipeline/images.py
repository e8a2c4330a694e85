"""Turning an image file's bytes into the backbone's input pixels, the same way in every stage.

Extraction runs `decode_image` in a thread pool (Pillow releases the GIL while decoding),
so it changes no Pillow setting and no warning filter per call. Any failure becomes an
`ImageError` with a short reason, which the cache records against that one file.

The final resize is our own, in exact integer arithmetic, rather than Pillow's: its
numbers then depend on no library version and no summation order, so an exported model
(`tf_images`) reproduces every pixel, and the cache fingerprint names them exactly.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import struct
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

DECODE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # never EPS (runs Ghostscript) or rarer decoders
DEFAULT_MAX_PIXELS = 178_956_970  # the size at which Pillow itself gives up; data.max_image_pixels changes it
# names this decoding in cache fingerprints: change it whenever the pixels it produces would change
DECODE_ID = "pillow:exif-transpose,alpha-on-white,16bit-scaled,jpeg-draft,integer-triangle-22bit:v2"
RESIZE_BITS = 22  # fixed-point precision of the resize weights (as in Pillow's own resampler)
_INT32_BLOCK = 1 << 22  # input values widened to int32 at once while resizing: 16 MiB



class ImageTooLarge(ImageError):
    """Refused by data.max_image_pixels, a setting rather than the file: extract checks it again each run."""


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
        with _open(data) as image:
            width, height = image.size  # from the header: no pixel memory allocated yet
            if width * height <= max_pixels:
                return _decode(image, size)
    except Exception as exc:  # Pillow signals bad input with many exception types
        raise ImageError(_reason(exc)) from None
    raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; "
                        "fix: raise data.max_image_pixels if you trust this file")


def prefetch(pool: Executor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """`pool.map(fn, items)` in order, but with at most `depth` results in flight, so that decoding
    ahead of the backbone keeps memory flat (extract and predict read their images through it)."""
    queue: collections.deque = collections.deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= depth:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _open(data: bytes) -> Image.Image:
    """`Image.open(..., formats=DECODE_FORMATS)` without its check against Pillow's process-wide
    `Image.MAX_IMAGE_PIXELS`: `decode_image` applies its own limit per call, so a raised
    data.max_image_pixels is not pre-empted (nor warned about from the thread pool), and
    nothing global is changed: whoever imports us keeps Pillow's guard everywhere else."""
    fp, prefix = io.BytesIO(data), data[:16]
    for name in DECODE_FORMATS:
        if name not in Image.OPEN:
            Image.init()
        factory, accept = Image.OPEN[name]
        accepted = accept is None or accept(prefix)
        if not accepted or isinstance(accepted, str):  # a str is Pillow's "looks like it, but unsupported"
            continue
        try:
            fp.seek(0)
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes for "not this format"
            continue
    raise UnidentifiedImageError("cannot identify image file")


def _decode(image: Image.Image, size: int) -> np.ndarray:
    image.draft("RGB", (size, size))  # JPEG only: the DCT scales down while decoding, never below size
    image = ImageOps.exif_transpose(image)
    return resize(np.asarray(_to_rgb(image)), size)


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (h, w, c) to (size, size, c): horizontal pass, then vertical, each rounded to 8 bits.

    The filter is Pillow's BILINEAR (a triangle, widened by the shrink factor so every
    input pixel counts), with weights as exact integer fractions: a level or so from
    Pillow's own resize, and bit-identical to `tf_images.resize`. Each pass is one sparse
    integer matrix product on 2-D rows (the channels interleaved), which keeps resizing
    a small share of extraction: 2-D uint8 transposes are cheap, 3-D ones are not.
    """
    height, width, channels = pixels.shape
    across = _resample(np.ascontiguousarray(pixels.reshape(height, width * channels).T), width, size, channels)
    down = _resample(np.ascontiguousarray(across.T), height, size, 1)
    return down.reshape(size, size, channels)


def resize_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel, the input pixels it reads and their weights in RESIZE_BITS fixed point.

    Distances are counted in units of 1/(2 * out_size) input pixels, so the triangle's
    height at every tap is an integer and its normalisation an exact integer division.
    """
    reach = max(in_size, out_size)  # the filter's half-width: in_size / out_size input pixels when shrinking
    taps = 2 * -(-reach // out_size) + 1
    centre = (2 * np.arange(out_size, dtype=np.int64) + 1) * in_size
    first = np.maximum((centre - 2 * reach + out_size) // (2 * out_size), 0)
    index = first[:, None] + np.arange(taps)
    height = np.maximum(2 * reach - np.abs((2 * index + 1) * out_size - centre[:, None]), 0)
    height = np.where(index < in_size, height, 0)
    total = height.sum(axis=1, keepdims=True)
    weights = (height * 2 ** (RESIZE_BITS + 1) + total) // (2 * total)  # rounded half up
    return np.minimum(index, in_size - 1), weights


def _resample(rows: np.ndarray, in_size: int, out_size: int, interleave: int) -> np.ndarray:
    """Resample the first axis of `rows`, which holds `in_size` groups of `interleave` rows.
    int32 cannot overflow: the weights sum to 2**RESIZE_BITS, 255 * 2**22 plus rounding < 2**31.
    Columns go in blocks, so a huge photo never has an int32 copy of itself (4x its size)."""
    matrix = _resample_matrix(in_size, out_size, interleave)
    block = max(1, _INT32_BLOCK // rows.shape[0])
    out = np.empty((matrix.shape[0], rows.shape[1]), np.uint8)
    for start in range(0, rows.shape[1], block):
        total = matrix @ rows[:, start:start + block].astype(np.int32)
        total += 1 << (RESIZE_BITS - 1)
        total >>= RESIZE_BITS
        out[:, start:start + block] = np.clip(total, 0, 255)
    return out


@functools.lru_cache(maxsize=256)
def _resample_matrix(in_size: int, out_size: int, interleave: int):
    """`resize_weights` as a sparse (out_size * interleave, in_size * interleave) matrix, made
    once per size (photos come in a few sizes) and read-only after, so threads can share it."""
    import scipy.sparse

    index, weights = resize_weights(in_size, out_size)
    outputs = np.repeat(np.arange(out_size), index.shape[1])
    matrix = scipy.sparse.csr_matrix((weights.ravel().astype(np.int32), (outputs, index.ravel())),
                                     shape=(out_size, in_size))  # repeated edge taps carry weight 0
    matrix = scipy.sparse.kron(matrix, scipy.sparse.identity(interleave, dtype=np.int32), format="csr")
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


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
