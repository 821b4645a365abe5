"""Capture metadata: the RAW's EXIF (camera, lens, exposure, date, place) and XMP, carried into the .rcb and
written into every decoded image.

exiv2 (libexiv2 through python-exiv2) reads it: it knows the raw formats LibRaw opens (DNG, CR2, CR3, NEF,
ARW, ORF, RW2, PEF, SRW, RAF, ...), bounds-checks and loop-checks IFD chains, and encodes EXIF exactly as a
JPEG's APP1 segment holds it. Only the capture fields below are kept, not the raw file's own structure
(strips, colour matrices, maker notes), so the stored EXIF is small and its offsets are rcam's own.

The .rcb stores `exif` as a TIFF-structured block (IFD0 with the Exif and GPS sub-IFDs, what a PNG eXIf chunk
holds; a JPEG's APP1 payload less its b"Exif\\0\\0") and `xmp` as the XMP packet, UTF-8. Both keep the RAW's
orientation; images written from them get orientation 1, because rcam's decoded pixels are already upright.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import exiv2
from PIL import Image

from rcam.errors import RcamError

# A JPEG APP1 segment holds at most 65533 bytes after its length field: b"Exif\0\0" + the block, or the
# 29-byte XMP namespace + the packet. Anything rcam stores must fit one, so every output format can carry it.
MAX_EXIF = 65533 - 6
MAX_XMP = 65533 - 29
# One kept EXIF value larger than this is not a capture field but junk (or an attack on the output size).
MAX_FIELD = 1024
# An XMP packet larger than this is not even parsed.
MAX_XMP_READ = 16 * MAX_XMP

_IFD0 = ("Make", "Model", "Orientation", "DateTime", "ImageDescription", "Artist", "Copyright", "Software")
_PHOTO = (
    "ExposureTime", "FNumber", "ExposureProgram", "ISOSpeedRatings", "SensitivityType", "RecommendedExposureIndex",
    "ExifVersion", "DateTimeOriginal", "DateTimeDigitized", "OffsetTime", "OffsetTimeOriginal", "OffsetTimeDigitized",
    "SubSecTime", "SubSecTimeOriginal", "SubSecTimeDigitized", "ShutterSpeedValue", "ApertureValue",
    "ExposureBiasValue", "MaxApertureValue", "SubjectDistance", "MeteringMode", "LightSource", "Flash", "FocalLength",
    "FocalLengthIn35mmFilm", "ExposureMode", "WhiteBalance", "SceneCaptureType", "DigitalZoomRatio",
    "BodySerialNumber", "CameraOwnerName", "LensMake", "LensModel", "LensSpecification", "LensSerialNumber",
)  # fmt: skip
# TIFF/EP raws (and some DNGs) hold these in IFD0 instead of the Exif IFD: moved to where JPEG readers look.
_TIFF_EP = ("ExposureTime", "FNumber", "ExposureProgram", "ISOSpeedRatings", "DateTimeOriginal", "ExposureBiasValue",
            "MaxApertureValue", "SubjectDistance", "MeteringMode", "LightSource", "Flash", "FocalLength")  # fmt: skip
KEPT_KEYS = frozenset([f"Exif.Image.{name}" for name in _IFD0] + [f"Exif.Photo.{name}" for name in _PHOTO])
GPS_GROUP = "GPSInfo"
ORIENTATION_KEY = "Exif.Image.Orientation"
LENS_KEY = "Exif.Photo.LensModel"


@dataclass(frozen=True)
class Metadata:
    """A capture's EXIF block (TIFF-structured, as in a PNG eXIf chunk) and XMP packet; either may be empty."""

    exif: bytes = b""
    xmp: bytes = b""

    def __bool__(self) -> bool:
        return bool(self.exif or self.xmp)


EMPTY = Metadata()


class _Collect(logging.Handler):
    """Keeps what libexiv2 reports (it logs through Python's logging as the 'exiv2' logger)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().strip())


@contextmanager
def _exiv2_messages() -> Iterator[list[str]]:
    """Collect libexiv2's warnings and errors instead of letting them reach stderr (nor an enclosing collector)."""
    logger = logging.getLogger("exiv2")
    collect = _Collect()
    propagate, handlers = logger.propagate, logger.handlers
    logger.handlers = [collect]
    logger.propagate = False
    try:
        yield collect.messages
    finally:
        logger.handlers = handlers
        logger.propagate = propagate


def _problem(messages: list[str]) -> str:
    """The first few distinct libexiv2 messages as one line."""
    unique = list(dict.fromkeys(m for m in messages if m))
    return "; ".join(unique[:3]) + (f" (+{len(unique) - 3} more)" if len(unique) > 3 else "")


