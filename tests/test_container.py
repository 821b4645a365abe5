"""The .rcb container: parsing never fails with anything but RcamError, and rejects corruption clearly.

Hand-made headers are built from docs/FORMAT.md here (not with rcam.codec.container.write), so these tests also
check that the reader follows the documented layout.
"""

from __future__ import annotations

import dataclasses
import math
import re
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from conftest import BLACK_LEVEL, WHITE_LEVEL, check_one_error_line, smooth_mosaic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rcam.codec import container
from rcam.codec import engine as codec
from rcam.codec.container import MAGIC
from rcam.codec.tone import IDENTITY, identity
from rcam.codec.tone_coding import encode_field, on_grid
from rcam.codec.zoo import load_codec
from rcam.errors import RcamError
from rcam.training.dng import write_bayer_dng

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def valid(tiny_codec, tmp_path_factory):
    """A valid multi-tile .rcb (bytes) with its header and streams."""
    path = write_bayer_dng(
        tmp_path_factory.mktemp("container") / "grid.dng",
        smooth_mosaic(130, 198, seed=11),
        cfa="BGGR",
        black_level=BLACK_LEVEL,
        white_level=WHITE_LEVEL,
        orientation=6,
    )
    data = codec.encode_file(tiny_codec, path, 0.01, tile=64, overlap=32).data
    header, streams = container.read(data)
    assert len(streams) > 1 and all(len(s) > 0 for s in streams)
    return data, header, streams


def header_size(header: container.Header) -> int:
    """Bytes from the start of the file to the end of the metadata (FORMAT.md): header, its CRC, EXIF, XMP."""
    tone = 2 + len(encode_field(header.tone)) if header.format_version >= 6 else 2 * len(header.tone)
    body = 1 + len(header.model_name) + 53 + 1 + tone + 41 + 12 + 8 * len(header.stream_lengths)
    return 14 + body + 4 + len(header.exif) + len(header.xmp)


