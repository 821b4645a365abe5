"""rcam.training.dng writes DNGs that LibRaw (rawpy) reads back with the CFA, levels, WB and orientation we wrote."""

import numpy as np
import pytest
import rawpy
import tifffile

from rcam.errors import RcamError
from rcam.training.dng import BAYER_PATTERNS, DEFAULT_XYZ_TO_CAMERA, XTRANS_PATTERN, write_bayer_dng, write_cfa_dng, write_linear_dng

# LibRaw's flip for each EXIF orientation (measured with LibRaw 0.22; it is "50132467"[orientation & 7]).
LIBRAW_FLIP = {1: 0, 2: 1, 3: 3, 4: 2, 5: 4, 6: 6, 7: 7, 8: 5}



def reference_render(path):
    with rawpy.imread(str(path)) as raw:
        return raw.postprocess(use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB, output_bps=8, gamma=(2.4, 12.92))


def random_mosaic(shape, low=0, high=4096, seed=0):
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.uint16)


@pytest.mark.parametrize("cfa", list(BAYER_PATTERNS))
def test_bayer_phase_round_trips(tmp_path, cfa):
    mosaic = random_mosaic((25, 31), 200, 4000)  # odd sizes on purpose
    black = (64, 65, 66, 67)  # per CFA position, row-major
    neutral = (0.5, 1.0, 0.625)
    path = write_bayer_dng(
        tmp_path / "bayer.dng", mosaic, cfa=cfa, black_level=black, white_level=4095, as_shot_neutral=neutral
    )
    with rawpy.imread(str(path)) as raw:
        assert raw.num_colors == 3
        assert raw.color_desc == b"RGBG"
        pattern = raw.raw_pattern
        # LibRaw calls the green that shares a row with blue "3" (G2); otherwise 0 R, 1 G, 2 B.
        colours = np.where(pattern == 3, 1, pattern)
        assert colours.ravel().tolist() == list(BAYER_PATTERNS[cfa])
        (g2_row,) = np.nonzero((pattern == 3).any(axis=1))[0]
        assert 2 in pattern[g2_row]
        np.testing.assert_array_equal(raw.raw_image, mosaic)
        for position in range(4):
            channel = pattern.ravel()[position]
            assert raw.black_level_per_channel[channel] == black[position]
        assert raw.white_level == 4095
        wb = np.array(raw.camera_whitebalance[:3])
        np.testing.assert_allclose(wb / wb[1], 1 / np.array(neutral), rtol=1e-5)
        assert raw.sizes.flip == 0
    assert reference_render(path).shape == (25, 31, 3)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_sets_libraw_flip_and_render_shape(tmp_path, orientation):
    path = write_bayer_dng(tmp_path / "o.dng", random_mosaic((24, 40)), orientation=orientation)
    with rawpy.imread(str(path)) as raw:
        assert raw.sizes.flip == LIBRAW_FLIP[orientation]
    expected = (24, 40, 3) if orientation <= 4 else (40, 24, 3)
    assert reference_render(path).shape == expected


def test_tags_written(tmp_path):
    path = write_bayer_dng(tmp_path / "t.dng", random_mosaic((22, 22)), cfa="GBRG", black_level=10, orientation=6)
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 1
        tags = {tag.code: tag.value for tag in tif.pages[0].tags}
    assert tags[254] == 0  # NewSubfileType: main image
    assert tags[259] == 1  # uncompressed
    assert tags[262] == 32803  # CFA
    assert tuple(tags[50706]) == (1, 4, 0, 0)
    assert tags[50708] == "rcam Synthetic"
    assert tuple(tags[33421]) == (2, 2)
    assert tuple(tags[33422]) == (1, 2, 0, 1)
    assert tags[274] == 6
    assert tags[50778] == 21
    assert 270 not in tags and 305 not in tags  # no tifffile description / software


def test_default_colour_matrix_is_used(tmp_path):
    path = write_bayer_dng(tmp_path / "m.dng", random_mosaic((24, 24)))
    with rawpy.imread(str(path)) as raw:
        # LibRaw derives its daylight multipliers from the ColorMatrix: 1 / row sums of (matrix @ sRGB->XYZ).
        daylight = np.array(raw.daylight_whitebalance[:3])
    xyz_from_srgb = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]])
    expected = 1 / (DEFAULT_XYZ_TO_CAMERA @ xyz_from_srgb).sum(axis=1)
    np.testing.assert_allclose(daylight / daylight[1], expected / expected[1], rtol=1e-3)