@cache
def _blank_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _encode_exif(data: exiv2.ExifData) -> bytes:
    """exiv2's own EXIF encoder, run by writing into a blank in-memory JPEG and taking its APP1 payload."""
    if data.empty():
        return b""
    image = exiv2.ImageFactory.open(_blank_jpeg())
    image.setExifData(data)
    image.writeMetadata()
    with Image.open(io.BytesIO(bytes(image.io().data()))) as jpeg:
        payload = jpeg.info.get("exif", b"")
    if not payload.startswith(b"Exif\x00\x00"):
        raise RcamError("internal: exiv2 wrote no EXIF segment")
    return payload[6:]


def _decode_exif(block: bytes) -> exiv2.ExifData:
    """A TIFF-structured EXIF block (as stored in an .rcb) -> exiv2 ExifData; RcamError if it is damaged."""
    with _exiv2_messages() as messages:
        try:
            image = exiv2.ImageFactory.open(block)
            image.readMetadata()
            data = image.exifData() if image.mimeType() == "image/tiff" else None
        except exiv2.Exiv2Error as error:
            data = None
            messages.append(str(error.args[-1] if error.args else error))
    if messages or data is None:
        raise RcamError(f"stored EXIF is damaged ({_problem(messages) or 'not a TIFF-structured block'})")
    return data


def _maker_note_lens(source: exiv2.ExifData) -> str | None:
    """The lens a maker note names, by libexiv2's lens tables (e.g. "Nikon AF-S Nikkor 50mm f/1.8G"), or None.

    Native raws (NEF, CR2, PEF, ARW, ...) often name the lens only there; DNG converters copy it into the DNG's
    LensModel, and so does rcam. Lens specifications ("24-70mm F4") and unknown lens ids ("(251)") are no names.
    """
    # python-exiv2 returns None (not end()) when no lens field is there.
    lens = exiv2.lensName(source)
    if lens is None or lens.key().startswith("Exif.Photo.") or lens.key() == "Exif.Nikon3.Lens":
        return None
    with _exiv2_messages() as messages:  # a maker note libexiv2 cannot print from costs the lens, not the EXIF
        try:
            name = lens.print(source).strip().rstrip("\x00").strip()
        except exiv2.Exiv2Error:
            return None
    return name if not messages and re.search("[A-Za-z]", name) and not name.startswith("(") and len(name) <= MAX_FIELD else None


def _select(source: exiv2.ExifData, gps: bool, warn: Callable[[str], None]) -> exiv2.ExifData:
    """The capture fields of a raw file's EXIF, as JPEG readers expect them."""
    found = {datum.key(): datum for datum in source}
    kept = exiv2.ExifData()
    for key, datum in found.items():
        group = key.split(".")[1]
        if key in KEPT_KEYS or (gps and group == GPS_GROUP):
            target = key
        elif group == "Image" and key.split(".")[2] in _TIFF_EP and f"Exif.Photo.{key.split('.')[2]}" not in found:
            target = f"Exif.Photo.{key.split('.')[2]}"
        else:
            continue
        if datum.size() > MAX_FIELD:
            warn(f"EXIF field {key} is {datum.size()} bytes (at most {MAX_FIELD} kept)")
            continue
        kept.add(exiv2.ExifKey(target), datum.value())
    if LENS_KEY not in found and (name := _maker_note_lens(source)):
        kept[LENS_KEY] = name
    # A DNG without Make and Model still names its camera.
    unique = found.get("Exif.Image.UniqueCameraModel")
    if "Exif.Image.Make" not in found and "Exif.Image.Model" not in found and unique is not None and unique.size() <= MAX_FIELD:
        kept["Exif.Image.Model"] = unique.toString().rstrip("\x00")
    return kept


def _xmp_data(packet: bytes, what: str) -> exiv2.XmpData:
    with _exiv2_messages() as messages:
        try:
            image = exiv2.ImageFactory.open(packet)
            image.readMetadata()
            data = image.xmpData()
        except exiv2.Exiv2Error as error:
            messages.append(str(error.args[-1] if error.args else error))
    if messages:
        raise RcamError(f"{what} cannot be parsed ({_problem(messages)})")
    return data


def _trim(packet: bytes) -> bytes:
    """An XMP packet without its trailing padding: whitespace that leaves room for in-place edits, nothing else."""
    return re.sub(rb"\s+(<\?xpacket end=[^>]*\?>)\s*$", rb"\n\1", packet.rstrip(b"\x00"))