def build(
    fields: dict, entries: list[tuple[int, int]], streams: bytes = b"", body_length: int | None = None, version: int = container.FORMAT_VERSION
) -> bytes:  # fmt: skip
    """A file laid out as docs/FORMAT.md says, with a correct header CRC and whatever field values we like."""
    name = fields.get("name", b"tiny")
    body = bytes([len(name)]) + name
    body += fields.get("digest", bytes(16))
    body += struct.pack("<f", fields.get("lam", 0.01))
    body += struct.pack("<II", fields.get("sensor_height", 64), fields.get("sensor_width", 96))
    body += bytes([fields.get("pad_top", 0), fields.get("pad_left", 0), fields.get("flip", 0)])
    body += struct.pack("<II", fields.get("output_height", 64), fields.get("output_width", 96))
    body += struct.pack(
        "<HHHHH",
        fields.get("tile_height", 64),
        fields.get("tile_width", 64),
        fields.get("overlap", 32),
        fields.get("tile_rows", 1),
        fields.get("tile_cols", 1),
    )
    body += struct.pack("<I", fields.get("stream_count", len(entries)))
    tone = fields.get("tone", IDENTITY)
    if version == 2:
        body += struct.pack("<6f", *tone)
    elif version >= 6:  # K, the code's length, the code (rcam.codec.tone_coding, as FORMAT.md describes it)
        knots = fields.get("tone_knots", math.isqrt(len(tone) // 6))
        code = fields.get("tone_code", encode_field(tone) if len(tone) == 6 * knots * knots else b"")
        body += bytes([knots]) + struct.pack("<H", fields.get("tone_code_length", len(code))) + code
    elif version >= 3:
        knots = fields.get("tone_knots", math.isqrt(len(tone) // 6))
        body += bytes([knots]) + struct.pack(f"<{len(tone)}e", *tone)
    exif, xmp = fields.get("exif", b""), fields.get("xmp", b"")
    if version >= 4:
        matrix = fields.get("cam_to_srgb", (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        body += struct.pack("<B9ff", fields.get("look", 0), *matrix, fields.get("white", 1.0))
        lengths = fields.get("metadata_lengths", (len(exif), len(xmp)))
        body += struct.pack("<III", *lengths, fields.get("metadata_crc", zlib.crc32(exif + xmp)))
    body += b"".join(struct.pack("<II", length, crc) for length, crc in entries)
    head = MAGIC + struct.pack("<HI", version, len(body) if body_length is None else body_length) + body
    return head + struct.pack("<I", zlib.crc32(head)) + exif + xmp + streams


def reject(data: bytes) -> str:
    """container.read must raise RcamError (and nothing else); returns the message."""
    with pytest.raises(RcamError) as error:
        container.read(data)
    return str(error.value)


# ---------------------------------------------------------------------------------------------------------
# The layout in FORMAT.md


def test_hand_built_file_parses(tiny_codec):
    stream = b"\x01\x00\x00\x00"
    data = build({"digest": tiny_codec.digest}, [(len(stream), zlib.crc32(stream))], stream)
    header, streams = container.read(data)
    assert header.model_name == "tiny" and header.weights_digest == tiny_codec.digest
    assert (header.sensor_height, header.sensor_width, header.tile_rows, header.tile_cols) == (64, 96, 1, 1)
    assert streams == [stream]


def test_written_file_round_trips(valid):
    data, header, streams = valid
    assert data.startswith(MAGIC)
    assert container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), streams) == data
    assert header.stream_lengths == tuple(len(s) for s in streams)
    assert header.stream_crcs == tuple(zlib.crc32(s) for s in streams)
    assert len(data) == header_size(header) + sum(header.stream_lengths)


# ---------------------------------------------------------------------------------------------------------
# Random and damaged input


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_are_rejected(data):
    reject(data)


@FUZZ
@given(st.integers(0, 2000), st.binary(max_size=400))
def test_random_bytes_after_a_valid_prefix_are_rejected(body_length, rest):
    # Almost always refused at the header CRC; test_fuzzed_fields_behind_a_valid_checksum_are_checked gets past it.
    reject(MAGIC + struct.pack("<HI", container.FORMAT_VERSION, body_length) + rest)


@FUZZ
@given(data=st.data())
def test_random_damage_is_rejected_by_the_decoder(tiny_codec, valid, data):
    original = bytearray(valid[0])
    damaged = bytearray(original)
    positions = data.draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=8, unique=True))
    for position in positions:
        damaged[position] ^= data.draw(st.integers(1, 255))
    with pytest.raises(RcamError):
        codec.decode_bytes(tiny_codec, bytes(damaged))


# Field values near the valid ones and anywhere in each field's range: most files then pass the signature
# and the CRC (computed over whatever was drawn) and reach the field checks behind them.
U8, U16, U32 = st.integers(0, 2**8 - 1), st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1)
FIELDS = {
    "name": st.one_of(st.just(b"tiny"), st.binary(max_size=70)),
    "lam": st.one_of(st.just(0.01), st.floats(width=32)),
    "sensor_height": st.one_of(st.sampled_from([2, 63, 64, 65]), U32),
    "sensor_width": st.one_of(st.sampled_from([2, 96, 97]), U32),
    "pad_top": st.one_of(st.sampled_from([0, 1]), U8),
    "pad_left": st.one_of(st.sampled_from([0, 1]), U8),
    "flip": st.one_of(st.sampled_from([0, 5, 6]), U8),
    "output_height": st.one_of(st.sampled_from([64, 96]), U32),
    "output_width": st.one_of(st.sampled_from([64, 96]), U32),
    "tile_height": st.one_of(st.sampled_from([32, 64, 96]), U16),
    "tile_width": st.one_of(st.sampled_from([32, 64, 96]), U16),
    "overlap": st.one_of(st.sampled_from([0, 32]), U16),
    "tile_rows": st.one_of(st.sampled_from([1, 2]), U16),
    "tile_cols": st.one_of(st.sampled_from([1, 2]), U16),
    "stream_count": st.one_of(st.sampled_from([1, 2, 4]), U32),
    "look": st.one_of(st.sampled_from([0, 1]), U8),
    "white": st.one_of(st.just(0.25), st.floats(width=32)),
    "cam_to_srgb": st.one_of(
        st.just((1.5, -0.25, -0.25, -0.125, 1.25, -0.125, 0.0, -0.5, 1.5)), st.tuples(*[st.floats(width=32)] * 9)
    ),
}


@st.composite
def headers(draw):
    """(fields for build(), table entries, stream bytes) with any subset of the fields drawn at random."""
    # Each field drawn one time in eight, the others left valid: mostly files with one or two bad fields.
    fields = {name: draw(strategy) for name, strategy in FIELDS.items() if draw(st.integers(0, 7)) == 0}
    knots = draw(st.one_of(st.sampled_from([1, 2, 6]), U8))
    half = 3 * min(knots, 33) ** 2
    kind = draw(st.sampled_from(["in range", "in range", "any"]))
    if kind == "in range":  # gains in [0.5, 2], offsets in [-0.5, 0.5], on one of the grids the code allows
        gains = draw(st.lists(st.floats(0.5, 2.0, width=16), min_size=half, max_size=half))
        offsets = draw(st.lists(st.floats(-0.5, 0.5, width=16), min_size=half, max_size=half))
        fields["tone"] = on_grid(tuple(gains + offsets), draw(st.integers(1, 12)))
    else:  # any bytes as the field's code, its length field true or not
        fields["tone_code"] = draw(st.binary(max_size=64))
        if draw(st.booleans()):
            fields["tone_code_length"] = draw(U16)
    fields["tone_knots"] = knots
    # As many streams as the grid has tiles where that is few, so that the stream count is not all it checks.
    tiles = fields.get("tile_rows", 1) * fields.get("tile_cols", 1)
    number = tiles if tiles <= 4 else draw(st.integers(0, 4))
    streams = draw(st.lists(st.binary(min_size=0, max_size=12), min_size=number, max_size=number))
    entries = [(len(stream), zlib.crc32(stream)) for stream in streams]
    if entries and draw(st.integers(0, 3)) == 0:  # a table entry that lies about its stream
        index = draw(st.integers(0, len(entries) - 1))
        entries[index] = (draw(U32), draw(U32))
    return fields, entries, b"".join(streams)


def test_fuzzed_fields_behind_a_valid_checksum_are_checked():
    """Current-version headers with a correct CRC and random field values: RcamError naming the field, or a file
    that the writer would write byte for byte."""
    outcomes = []

    @settings(FUZZ, max_examples=200)
    @given(headers())
    def check(drawn):
        fields, entries, streams = drawn
        data = build(fields, entries, streams)
        try:
            header, parsed = container.read(data)
        except RcamError as error:
            message = str(error)
            assert "checksum mismatch in header" not in message and "signature" not in message, message
            outcomes.append(re.sub(r"[-+\d.]+|nan|inf", "#", message)[:40])  # the kind of error, without its numbers
            return
        outcomes.append("accepted")
        assert header.format_version == container.FORMAT_VERSION
        written = container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), parsed)
        if "tone_code" in fields:  # a drawn code that decodes is re-coded the writer's way: the same header
            assert container.read(written) == (header, parsed)
        else:
            assert written == data

    check()
    # The fuzzing reached the field parser: files were refused for their fields, not just at the CRC.
    assert "accepted" in outcomes, sorted(set(outcomes))
    assert sum(outcome.startswith("bad header") for outcome in set(outcomes)) >= 5, sorted(set(outcomes))


