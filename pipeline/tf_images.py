"""`images.decode_image` rebuilt from TensorFlow ops, so an exported model sees the same pixels.

Training decodes with Pillow; a served model that decoded or resized any differently would
drift from what the report measured (the retrain.py / label_image.py trap). So each step
reproduces Pillow bit for bit instead of approximating it:

- JPEG: libjpeg's DCT scaling, which Pillow's `draft` picks, through `decode_jpeg`'s
  `ratio`, with the same accurate integer IDCT and fancy upsampling;
- EXIF orientation from a JPEG's APP1 segment or a PNG's eXIf chunk;
- transparency composited onto white with Pillow's integer formula; 16-bit greys / 257;
- `images.resize`, whose integer weights and rounding are computed here op for op.

JPEG (CMYK included) and PNG (any bit depth, palette, transparency) decode exactly as in
training; GIF, 24/32-bit BMP and WebP go through TensorFlow's decoders, which give the
same pixels. Refused: BMPs with a palette (TensorFlow ignores it) and TIFF (TensorFlow has
no decoder). Not followed: orientation given only in XMP metadata.
"""

from __future__ import annotations

import tensorflow as tf

from .images import RESIZE_BITS

_JPEG, _PNG, _OTHER = 0, 1, 2
_ORIENTATION_TAG = 0x0112
_MAX_IFD_ENTRIES = 256
_MAX_SEGMENTS = 1 << 16  # bounds the marker and chunk walks on malformed files


def decode_image(data: tf.Tensor, size: int) -> tf.Tensor:
    """One encoded image (a scalar string) as uint8 (size, size, 3), as `images.decode_image` gives it."""
    data = tf.convert_to_tensor(data, tf.string)
    kind = _format(data)
    pixels = tf.switch_case(kind, [lambda: _decode_jpeg(data, size), lambda: _decode_png(data),
                                   lambda: _decode_other(data)])
    pixels = _exif_transpose(pixels, _orientation(data, kind))
    return resize(pixels, size)


def resize(pixels: tf.Tensor, size: int) -> tf.Tensor:
    """`images.resize` in TensorFlow ops: the same integer weights, the same rounding, the same pass order."""
    across = _resample_rows(tf.transpose(pixels, [1, 0, 2]), size)
    return tf.cast(_resample_rows(tf.transpose(across, [1, 0, 2]), size), tf.uint8)


