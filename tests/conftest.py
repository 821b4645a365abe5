"""Shared fixtures and helpers: a tiny random RealCamNet saved as a checkpoint, small synthetic Bayer DNGs,
bad and hostile RAW inputs, and running the `rcam` command line in-process or as the real console script.

Everything here is sized for a loaded 2-core CPU: the tiny model has a few tens of thousands of parameters
and the DNGs are a few thousand pixels. bench/hostile_inputs.py and bench/fuzz_bitstream.py import the
model and file builders from here too.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from nef import write_nef
from PIL import Image

from rcam import cli
from rcam.codec.models import CONFIGS, RealCamNet
from rcam.codec.zoo import load_codec, save_checkpoint
from rcam.demo import sample_scene
from rcam.training.dng import XTRANS_PATTERN, write_bayer_dng, write_cfa_dng, write_linear_dng
from rcam.training.synth import build_dataset


TINY_CONFIG = dataclasses.replace(
    CONFIGS["small"], name="tiny", channels=16, latent_channels=16, hyper_channels=16, prior_channels=8, thumbnail=32
)
# The same sizes as a training config's model_overrides.
TINY_OVERRIDES = {"channels": 16, "latent_channels": 16, "hyper_channels": 16, "prior_channels": 8, "thumbnail": 32}
BLACK_LEVEL = 64
WHITE_LEVEL = 4095
# At initialisation the latents are so small that they all quantise to 0; a larger gain gives the tiny
# model real symbols to code (and a rate that depends on λ).
GAIN_BOOST = 30.0

# The machine these tests run on is small and busy: one intra-op thread avoids oversubscription, which
# otherwise slows torch down by two orders of magnitude. Tests that need other thread counts set them.
torch.set_num_threads(1)


def save_tiny_model(path, seed: int = 0, **config_changes) -> Path:
    """Save a tiny random model (with boosted gains, see GAIN_BOOST) as a .safetensors checkpoint."""
    torch.manual_seed(seed)
    model = RealCamNet(dataclasses.replace(TINY_CONFIG, **config_changes)).eval()
    with torch.no_grad():
        model.gains.log_gain += math.log(GAIN_BOOST)
        model.gains.log_inverse_gain -= math.log(GAIN_BOOST)
    return save_checkpoint(model, path)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Two synthetic training pairs (index.jsonl) made from the procedural scene."""
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(sample_scene(96, 128, seed=1)).save(folder / "a.png")
    Image.fromarray(sample_scene(100, 140, seed=2)).save(folder / "b.png")
    return build_dataset([folder], tmp_path_factory.mktemp("pairs"), 1, seed=0)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A tiny random model's .safetensors file (model A)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny.safetensors", seed=0)


@pytest.fixture(scope="session")
def other_model_path(tmp_path_factory):
    """Model B: same config and file name as model A (so the same model name), different weights."""
    return save_tiny_model(tmp_path_factory.mktemp("models_b") / "tiny.safetensors", seed=1)


@pytest.fixture(scope="session")
def tiny_codec(tiny_model_path):
    return load_codec(tiny_model_path)


def smooth_mosaic(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random-ish uint16 mosaic between the black and white levels (gradients, waves, a little noise)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    signal = (
        0.35
        + 0.2 * np.sin(rows / rng.uniform(4, 9) + phase[0])
        + 0.15 * np.cos(cols / rng.uniform(3, 8) + phase[1])
        + 0.1 * np.sin((rows + cols) / 11.0 + phase[2])
        + 0.2 * rows / height
    )
    signal += rng.normal(0, 0.01, signal.shape)
    values = BLACK_LEVEL + np.clip(signal, 0, 1) * (WHITE_LEVEL - BLACK_LEVEL)
    return np.round(values).astype(np.uint16)


@pytest.fixture
def make_dng(tmp_path):
    """Factory: make_dng(name, height, width, cfa=..., orientation=..., seed=...) -> path of a Bayer DNG."""

    def make(name="image.dng", height=64, width=96, *, cfa="RGGB", orientation=1, seed=0, folder=None):
        folder = tmp_path if folder is None else folder
        return bayer_dng_of_size(folder / name, height, width, cfa=cfa, orientation=orientation, seed=seed)

    return make


# ---------------------------------------------------------------------------------------------------------
# Running the command line

RCAM = Path(sys.executable).parent / "rcam"


@pytest.fixture
def run(monkeypatch, capfd):
    """run(*args) -> (exit status, stdout, stderr) of `rcam args...`, in-process.

    Output is captured at the file descriptors, so what C libraries (LibRaw, torch) print counts too.
    """

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["rcam", *(str(a) for a in args)])
        capfd.readouterr()  # drop anything printed before
        with pytest.raises(SystemExit) as done:
            cli.main()
        captured = capfd.readouterr()
        return done.value.code, captured.out, captured.err

    return invoke


