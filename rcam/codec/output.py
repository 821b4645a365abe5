"""Image output: PNG (8/16-bit), JPEG and TIFF with an embedded sRGB ICC profile and the capture metadata,
written atomically.

Every file rcam writes goes to a temporary name in the destination folder and is renamed into place only
when complete, so an interrupted run (Ctrl-C, a crash, a full disk) never leaves a partial output.
"""

from __future__ import annotations

import io
import os
import struct
import tempfile
import zlib
from functools import cache
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageCms

from rcam.codec.metadata import EMPTY, Metadata, png_chunks, upright, write_into
from rcam.errors import RcamError

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff"}
# zlib level of PNG output: at 24 MP level 2 takes 1.5 s where the default (6) takes 7.6 s, for a file 4.5% larger.
PNG_LEVEL = 2


# The ICC header's creation date (bytes 24-35: year, month, day, hour, minute, second as u16): littleCMS
# stamps the current time, which made the same pixels give different files from one run to the next.
_ICC_DATE = slice(24, 36)
_FIXED_ICC_DATE = struct.pack(">6H", 2024, 1, 1, 0, 0, 0)


@cache
def srgb_icc_profile() -> bytes:
    """The sRGB ICC profile (littleCMS's built-in one, via Pillow), with a fixed creation date: output files
    are reproducible byte for byte (the profile carries no MD5 ID that the date would invalidate)."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[_ICC_DATE] = _FIXED_ICC_DATE
    return bytes(profile)


QUANTIZE_BAND_ROWS = 256  # rows quantize converts at a time: its float temporaries were 3 frames at 24 MP


def quantize(image: np.ndarray, bits: int) -> np.ndarray:
    """(H, W, ...) float in [0, 1] -> uint8 or uint16 of the same shape, rounding to nearest."""
    peak = (1 << bits) - 1
    pixels = np.empty(image.shape, np.uint8 if bits == 8 else np.uint16)
    for top in range(0, image.shape[0], QUANTIZE_BAND_ROWS):
        band = slice(top, top + QUANTIZE_BAND_ROWS)
        pixels[band] = np.round(np.clip(image[band], 0.0, 1.0) * peak)
    return pixels


def _png_with_icc(png: bytes, profile: bytes, extra: bytes = b"") -> bytes:
    """Insert an iCCP chunk, then the `extra` chunks, right after IHDR (PNG spec: before PLTE/IDAT)."""
    ihdr_end = 8 + 4 + 4 + 13 + 4  # signature, IHDR length, type, data, CRC
    payload = b"sRGB\x00\x00" + zlib.compress(profile)  # name, NUL, compression method 0
    chunk = struct.pack(">I", len(payload)) + b"iCCP" + payload + struct.pack(">I", zlib.crc32(b"iCCP" + payload))
    return png[:ihdr_end] + chunk + extra + png[ihdr_end:]


def encode_image(image: np.ndarray, kind: str, bits: int = 8, quality: int = 95, metadata: Metadata = EMPTY) -> bytes:
    """(H, W, 3) float sRGB in [0, 1] -> file bytes of `kind` ("png", "jpeg", "tiff") with the sRGB profile and
    the capture metadata (EXIF and XMP, orientation set to 1: the pixels are upright)."""
    if bits not in (8, 16):
        raise RcamError(f"--bits must be 8 or 16, not {bits}")
    if kind == "jpeg" and bits != 8:
        raise RcamError("JPEG output is 8-bit only; use .png or .tif for 16-bit")
    if not 1 <= quality <= 100:
        raise RcamError(f"--quality must be within 1..100, not {quality}")
    if kind not in ("png", "jpeg", "tiff"):
        raise RcamError(f"unknown output format '{kind}'")
    pixels = quantize(image, bits)
    profile = srgb_icc_profile()
    metadata = upright(metadata)
    if kind == "png":
        return _png_with_icc(imagecodecs.png_encode(pixels, level=PNG_LEVEL), profile, png_chunks(metadata))
    if kind == "jpeg":
        buffer = io.BytesIO()
        extra = {"exif": b"Exif\x00\x00" + metadata.exif} if metadata.exif else {}
        if metadata.xmp:
            extra["xmp"] = metadata.xmp
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality, icc_profile=profile, **extra)
        return buffer.getvalue()
    if kind == "tiff":
        buffer = io.BytesIO()
        # No tifffile ImageDescription ('{"shape": ...}') or Software: both are capture fields, and the RAW's own
        # (or none) must be what the image carries.
        tifffile.imwrite(buffer, pixels, photometric="rgb", compression="zlib", iccprofile=profile, metadata=None, software=False)
        # libexiv2 writes the Exif and GPS sub-IFDs and the XMP tag (700) into the finished TIFF.
        return write_into(buffer.getvalue(), metadata)
    raise RcamError(f"unknown output format '{kind}'")


def image_kind(path: Path) -> str:
    """Output format from a file name's suffix."""
    kind = IMAGE_SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise RcamError(f"{path}: output must end in .png, .jpg, .jpeg, .tif or .tiff")
    return kind


def check_output_path(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse to overwrite an input, or an existing file without --force."""
    path = Path(path)
    for source in inputs:
        if path.exists() and Path(source).exists() and os.path.samefile(path, source):
            raise RcamError(f"{path}: refusing to overwrite an input file")
    if path.exists() and not force:
        raise RcamError(f"{path}: already exists (use --force to overwrite)")
    if path.exists() and not path.is_file():
        raise RcamError(f"{path}: exists and is not a regular file")
    if not path.parent.is_dir():
        raise RcamError(f"{path}: folder {path.parent} does not exist")


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes to `path` via a temporary file in the same folder and a rename; no partial file on failure."""
    path = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as error:  # e.g. a read-only or unwritable folder: the user's problem, not an rcam bug
        raise RcamError(f"{path}: cannot write in {path.parent} ({error.strerror})") from None
    try:
        with os.fdopen(handle, "wb") as file:
            # mkstemp creates the file 0600; give the output the usual permissions (0666 less the umask).
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(file.fileno(), 0o666 & ~umask)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:  # KeyboardInterrupt included: never leave the temporary behind
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise RcamError(f"{path}: cannot write ({error.strerror})") from None
        raise