def test_odd_and_minimum_sizes(tmp_path):
    for shape in [(22, 22), (23, 57), (57, 23)]:
        mosaic = random_mosaic(shape)
        path = write_bayer_dng(tmp_path / "s.dng", mosaic, cfa="GRBG")
        with rawpy.imread(str(path)) as raw:
            np.testing.assert_array_equal(raw.raw_image, mosaic)
        assert reference_render(path).shape == shape + (3,)


@pytest.mark.parametrize("shape", [(2, 2), (3, 5), (21, 40), (40, 21)])
def test_tiny_files_are_valid_tiff_but_libraw_refuses_them(tmp_path, shape):
    mosaic = random_mosaic(shape)
    path = write_bayer_dng(tmp_path / "tiny.dng", mosaic, cfa="BGGR")
    np.testing.assert_array_equal(tifffile.imread(path), mosaic)
    # LibRaw rejects any raw image under 22 pixels in height or width.
    with pytest.raises(rawpy.LibRawFileUnsupportedError):
        rawpy.imread(str(path))


def test_linearization_table_is_applied_by_libraw(tmp_path):
    table = (np.arange(1024, dtype=np.float64) ** 2 / 1023 * 48).astype(np.uint16)  # 10-bit log-ish codes
    codes = random_mosaic((30, 40), 0, 1024)
    path = write_bayer_dng(tmp_path / "lin.dng", codes, linearization_table=table, white_level=int(table[-1]),
                           black_level=50)
    with rawpy.imread(str(path)) as raw:
        np.testing.assert_array_equal(raw.raw_image, table[codes])
        assert raw.white_level == int(table[-1])
        assert raw.black_level_per_channel == [50, 50, 50, 50]
    assert reference_render(path).shape == (30, 40, 3)


def test_short_linearization_table_saturates_at_last_entry(tmp_path):
    table = np.array([0, 1000, 2000, 3000], np.uint16)
    codes = random_mosaic((24, 24), 0, 8)
    path = write_bayer_dng(tmp_path / "short.dng", codes, linearization_table=table, white_level=3000)
    with rawpy.imread(str(path)) as raw:
        np.testing.assert_array_equal(raw.raw_image, table[np.minimum(codes, 3)])


def test_active_area_crops_visible_region(tmp_path):
    mosaic = random_mosaic((40, 50))
    path = write_bayer_dng(tmp_path / "aa.dng", mosaic, cfa="RGGB", active_area=(2, 4, 38, 46))
    with rawpy.imread(str(path)) as raw:
        assert (raw.sizes.top_margin, raw.sizes.left_margin) == (2, 4)
        assert (raw.sizes.height, raw.sizes.width) == (36, 42)
        np.testing.assert_array_equal(raw.raw_image_visible, mosaic[2:38, 4:46])
        assert raw.raw_pattern.tolist() == [[0, 1], [3, 2]]
    assert reference_render(path).shape == (36, 42, 3)


def test_xtrans_is_recognisable(tmp_path):
    pattern = sum(XTRANS_PATTERN, [])
    path = write_cfa_dng(tmp_path / "xtrans.dng", random_mosaic((36, 48)), repeat_dim=(6, 6), pattern=pattern)
    with rawpy.imread(str(path)) as raw:
        assert raw.raw_pattern.shape == (6, 6)
        assert raw.raw_pattern.tolist() == XTRANS_PATTERN
        assert raw.num_colors == 3