def script_env() -> dict[str, str]:
    """Environment for the console script: one torch thread (the test machine is busy)."""
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def interruptible() -> None:
    """Popen preexec_fn: SIGINT back to its default in the child, so Python turns it into KeyboardInterrupt as at a
    terminal. A test run started in the background (nohup, `cmd &` in a script) ignores SIGINT, children inherit
    that, and a Ctrl-C test would then see the batch run to its end (a fresh-clone .ci/run launched so did)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_script(*args):
    """The installed console script in a subprocess."""
    return subprocess.run([str(RCAM), *(str(a) for a in args)], capture_output=True, text=True, env=script_env(), timeout=300)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rcam: error:")]


def part_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".part"))


def check_one_error_line(stderr: str, path: Path) -> str:
    """stderr is exactly one `rcam: error:` line naming `path` (no traceback, no other output); returns it."""
    assert "Traceback" not in stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    assert str(path) in lines[0]
    assert stderr.strip().splitlines() == lines, stderr  # nothing else on stderr (no warnings either)
    return lines[0]


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: each factory writes one file into a folder and returns its path.



def random_mosaic(shape, seed=0):
    return np.random.default_rng(seed).integers(64, 4095, shape).astype(np.uint16)


def text_file(folder):
    path = folder / "notes.dng"
    path.write_text("this is not a raw file\n")
    return path


def empty_file(folder):
    path = folder / "empty.dng"
    path.write_bytes(b"")
    return path


def jpeg_file(folder):
    path = folder / "photo.dng"
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buffer, format="JPEG")
    path.write_bytes(buffer.getvalue())
    return path


def linear_dng(folder):
    rgb = np.random.default_rng(1).integers(64, 4095, (32, 40, 3)).astype(np.uint16)
    return write_linear_dng(folder / "linear.dng", rgb, black_level=64, white_level=4095)


def xtrans_dng(folder):
    pattern = sum(XTRANS_PATTERN, [])
    return write_cfa_dng(folder / "xtrans.dng", random_mosaic((36, 48)), repeat_dim=(6, 6), pattern=pattern, white_level=4095)


def cmyg_dng(folder):
    cyan, magenta, yellow, green = 3, 4, 5, 1
    return write_cfa_dng(
        folder / "cmyg.dng",
        random_mosaic((30, 40)),
        repeat_dim=(2, 2),
        pattern=[cyan, yellow, magenta, green],
        cfa_plane_color=(cyan, magenta, yellow, green),
        xyz_to_camera=[[0.6, 0.3, 0.1], [0.4, 0.5, 0.2], [0.3, 0.6, 0.5], [0.2, 0.8, 0.1]],
        as_shot_neutral=(1, 1, 1, 1),
        white_level=4095,
    )


def too_small_dng(folder):
    # A valid Bayer DNG, but LibRaw refuses anything under 22 pixels a side.
    return write_bayer_dng(folder / "tiny.dng", random_mosaic((16, 16)), white_level=4095)


BAD_INPUTS = {
    "text": text_file,
    "empty": empty_file,
    "jpeg": jpeg_file,
    "linear": linear_dng,
    "xtrans": xtrans_dng,
    "cmyg": cmyg_dng,
    "too-small": too_small_dng,
}


# ---------------------------------------------------------------------------------------------------------
# Hostile DNGs: valid files with edited TIFF fields

TAG_IMAGE_WIDTH, TAG_IMAGE_LENGTH, TAG_ROWS_PER_STRIP, TAG_STRIP_BYTE_COUNTS = 256, 257, 278, 279


def patch_tiff_tags(path, values: dict[int, int]) -> Path:
    """Overwrite single-value SHORT/LONG tags of a little-endian classic TIFF's first IFD, in place."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"II*\x00", "little-endian classic TIFF expected"
    ifd = struct.unpack_from("<I", data, 4)[0]
    remaining = dict(values)
    for number in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * number
        code, kind, count = struct.unpack_from("<HHI", data, entry)
        if code in remaining:
            assert count == 1 and kind in (3, 4), (code, kind, count)
            struct.pack_into("<H" if kind == 3 else "<I", data, entry + 8, remaining.pop(code))
    assert not remaining, f"tags not found: {sorted(remaining)}"
    path.write_bytes(bytes(data))
    return path