def _encode_xmp(data: exiv2.XmpData) -> bytes:
    flags = exiv2.XmpParser.XmpFormatFlags.useCompactFormat
    status, packet = exiv2.XmpParser.encode(data, flags, 0)
    if status != 0:
        raise RcamError(f"internal: exiv2 could not write XMP (status {status})")
    return _trim(packet.encode("utf-8"))


def _clean_xmp(packet: bytes, gps: bool, warn: Callable[[str], None]) -> bytes:
    """The raw file's XMP packet, checked; without its GPS properties when `gps` is false."""
    packet = _trim(packet)
    if len(packet) > MAX_XMP_READ:
        warn(f"XMP packet of {len(packet)} bytes (at most {MAX_XMP} kept)")
        return b""
    try:
        packet.decode("utf-8")
        data = _xmp_data(packet, "XMP packet")
    except UnicodeDecodeError:
        warn("XMP packet is not UTF-8")
        return b""
    except (RcamError, exiv2.Exiv2Error) as error:
        warn(str(error))
        return b""
    if data.empty():
        warn("XMP packet holds no properties")
        return b""
    if not gps:
        gps_keys = [d.key() for d in data if d.key().startswith(("Xmp.exif.GPS", "Xmp.exifEX.GPS"))]
        if gps_keys:
            for key in gps_keys:
                data.erase(data.findKey(exiv2.XmpKey(key)))
            packet = _encode_xmp(data)
    if len(packet) > MAX_XMP:
        warn(f"XMP packet of {len(packet)} bytes (at most {MAX_XMP} kept)")
        return b""
    return packet


def read_metadata(path: Path, gps: bool = True, strict: bool = False, warn: Callable[[str], None] | None = None) -> Metadata:
    """A RAW file's capture EXIF and XMP; damaged or oversized blocks are dropped with a warning (RcamError if strict)."""
    problems: list[str] = []

    def report(message: str) -> None:
        problems.append(message)
        if not strict and warn:
            warn(f"{message}: dropped")

    exif, xmp = b"", b""
    with _exiv2_messages() as read_messages:
        try:
            image = exiv2.ImageFactory.open(str(path))
            image.readMetadata()
            source_exif, source_xmp = image.exifData(), image.xmpPacket()
        except exiv2.Exiv2Error as error:
            source_exif, source_xmp = None, ""
            report(f"metadata cannot be read ({error.args[-1] if error.args else error})")
    # readMetadata parses the XMP too; its complaints about it are the XMP check's business (below).
    exif_messages = [message for message in read_messages if "XMP" not in message]
    if source_exif is not None and exif_messages:
        # libexiv2 stops at bad offsets, loops and truncated IFDs and says so: what it did read may be a
        # fragment, or values taken from the wrong place. Nothing of a damaged EXIF is kept.
        report(f"EXIF is damaged ({_problem(exif_messages)})")
    elif source_exif is not None:
        with _exiv2_messages() as messages:
            exif = _encode_exif(_select(source_exif, gps, report))
        if messages:
            report(f"EXIF cannot be re-encoded ({_problem(messages)})")
            exif = b""
        if len(exif) > MAX_EXIF:
            report(f"EXIF of {len(exif)} bytes (at most {MAX_EXIF})")
            exif = b""
    xmp_messages = [message for message in read_messages if "XMP" in message]
    if xmp_messages and not source_xmp:  # libexiv2 empties a packet it cannot parse
        report(f"XMP packet cannot be parsed ({_problem(xmp_messages)})")
    if source_xmp:
        xmp = _clean_xmp(source_xmp.encode("utf-8", "surrogateescape") if isinstance(source_xmp, str) else bytes(source_xmp), gps, report)
    if strict and problems:
        raise RcamError(f"{problems[0]} (strict metadata: the file is refused rather than stored without it)")
    return Metadata(exif, xmp)


def check_metadata(metadata: Metadata) -> Metadata:
    """Refuse EXIF or XMP larger than an output image can carry (what the container parser bounds too)."""
    if len(metadata.exif) > MAX_EXIF or len(metadata.xmp) > MAX_XMP:
        raise RcamError(f"metadata too large: EXIF {len(metadata.exif)} bytes (at most {MAX_EXIF}), XMP {len(metadata.xmp)} (at most {MAX_XMP})")
    return metadata