def test_cmyg_is_recognisable(tmp_path):
    cyan, magenta, yellow, green = 3, 4, 5, 1
    xyz_to_camera = [[0.6, 0.3, 0.1], [0.4, 0.5, 0.2], [0.3, 0.6, 0.5], [0.2, 0.8, 0.1]]
    path = write_cfa_dng(
        tmp_path / "cmyg.dng",
        random_mosaic((30, 40)),
        repeat_dim=(2, 2),
        pattern=[cyan, yellow, magenta, green],
        cfa_plane_color=(cyan, magenta, yellow, green),
        xyz_to_camera=xyz_to_camera,
        as_shot_neutral=(1, 1, 1, 1),
    )
    with rawpy.imread(str(path)) as raw:
        assert raw.num_colors == 4
        # raw_pattern holds plane indices in CFAPlaneColor order (C=0, M=1, Y=2, G=3).
        assert raw.raw_pattern.tolist() == [[0, 2], [1, 3]]


def test_linear_dng_is_recognisable(tmp_path):
    rgb = np.random.default_rng(1).integers(64, 4095, (24, 32, 3)).astype(np.uint16)
    path = write_linear_dng(tmp_path / "linear.dng", rgb, black_level=64, white_level=4095, orientation=6)
    with rawpy.imread(str(path)) as raw:
        assert raw.raw_type == rawpy.RawType.Stack
        assert raw.raw_pattern is None
        assert raw.num_colors == 3
        assert raw.white_level == 4095
        assert raw.sizes.flip == 6
    assert reference_render(path).shape == (32, 24, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(cfa="RGBG"),
        dict(orientation=0),
        dict(orientation=9),
        dict(black_level=(1, 2, 3)),
        dict(black_level=-1),
        dict(white_level=70000),
        dict(as_shot_neutral=(1, 0, 1)),
        dict(xyz_to_camera=np.eye(2)),
        dict(linearization_table=np.arange(10, dtype=np.float32)),
    ],
)
def test_bad_arguments_raise_rcam_error(tmp_path, kwargs):
    with pytest.raises(RcamError):
        write_bayer_dng(tmp_path / "bad.dng", random_mosaic((24, 24)), **kwargs)


@pytest.mark.parametrize(
    "mosaic",
    [np.zeros(24, np.uint16), np.zeros((1, 24), np.uint16), np.zeros((24, 24), np.float32),
     np.full((24, 24), 70000, np.int32)],
)
def test_bad_mosaic_raises_rcam_error(tmp_path, mosaic):
    with pytest.raises(RcamError):
        write_bayer_dng(tmp_path / "bad.dng", mosaic)


def test_normalise_planes_with_the_frames_white_is_network_input_on_any_crop(make_dng):
    from rcam.codec.rawio import auto_bright_white, network_input, normalise_planes, read_raw

    image = read_raw(make_dng(height=64, width=96, cfa="GBRG"))
    whole = network_input(image)
    white = auto_bright_white(image.planes, image.wb_gains, image.cam_to_srgb)
    np.testing.assert_array_equal(normalise_planes(image.planes, image.wb_gains, image.cam_to_srgb, white), whole)
    # A crop normalised with the whole frame's white is the crop of the whole frame's input (what training uses).
    crop = normalise_planes(image.planes[:, 5:21, 9:33], image.wb_gains, image.cam_to_srgb, white)
    np.testing.assert_allclose(crop, whole[:, 5:21, 9:33], atol=1e-6)


def test_normalising_in_bands_and_in_place_gives_the_same_bits(make_dng, monkeypatch):
    """The encoder normalises a band of rows at a time, and over the raw planes themselves (memory): bands of
    any height, and writing over the input, give the values and auto-brightness level of one pass."""
    from rcam.codec import rawio

    image = rawio.read_raw(make_dng(height=150, width=94, cfa="GRBG"))
    planes = image.planes.copy()
    monkeypatch.setattr(rawio, "NORMALISE_BAND_ROWS", 10_000)
    whole, white = rawio.network_input_and_white(image)
    monkeypatch.setattr(rawio, "NORMALISE_BAND_ROWS", 7)
    banded, banded_white = rawio.network_input_and_white(image)
    assert banded_white == white and np.array_equal(banded, whole)
    assert np.array_equal(image.planes, planes)  # not overwritten unless asked
    in_place, in_place_white = rawio.network_input_and_white(image, overwrite=True)
    assert in_place is image.planes and in_place_white == white and np.array_equal(in_place, whole)
    assert white == rawio.auto_bright_white(planes, image.wb_gains, image.cam_to_srgb)