def bayer_dng_of_size(path, height: int, width: int, cfa: str = "RGGB", orientation: int = 1, seed: int = 0) -> Path:
    """A Bayer DNG of any size, 1x1 included (the DNG writer needs 2x2: smaller ones get their size tags edited)."""
    mosaic = smooth_mosaic(max(height, 2), max(width, 2), seed)
    path = write_bayer_dng(
        path, mosaic, cfa=cfa, black_level=BLACK_LEVEL, white_level=WHITE_LEVEL, as_shot_neutral=(0.5, 1.0, 0.7), orientation=orientation
    )
    if (height, width) != mosaic.shape:
        patch_tiff_tags(path, {TAG_IMAGE_WIDTH: width, TAG_IMAGE_LENGTH: height, TAG_ROWS_PER_STRIP: height, TAG_STRIP_BYTE_COUNTS: 2 * height * width})
    return path


def truncation_points(path) -> dict[str, int]:
    """File lengths that cut a DNG inside its TIFF header, IFD, tag values, image data, and just before the end."""
    path = Path(path)
    with tifffile.TiffFile(path) as tiff:
        page = tiff.pages[0]
        ifd, data_start, data_length = page.offset, page.dataoffsets[0], page.databytecounts[0]
    size = path.stat().st_size
    assert ifd + 200 < data_start and data_start + data_length == size  # the layout tifffile writes
    return {
        "header": 5,
        "ifd": ifd + 2 + 12 * 4 + 6,
        "tag values": data_start - 40,
        "image data": data_start + data_length // 2,
        "last byte": size - 1,
    }


# ---------------------------------------------------------------------------------------------------------
# Real sensor data

RAW_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"


def real_dng_crop(source: Path, path: Path, height: int, width: int) -> Path:
    """A Bayer DNG holding the central height x width of a real DNG's visible mosaic, with its CFA, black and
    white levels, as-shot neutral and ColorMatrix1: the camera's own data at a size a test can code quickly."""
    with tifffile.TiffFile(source) as tiff:
        tags = tiff.pages[0].tags  # DNG keeps the colour tags in IFD0, the mosaic in a SubIFD
        ratio = lambda values: [n / d for n, d in zip(values[0::2], values[1::2])]  # noqa: E731
        matrix = np.array(ratio(tags["ColorMatrix1"].value)).reshape(3, 3)
        neutral = tuple(ratio(tags["AsShotNeutral"].value))
    import rawpy  # noqa: PLC0415 (only this helper needs LibRaw directly)

    with rawpy.imread(str(source)) as raw:
        visible, pattern, desc = raw.raw_image_visible, raw.raw_pattern, raw.color_desc.decode()
        # Even offsets keep the CFA phase; the crop's pattern is then the file's own.
        top, left = (visible.shape[0] - height) // 4 * 2, (visible.shape[1] - width) // 4 * 2
        mosaic = visible[top : top + height, left : left + width].copy()
        cfa = "".join(desc[pattern[y, x]] for y in range(2) for x in range(2))
        black = [raw.black_level_per_channel[pattern[y, x]] for y in range(2) for x in range(2)]
        white = int(raw.white_level)
    return write_bayer_dng(path, mosaic, cfa=cfa, black_level=black, white_level=white, as_shot_neutral=neutral, xyz_to_camera=matrix)


@pytest.fixture(scope="session")
def shipped_codec():
    """The model rcam uses by default (weights/manifest.json), whatever its architecture."""
    return load_codec()


# ---------------------------------------------------------------------------------------------------------
# DNGs with capture metadata, sound and hostile