@FUZZ
@given(st.binary(max_size=400))
def test_random_header_body_behind_a_valid_checksum_is_rejected_or_read(body):
    head = MAGIC + struct.pack("<HI", container.FORMAT_VERSION, len(body)) + body
    data = head + struct.pack("<I", zlib.crc32(head))
    try:
        header, streams = container.read(data)
    except RcamError as error:
        assert "checksum mismatch in header" not in str(error)
    else:  # possible in principle (e.g. a valid header with empty streams): then it must be consistent
        assert len(streams) == header.tile_rows * header.tile_cols


def test_truncation_at_every_offset(valid):
    data = valid[0]
    for length in range(len(data)):
        message = reject(data[:length])
        assert any(word in message for word in ("truncated", "signature", "checksum")), (length, message)
    # Trailing bytes are an error too.
    assert "unexpected bytes" in reject(data + b"\x00")


def test_truncated_file_is_rejected_by_the_decoder(tiny_codec, valid):
    data = valid[0]
    for length in (0, 5, 20, len(data) // 2, len(data) - 1):
        with pytest.raises(RcamError, match="truncated|signature|checksum"):
            codec.decode_bytes(tiny_codec, data[:length])


def test_every_single_bit_flip_in_the_header_is_caught(valid):
    data, header, _ = valid
    end = header_size(header)
    for bit in range(8 * end):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        message = reject(bytes(damaged))
        if bit // 8 >= 14:  # body and CRC: the checksum catches it
            assert "checksum" in message, (bit, message)
        else:  # magic, version, body length
            assert any(w in message for w in ("signature", "version", "header length", "truncated", "checksum")), (bit, message)


def test_every_single_bit_flip_in_the_streams_is_caught(valid):
    data, header, _ = valid
    start = header_size(header)
    assert len(data) > start
    for bit in range(8 * start, 8 * len(data)):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        message = reject(bytes(damaged))
        assert "checksum mismatch in stream" in message, (bit, message)


@FUZZ
@given(data=st.data())
def test_garbage_streams_with_valid_checksums_fail_cleanly(tiny_codec, valid, data):
    """Streams that pass the CRC but hold random words: decode to some image of the right size, or RcamError."""
    _, header, streams = valid
    garbage = [data.draw(st.binary(max_size=3 * len(s))) for s in streams]
    forged = container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), garbage)
    try:
        image = codec.decode_bytes(tiny_codec, forged)
    except RcamError as error:
        assert "stream" in str(error)
    else:
        assert image.shape == (header.output_height, header.output_width, 3)
        assert np.all(np.isfinite(image))


