"""Image output written a band at a time: the streamed PNG, write_image for every orientation and format, and
`rcam decode`'s streamed file against the whole-frame decode."""

import io

import imagecodecs
import numpy as np
import pytest
from PIL import Image

from rcam.codec import batch, container
from rcam.codec.engine import decode_bytes, decoded_bands, encode_file, read_checked
from rcam.codec.metadata import Metadata
from rcam.codec.output import PngStream, encode_image, quantize, write_image
from rcam.codec.rawio import oriented_view

from conftest import part_files

EXIF = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00"  # big-endian TIFF, Orientation 1


@pytest.mark.parametrize("bits", [8, 16])
def test_png_stream_writes_the_rows_it_is_given(bits):
    rng = np.random.default_rng(bits)
    pixels = rng.integers(0, 1 << bits, size=(53, 37, 3)).astype(np.uint8 if bits == 8 else np.uint16)
    pixels[20:30] = pixels[19]  # flat rows: the filter's "row above" must carry across bands
    buffer = io.BytesIO()
    stream = PngStream(buffer, 53, 37, bits, chunks=b"")
    for first, last in [(0, 1), (1, 8), (8, 30), (30, 53)]:
        stream.add(pixels[first:last])
    stream.close()
    np.testing.assert_array_equal(imagecodecs.png_decode(buffer.getvalue()), pixels)
    with Image.open(io.BytesIO(buffer.getvalue())) as image:
        image.load()  # Pillow checks the chunks' CRCs and the zlib stream
        assert image.size == (37, 53)


def test_png_stream_refuses_a_short_or_long_image():
    stream = PngStream(io.BytesIO(), 4, 5, 8)
    stream.add(np.zeros((3, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="3 of 4 rows"):
        stream.close()
    with pytest.raises(ValueError, match="more rows"):
        stream.add(np.zeros((2, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="rows of 5 RGB"):
        stream.add(np.zeros((1, 5, 3), np.uint16))


@pytest.mark.parametrize("kind, suffix, bits", [("png", ".png", 8), ("png", ".png", 16), ("tiff", ".tif", 16), ("jpeg", ".jpg", 8)])
@pytest.mark.parametrize("flip", [0, 3, 5, 6])
def test_write_image_is_encode_image_of_the_oriented_frame(tmp_path, kind, suffix, bits, flip):
    rng = np.random.default_rng(flip)
    frame = rng.random((41, 29, 3), dtype=np.float32)
    metadata = Metadata(EXIF, b"")
    target = tmp_path / f"out{suffix}"
    bands = (frame[first : first + 10] for first in range(0, 41, 10))
    written = write_image(target, bands, 41, 29, kind, bits, 90, metadata, flip)
    data = target.read_bytes()
    assert written == len(data)
    expected = encode_image(oriented_view(frame, flip), kind, bits, 90, metadata)
    decode = {"png": imagecodecs.png_decode, "tiff": imagecodecs.tiff_decode, "jpeg": imagecodecs.jpeg8_decode}[kind]
    np.testing.assert_array_equal(decode(data), decode(expected))
    with Image.open(target) as image:
        assert image.size == ((41, 29) if flip & 4 else (29, 41))
        assert image.info.get("icc_profile")
        assert image.getexif().get(0x0112) == 1


def test_write_image_interrupted_leaves_nothing(tmp_path):
    def bands():
        yield np.zeros((8, 16, 3), np.float32)
        raise KeyboardInterrupt

    target = tmp_path / "out.png"
    with pytest.raises(KeyboardInterrupt):
        write_image(target, bands(), 16, 16, "png")
    assert not target.exists() and part_files(tmp_path) == []


@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_decode_streams_the_whole_frame_decode(tmp_path, tiny_codec, make_dng, orientation):
    source = make_dng("rows.dng", 200, 88, orientation=orientation)
    data = encode_file(tiny_codec, source, 0.01, tile=64, overlap=32).data
    header, streams = read_checked(tiny_codec, data)
    assert header.tile_rows >= 2  # several bands
    assert [top for top, _ in decoded_bands(tiny_codec, header, streams)][0] == 0
    (tmp_path / "rows.rcb").write_bytes(data)
    target = tmp_path / "rows.png"
    done = batch.decode_one(batch.DecodeSettings(16, 95, False), tiny_codec, tmp_path / "rows.rcb", target)
    expected = quantize(decode_bytes(tiny_codec, data), 16)
    np.testing.assert_array_equal(imagecodecs.png_decode(target.read_bytes()), expected)
    assert done.pixels == expected.shape[0] * expected.shape[1] and container.read(data)[0].flip == header.flip