# A full capture set: written into a test DNG with libexiv2 and expected unchanged in every output.
CAPTURE_EXIF = {
    "Exif.Image.Make": "Nikon",
    "Exif.Image.Model": "Z 6",
    "Exif.Image.DateTime": "2024:05:17 14:03:22",
    "Exif.Image.Artist": "Ada Lovelace",
    "Exif.Photo.ExposureTime": "1/250",
    "Exif.Photo.FNumber": "56/10",
    "Exif.Photo.ISOSpeedRatings": "400",
    "Exif.Photo.FocalLength": "35/1",
    "Exif.Photo.FocalLengthIn35mmFilm": "35",
    "Exif.Photo.DateTimeOriginal": "2024:05:17 14:03:22",
    "Exif.Photo.OffsetTimeOriginal": "+02:00",
    "Exif.Photo.SubSecTimeOriginal": "25",
    "Exif.Photo.LensMake": "Nikon",
    "Exif.Photo.LensModel": "NIKKOR Z 24-70mm f/4 S",
    "Exif.Photo.LensSpecification": "24/1 70/1 4/1 4/1",
    "Exif.GPSInfo.GPSVersionID": "2 3 0 0",
    "Exif.GPSInfo.GPSLatitudeRef": "N",
    "Exif.GPSInfo.GPSLatitude": "48/1 51/1 2436/100",
    "Exif.GPSInfo.GPSLongitudeRef": "E",
    "Exif.GPSInfo.GPSLongitude": "2/1 17/1 4012/100",
    "Exif.GPSInfo.GPSAltitude": "35/1",
}
CAPTURE_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:xmp="http://ns.adobe.com/xap/1.0/"'
    ' xmlns:tiff="http://ns.adobe.com/tiff/1.0/" xmlns:exif="http://ns.adobe.com/exif/1.0/" xmp:Rating="4"'
    ' tiff:Orientation="6" exif:GPSLatitude="48,51.406N" exif:GPSLongitude="2,17.6687E">'
    "<dc:creator><rdf:Seq><rdf:li>Ada Lovelace</rdf:li></rdf:Seq></dc:creator>"
    '<dc:subject><rdf:Bag><rdf:li>bridge</rdf:li><rdf:li>Paris</rdf:li></rdf:Bag></dc:subject>'
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)


def add_metadata(path, exif: dict[str, str] | None = None, xmp: str | None = None, remove=()) -> Path:
    """Write EXIF fields (exiv2 keys and values) and an XMP packet into an existing RAW file, in place."""
    import exiv2

    image = exiv2.ImageFactory.open(str(path))
    image.readMetadata()
    data = image.exifData()
    for key in remove:
        data.erase(data.findKey(exiv2.ExifKey(key)))
    for key, value in (exif or {}).items():
        data[key] = value
    if xmp is not None:
        image.setXmpPacket(xmp)
    image.writeMetadata()
    return Path(path)


def capture_dng(path, orientation: int = 6) -> Path:
    """A Bayer DNG carrying CAPTURE_EXIF and CAPTURE_XMP."""
    return add_metadata(bayer_dng_of_size(path, 64, 96, orientation=orientation), CAPTURE_EXIF, CAPTURE_XMP)


# Nikon's own identity strings, as its NEFs carry them (the model repeats the make).
NEF_IDENTITY = {"Exif.Image.Make": "NIKON CORPORATION", "Exif.Image.Model": "NIKON Z 6"}
# Capture fields beyond CAPTURE_EXIF, of the EXIF types it lacks (SRATIONAL, UNDEFINED), for field-by-field checks.
MORE_CAPTURE_EXIF = {
    "Exif.Image.Copyright": "(c) 2024 Ada Lovelace",
    "Exif.Photo.ExifVersion": "48 50 51 50",
    "Exif.Photo.ExposureProgram": "3",
    "Exif.Photo.ExposureBiasValue": "-2/3",
    "Exif.Photo.MeteringMode": "5",
    "Exif.Photo.Flash": "16",
    "Exif.Photo.WhiteBalance": "0",
    "Exif.Photo.OffsetTime": "+02:00",
    "Exif.Photo.DateTimeDigitized": "2024:05:17 14:03:22",
    "Exif.Photo.BodySerialNumber": "6012345",
    "Exif.GPSInfo.GPSTimeStamp": "12/1 3/1 22/1",
    "Exif.GPSInfo.GPSDateStamp": "2024:05:17",
}
# A Nikon maker note naming the lens (LensData 0100 and LensType as an AF-S Nikkor 50mm f/1.8G holds them) and
# no EXIF LensModel, as in NEFs of cameras older than the Z series.
NIKON_LENS_MAKERNOTE = {
    "Exif.Nikon3.Version": "48 50 49 48", "Exif.Nikon3.LensType": "6", "Exif.NikonLd1.Version": "48 49 48 48",
    "Exif.NikonLd1.LensIDNumber": "176", "Exif.NikonLd1.LensFStops": "76", "Exif.NikonLd1.MinFocalLength": "80",
    "Exif.NikonLd1.MaxFocalLength": "80", "Exif.NikonLd1.MaxApertureAtMinFocal": "20",
    "Exif.NikonLd1.MaxApertureAtMaxFocal": "20", "Exif.NikonLd1.MCUVersion": "178",
}  # fmt: skip