def test_a_damaged_last_stream_behind_a_valid_checksum_leaves_no_image(run, tiny_model_path, valid, tmp_path):
    """The decoder entropy-decodes each tile as it synthesises it: a bad stream found after earlier bands were
    written still ends in one error line naming the stream, exit status 2 and no output file."""
    _, header, streams = valid
    last = len(streams) - 1
    forged = container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), streams[:last] + [streams[last][:-4]])
    source = tmp_path / "forged.rcb"
    source.write_bytes(forged)
    target = tmp_path / "forged.png"
    status, _, err = run("decode", source, "-o", target, "--model", tiny_model_path)
    assert status == 2
    assert f"stream {last} cannot be decoded" in check_one_error_line(err, source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forged.rcb"]


# ---------------------------------------------------------------------------------------------------------
# Hostile headers: rejected from the numbers alone, without allocating what they declare


def rejected_cheaply(data: bytes) -> str:
    tracemalloc.start()
    try:
        message = reject(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(data) + (1 << 20), peak
    return message


def test_huge_stream_count_is_rejected():
    # 65535 x 65535 tiles: a stream count that fits the u32 field and matches the grid, with no table.
    count = 65535 * 65535
    message = rejected_cheaply(build({"tile_rows": 65535, "tile_cols": 65535, "stream_count": count}, []))
    assert "streams" in message and str(count) in message


def test_stream_count_not_matching_the_grid_is_rejected():
    message = rejected_cheaply(build({"tile_rows": 2, "tile_cols": 2, "stream_count": 2**32 - 1}, []))
    assert "streams" in message and "2x2" in message


def test_tile_grid_larger_than_the_image_is_rejected():
    rows, cols = 20, 30
    message = rejected_cheaply(build({"tile_rows": rows, "tile_cols": cols}, [(0, 0)] * (rows * cols)))
    assert "tile grid" in message


def test_huge_header_length_is_rejected():
    data = build({}, [(4, 0)], body_length=2**32 - 1)
    assert "header length" in rejected_cheaply(data)


def test_huge_stream_length_is_rejected():
    data = build({}, [(2**32 - 16, 0)], b"\x01\x00\x00\x00")
    message = rejected_cheaply(data)
    assert "truncated" in message and "stream 0" in message


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"sensor_height": 65535, "sensor_width": 65535, "output_height": 65535, "output_width": 65535}, "200 MP"),
        ({"sensor_height": 100_000, "output_height": 100_000}, "sensor size"),
        ({"sensor_height": 1, "output_height": 1}, "sensor size"),
        ({"output_height": 96, "output_width": 64}, "output size"),
        ({"flip": 9}, "orientation"),
        ({"pad_top": 2}, "padding"),
        ({"tile_height": 48}, "tile size"),
        ({"tile_width": 8192}, "tile size"),
        ({"overlap": 64}, "overlap"),
        ({"lam": float("nan")}, "lambda"),
        ({"lam": 5.0}, "lambda"),
        ({"name": b"\xff\xfe"}, "ASCII"),
        ({"name": b""}, "model name of 0 bytes"),  # found by test_fuzzed_fields_behind_a_valid_checksum_are_checked
        ({"name": b"m" * 65}, "model name of 65 bytes"),
    ],
)
def test_bad_header_fields_are_named(fields, words):
    stream = b"\x01\x00\x00\x00"
    message = rejected_cheaply(build(fields, [(len(stream), zlib.crc32(stream))], stream))
    assert "bad header" in message and words in message


def test_other_format_version_is_rejected(valid):
    data = bytearray(valid[0])
    data[8:10] = struct.pack("<H", 7)
    assert "version 7" in reject(bytes(data))