def resize_weights(in_size: tf.Tensor, out_size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """`images.resize_weights`, computed in the graph because the input size is known only there."""
    in_size = tf.cast(in_size, tf.int64)
    reach = tf.maximum(in_size, out_size)
    taps = 2 * ((reach + out_size - 1) // out_size) + 1
    centre = (2 * tf.range(out_size, dtype=tf.int64) + 1) * in_size
    first = tf.maximum((centre - 2 * reach + out_size) // (2 * out_size), 0)
    index = first[:, None] + tf.range(taps)[None, :]
    height = tf.maximum(2 * reach - tf.abs((2 * index + 1) * out_size - centre[:, None]), 0)
    height = tf.where(index < in_size, height, 0)
    total = tf.reduce_sum(height, axis=1, keepdims=True)
    weights = (height * 2 ** (RESIZE_BITS + 1) + total) // (2 * total)
    return tf.minimum(index, in_size - 1), weights


def _resample_rows(pixels: tf.Tensor, out_size: int) -> tf.Tensor:
    index, weights = resize_weights(tf.shape(pixels)[0], out_size)
    weights = tf.cast(weights, tf.int32)
    pixels = tf.cast(pixels, tf.int32)

    def add_tap(tap, total):
        return tap + 1, total + tf.gather(pixels, index[:, tap]) * weights[:, tap, None, None]

    start = tf.fill(tf.concat([[out_size], tf.shape(pixels)[1:]], 0), 1 << (RESIZE_BITS - 1))
    _, total = tf.while_loop(lambda tap, _: tap < tf.shape(weights)[1], add_tap, (tf.constant(0), start))
    return tf.clip_by_value(tf.bitwise.right_shift(total, RESIZE_BITS), 0, 255)


def _format(data: tf.Tensor) -> tf.Tensor:
    """0 for JPEG, 1 for PNG, 2 for anything else, by the magic bytes Pillow checks."""
    is_jpeg = tf.equal(tf.strings.substr(data, 0, 3), b"\xff\xd8\xff")
    is_png = tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n")
    return tf.where(is_jpeg, _JPEG, tf.where(is_png, _PNG, _OTHER))


def _decode_jpeg(data: tf.Tensor, size: int) -> tf.Tensor:
    """Pillow's `draft("RGB", (size, size))`: the largest DCT scale (1/2, 1/4, 1/8) keeping both sides >= size."""
    height_width = tf.image.extract_jpeg_shape(data)[:2]
    scale = tf.reduce_min(height_width) // size
    choice = tf.reduce_sum(tf.cast(scale >= tf.constant([2, 4, 8]), tf.int32))
    return tf.switch_case(choice, [
        lambda ratio=ratio: tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method="INTEGER_ACCURATE")
        for ratio in (1, 2, 4, 8)])


def _decode_png(data: tf.Tensor) -> tf.Tensor:
    header, _ = _byte_reader(tf.strings.substr(data, 0, 26))  # IHDR: bit depth at 24, colour type at 25
    depth, grey = header(24), tf.equal(header(25), 0)
    return tf.case([
        (grey & tf.equal(depth, 16), lambda: _grey16_to_rgb(tf.io.decode_png(data, channels=1, dtype=tf.uint16))),
        (grey & (depth < 8), lambda: _onto_white(_opaque_as_255(tf.io.decode_png(data, channels=4))))],
        default=lambda: _onto_white(tf.io.decode_png(data, channels=4)))


def _opaque_as_255(rgba: tf.Tensor) -> tf.Tensor:
    """Without a tRNS chunk TensorFlow fills 1-, 2- and 4-bit greys' alpha with 1, 3 or 15, meaning opaque."""
    return tf.concat([rgba[..., :3], tf.where(rgba[..., 3:] > 0, tf.constant(255, tf.uint8), 0)], axis=-1)


def _grey16_to_rgb(grey: tf.Tensor) -> tf.Tensor:
    """As `images._grey_to_8bit`: 16-bit greys scaled by 1/257 and rounded half to even."""
    scaled = tf.math.rint(tf.cast(grey, tf.float64) / 257.0)
    return tf.image.grayscale_to_rgb(tf.cast(tf.clip_by_value(scaled, 0.0, 255.0), tf.uint8))


def _onto_white(rgba: tf.Tensor) -> tf.Tensor:
    """Pillow's ImagingAlphaComposite of RGBA over opaque white; the identity where alpha is 255."""
    alpha = tf.cast(rgba[..., 3:], tf.int32)
    colour = tf.cast(rgba[..., :3], tf.int32)
    # over opaque white Pillow's coefficients reduce to alpha * 128 and (255 - alpha) * 128
    mixed = colour * alpha * 128 + 255 * (255 - alpha) * 128 + 128 * 128
    return tf.cast((mixed // 256 + mixed) // 256 // 128, tf.uint8)  # Pillow's SHIFTFORDIV255, then >> 7


def _decode_other(data: tf.Tensor) -> tf.Tensor:
    """GIF (first frame), BMP, WebP through TensorFlow, refusing BMPs it would read differently from Pillow."""
    header, _ = _byte_reader(tf.strings.substr(data, 0, 30))
    palette_bmp = _matches(header, 0, "BM") & (header(28) + 256 * header(29) <= 8)  # bits per pixel
    check = tf.debugging.Assert(~palette_bmp, ["a BMP of 8 or fewer bits per pixel: TensorFlow ignores its palette; "
                                               "convert it to PNG"])
    with tf.control_dependencies([check]):
        pixels = tf.io.decode_image(data, channels=3, expand_animations=False)
    pixels.set_shape([None, None, 3])
    return pixels


def _byte_reader(data: tf.Tensor):
    """(byte i of a string as int64, 0 past its end; the string's length), so malformed headers read as zeros."""
    raw = tf.io.decode_raw(data, tf.uint8)
    padded = tf.concat([raw, tf.zeros([1], tf.uint8)], 0)
    size = tf.cast(tf.size(raw), tf.int64)

    def at(i):
        i = tf.cast(i, tf.int64)
        return tf.cast(tf.gather(padded, tf.where((i >= 0) & (i < size), i, size)), tf.int64)

    return at, size


def _orientation(data: tf.Tensor, kind: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (1..8, 1 when absent) that Pillow's `exif_transpose` applies."""
    at, size = _byte_reader(data)
    tiff = tf.switch_case(kind, [lambda: _jpeg_exif_offset(at, size), lambda: _png_exif_offset(at, size),
                                 lambda: tf.constant(-1, tf.int64)])
    return tf.cond(tiff >= 0, lambda: _tiff_orientation(at, tiff), lambda: tf.constant(1, tf.int64))


def _matches(at, pos, text: str) -> tf.Tensor:
    result = tf.constant(True)
    for i, char in enumerate(text):
        result &= tf.equal(at(pos + i), ord(char))
    return result


def _jpeg_exif_offset(at, size) -> tf.Tensor:
    """Where the TIFF header of the first `Exif\\0\\0` APP1 segment starts, or -1; the walk stops at the scan."""

    def more(pos, found, steps):
        marker = at(pos + 1)
        return ((found < 0) & (steps < _MAX_SEGMENTS) & (pos + 4 <= size) & tf.equal(at(pos), 0xFF)
                & tf.not_equal(marker, 0xDA) & tf.not_equal(marker, 0xD9))

    def step(pos, found, steps):
        is_exif = tf.equal(at(pos + 1), 0xE1) & _matches(at, pos + 4, "Exif\0\0")
        return pos + 2 + at(pos + 2) * 256 + at(pos + 3), tf.where(is_exif, pos + 10, found), steps + 1

    start = (tf.constant(2, tf.int64), tf.constant(-1, tf.int64), tf.constant(0))
    return tf.while_loop(more, step, start)[1]


def _png_exif_offset(at, size) -> tf.Tensor:
    """Where the data of the eXIf chunk starts, or -1 (Pillow reads it before or after the pixels)."""

    def more(pos, found, steps):
        return (found < 0) & (steps < _MAX_SEGMENTS) & (pos + 8 <= size) & ~_matches(at, pos + 4, "IEND")

    def step(pos, found, steps):
        length = ((at(pos) * 256 + at(pos + 1)) * 256 + at(pos + 2)) * 256 + at(pos + 3)
        return pos + 12 + length, tf.where(_matches(at, pos + 4, "eXIf"), pos + 8, found), steps + 1

    start = (tf.constant(8, tf.int64), tf.constant(-1, tf.int64), tf.constant(0))
    return tf.while_loop(more, step, start)[1]


def _tiff_orientation(at, tiff: tf.Tensor) -> tf.Tensor:
    """Tag 0x0112 in the first image file directory of the TIFF structure at `tiff` (the last if repeated)."""
    little = tf.equal(at(tiff), ord("I"))

    def number(pos, width):
        digits = [at(pos + i) for i in range(width)]
        return tf.where(little, sum(d * 256 ** i for i, d in enumerate(digits)),
                        sum(d * 256 ** (width - 1 - i) for i, d in enumerate(digits)))

    directory = tiff + number(tiff + 4, 4)
    entries = directory + 2 + 12 * tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64)
    present = tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < number(directory, 2)
    matches = tf.where(present & tf.equal(number(entries, 2), _ORIENTATION_TAG))[:, 0]

    def value():
        entry = entries[matches[-1]]
        return tf.where(tf.equal(number(entry + 2, 2), 4), number(entry + 8, 4), number(entry + 8, 2))

    return tf.cond(tf.size(matches) > 0, value, lambda: tf.constant(1, tf.int64))


def _exif_transpose(pixels: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Pillow's `ImageOps.exif_transpose` table; orientations outside 2..8 leave the image as stored."""
    choice = tf.cast(tf.where((orientation >= 2) & (orientation <= 8), orientation - 1, 0), tf.int32)

    def swap(image):
        return tf.transpose(image, [1, 0, 2])

    return tf.switch_case(choice, [
        lambda: pixels,
        lambda: pixels[:, ::-1],  # 2: FLIP_LEFT_RIGHT
        lambda: pixels[::-1, ::-1],  # 3: ROTATE_180
        lambda: pixels[::-1],  # 4: FLIP_TOP_BOTTOM
        lambda: swap(pixels),  # 5: TRANSPOSE
        lambda: swap(pixels[::-1]),  # 6: ROTATE_270
        lambda: swap(pixels[::-1, ::-1]),  # 7: TRANSVERSE
        lambda: swap(pixels[:, ::-1]),  # 8: ROTATE_90
    ])