def capture_nef(path, orientation: int = 6, exif: dict[str, str] | None = None) -> Path:
    """A Nikon NEF (tests/nef.py) of smooth_mosaic(64, 96) carrying CAPTURE_EXIF with Nikon's Make and Model,
    the given extra fields, and CAPTURE_XMP."""
    make, model = NEF_IDENTITY["Exif.Image.Make"], NEF_IDENTITY["Exif.Image.Model"]
    nef = write_nef(path, smooth_mosaic(64, 96), make=make, model=model, orientation=orientation)
    return add_metadata(nef, CAPTURE_EXIF | NEF_IDENTITY | (exif or {}), CAPTURE_XMP)


def _ifd_entries(data: bytes, offset: int) -> list[tuple[int, int, int, int, int]]:
    """(entry offset, tag, type, count, value) of a little-endian classic TIFF IFD."""
    count = struct.unpack_from("<H", data, offset)[0]
    return [(offset + 2 + 12 * i, *struct.unpack_from("<HHII", data, offset + 2 + 12 * i)) for i in range(count)]


def _exif_ifd(data: bytes) -> tuple[int, int]:
    """(offset of IFD0's ExifTag entry, offset of the Exif IFD)."""
    (entry, _, _, _, offset), = [e for e in _ifd_entries(data, struct.unpack_from("<I", data, 4)[0]) if e[1] == 34665]
    return entry, offset


def _exif_loop_to_ifd0(data: bytearray) -> None:
    entry, _ = _exif_ifd(data)
    struct.pack_into("<I", data, entry + 8, struct.unpack_from("<I", data, 4)[0])


def _exif_next_is_itself(data: bytearray) -> None:
    _, offset = _exif_ifd(data)
    struct.pack_into("<I", data, offset + 2 + 12 * struct.unpack_from("<H", data, offset)[0], offset)


def _exif_value_past_the_end(data: bytearray) -> None:
    _, offset = _exif_ifd(data)
    entry = next(e for e in _ifd_entries(data, offset) if e[2] in (5, 10))  # a rational: its value lies elsewhere
    struct.pack_into("<I", data, entry[0] + 8, len(data) + 1000)


def _huge_xmp(path) -> None:
    text = "x" * 3_000_000
    add_metadata(path, xmp=CAPTURE_XMP.replace("<dc:creator>", f'<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{text}</rdf:li></rdf:Alt></dc:description><dc:creator>'))


def _broken_xmp(path) -> None:
    # A packet cut off in the middle, as a truncated write leaves it (blanked in place: libexiv2 writes only valid XMP).
    data = bytearray(Path(path).read_bytes())
    start = data.index(b"<x:xmpmeta")
    end = data.index(b"</x:xmpmeta>") + len(b"</x:xmpmeta>")
    middle = (start + end) // 2
    data[middle:end] = b" " * (end - middle)
    Path(path).write_bytes(bytes(data))


HOSTILE_METADATA = {
    # name: (how the capture DNG is damaged, the block that is dropped, words of the warning)
    "exif-loop": (_exif_loop_to_ifd0, "exif", "EXIF is damaged"),
    "exif-next-itself": (_exif_next_is_itself, "exif", "EXIF is damaged"),
    "exif-truncated-value": (_exif_value_past_the_end, "exif", "EXIF is damaged"),
    "huge-xmp": (_huge_xmp, "xmp", "XMP packet of"),
    "broken-xmp": (_broken_xmp, "xmp", "XMP packet cannot be parsed"),
}


def hostile_metadata_dng(path, name: str) -> Path:
    """A capture DNG with one HOSTILE_METADATA damage: the raw image itself still reads."""
    damage = HOSTILE_METADATA[name][0]
    path = capture_dng(path, orientation=1)
    if name.startswith("exif"):
        data = bytearray(path.read_bytes())
        damage(data)
        path.write_bytes(bytes(data))
    else:
        damage(path)
    return path