def upright(metadata: Metadata) -> Metadata:
    """The same metadata with orientation 1 (EXIF and XMP), for pixels that are already upright."""
    exif, xmp = metadata.exif, metadata.xmp
    if exif:
        data = _decode_exif(exif)
        if data.findKey(exiv2.ExifKey(ORIENTATION_KEY)) != data.end() and data[ORIENTATION_KEY].toInt64() != 1:
            data[ORIENTATION_KEY] = exiv2.UShortValue(1)
            exif = _encode_exif(data)
    if xmp:
        data = _xmp_data(xmp, "stored XMP packet")  # parsed even when unchanged: no junk goes into an image
        key = "Xmp.tiff.Orientation"
        if data.findKey(exiv2.XmpKey(key)) != data.end() and data[key].toString() != "1":
            data[key] = "1"
            xmp = _encode_xmp(data)
    return Metadata(exif, xmp)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_chunks(metadata: Metadata) -> bytes:
    """PNG chunks for upright metadata: eXIf (PNG 1.5 / PNG 3rd edition) and XMP as iTXt 'XML:com.adobe.xmp'."""
    chunks = b""
    if metadata.exif:
        chunks += png_chunk(b"eXIf", metadata.exif)
    if metadata.xmp:
        # keyword, NUL, compression flag 0, method 0, empty language tag NUL, empty translated keyword NUL, text
        chunks += png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + metadata.xmp)
    return chunks


def write_into(image_bytes: bytes, metadata: Metadata) -> bytes:
    """Write upright metadata into an encoded image (TIFF here; any format libexiv2 writes) and return the new bytes."""
    if not metadata:
        return image_bytes
    with _exiv2_messages() as messages:
        image = exiv2.ImageFactory.open(image_bytes)
        image.readMetadata()
        data = image.exifData()
        for datum in _decode_exif(metadata.exif) if metadata.exif else ():
            data[datum.key()] = datum.value()
        if metadata.xmp:
            image.setXmpPacket(metadata.xmp.decode("utf-8"))
        image.writeMetadata()
        written = bytes(image.io().data())
    if messages:
        raise RcamError(f"internal: exiv2 could not write the metadata ({_problem(messages)})")
    return written


def _text(data: exiv2.ExifData, key: str) -> str | None:
    position = data.findKey(exiv2.ExifKey(key))
    if position == data.end():
        return None
    text = position.print(data).strip().rstrip("\x00").strip()
    return text or None


def summary(metadata: Metadata) -> list[tuple[str, str]]:
    """The main capture fields as (label, human-readable value) pairs, for `rcam info`."""
    rows: list[tuple[str, str]] = []
    if metadata.exif:
        data = _decode_exif(metadata.exif)
        make, model = _text(data, "Exif.Image.Make"), _text(data, "Exif.Image.Model")
        # Most makers repeat their name in the model ("NIKON CORPORATION" + "NIKON Z 6", "Canon" + "Canon EOS R").
        repeated = make and model and model.casefold().startswith(make.split()[0].casefold())
        camera = model if repeated else " ".join(v for v in (make, model) if v)
        lens = _text(data, "Exif.Photo.LensModel") or _text(data, "Exif.Photo.LensSpecification")
        exposure = ", ".join(
            f"{label}{value}" for label, value in (
                ("", _text(data, "Exif.Photo.ExposureTime")), ("", _text(data, "Exif.Photo.FNumber")),
                ("ISO ", _text(data, "Exif.Photo.ISOSpeedRatings")), ("", _text(data, "Exif.Photo.FocalLength")),
            ) if value
        )  # fmt: skip
        date = _text(data, "Exif.Photo.DateTimeOriginal") or _text(data, "Exif.Image.DateTime")
        offset = _text(data, "Exif.Photo.OffsetTimeOriginal") or _text(data, "Exif.Photo.OffsetTime")
        latitude, longitude = _text(data, "Exif.GPSInfo.GPSLatitude"), _text(data, "Exif.GPSInfo.GPSLongitude")
        place = None
        if latitude and longitude:
            north = _text(data, "Exif.GPSInfo.GPSLatitudeRef") or ""
            east = _text(data, "Exif.GPSInfo.GPSLongitudeRef") or ""
            place = f"{latitude} {north[:1]}, {longitude} {east[:1]}".replace(" ,", ",").strip()
        for label, value in (
            ("camera", camera), ("lens", lens), ("exposure", exposure),
            ("date", f"{date} {offset}" if date and offset else date), ("place", place),
            ("orientation", _text(data, ORIENTATION_KEY)),
        ):  # fmt: skip
            if value:
                rows.append((label, value))
        rows.append(("exif", f"{len(metadata.exif)} bytes, {data.count()} fields"))
    if metadata.xmp:
        rows.append(("xmp", f"{len(metadata.xmp)} bytes, {_xmp_data(metadata.xmp, 'stored XMP packet').count()} properties"))
    return rows
