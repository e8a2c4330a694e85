"""Photos scraped from anywhere, through the real extract (MobileNet 0.25, random weights).

A generated corpus of broken, hostile and exotic files lies among real photos. Every valid
image, whatever its format, colour mode or orientation, gets the row the backbone gives
for its pixels; every invalid one is skipped, recorded with a one-line reason and listed;
the run completes and says how many it skipped; a decompression bomb is refused before
any pixel memory exists.
"""

import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import images
from pipeline.cli import EXIT_SKIPPED, main
from pipeline.dataset import shown
from pipeline.extract import run_extract
from pipeline.features import dataset_from_config, open_cache

from conftest import REPO, tiny_config, write_image
from pipeline_helpers import BLUE, RED, KeptExtractor, cli_args, encode, permissions_enforced, png_chunk, quadrants

WHITE = (255, 255, 255)


def halves(width: int, height: int) -> Image.Image:
    """Red then blue along the longer side."""
    pixels = np.zeros((height, width, 3), np.uint8)
    if width >= height:
        pixels[:, : width // 2], pixels[:, width // 2:] = RED, BLUE
    else:
        pixels[: height // 2], pixels[height // 2:] = RED, BLUE
    return Image.fromarray(pixels)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: some 50 kB that decode to width x height pixels."""
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    """The quadrants stored on their side, with EXIF orientation 6 saying how to turn them upright."""
    exif = Image.Exif()
    exif[0x0112] = 6  # the viewer rotates 90 degrees clockwise
    return encode(quadrants().transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif)


def animated_gif() -> bytes:
    frames = [quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4)]
    frames += [Image.new("P", (64, 48), 1), Image.new("P", (64, 48), 2)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def grey16() -> bytes:
    levels = np.zeros((48, 64), np.uint16)
    levels[:, 16:32], levels[:, 32:48], levels[:, 48:] = 20000, 40000, 65535
    return encode(Image.fromarray(levels), "PNG")


def transparent_half() -> bytes:
    pixels = np.zeros((48, 64, 4), np.uint8)  # the right half: transparent black
    pixels[:, :32] = (*RED, 255)
    return encode(Image.fromarray(pixels), "PNG")


def truth_grey16() -> Image.Image:
    levels = np.zeros((48, 64), np.uint8)
    levels[:, 16:32], levels[:, 32:48], levels[:, 48:] = 78, 156, 255  # 16-bit levels / 257
    return Image.fromarray(levels).convert("RGB")


def truth_transparent_half() -> Image.Image:
    pixels = np.full((48, 64, 3), 255, np.uint8)
    pixels[:, :32] = RED
    return Image.fromarray(pixels)


# relpath -> (bytes, the upright RGB picture they show, mean tolerance in levels after resizing)
EXOTIC = {
    "daisy/exif rotated.jpg": (exif_rotated, quadrants, 6),
    "daisy/alpha.png": (transparent_half, truth_transparent_half, 2),
    "daisy/palette.gif": (lambda: encode(quadrants().convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "GIF"),
                          quadrants, 2),
    "daisy/animated.gif": (animated_gif, quadrants, 2),
    "daisy/really a bitmap.jpg": (lambda: encode(quadrants(), "BMP"), quadrants, 2),
    "daisy/-leading-dash.png": (lambda: encode(quadrants(), "PNG"), quadrants, 2),
    "daisy/ünïcødé 写真.png": (lambda: encode(quadrants().transpose(Image.Transpose.FLIP_LEFT_RIGHT), "PNG"),
                              lambda: quadrants().transpose(Image.Transpose.FLIP_LEFT_RIGHT), 2),
    "daisy/folder.jpg/inside.webp": (lambda: encode(quadrants(), "WEBP", lossless=True), quadrants, 2),
    "roses/sixteen bit.png": (grey16, truth_grey16, 2),
    "roses/cmyk.jpg": (lambda: encode(quadrants().convert("CMYK"), "JPEG", quality=95), quadrants, 6),
    "roses/grey.png": (lambda: encode(quadrants().convert("L"), "PNG"), lambda: quadrants().convert("L").convert("RGB"),
                       2),
    "roses/one pixel.png": (lambda: encode(Image.new("RGB", (1, 1), RED), "PNG"), lambda: Image.new("RGB", (1, 1), RED),
                            0),
    "roses/very wide.png": (lambda: encode(halves(3000, 12), "PNG"), lambda: halves(3000, 12), 2),
    "roses/very tall.tiff": (lambda: encode(halves(12, 3000), "TIFF"), lambda: halves(12, 3000), 2),
}


def truncated_jpeg() -> bytes:
    """A photo cut off half-way through its pixel data, as an interrupted download leaves it."""
    noise = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    return data[: len(data) // 2]


# relpath -> (bytes, a word of the one-line reason)
BROKEN = {
    "daisy/empty.jpg": (lambda: b"", "empty file"),
    "daisy/truncated.jpg": (truncated_jpeg, "truncated image data"),
    "daisy/random bytes.jpg": (lambda: np.random.default_rng(7).bytes(5000), "cannot identify image file"),
    "roses/saved web page.jpg": (lambda: b"<!DOCTYPE html><html><body>403 Forbidden</body></html>",
                                 "cannot identify image file"),
    "roses/notes.jpg": (lambda: b"remember to buy milk\n", "cannot identify image file"),
    "roses/bomb.png": (lambda: bomb_png(20000, 20000), "20000x20000 = 400000000 pixels, above the limit"),
}


def build_corpus(root, flowers5):
    """Real photos plus the exotic, broken and hostile files; returns what each valid file shows,
    and a word of the reason for each one that must be skipped."""
    truth, reasons = {}, {}
    for label, source in (("daisy", "daisy"), ("roses", "roses")):
        for photo in sorted((flowers5 / "train" / source).glob("*.jpg"))[:4]:
            (root / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / label / photo.name)
            truth[f"{label}/{photo.name}"] = None  # a real photo: its own truth
    for relpath, (data, shows, tolerance) in EXOTIC.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data())
        truth[relpath] = (shows(), tolerance)
    for relpath, (data, reason) in BROKEN.items():
        (root / relpath).write_bytes(data())
        reasons[relpath] = reason
    permission = root / "roses" / "chmod 000.png"
    permission.write_bytes(encode(quadrants(60, 40), "PNG"))
    permission.chmod(0)  # refused to root too, by permissions_enforced
    reasons["roses/chmod 000.png"] = "cannot read the file (Permission denied)"
    os.symlink("/proc/self/mem", root / "roses" / "unreadable.jpg")  # a file whose reads fail, even for root
    reasons["roses/unreadable.jpg"] = "cannot read the file (Input/output error)"
    os.symlink("loop.jpg", root / "roses" / "loop.jpg")
    reasons["roses/loop.jpg"] = "Too many levels of symbolic links"
    os.symlink(root / "nowhere.png", root / "daisy" / "broken link.png")
    reasons["daisy/broken link.png"] = "No such file or directory"
    os.mkfifo(root / "roses" / "pipe.jpg")
    reasons["roses/pipe.jpg"] = "not a regular file"
    with open(os.fsencode(root / "daisy") + b"/latin-1 caf\xe9.png", "wb") as out:
        out.write(encode(quadrants(), "PNG"))
    reasons["daisy/latin-1 caf\udce9.png"] = "not valid UTF-8"
    for junk in ("daisy/.DS_Store", "roses/Thumbs.db", "daisy/._exif rotated.jpg", "roses/desktop.ini"):
        (root / junk).write_bytes(b"\0\5\x16\x07junk")
    (root / "roses" / ".hidden.png").write_bytes(encode(quadrants(), "PNG"))
    (root / "roses" / "readme.txt").write_text("photos from the garden")
    return truth, reasons


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, flowers5):
    tmp_path = tmp_path_factory.mktemp("scraped")
    root = tmp_path / "garden"
    truth, reasons = build_corpus(root, flowers5)
    config = tiny_config(tmp_path, root, **{"data.val_percent": 20.0, "data.test_percent": 20.0})
    with permissions_enforced():
        summary = run_extract(config, progress=False, make_extractor=KeptExtractor)
    yield tmp_path, config, summary, truth, reasons
    (root / "roses" / "chmod 000.png").chmod(0o644)  # so that pytest can clean up


def test_every_valid_image_is_extracted_correctly(corpus):
    _, config, summary, truth, _ = corpus
    dataset = dataset_from_config(config)
    paths = {entry.relpath: entry.path for entry in dataset.entries}
    assert set(truth) <= set(paths)
    pixels = {relpath: images.decode_image(paths[relpath].read_bytes(), 224) for relpath in truth}
    for relpath, expected in truth.items():
        if expected is None:  # a real photo: a real photo's texture, not a flat failure
            assert pixels[relpath].std() > 10, relpath
            continue
        picture, tolerance = expected
        upright = np.asarray(picture.resize((224, 224), Image.Resampling.BILINEAR), dtype=float)
        difference = np.abs(pixels[relpath] - upright).mean()
        assert difference <= tolerance, f"{relpath}: decoded {difference:.1f} levels away from what it shows"
    direct = KeptExtractor(config.backbone)(np.stack(list(pixels.values())))
    with open_cache(config) as cache:
        index, rows = cache.file_index(), cache.row_index()
        for (relpath, _), expected_row in zip(pixels.items(), direct):
            stored = cache.read_features([rows[index[relpath].key]])[0]
            np.testing.assert_allclose(stored, expected_row, rtol=1e-4, atol=1e-5, err_msg=relpath)
    assert summary.extracted == len(truth)


def test_every_invalid_file_is_skipped_with_a_one_line_reason(corpus):
    _, config, summary, _, reasons = corpus
    skipped = dict(summary.failed)
    assert set(skipped) == set(reasons)
    for relpath, word in reasons.items():
        assert word in skipped[relpath] and "\n" not in skipped[relpath], (relpath, skipped[relpath])
    with open_cache(config) as cache:  # undecodable content is recorded in the cache, with its reason
        recorded = {path: reason for path, reason in cache.failures().values()}
    for relpath in ("daisy/empty.jpg", "daisy/truncated.jpg", "roses/saved web page.jpg", "roses/bomb.png",
                    "roses/unreadable.jpg", "roses/chmod 000.png"):
        assert recorded[relpath] == skipped[relpath]


def test_a_folder_that_cannot_be_read_is_one_line_naming_it(tmp_path, tiny_dataset, capsys):
    (tiny_dataset / "owl" / "more owls").mkdir()
    write_image(tiny_dataset / "owl" / "more owls" / "owl_9.png", seed=9)
    (tiny_dataset / "owl" / "more owls").chmod(0)
    try:
        with permissions_enforced():
            status = main(["extract", "--no-progress", *cli_args(tiny_config(tmp_path, tiny_dataset))])
    finally:
        (tiny_dataset / "owl" / "more owls").chmod(0o755)
    assert (status, capsys.readouterr().err.splitlines()) == (2, [
        f"error: cannot read folder {tiny_dataset / 'owl' / 'more owls'} (Permission denied); fix: make it readable or "
        "move it out of data.root"])


def test_the_summary_counts_and_lists_the_skipped_files(corpus):
    _, _, summary, _, reasons = corpus
    listing = summary.describe()
    assert f"{len(reasons)} failed" in listing.splitlines()[0]
    assert listing.splitlines()[-1] == f"extract: completed, {len(reasons)} skipped"
    for relpath in reasons:
        assert f"  {shown(relpath)}: " in listing
    assert "daisy/latin-1 caf\\xe9.png" in listing
    listing.encode("utf-8")  # printable whatever the file names hold


def test_the_exit_status_tells_completed_with_skips_from_failed(tmp_path, tiny_dataset, capsys):
    (tiny_dataset / "cat" / "empty.jpg").write_bytes(b"")
    (tiny_dataset / "dog" / "truncated.jpg").write_bytes(truncated_jpeg())
    (tiny_dataset / "owl" / "page.png").write_bytes(b"<html><body>Not Found</body></html>")
    args = cli_args(tiny_config(tmp_path, tiny_dataset))
    assert main(["extract", "--no-progress", *args]) == 0  # completed: `make extract train report` goes on
    assert capsys.readouterr().out.splitlines()[-1] == "extract: completed, 3 skipped"
    assert main(["extract", "--no-progress", "--strict", *args]) == EXIT_SKIPPED
    assert main(["train", *args]) == 0 and main(["report", *args]) == 0
    assert main(["train", *args, "--set", "data.root='nowhere'"]) == 2  # failed
    assert capsys.readouterr().err.splitlines() == [
        "error: data.root: folder nowhere does not exist; fix: set data.root in your config or --set data.root=PATH"]
    (tiny_dataset / "cat" / "empty.jpg").unlink(), (tiny_dataset / "dog" / "truncated.jpg").unlink()
    (tiny_dataset / "owl" / "page.png").unlink()
    assert main(["extract", "--no-progress", "--strict", *args]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "extract: completed"


def test_junk_hidden_and_non_image_files_are_never_taken_for_images(corpus):
    _, config, _, truth, reasons = corpus
    dataset = dataset_from_config(config)
    assert {entry.relpath for entry in dataset.entries} | {path for path, _ in dataset.skipped} == set(truth) | set(
        reasons)
    assert dataset.ignored == ["roses/readme.txt"]
    assert dataset.classes == ["daisy", "roses"]


def test_a_decompression_bomb_is_refused_before_any_pixel_memory_exists(tmp_path):
    """Decoding it would take 400 MB as 1-bit pixels and 1.2 GB as RGB; the child stays small."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png(20000, 20000))
    assert bomb.stat().st_size < 100_000
    code = ("import re, sys; from pipeline import images; from pipeline.errors import ImageError\n"
            "try:\n    images.decode_image(open(sys.argv[1], 'rb').read(), 224)\n"
            "except ImageError as exc:\n    print(exc)\n"  # the peak resident memory of this process, in MB:
            "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) // 1024)")
    result = subprocess.run([sys.executable, "-c", code, str(bomb)], cwd=REPO, capture_output=True, text=True,
                            check=True)
    reason, peak_mb = result.stdout.splitlines()
    assert reason.startswith("image is 20000x20000 = 400000000 pixels, above the limit of 178956970")
    assert int(peak_mb) < 250, f"peak memory {peak_mb} MB: the pixels were allocated"


def test_the_pixel_limit_is_a_setting_and_a_raised_limit_extracts_what_it_refused(tmp_path):
    root = tmp_path / "sizes"
    for label in ("small", "large"):
        for i in range(6):
            side = 20 if label == "small" else 60
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((side, side, 3), 40 * i, np.uint8)).save(root / label / f"{i}.png")
    strict = tiny_config(tmp_path, root, **{"data.max_image_pixels": 1000})
    summary = run_extract(strict, progress=False, make_extractor=KeptExtractor)
    assert summary.extracted == 6 and len(summary.failed) == 6
    assert all("60x60 = 3600 pixels, above the limit of 1000" in reason for _, reason in summary.failed)
    relaxed = run_extract(tiny_config(tmp_path, root), progress=False, make_extractor=KeptExtractor)
    assert relaxed.extracted == 6 and relaxed.failed == []
