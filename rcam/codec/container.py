"""The .rcb container, version 6 (docs/FORMAT.md): header, tone correction field (coded: rcam.codec.tone_coding), look and development (the colour
matrix and brightness the skeleton decoder applies), capture metadata (EXIF and XMP lengths, own CRC), stream
table, checksums, then the metadata and one stream per tile. Version 5 files (the tone field as float16), version
4 files (the same header; y in each stream in position order), version 3 files (no look: clean, no development,
no metadata), version 2 (one gain and offset per channel) and version 1 (no tone correction) are still read.

Parsing reads fixed-size little-endian fields with explicit bounds checks, never unpickles or evaluates
anything, and checks every declared size against both a fixed limit and the bytes actually present before
anything is allocated from it.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, replace

from rcam.codec.metadata import MAX_EXIF, MAX_XMP
from rcam.codec.tone import IDENTITY, MAX_KNOTS, check_tone, knots_of
from rcam.codec.tone_coding import decode_field, encode_field, max_field_bytes
from rcam.errors import RcamError

MAGIC = b"\x89RCB\r\n\x1a\n"  # like PNG's: catches text-mode transfers and truncation to a few bytes
FORMAT_VERSION = 6  # written
# 1: no tone correction; 2: one gain and offset per channel (six float32); 3: no capture metadata; 4: older streams;
# 5: the tone field as float16
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
ADAPTIVE_STREAMS_VERSION = 5  # from here on: z with per-tile table variants, y grouped by scale (entropy.LatentCoder)
CODED_TONE_VERSION = 6  # from here on: the tone field coded (rcam.codec.tone_coding) instead of float16
MAX_SIDE = 65535  # sensor rows / columns
MAX_PIXELS = 200_000_000  # same bound as the RAW reader
MAX_TILE = 4096  # packed pixels per tile side
MAX_STREAMS = 65535
MAX_NAME = 64
LOOKS = ("clean", "faithful")  # SPEC §3; the header stores the index
MAX_MATRIX_ENTRY = 64.0  # |colour matrix entries|: real cameras stay within about ±8
IDENTITY_MATRIX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

_PREFIX = struct.Struct("<8sHI")  # magic, version, header body length
_GEOMETRY = struct.Struct("<16sfIIBBBIIHHHHHI")
_TONE_V2 = struct.Struct("<6f")  # gains R, G, B, offsets R, G, B (version 2)
_TONE_KNOTS = struct.Struct("<B")  # K, then 6 K² float16: gains (3, K, K), offsets (3, K, K) (versions 3-5)
_TONE_CODE_LENGTH = struct.Struct("<H")  # after K: the coded field's length in bytes, then the code (version 6)
_LOOK_DEVELOPMENT = struct.Struct("<B9ff")  # look code, camera -> sRGB matrix (row-major), white (version 4)
_METADATA = struct.Struct("<III")  # EXIF length, XMP length, crc32 of both (version 4)
_STREAM_ENTRY = struct.Struct("<II")  # length, crc32
_CRC = struct.Struct("<I")


@dataclass(frozen=True)
class Header:
    """Everything the decoder needs besides the weights: model identity, λ, geometry, tile grid, streams."""

    model_name: str
    weights_digest: bytes  # 16 bytes: the first half of the weights file's SHA-256
    lam: float
    sensor_height: int  # visible sensor rows
    sensor_width: int
    pad_top: int  # CFA unification padding (0 or 1)
    pad_left: int
    flip: int  # LibRaw orientation code
    output_height: int  # decoded image rows (after orientation)
    output_width: int
    tile_height: int  # packed pixels
    tile_width: int
    overlap: int
    tile_rows: int
    tile_cols: int
    tone: tuple[float, ...] = IDENTITY  # encoder-fitted gain and offset fields, 6 K² values (rcam.codec.tone)
    look: str = "clean"  # SPEC §3: which target the decoder renders (files before version 4: clean)
    cam_to_srgb: tuple[float, ...] = IDENTITY_MATRIX  # 9 values, the skeleton decoder's colour matrix (rcam.codec.skeleton)
    white: float = 1.0  # the skeleton decoder's auto-brightness level (linear sRGB value that becomes 1)
    stream_lengths: tuple[int, ...] = ()
    stream_crcs: tuple[int, ...] = ()
    format_version: int = FORMAT_VERSION  # of the file it was read from
    exif: bytes = b""  # capture EXIF, TIFF-structured (rcam.codec.metadata); stored after the header, own CRC
    xmp: bytes = b""  # capture XMP packet, UTF-8


def _check_geometry(header: Header) -> None:
    """Reject headers whose numbers are out of range or inconsistent with each other."""
    if not (2 <= header.sensor_height <= MAX_SIDE and 2 <= header.sensor_width <= MAX_SIDE):
        raise RcamError(f"bad header: sensor size {header.sensor_width}x{header.sensor_height} out of range")
    if header.sensor_height * header.sensor_width > MAX_PIXELS:
        raise RcamError("bad header: sensor larger than 200 MP")
    if header.pad_top not in (0, 1) or header.pad_left not in (0, 1) or header.flip not in (0, 1, 2, 3, 4, 5, 6, 7):
        raise RcamError("bad header: CFA padding or orientation out of range")
    expected = (header.sensor_width, header.sensor_height) if header.flip & 4 else (header.sensor_height, header.sensor_width)
    if (header.output_height, header.output_width) != expected:
        raise RcamError("bad header: output size does not match sensor size and orientation")
    for size in (header.tile_height, header.tile_width):
        if not (32 <= size <= MAX_TILE and size % 32 == 0):
            raise RcamError(f"bad header: tile size {size} out of range")
    if header.overlap % 32 or header.overlap >= min(header.tile_height, header.tile_width):
        raise RcamError(f"bad header: tile overlap {header.overlap} out of range")
    packed_height = (header.sensor_height + header.pad_top + 1) // 2
    packed_width = (header.sensor_width + header.pad_left + 1) // 2
    for count, size, length in ((header.tile_rows, header.tile_height, packed_height), (header.tile_cols, header.tile_width, packed_width)):
        last_start = (count - 1) * (size - header.overlap)
        # The tiles must cover the frame, and the last one must start inside it.
        if count < 1 or last_start + size < length or last_start >= length:
            raise RcamError("bad header: tile grid does not match the image size")
    if not (0.0 < header.lam < 1.0):
        raise RcamError(f"bad header: lambda {header.lam} out of range")
    if header.look not in LOOKS:
        raise RcamError(f"bad header: look {header.look!r} unknown")
    finite = all(math.isfinite(value) for value in (*header.cam_to_srgb, header.white))
    if len(header.cam_to_srgb) != 9 or not finite or max(map(abs, header.cam_to_srgb)) > MAX_MATRIX_ENTRY:
        raise RcamError("bad header: colour matrix out of range")
    if not (1e-6 <= header.white <= 2.0):
        raise RcamError(f"bad header: white level {header.white} out of range")


def write(header: Header, streams: list[bytes]) -> bytes:
    """Serialise a header and its tile streams into .rcb bytes."""
    if len(streams) != header.tile_rows * header.tile_cols:
        raise ValueError("one stream per tile")
    _check_geometry(header)
    check_tone(header.tone)
    name = header.model_name.encode("ascii")
    if not 1 <= len(name) <= MAX_NAME or len(header.weights_digest) != 16:
        raise ValueError("model name must be 1-64 ASCII bytes and the digest 16 bytes")
    body = bytearray([len(name)]) + name
    body += _GEOMETRY.pack(
        header.weights_digest, header.lam, header.sensor_height, header.sensor_width, header.pad_top,
        header.pad_left, header.flip, header.output_height, header.output_width, header.tile_height,
        header.tile_width, header.overlap, header.tile_rows, header.tile_cols, len(streams),
    )  # fmt: skip
    body += _TONE_KNOTS.pack(knots_of(header.tone))
    if FORMAT_VERSION >= CODED_TONE_VERSION:
        code = encode_field(header.tone)
        body += _TONE_CODE_LENGTH.pack(len(code)) + code
    else:  # an older version, written where tests make one
        body += _pack_float16(header.tone)
    body += _LOOK_DEVELOPMENT.pack(LOOKS.index(header.look), *header.cam_to_srgb, header.white)
    if len(header.exif) > MAX_EXIF or len(header.xmp) > MAX_XMP:
        raise ValueError(f"metadata too large (EXIF at most {MAX_EXIF} bytes, XMP at most {MAX_XMP})")
    body += _METADATA.pack(len(header.exif), len(header.xmp), zlib.crc32(header.exif + header.xmp))
    for stream in streams:
        body += _STREAM_ENTRY.pack(len(stream), zlib.crc32(stream))
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + bytes(body)
    return head + _CRC.pack(zlib.crc32(head)) + header.exif + header.xmp + b"".join(streams)


def _pack_float16(values: tuple[float, ...]) -> bytes:
    packed = struct.pack(f"<{len(values)}e", *values)
    # The decoder applies what the file holds: an encoder must hand over values float16 keeps exactly.
    if struct.unpack(f"<{len(values)}e", packed) != tuple(values):
        raise ValueError("tone values must be exact float16 numbers (rcam.codec.tone.fit_tone rounds them)")
    return packed


def _read_tone(fields: "_Reader", version: int) -> tuple[float, ...]:
    """The tone correction of a header body at `fields` (version 1: none, 2: six float32, 3-5: a K x K field of
    float16, 6: a K x K field coded by rcam.codec.tone_coding)."""
    if version == 1:
        return IDENTITY
    if version == 2:
        return _TONE_V2.unpack(fields.take(_TONE_V2.size, "header"))
    (knots,) = _TONE_KNOTS.unpack(fields.take(_TONE_KNOTS.size, "header"))
    if not 1 <= knots <= MAX_KNOTS:
        raise RcamError(f"bad header: tone correction with {knots} knots per side, expected 1 to {MAX_KNOTS}")
    if version >= CODED_TONE_VERSION:
        (length,) = _TONE_CODE_LENGTH.unpack(fields.take(_TONE_CODE_LENGTH.size, "header"))
        if length > max_field_bytes(knots):
            raise RcamError(f"bad header: tone field code of {length} bytes, at most {max_field_bytes(knots)} for K = {knots}")
        return decode_field(fields.take(length, "header"), knots)
    count = 6 * knots * knots
    return struct.unpack(f"<{count}e", fields.take(2 * count, "header"))


class _Reader:
    """Sequential reads that fail with 'truncated' instead of reading past the end."""

    def __init__(self, data: bytes, start: int = 0):
        self.data, self.offset = data, start

    def take(self, count: int, what: str) -> bytes:
        if count > len(self.data) - self.offset:
            raise RcamError(f"truncated: file ends inside the {what} (at byte {len(self.data)})")
        chunk = self.data[self.offset : self.offset + count]
        self.offset += count
        return chunk


def read(data: bytes) -> tuple[Header, list[bytes]]:
    """Parse and verify .rcb bytes -> (header, streams); any problem raises RcamError naming it."""
    reader = _Reader(data)
    magic, version, body_length = _PREFIX.unpack(reader.take(_PREFIX.size, "file signature"))
    if magic != MAGIC:
        raise RcamError("not an rcam bitstream (bad signature)")
    if version not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise RcamError(f"format version {version} is not supported (this rcam reads versions {readable})")
    max_body = (
        1 + MAX_NAME + _GEOMETRY.size + _TONE_KNOTS.size + 12 * MAX_KNOTS**2 + _LOOK_DEVELOPMENT.size + _METADATA.size
        + MAX_STREAMS * _STREAM_ENTRY.size
    )  # fmt: skip
    if body_length > max_body:
        raise RcamError(f"bad header: declared header length {body_length} is too large")
    body = reader.take(body_length, "header")
    (crc,) = _CRC.unpack(reader.take(_CRC.size, "header checksum"))
    if zlib.crc32(data[: _PREFIX.size + body_length]) != crc:
        raise RcamError("checksum mismatch in header")
    fields = _Reader(body)
    name_length = fields.take(1, "header")[0]
    if not 1 <= name_length <= MAX_NAME:  # FORMAT.md: 1..64, as the writer enforces
        raise RcamError(f"bad header: model name of {name_length} bytes, expected 1 to {MAX_NAME}")
    name_bytes = fields.take(name_length, "header")
    try:
        model_name = name_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise RcamError("bad header: model name is not ASCII") from None
    (digest, lam, sensor_height, sensor_width, pad_top, pad_left, flip, output_height, output_width,
     tile_height, tile_width, overlap, tile_rows, tile_cols, stream_count) = _GEOMETRY.unpack(fields.take(_GEOMETRY.size, "header"))  # fmt: skip
    if stream_count != tile_rows * tile_cols:
        raise RcamError(f"bad header: {stream_count} streams for a {tile_rows}x{tile_cols} tile grid")
    if stream_count > MAX_STREAMS:
        raise RcamError(f"bad header: {stream_count} streams ({tile_rows}x{tile_cols} tiles), at most {MAX_STREAMS}")
    tone = _read_tone(fields, version)
    check_tone(tone)
    look, cam_to_srgb, white = "clean", IDENTITY_MATRIX, 1.0
    if version >= 4:
        look_code, *cam_to_srgb, white = _LOOK_DEVELOPMENT.unpack(fields.take(_LOOK_DEVELOPMENT.size, "header"))
        if look_code >= len(LOOKS):
            raise RcamError(f"bad header: look code {look_code} unknown")
        look = LOOKS[look_code]
    exif_length, xmp_length, metadata_crc = _METADATA.unpack(fields.take(_METADATA.size, "header")) if version >= 4 else (0, 0, 0)
    if exif_length > MAX_EXIF or xmp_length > MAX_XMP:
        raise RcamError(f"bad header: metadata of {exif_length} + {xmp_length} bytes, at most {MAX_EXIF} + {MAX_XMP}")
    entries = [_STREAM_ENTRY.unpack(fields.take(_STREAM_ENTRY.size, "stream table")) for _ in range(stream_count)]
    if fields.offset != len(body):
        raise RcamError("bad header: unexpected bytes after the stream table")
    header = Header(
        model_name, digest, lam, sensor_height, sensor_width, pad_top, pad_left, flip, output_height, output_width,
        tile_height, tile_width, overlap, tile_rows, tile_cols, tuple(tone), look, tuple(cam_to_srgb), white,
        tuple(length for length, _ in entries), tuple(crc for _, crc in entries), version,
    )  # fmt: skip
    _check_geometry(header)
    metadata = reader.take(exif_length + xmp_length, "metadata")
    if version >= 4 and zlib.crc32(metadata) != metadata_crc:
        raise RcamError("checksum mismatch in metadata")
    header = replace(header, exif=metadata[:exif_length], xmp=metadata[exif_length:])
    streams = []
    for number, (length, stream_crc) in enumerate(entries):
        stream = reader.take(length, f"stream {number}")
        if zlib.crc32(stream) != stream_crc:
            raise RcamError(f"checksum mismatch in stream {number}")
        streams.append(stream)
    if reader.offset != len(data):
        raise RcamError(f"{len(data) - reader.offset} unexpected bytes after the last stream")
    return header, streams