def test_version_1_and_2_files_still_read(tiny_codec):
    stream = b"\x01\x00\x00\x00"
    header, streams = container.read(build({"digest": tiny_codec.digest}, [(4, zlib.crc32(stream))], stream, version=1))
    assert header.format_version == 1 and header.tone == IDENTITY and streams == [stream]
    # Version 2 differs only by six float32 tone numbers: one gain and offset per channel.
    tone = (1.25, 1.0, 0.75, 0.0, -0.125, 0.5)
    header2, _ = container.read(build({"digest": tiny_codec.digest, "tone": tone}, [(4, zlib.crc32(stream))], stream, version=2))
    assert header2.format_version == 2 and header2.tone == tone
    # Version 3 has no look or development: clean, and the identity a non-skeleton model ignores.
    header3, _ = container.read(build({"digest": tiny_codec.digest}, [(4, zlib.crc32(stream))], stream, version=3))
    assert (header3.format_version, header3.look, header3.cam_to_srgb, header3.white) == (3, "clean", container.IDENTITY_MATRIX, 1.0)


def test_look_and_development_round_trip(tiny_codec):
    stream = b"\x01\x00\x00\x00"
    matrix = tuple(float(v) for v in np.float32([1.75, -0.5, -0.25, -0.125, 1.5, -0.375, 0.0625, -0.5, 1.4375]))
    data = build({"digest": tiny_codec.digest, "look": 1, "cam_to_srgb": matrix, "white": 0.375}, [(4, zlib.crc32(stream))], stream)
    header, _ = container.read(data)
    assert (header.format_version, header.look, header.cam_to_srgb, header.white) == (container.FORMAT_VERSION, "faithful", matrix, 0.375)
    assert container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), [stream]) == data


@pytest.mark.parametrize(
    "fields, words",
    [({"look": 2}, "look code 2"), ({"white": 0.0}, "white level"), ({"white": float("nan")}, "colour matrix"),
     ({"cam_to_srgb": (1.0, 0.0, 0.0, 0.0, 1e6, 0.0, 0.0, 0.0, 1.0)}, "colour matrix")],
)  # fmt: skip
def test_bad_look_or_development_is_rejected(fields, words):
    stream = b"\x01\x00\x00\x00"
    message = reject(build(fields, [(4, zlib.crc32(stream))], stream))
    assert "bad header" in message and words in message


def test_tone_field_round_trips(tiny_codec):
    stream = b"\x01\x00\x00\x00"
    tone = on_grid(tuple(np.concatenate([np.linspace(0.8, 1.2, 48), np.linspace(-0.1, 0.1, 48)])), 10)
    data = build({"digest": tiny_codec.digest, "tone": tone}, [(4, zlib.crc32(stream))], stream)
    header, _ = container.read(data)
    assert header.format_version == container.FORMAT_VERSION and header.tone == tone
    # Version 4 has the same header (its streams code y in another order: test_codec.py).
    v4, _ = container.read(build({"digest": tiny_codec.digest, "tone": tone}, [(4, zlib.crc32(stream))], stream, version=4))
    assert v4.format_version == 4 and v4.tone == tone
    # Version 3 is the same without the metadata lengths and CRC.
    old, _ = container.read(build({"digest": tiny_codec.digest, "tone": tone}, [(4, zlib.crc32(stream))], stream, version=3))
    assert old.format_version == 3 and old.tone == tone and old.exif == old.xmp == b""
    # Version 5 stored the field as float16; version 6 codes it, in fewer bytes.
    v5_data = build({"digest": tiny_codec.digest, "tone": tone}, [(4, zlib.crc32(stream))], stream, version=5)
    v5, _ = container.read(v5_data)
    assert v5.format_version == 5 and v5.tone == tone and len(data) < len(v5_data)
    assert container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), [stream]) == data
    with pytest.raises(ValueError, match="grid"):
        container.write(dataclasses.replace(header, tone=(1.0001, 1, 1, 0, 0, 0)), [stream])


@pytest.mark.parametrize(
    "tone, words",
    [((float("nan"), 1, 1, 0, 0, 0), "finite"), ((1, 1, 9.0, 0, 0, 0), "gains"), ((1, 1, 1, 0, -0.75, 0), "offsets")],
)
def test_bad_tone_correction_is_rejected(tone, words):
    stream = b"\x01\x00\x00\x00"
    for version in (2, 3):
        message = reject(build({"tone": tone}, [(4, zlib.crc32(stream))], stream, version=version))
        assert "bad header: tone" in message and words in message


