"""Write small uncompressed Nikon NEF files, the second raw format the metadata tests run through rcam.

The layout is that of Nikon's own NEFs: a big-endian TIFF whose IFD0 holds a small RGB preview (NewSubfileType 1)
and the camera's identity, and whose SubIFD holds the raw CFA strip (NewSubfileType 0, Compression 34713 =
"Nikon NEF compressed", PhotometricInterpretation 32803 = CFA, CFARepeatPatternDim and CFAPattern as in TIFF/EP).
Both readers recognise it as a NEF:
- LibRaw (tiff.cpp, apply_tiff) takes the largest image as the raw one; for Compression 34713 whose strip is
  exactly width x height x 2 bytes it uses its uncompressed-NEF loader (unpacked_load_raw, big-endian samples
  shifted right by 4 bits: load_flags 4), so each 12-bit value is stored << 4; BitsPerSample 12 makes its
  white level 4095. It takes the CFA from CFAPattern and the colour matrix from its table for the model
  ("Z 6" has no size quirks there; older models such as the D1X get their width cut);
- libexiv2 (TiffImage::mimeType) names a TIFF whose primary image has Compression 34713 image/x-nikon-nef.
EXIF and XMP are added afterwards with libexiv2 (conftest.add_metadata), as for the test DNGs.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_BYTE, _ASCII, _SHORT, _LONG = 1, 2, 3, 4
_FORMATS = {_BYTE: "B", _ASCII: "B", _SHORT: "H", _LONG: "I"}
NEF_COMPRESSION = 34713
# LibRaw's uncompressed-NEF loader shifts each sample right by this many bits.
NEF_SHIFT = 4
CFA_CODES = {"R": 0, "G": 1, "B": 2}


def _ifd(entries: list[tuple[int, int, object]], at: int, next_ifd: int = 0) -> bytes:
    """One big-endian IFD placed at byte `at`: (tag, type, value or values) -> the IFD and its out-of-line values."""
    entries = sorted(entries, key=lambda entry: entry[0])
    values_at = at + 2 + 12 * len(entries) + 4
    table, values = struct.pack(">H", len(entries)), b""
    for tag, kind, value in entries:
        if kind == _ASCII:
            items = list(str(value).encode("ascii") + b"\x00")
        else:
            items = list(value) if isinstance(value, (tuple, list)) else [value]
        payload = struct.pack(f">{len(items)}{_FORMATS[kind]}", *items)
        if len(payload) <= 4:
            inline = payload.ljust(4, b"\x00")
        else:
            inline = struct.pack(">I", values_at + len(values))
            values += payload + b"\x00" * (len(payload) % 2)  # values start on a word boundary
        table += struct.pack(">HHI", tag, kind, len(items)) + inline
    return table + struct.pack(">I", next_ifd) + values


def _ifd_size(entries: list[tuple[int, int, object]]) -> int:
    return len(_ifd(entries, 0))


def write_nef(path, mosaic: np.ndarray, *, cfa: str = "RGGB", make: str = "NIKON CORPORATION", model: str = "NIKON Z 6", orientation: int = 1) -> Path:
    """Write a (H, W) mosaic of 12-bit values (0..4095) as an uncompressed NEF with an 8x8 grey preview."""
    mosaic = np.asarray(mosaic)
    if mosaic.ndim != 2 or mosaic.min() < 0 or mosaic.max() > 4095:
        raise ValueError("a NEF mosaic is (H, W) of 12-bit values")
    height, width = mosaic.shape
    preview = np.full((8, 8, 3), 128, np.uint8).tobytes()
    raw = (mosaic.astype(np.uint16) << NEF_SHIFT).astype(">u2").tobytes()

    def ifd0(raw_ifd_at: int, preview_at: int) -> list:
        return [
            (254, _LONG, 1),  # NewSubfileType: reduced-resolution preview
            (256, _LONG, 8), (257, _LONG, 8), (258, _SHORT, (8, 8, 8)), (259, _SHORT, 1), (262, _SHORT, 2),
            (271, _ASCII, make), (272, _ASCII, model), (273, _LONG, preview_at), (274, _SHORT, orientation),
            (277, _SHORT, 3), (278, _LONG, 8), (279, _LONG, len(preview)), (284, _SHORT, 1),
            (330, _LONG, raw_ifd_at),  # SubIFDs: the raw image
        ]  # fmt: skip

    def raw_ifd(raw_at: int) -> list:
        return [
            (254, _LONG, 0),  # the main (full-resolution raw) image
            (256, _LONG, width), (257, _LONG, height), (258, _SHORT, 12), (259, _SHORT, NEF_COMPRESSION),
            (262, _SHORT, 32803), (273, _LONG, raw_at), (277, _SHORT, 1), (278, _LONG, height),
            (279, _LONG, len(raw)), (284, _SHORT, 1),
            (33421, _SHORT, (2, 2)), (33422, _BYTE, tuple(CFA_CODES[c] for c in cfa)),
        ]  # fmt: skip

    # Layout: header, IFD0, raw IFD, preview, raw strip (sizes do not depend on the offsets).
    ifd0_at = 8
    raw_ifd_at = ifd0_at + _ifd_size(ifd0(0, 0))
    preview_at = raw_ifd_at + _ifd_size(raw_ifd(0))
    raw_at = preview_at + len(preview)
    data = b"MM\x00\x2a" + struct.pack(">I", ifd0_at)
    data += _ifd(ifd0(raw_ifd_at, preview_at), ifd0_at) + _ifd(raw_ifd(raw_at), raw_ifd_at) + preview + raw
    path = Path(path)
    path.write_bytes(data)
    return path
