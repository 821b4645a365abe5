"""Capture metadata: read from the RAW with libexiv2, carried in the .rcb, written into PNG, JPEG and TIFF
unchanged (orientation aside); privacy switches; hostile EXIF and XMP blocks dropped with a warning."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import exiv2
import numpy as np
import pytest
import rawpy
from conftest import (
    CAPTURE_EXIF,
    HOSTILE_METADATA,
    MORE_CAPTURE_EXIF,
    NEF_IDENTITY,
    NIKON_LENS_MAKERNOTE,
    WHITE_LEVEL,
    add_metadata,
    bayer_dng_of_size,
    capture_dng,
    capture_nef,
    check_one_error_line,
    hostile_metadata_dng,
    part_files,
    smooth_mosaic,
)  # fmt: skip
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

import rcam.pillow  # noqa: F401 (registers the .rcb plugin)
from rcam.codec import container
from rcam.codec.engine import decode_bytes, encode_file
from rcam.codec.metadata import GPS_GROUP, KEPT_KEYS, MAX_XMP, Metadata, read_metadata, summary, upright
from rcam.codec.output import encode_image
from rcam.codec.rawio import read_raw
from rcam.errors import RcamError

RAW_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "raw"
CANON = RAW_DIR / "canon550d_magiclantern_colorchart.dng"
BLACKMAGIC = RAW_DIR / "blackmagic_pocket_2013.dng"
EXIF_IFD, GPS_IFD = 0x8769, 0x8825


def exif_fields(data: bytes) -> dict[str, str]:
    """exiv2's view of an image file's (or a TIFF-structured EXIF block's) EXIF: key -> value text."""
    image = exiv2.ImageFactory.open(data)
    image.readMetadata()
    return {datum.key(): datum.toString() for datum in image.exifData()}


def xmp_properties(packet: bytes | str) -> dict[str, str]:
    data = packet.encode() if isinstance(packet, str) else packet
    image = exiv2.ImageFactory.open(data)
    image.readMetadata()
    return {datum.key(): datum.toString() for datum in image.xmpData()}


def image_xmp(data: bytes) -> dict[str, str]:
    image = exiv2.ImageFactory.open(data)
    image.readMetadata()
    return xmp_properties(image.xmpPacket())


def capture_fields(data: bytes) -> dict[str, str]:
    """exif_fields restricted to the capture fields rcam carries (not a raw file's strips, sub-IFDs, maker note)."""
    return {key: value for key, value in exif_fields(data).items() if key in KEPT_KEYS or key.split(".")[1] == GPS_GROUP}


def _as_exiv2_text(value) -> str:
    """A value as Pillow reads it, written as exiv2's toString writes it (BYTE/UNDEFINED as numbers, n/d rationals)."""
    if isinstance(value, bytes):
        return " ".join(str(byte) for byte in value)
    if isinstance(value, tuple):
        return " ".join(_as_exiv2_text(item) for item in value)
    if isinstance(value, IFDRational):
        return f"{value.numerator}/{value.denominator}"
    return str(value)


def pillow_fields(data: bytes, keys) -> dict[str, str]:
    """Pillow's own reading of an image's EXIF (IFD0, Exif and GPS IFDs) for the given exiv2 keys, as exiv2 text."""
    with Image.open(io.BytesIO(data)) as image:
        exif = image.getexif()
        ifds = {"Image": exif, "Photo": exif.get_ifd(EXIF_IFD), GPS_GROUP: exif.get_ifd(GPS_IFD)}
        found = {}
        for key in keys:
            ifd, tag = ifds[key.split(".")[1]], exiv2.ExifKey(key).tag()
            if tag in ifd:
                found[key] = _as_exiv2_text(ifd[tag])
        return found


# ---------------------------------------------------------------------------------------------------------
# Reading


def test_capture_fields_are_kept_and_raw_structure_is_not(tmp_path):
    metadata = read_metadata(capture_dng(tmp_path / "capture.dng"))
    fields = exif_fields(metadata.exif)
    for key, value in CAPTURE_EXIF.items():
        assert fields[key] == value, key
    assert fields["Exif.Image.Orientation"] == "6"  # the RAW's, as read
    # Nothing of the DNG's own structure (strips, colour matrix, DNG version) comes along.
    assert not any(key.endswith(("StripOffsets", "ColorMatrix1", "DNGVersion", "UniqueCameraModel")) for key in fields)
    assert xmp_properties(metadata.xmp)["Xmp.dc.creator"] == "Ada Lovelace"


def test_unique_camera_model_names_a_camera_without_make_and_model(tmp_path):
    path = add_metadata(bayer_dng_of_size(tmp_path / "anon.dng", 64, 96), remove=("Exif.Image.Make", "Exif.Image.Model"))
    fields = exif_fields(read_metadata(path).exif)
    assert "Exif.Image.Make" not in fields and fields["Exif.Image.Model"] == "rcam Synthetic"


@pytest.mark.skipif(not CANON.exists(), reason="real DNGs not present")
def test_real_canon_dng_names_its_camera():
    fields = exif_fields(read_metadata(CANON).exif)
    assert (fields["Exif.Image.Make"], fields["Exif.Image.Model"]) == ("Canon", "Canon EOS Kiss X4")


@pytest.mark.skipif(not BLACKMAGIC.exists(), reason="real DNGs not present")
def test_real_blackmagic_dng_has_only_its_unique_camera_model():
    fields = exif_fields(read_metadata(BLACKMAGIC).exif)
    assert fields["Exif.Image.Model"] == "Blackmagic Pocket Cinema Camera"


def test_strip_gps_removes_the_place_from_exif_and_xmp(tmp_path):
    metadata = read_metadata(capture_dng(tmp_path / "capture.dng"), gps=False)
    fields = exif_fields(metadata.exif)
    assert not any(key.startswith("Exif.GPSInfo") for key in fields) and "Exif.Image.GPSTag" not in fields
    assert fields["Exif.Photo.LensModel"] == CAPTURE_EXIF["Exif.Photo.LensModel"]
    properties = xmp_properties(metadata.xmp)
    assert not any("GPS" in key for key in properties) and properties["Xmp.xmp.Rating"] == "4"


def test_upright_sets_orientation_1_in_exif_and_xmp(tmp_path):
    metadata = upright(read_metadata(capture_dng(tmp_path / "capture.dng")))
    assert exif_fields(metadata.exif)["Exif.Image.Orientation"] == "1"
    assert xmp_properties(metadata.xmp)["Xmp.tiff.Orientation"] == "1"


def test_summary_names_the_main_fields(tmp_path):
    rows = dict(summary(read_metadata(capture_dng(tmp_path / "capture.dng"))))
    assert rows["camera"] == "Nikon Z 6" and rows["lens"] == "NIKKOR Z 24-70mm f/4 S"
    assert rows["exposure"] == "1/250 s, F5.6, ISO 400, 35.0 mm"
    assert rows["date"] == "2024:05:17 14:03:22 +02:00" and "48 deg 51' 24.36\" N" in rows["place"]


# ---------------------------------------------------------------------------------------------------------
# Writing: every output format carries what the RAW had


@pytest.mark.parametrize("kind, bits", [("png", 8), ("png", 16), ("jpeg", 8), ("tiff", 8), ("tiff", 16)])
def test_outputs_carry_the_metadata_unchanged(tmp_path, kind, bits):
    source = capture_dng(tmp_path / "capture.dng")
    pixels = np.random.default_rng(0).random((40, 60, 3)).astype(np.float32)
    data = encode_image(pixels, kind, bits, metadata=read_metadata(source))
    fields = exif_fields(data)
    for key, value in CAPTURE_EXIF.items():
        assert fields[key] == value, (kind, key)
    assert fields["Exif.Image.Orientation"] == "1"
    expected = xmp_properties(read_metadata(source).xmp) | {"Xmp.tiff.Orientation": "1"}
    assert image_xmp(data) == expected
    # Pillow reads the same: the PNG's eXIf chunk, the JPEG's APP1, the TIFF's IFDs.
    with Image.open(io.BytesIO(data)) as image:
        exif = image.getexif()
        assert (exif[0x010F], exif[0x0110], exif[0x0112]) == ("Nikon", "Z 6", 1)
        assert exif.get_ifd(EXIF_IFD)[0xA434] == "NIKKOR Z 24-70mm f/4 S"
        assert exif.get_ifd(GPS_IFD)[2] == (48.0, 51.0, 24.36)
        assert image.info.get("icc_profile")
        if (kind, bits) == ("png", 8):
            assert np.array_equal(np.asarray(image), np.round(pixels * 255).astype(np.uint8))
    if kind == "png":
        assert b"eXIf" in data[: data.index(b"IDAT")] and b"XML:com.adobe.xmp" in data


def test_tiff_pixels_survive_the_metadata_write(tmp_path):
    import tifffile

    pixels = np.random.default_rng(1).random((40, 60, 3)).astype(np.float32)
    data = encode_image(pixels, "tiff", 16, metadata=read_metadata(capture_dng(tmp_path / "capture.dng")))
    assert np.array_equal(tifffile.imread(io.BytesIO(data)), np.round(pixels * 65535).astype(np.uint16))


def test_no_metadata_writes_none():
    data = encode_image(np.zeros((8, 8, 3), np.float32), "png", metadata=Metadata())
    assert b"eXIf" not in data and b"iTXt" not in data


# ---------------------------------------------------------------------------------------------------------
# Through the .rcb and the command line


def test_rcb_carries_the_metadata(tmp_path, tiny_codec):
    source = capture_dng(tmp_path / "capture.dng")
    encoded = encode_file(tiny_codec, source, 0.01, tone_fit=False, metadata=read_metadata, tile=64, overlap=32)
    header, _ = container.read(encoded.data)
    assert (header.exif, header.xmp) == (read_metadata(source).exif, read_metadata(source).xmp)
    # Without a reader nothing is stored (the library default: eval and training never need it).
    bare = encode_file(tiny_codec, source, 0.01, tone_fit=False, tile=64, overlap=32)
    assert container.read(bare.data)[0].exif == b"" and len(bare.data) < len(encoded.data)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_cli_raw_to_image_keeps_the_metadata(run, tmp_path, tiny_model_path, suffix):
    source = capture_dng(tmp_path / "capture.dng")
    encoded, image = tmp_path / "capture.rcb", tmp_path / f"capture{suffix}"
    assert run("encode", source, "--model", tiny_model_path, "-o", encoded, "--no-tone-fit")[0] == 0
    status, out, err = run("decode", encoded, "--model", tiny_model_path, "-o", image)
    assert (status, err) == (0, "")
    fields = exif_fields(image.read_bytes())
    assert {key: fields[key] for key in CAPTURE_EXIF} == CAPTURE_EXIF and fields["Exif.Image.Orientation"] == "1"
    assert image_xmp(image.read_bytes())["Xmp.dc.subject"] == "bridge, Paris"
    status, out, err = run("info", encoded)
    assert "camera       Nikon Z 6" in out and "lens         NIKKOR Z 24-70mm f/4 S" in out
    assert "exposure     1/250 s, F5.6, ISO 400, 35.0 mm" in out and "place        48 deg" in out


def test_cli_strip_switches(run, tmp_path, tiny_model_path):
    source = capture_dng(tmp_path / "capture.dng")
    common = ("--model", tiny_model_path, "--no-tone-fit")
    assert run("encode", source, "-o", tmp_path / "none.rcb", "--strip-metadata", *common)[0] == 0
    assert run("encode", source, "-o", tmp_path / "nogps.rcb", "--strip-gps", *common)[0] == 0
    assert "metadata     none" in run("info", tmp_path / "none.rcb")[1]
    info = run("info", tmp_path / "nogps.rcb")[1]
    assert "place" not in info and "camera       Nikon Z 6" in info
    assert run("decode", tmp_path / "nogps.rcb", "--model", tiny_model_path, "-o", tmp_path / "nogps.jpg")[0] == 0
    assert not any("GPS" in key for key in exif_fields((tmp_path / "nogps.jpg").read_bytes()))
    status, _, err = run("encode", source, "-o", tmp_path / "x.rcb", "--strip-metadata", "--strip-gps", *common)
    assert status == 2 and "--strip-metadata" in err


@pytest.mark.skipif(not CANON.exists(), reason="real DNGs not present")
def test_real_dng_metadata_reaches_the_png(run, tmp_path, tiny_codec):
    encoded = encode_file(tiny_codec, CANON, 0.01, tone_fit=False, metadata=read_metadata, tile=512, overlap=32)
    with Image.open(io.BytesIO(encode_image(np.zeros((8, 8, 3), np.float32), "png", metadata=Metadata(encoded.header.exif)))) as png:
        assert (png.getexif()[0x010F], png.getexif()[0x0110]) == ("Canon", "Canon EOS Kiss X4")


# ---------------------------------------------------------------------------------------------------------
# Hostile metadata


@pytest.mark.parametrize("name", sorted(HOSTILE_METADATA))
def test_hostile_metadata_is_dropped_with_a_warning(run, tmp_path, tiny_model_path, name):
    _, dropped, words = HOSTILE_METADATA[name]
    source = hostile_metadata_dng(tmp_path / f"{name}.dng", name)
    target = tmp_path / "out.rcb"
    status, out, err = run("encode", source, "--model", tiny_model_path, "-o", target, "--no-tone-fit")
    assert status == 0 and "Traceback" not in err
    warnings = [line for line in err.splitlines() if line.startswith("rcam: warning:")]
    assert len(warnings) == 1 and str(source) in warnings[0] and words in warnings[0] and warnings[0].endswith(": dropped"), err
    header, _ = container.read(target.read_bytes())
    assert getattr(header, dropped) == b""
    kept = "xmp" if dropped == "exif" else "exif"
    assert getattr(header, kept) != b""  # the sound block stays
    assert len(header.exif) + len(header.xmp) < 4096  # nothing bloated


@pytest.mark.parametrize("name", sorted(HOSTILE_METADATA))
def test_strict_metadata_refuses_hostile_blocks(run, tmp_path, tiny_model_path, name):
    source = hostile_metadata_dng(tmp_path / f"{name}.dng", name)
    target = tmp_path / "out.rcb"
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", target, "--no-tone-fit", "--strict-metadata")
    assert status == 2
    line = check_one_error_line(err, source)
    assert HOSTILE_METADATA[name][2] in line and "strict" in line
    assert not target.exists() and part_files(tmp_path) == []


def test_read_metadata_raises_in_strict_mode(tmp_path):
    source = hostile_metadata_dng(tmp_path / "loop.dng", "exif-loop")
    with pytest.raises(RcamError, match="EXIF is damaged"):
        read_metadata(source, strict=True)
    warnings: list[str] = []
    assert read_metadata(source, warn=warnings.append).exif == b"" and len(warnings) == 1


def test_oversized_field_is_dropped_alone(tmp_path):
    source = add_metadata(capture_dng(tmp_path / "capture.dng"), {"Exif.Image.ImageDescription": "x" * 5000})
    warnings: list[str] = []
    fields = exif_fields(read_metadata(source, warn=warnings.append).exif)
    assert "Exif.Image.ImageDescription" not in fields and fields["Exif.Image.Make"] == "Nikon"
    assert len(warnings) == 1 and "ImageDescription" in warnings[0]


def test_xmp_padding_is_not_stored(tmp_path):
    source = capture_dng(tmp_path / "capture.dng")  # libexiv2 pads the packet it writes by about 2 kB
    assert len(read_metadata(source).xmp) < 1200 <= MAX_XMP


def test_a_file_without_metadata_warns_nothing(tmp_path):
    path = add_metadata(bayer_dng_of_size(tmp_path / "bare.dng", 64, 96), remove=("Exif.Image.Make", "Exif.Image.Model", "Exif.Image.UniqueCameraModel"))
    warnings: list[str] = []
    metadata = read_metadata(path, warn=warnings.append)
    assert warnings == [] and metadata.xmp == b""


def test_decoded_pixels_do_not_depend_on_metadata(tmp_path, tiny_codec):
    source = capture_dng(tmp_path / "capture.dng")
    with_metadata = encode_file(tiny_codec, source, 0.01, tone_fit=False, metadata=read_metadata, tile=64, overlap=32)
    without = encode_file(tiny_codec, source, 0.01, tone_fit=False, tile=64, overlap=32)
    assert np.array_equal(decode_bytes(tiny_codec, with_metadata.data), decode_bytes(tiny_codec, without.data))


@pytest.mark.parametrize("field, junk", [("exif", b"II*\x00\xff\xff\xff\x7f"), ("exif", b"not a tiff"), ("xmp", b"<x:xmpmeta><unclosed")])
def test_damaged_metadata_in_an_rcb_leaves_the_pixels_decodable(run, tmp_path, tiny_codec, tiny_model_path, field, junk):
    # Valid CRC, garbage content: written by a buggy or hostile encoder.
    encoded = encode_file(tiny_codec, capture_dng(tmp_path / "capture.dng"), 0.01, tone_fit=False, metadata=read_metadata, tile=64, overlap=32)
    header = dataclasses.replace(encoded.header, stream_lengths=(), stream_crcs=(), **{field: junk})
    source = tmp_path / "junk.rcb"
    source.write_bytes(container.write(header, container.read(encoded.data)[1]))
    status, out, err = run("decode", source, "--model", tiny_model_path, "-o", tmp_path / "junk.jpg")
    assert status == 0 and "Traceback" not in err
    assert err.startswith(f"rcam: warning: {source}: stored") and err.strip().endswith("not written")
    status, out, err = run("info", source)
    assert status == 0 and "metadata     stored" in out
    with Image.open(source) as image:  # the Pillow plugin too
        assert "exif" not in image.info and image.size == (64, 96)


# ---------------------------------------------------------------------------------------------------------
# A second raw format, NEF (written by tests/nef.py), and every capture field through RAW -> .rcb -> images


def test_written_nef_is_a_nef_to_libexiv2_and_libraw(tmp_path):
    path = capture_nef(tmp_path / "capture.nef")
    image = exiv2.ImageFactory.open(str(path))
    image.readMetadata()
    assert image.mimeType() == "image/x-nikon-nef"  # libexiv2's name for it (its type detector is the TIFF one)
    with rawpy.imread(str(path)) as raw:  # LibRaw's uncompressed-NEF loader, Nikon's identity and colour table
        assert np.array_equal(raw.raw_image_visible, smooth_mosaic(64, 96)) and raw.white_level == WHITE_LEVEL
        assert raw.sizes.flip == 6 and np.abs(raw.rgb_xyz_matrix).sum() > 0
    assert read_raw(path).cfa == "RGGB"


RAW_CAPTURES = {
    # format: (a capture file carrying CAPTURE_EXIF, the given extra fields and CAPTURE_XMP; its camera in `rcam info`)
    "dng": (lambda path, exif: add_metadata(capture_dng(path), exif), "Nikon Z 6"),
    "nef": (lambda path, exif: capture_nef(path, exif=exif), "NIKON Z 6"),
}


@pytest.mark.parametrize("kind", sorted(RAW_CAPTURES))
def test_every_capture_field_survives_raw_to_rcb_to_each_image(run, tmp_path, tiny_model_path, kind):
    build, camera = RAW_CAPTURES[kind]
    source = build(tmp_path / f"capture.{kind}", MORE_CAPTURE_EXIF)
    # What the RAW holds, by libexiv2: every field written, and nothing else among the capture fields.
    held = capture_fields(source.read_bytes())
    assert set(held) == set(CAPTURE_EXIF) | set(MORE_CAPTURE_EXIF) | {"Exif.Image.Orientation"}
    assert held["Exif.Image.Orientation"] == "6"
    if kind == "nef":
        assert {key: held[key] for key in NEF_IDENTITY} == NEF_IDENTITY
    expected = held | {"Exif.Image.Orientation": "1"}
    expected_xmp = image_xmp(source.read_bytes()) | {"Xmp.tiff.Orientation": "1"}
    assert len(expected_xmp) >= 6
    encoded = tmp_path / "capture.rcb"
    assert run("encode", source, "--model", tiny_model_path, "-o", encoded, "--no-tone-fit")[0] == 0
    assert f"camera       {camera}" in run("info", encoded)[1]
    for suffix in (".png", ".jpg", ".tif"):
        image = tmp_path / f"capture{suffix}"
        assert run("decode", encoded, "--model", tiny_model_path, "-o", image)[0::2] == (0, "")
        data = image.read_bytes()
        # Field by field, by libexiv2 and by Pillow's own EXIF parser: the same values as in the RAW.
        assert capture_fields(data) == expected, suffix
        assert pillow_fields(data, expected) == expected, suffix
        assert image_xmp(data) == expected_xmp, suffix
        with Image.open(image) as pillow:
            assert xmp_properties(pillow.info["xmp"]) == expected_xmp, suffix


def test_a_lens_named_only_in_the_maker_note_is_kept(tmp_path):
    # NEFs before the Z series name the lens only in Nikon's maker note; libexiv2's lens table names it.
    source = add_metadata(capture_nef(tmp_path / "old.nef", exif=NIKON_LENS_MAKERNOTE), remove=("Exif.Photo.LensModel",))
    fields = exif_fields(read_metadata(source).exif)
    assert fields["Exif.Photo.LensModel"] == "Nikon AF-S Nikkor 50mm f/1.8G"
    assert not any(key.startswith(("Exif.Nikon", "Exif.MakerNote")) for key in fields)  # the maker note stays behind
    # The EXIF's own LensModel wins; a lens id libexiv2 does not know is no name.
    both = capture_nef(tmp_path / "both.nef", exif=NIKON_LENS_MAKERNOTE)
    assert exif_fields(read_metadata(both).exif)["Exif.Photo.LensModel"] == CAPTURE_EXIF["Exif.Photo.LensModel"]
    unknown = add_metadata(source, {"Exif.NikonLd1.LensIDNumber": "251"})
    assert "Exif.Photo.LensModel" not in exif_fields(read_metadata(unknown).exif)