@pytest.mark.parametrize("knots", [0, 33, 255])
def test_a_tone_field_of_impossible_size_is_rejected(knots):
    stream = b"\x01\x00\x00\x00"
    message = reject(build({"tone": IDENTITY, "tone_knots": knots}, [(4, zlib.crc32(stream))], stream))
    assert "bad header: tone correction with" in message


def test_a_tone_field_longer_than_the_header_is_truncation():
    stream = b"\x01\x00\x00\x00"
    assert "truncated" in reject(build({"tone": IDENTITY, "tone_knots": 3}, [(4, zlib.crc32(stream))], stream, version=5))
    assert "truncated" in reject(build({"tone": identity(6), "tone_code_length": 300}, [(4, zlib.crc32(stream))], stream))
    message = reject(build({"tone": identity(6), "tone_code_length": 383}, [(4, zlib.crc32(stream))], stream))
    assert "bad header: tone field code of 383 bytes, at most 382" in message


@pytest.mark.parametrize(
    "code, words",
    [(b"", "grid None"), (b"\x0d\x00", "grid 13"), (b"\x0a", "ends early"), (b"\x0a" + bytes(10), "unexpected bits"),
     (b"\x0a\xff\xff\xff\xff", "ends early")],
)  # fmt: skip
def test_a_damaged_tone_code_is_rejected(code, words):
    stream = b"\x01\x00\x00\x00"
    message = reject(build({"tone": IDENTITY, "tone_code": code}, [(4, zlib.crc32(stream))], stream))
    assert "bad header" in message and words in message


def test_a_tone_code_out_of_range_is_rejected():
    """A code that decodes to gains or offsets no encoder fits (here a gain of 9) fails the range check."""
    stream = b"\x01\x00\x00\x00"
    message = reject(build({"tone": (1.0, 1.0, 9.0, 0.0, 0.0, 0.0)}, [(4, zlib.crc32(stream))], stream))
    assert "bad header: tone gains" in message


# ---------------------------------------------------------------------------------------------------------
# Model identity


def test_decoding_with_another_model_is_refused(tiny_codec, other_model_path, valid):
    other = load_codec(other_model_path)
    assert other.name == tiny_codec.name and other.digest != tiny_codec.digest
    with pytest.raises(RcamError, match="made with model"):
        codec.decode_bytes(other, valid[0])


def test_decoding_with_a_model_of_another_name_is_refused(tiny_codec, valid):
    renamed = dataclasses.replace(tiny_codec, name="something-else")
    with pytest.raises(RcamError, match="made with model tiny"):
        codec.decode_bytes(renamed, valid[0])


# ---------------------------------------------------------------------------------------------------------
# Capture metadata (version 4)

EXIF = b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # an empty IFD0: the container does not look inside
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"/>'


def test_metadata_round_trips_between_header_and_streams(tiny_codec):
    stream = b"\x01\x00\x00\x00"
    data = build({"digest": tiny_codec.digest, "exif": EXIF, "xmp": XMP}, [(4, zlib.crc32(stream))], stream)
    header, streams = container.read(data)
    assert (header.exif, header.xmp, streams) == (EXIF, XMP, [stream])
    assert container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), [stream]) == data
    assert len(data) == header_size(header) + 4


def test_damaged_metadata_is_a_checksum_mismatch(tiny_codec):
    stream = b"\x01\x00\x00\x00"
    data = bytearray(build({"digest": tiny_codec.digest, "exif": EXIF, "xmp": XMP}, [(4, zlib.crc32(stream))], stream))
    data[-4 - 3] ^= 0x20  # a byte of the XMP
    assert reject(bytes(data)) == "checksum mismatch in metadata"


@pytest.mark.parametrize("lengths", [(container.MAX_EXIF + 1, 0), (0, container.MAX_XMP + 1), (2**32 - 1, 2**32 - 1)])
def test_oversized_metadata_is_rejected_before_reading_it(lengths):
    stream = b"\x01\x00\x00\x00"
    message = rejected_cheaply(build({"metadata_lengths": lengths}, [(4, zlib.crc32(stream))], stream))
    assert message.startswith("bad header: metadata of")


def test_metadata_longer_than_the_file_is_truncation():
    stream = b"\x01\x00\x00\x00"
    message = reject(build({"metadata_lengths": (1000, 0)}, [(4, zlib.crc32(stream))], stream))
    assert "truncated" in message and "metadata" in message


def test_writer_refuses_metadata_a_reader_would_refuse(valid):
    _, header, streams = valid
    with pytest.raises(ValueError, match="metadata too large"):
        container.write(dataclasses.replace(header, xmp=b" " * (container.MAX_XMP + 1)), streams)
