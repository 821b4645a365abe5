"""rcam.training.synth: unprocessing, mosaicking, position-dependent defects, clean twins and dataset files."""

import dataclasses
import json

import numpy as np
import pytest
import rawpy
from PIL import Image

from rcam.codec.rawio import reference_render
from rcam.errors import RcamError
from rcam.training import synth
from rcam.training.dng import BAYER_PATTERNS, write_bayer_dng


def smooth_photo(height=48, width=64, seed=0):
    """A small synthetic 'photo': colour gradients plus a few flat patches, uint8 sRGB."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, height)[:, None]
    cols = np.linspace(0, 1, width)[None, :]
    image = np.stack([0.2 + 0.6 * cols + 0 * rows, 0.3 + 0.5 * rows + 0 * cols, 0.7 - 0.5 * cols * rows], axis=2)
    for _ in range(3):
        top, left = rng.integers(0, height - 10), rng.integers(0, width - 10)
        image[top : top + 10, left : left + 10] = rng.uniform(0.05, 0.95, 3)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


ORIGINAL_FAMILIES = ("vignette-rational", "shading-corner")
NEW_FAMILIES = tuple(name for name in synth.FAMILIES if name not in ORIGINAL_FAMILIES)


def make_defects(frame_shape=(64, 96), seed=3, include=(), **overrides):
    """Defects of the original families (plus `include`), with fields overridden."""
    sensor = synth.sample_sensor(np.random.default_rng(seed), cfa="RGGB")
    exclude = [name for name in NEW_FAMILIES if name not in include]  # an included law replaces the rational one
    defects = synth.sample_defects(np.random.default_rng(seed), frame_shape, sensor, exclude=exclude, include=include)
    for key, value in overrides.items():
        setattr(defects, key, value)
    return sensor, defects


def test_transfer_functions():
    y = np.linspace(0, 1, 101)
    x = synth.inverse_smoothstep(y)
    np.testing.assert_allclose(3 * x**2 - 2 * x**3, y, atol=1e-9)
    assert synth.srgb_to_linear(np.array([0.0, 1.0]))[1] == pytest.approx(1.0)
    assert synth.srgb_to_linear(np.array(0.5)) == pytest.approx(0.21404, abs=1e-4)


def test_camera_matrix_is_a_convex_mix_with_white_preserved():
    matrices = np.stack([synth.XYZ_TO_CAMERA_D65[name] for name in synth.MIX_CAMERAS])
    mixed = synth.random_xyz_to_camera(np.random.default_rng(0))
    assert np.all(mixed >= matrices.min(axis=0) - 1e-12) and np.all(mixed <= matrices.max(axis=0) + 1e-12)
    camera_from_srgb = synth.camera_from_linear_srgb(mixed)
    np.testing.assert_allclose(camera_from_srgb @ np.ones(3), np.ones(3))


def test_unprocess_ranges():
    photo = smooth_photo()
    camera, params = synth.unprocess(photo, np.random.default_rng(1), camera_share=0.0, wide_share=0.0)
    assert camera.shape == photo.shape and camera.dtype == np.float32
    assert camera.min() >= 0
    assert 1.9 <= params.red_gain <= 2.4 and 1.5 <= params.blue_gain <= 1.9
    assert 0.85 <= np.percentile(camera.max(axis=2), 99.5) <= 1.3  # exposure puts highlights at the clip point
    assert params.as_shot_neutral == pytest.approx((1 / params.red_gain, 1.0, 1 / params.blue_gain))
    with pytest.raises(RcamError):
        synth.unprocess(photo.astype(np.float32), np.random.default_rng(1))


@pytest.mark.parametrize("cfa", list(BAYER_PATTERNS))
def test_mosaic_picks_the_cfa_channel(cfa):
    image = np.zeros((4, 6, 3), np.float32)
    image[..., 0], image[..., 1], image[..., 2] = 10, 20, 30
    expected = (np.array(BAYER_PATTERNS[cfa]).reshape(2, 2) + 1) * 10
    np.testing.assert_array_equal(synth.mosaic(image, cfa), np.tile(expected, (2, 3)))


def test_sensor_levels():
    for seed in range(20):
        sensor = synth.sample_sensor(np.random.default_rng(seed))
        assert 10 <= sensor.bits <= 14
        assert sensor.white_level == 2**sensor.bits - 1
        assert sensor.cfa in BAYER_PATTERNS
        assert len(sensor.black_level) == 4
        assert all(0.7 * 2 ** (sensor.bits - 4) <= b <= 1.35 * 2 ** (sensor.bits - 4) for b in sensor.black_level)


def test_defect_maps_use_absolute_position():
    _, defects = make_defects()
    full_vignette = synth.vignetting_gain(defects)
    full_shading = synth.dark_shading(defects)
    full_noise = synth.standard_normal_field(defects)
    for offset in [(0, 0), (10, 20), (31, 47)]:
        crop = (slice(offset[0], offset[0] + 24), slice(offset[1], offset[1] + 32))
        np.testing.assert_allclose(synth.vignetting_gain(defects, offset, (24, 32)), full_vignette[crop])
        np.testing.assert_allclose(synth.dark_shading(defects, offset, (24, 32)), full_shading[crop])
        np.testing.assert_array_equal(synth.standard_normal_field(defects, offset, (24, 32)), full_noise[crop])
    # Same offset: same maps; different offsets: different maps.
    for map_of in (synth.vignetting_gain, synth.dark_shading, synth.standard_normal_field):
        np.testing.assert_array_equal(map_of(defects, (8, 8), (16, 16)), map_of(defects, (8, 8), (16, 16)))
        assert not np.allclose(map_of(defects, (0, 0), (16, 16)), map_of(defects, (40, 70), (16, 16)))


def test_defect_map_shapes_and_ranges():
    _, defects = make_defects(frame_shape=(80, 120))
    gain = synth.vignetting_gain(defects)
    assert gain.shape == (80, 120)
    assert 0 < gain.min() < gain.max() <= 1
    center = np.unravel_index(np.argmax(gain), gain.shape)
    assert abs(center[0] - defects.vignette_center[0]) <= 1 and abs(center[1] - defects.vignette_center[1]) <= 1
    shading = synth.dark_shading(defects)
    assert shading.min() >= 0 and shading.max() > 0
    corners = np.mean([shading[:8, :8].mean(), shading[:8, -8:].mean(), shading[-8:, :8].mean(), shading[-8:, -8:].mean()])
    assert corners > shading[36:44, 56:64].mean()
    # Each CFA position has its own scale of the same smooth field.
    scale = np.array(defects.shading_channel_scale).reshape(2, 2)
    ratio = shading[0::2, 1::2] / np.maximum(shading[0::2, 0::2], 1e-9)
    assert np.median(ratio) == pytest.approx(scale[0, 1] / scale[0, 0], rel=0.05)


def test_clean_twin_has_no_defects_and_degraded_minus_clean_is_the_defects():
    sensor, defects = make_defects(frame_shape=(40, 60))
    linear = np.random.default_rng(5).uniform(0.05, 0.6, (40, 60))  # below clipping even after noise
    offset = (0, 0)
    clean = synth.simulate_raw(linear, sensor)
    black = synth.black_level_map(sensor, offset, linear.shape)
    span = sensor.white_level - black
    np.testing.assert_allclose(clean, black + span * linear)

    degraded = synth.simulate_raw(linear, sensor, defects)
    vignetted = linear * synth.vignetting_gain(defects)
    noise = synth.noise_std(vignetted, defects) * synth.standard_normal_field(defects)
    defect_dn = span * (vignetted - linear) + span * noise + synth.dark_shading(defects)
    np.testing.assert_allclose(degraded - clean, defect_dn, atol=1e-6)

    # After quantisation the difference is the defects to within rounding (no clipping in this signal range).
    difference = synth.quantize_raw(degraded, sensor).astype(float) - synth.quantize_raw(clean, sensor)
    assert np.abs(difference - defect_dn).max() <= 1.0


def test_noise_is_heteroscedastic_with_brooks_parameters():
    sensor, defects = make_defects(frame_shape=(200, 200), vignette_strength=0.0, shading_amplitude=0.0,
                                   shading_gradient=(0.0, 0.0), shading_waves=[])
    assert 1e-4 <= defects.shot_noise <= 1.2e-2
    for level in (0.1, 0.8):
        linear = np.full((200, 200), level)
        residual = (synth.simulate_raw(linear, sensor, defects) - synth.simulate_raw(linear, sensor))
        residual /= sensor.white_level - synth.black_level_map(sensor, (0, 0), linear.shape)
        expected = np.sqrt(defects.shot_noise * level + defects.read_noise)
        assert residual.std() == pytest.approx(expected, rel=0.05)


def test_unprocessed_colours_come_back_in_libraw_render(tmp_path):
    """LibRaw's camera WB + ColorMatrix1 undo unprocess's colour steps exactly (linear, unscaled render)."""
    colours = np.array([[0.5, 0.2, 0.1], [0.1, 0.4, 0.1], [0.1, 0.2, 0.5], [0.4, 0.4, 0.4]])
    image = np.repeat(colours, 32, axis=0).reshape(4, 32, 3).repeat(32, axis=0).reshape(128, 32, 3)
    xyz_to_camera = synth.random_xyz_to_camera(np.random.default_rng(2))
    gains = np.array([2.2, 1.0, 1.6])
    camera = image @ synth.camera_from_linear_srgb(xyz_to_camera).T / gains
    sensor = synth.SensorParams(cfa="GBRG", bits=14, black_level=[1000, 1001, 1002, 1003], white_level=16383)
    raw = synth.quantize_raw(synth.simulate_raw(synth.mosaic(camera, sensor.cfa), sensor), sensor)
    path = write_bayer_dng(tmp_path / "c.dng", raw, cfa=sensor.cfa, black_level=sensor.black_level,
                           white_level=sensor.white_level, as_shot_neutral=1 / gains, xyz_to_camera=xyz_to_camera)
    with rawpy.imread(str(path)) as dng:
        out = dng.postprocess(use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB, output_bps=16, gamma=(1, 1),
                              no_auto_bright=True)
    for index, colour in enumerate(colours):
        patch = out[32 * index + 8 : 32 * index + 24, 8:24].reshape(-1, 3).mean(axis=0) / 65535
        np.testing.assert_allclose(patch, colour, atol=2e-3)


def test_make_pair_files(tmp_path):
    photo_path = tmp_path / "photo.png"
    Image.fromarray(smooth_photo(48, 64)).save(photo_path)
    files = synth.make_pair(photo_path, tmp_path / "out", np.random.default_rng(7), "p")
    degraded, clean, target = files
    assert degraded.name == "p_degraded.dng" and clean.name == "p_clean.dng" and target.name == "p_target.png"
    with rawpy.imread(str(degraded)) as a, rawpy.imread(str(clean)) as b:
        assert a.raw_pattern.tolist() == b.raw_pattern.tolist()
        assert a.black_level_per_channel == b.black_level_per_channel
        assert a.white_level == b.white_level
        assert a.camera_whitebalance == b.camera_whitebalance
        assert a.raw_image.shape == b.raw_image.shape == (48, 64)
        assert not np.array_equal(a.raw_image, b.raw_image)
        wb = np.array(b.camera_whitebalance[:3])
        assert 1.3 * 0.9 <= wb[0] / wb[1] <= 2.8 * 1.1 and 1.3 * 0.9 <= wb[2] / wb[1] <= 2.6 * 1.1
    target_pixels = np.asarray(Image.open(target))
    np.testing.assert_array_equal(target_pixels, reference_render(clean))
    assert target_pixels.shape == (48, 64, 3)
    assert not list((tmp_path / "out").glob("*.part"))


def test_make_pair_orientation(tmp_path):
    photo_path = tmp_path / "photo.png"
    Image.fromarray(smooth_photo(48, 64)).save(photo_path)
    files = synth.make_pair(photo_path, tmp_path, np.random.default_rng(0), "o", orientation=6)
    with rawpy.imread(str(files.clean)) as raw:
        assert raw.sizes.flip == 6
    assert np.asarray(Image.open(files.target)).shape == (64, 48, 3)


def test_build_dataset_is_resumable_and_deterministic(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        Image.fromarray(smooth_photo(40, 56, seed=index)).save(photos / f"img{index}.png")
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "data"

    index_path = synth.build_dataset([photos], out, variants_per_photo=2, seed=11)
    records = [json.loads(line) for line in index_path.read_text().splitlines()]
    assert sorted(r["name"] for r in records) == ["photos_img0_v0", "photos_img0_v1", "photos_img1_v0", "photos_img1_v1"]
    for record in records:
        for key in ("degraded", "clean", "target"):
            assert (out / record[key]).exists()
        assert record["sensor"]["cfa"] in BAYER_PATTERNS
        assert record["orientation"] == 1
        assert len(record["unprocess"]["xyz_to_camera"]) == 3
    first = {r["name"]: (out / r["degraded"]).read_bytes() for r in records}

    # Re-running does nothing; removing one file regenerates exactly that pair, identically.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "photos_img1_v0_target.png").unlink()
    synth.build_dataset([photos], out, variants_per_photo=2, seed=11)
    records = [json.loads(line) for line in index_path.read_text().splitlines()]
    assert len(records) == 4 and len({r["name"] for r in records}) == 4
    for path in out.glob("photos_img0_*"):
        assert path.stat().st_mtime_ns == mtimes[path.name]
    assert (out / "photos_img1_v0_degraded.dng").read_bytes() == first["photos_img1_v0"]
    assert (out / "photos_img1_v0_target.png").exists()


def test_build_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(RcamError):
        synth.build_dataset([tmp_path / "missing"], tmp_path / "out", 1, 0)
    with pytest.raises(RcamError):
        synth.build_dataset([tmp_path], tmp_path / "out", 0, 0)


def _packed_normalised(raw_dn, sensor):
    """Quantised mosaic (H, W) DN -> R, G1, G2, B planes normalised as read_raw does (0 = black, 1 = white)."""
    black = synth.black_level_map(sensor, (0, 0), raw_dn.shape)
    mosaic = (raw_dn - black) / (sensor.white_level - black)
    return np.stack([mosaic[0::2, 0::2], mosaic[0::2, 1::2], mosaic[1::2, 0::2], mosaic[1::2, 1::2]])


def test_degrade_planes_puts_the_defects_of_simulate_raw_on_crops_and_strided_samples():
    sensor, defects = make_defects(frame_shape=(192, 256), vignette_strength=0.9, shot_noise=0.0, read_noise=0.0)
    linear = np.random.default_rng(7).uniform(0.02, 0.9, (192, 256))
    linear[:12, :12] = 1.6  # a clipped highlight in a vignetted corner
    highlight = (slice(None), slice(0, 6), slice(0, 6))
    clean = _packed_normalised(synth.quantize_raw(synth.simulate_raw(linear, sensor), sensor), sensor)
    degraded = _packed_normalised(synth.quantize_raw(synth.simulate_raw(linear, sensor, defects), sensor), sensor)
    rng = np.random.default_rng(0)
    # A crop at packed (5, 7) starts at sensor pixel (10, 14); a 3-strided sample steps 6 sensor pixels.
    crop = synth.degrade_planes(clean[:, 5:37, 7:47], sensor, defects, (10, 14), 2, rng)
    sample = synth.degrade_planes(clean[:, ::3, ::3], sensor, defects, (0, 0), 6, rng)
    # The highlight stays clipped; the DNG, which knows the light was 1.6 × white, dims it in the corner.
    assert np.all(clean[highlight] == 1.0) and np.all(sample[:, :2, :2] == 1.0)
    assert degraded[highlight].min() < 0.9
    unclipped = clean < 1.0
    for produced, expected, keep in (
        (crop, degraded[:, 5:37, 7:47], unclipped[:, 5:37, 7:47]), (sample, degraded[:, ::3, ::3], unclipped[:, ::3, ::3])
    ):  # fmt: skip
        # The defects move pixels by up to ~0.6 of white; evaluating the smooth maps per 2x2 cell costs < 1%.
        assert np.abs(produced - expected)[keep].max() < 0.01
        assert abs(float((produced - expected)[keep].mean())) < 1e-3
    assert np.abs(degraded[:, ::3, ::3] - clean[:, ::3, ::3]).max() > 0.3  # so the defects are far from nothing


def test_degrade_planes_draws_fresh_noise_of_the_brooks_level():
    sensor, defects = make_defects(frame_shape=(256, 256), vignette_strength=0.0, shading_amplitude=0.0,
                                   shading_gradient=(0.0, 0.0), shading_waves=[])
    clean = np.full((4, 128, 128), 0.5, dtype=np.float32)
    first = synth.degrade_planes(clean, sensor, defects, (0, 0), 2, np.random.default_rng(1))
    second = synth.degrade_planes(clean, sensor, defects, (0, 0), 2, np.random.default_rng(2))
    assert not np.array_equal(first, second)
    expected = np.sqrt(defects.shot_noise * 0.5 + defects.read_noise)
    assert (first - clean).std() == pytest.approx(expected, rel=0.05)


# ----------------------------------------------------------------------------------------------------
# Defect and camera families

# DefectParams of an index.jsonl line written before the families existed (sample_defects(default_rng(3),
# (64, 96), sample_sensor(default_rng(3), cfa="RGGB"))), and its maps at (0, 0), (10, 50), (63, 95) then.
ORIGINAL_ENTRY = {
    "frame_shape": [64, 96], "vignette_center": [26.696309339438393, 42.946761726645114],
    "vignette_strength": 0.9650138038688789, "shading_amplitude": 195.60208071082647,
    "shading_gradient": [9.642639125776979, -47.6335692472237],
    "shading_waves": [[12.708079608325207, 1.1143872068394178, 0.5715561548830335, 4.615484364724211],
                      [3.3351725422843534, 0.9650879238426255, 1.1784583104563182, 2.705715650726193]],
    "shading_channel_scale": [0.8705206982492748, 1.089128324247895, 1.1177295980020934, 0.8756324494074923],
    "shot_noise": 0.0016598184392524096, "read_noise": 2.1965519411628975e-06, "noise_seed": 13743594567978336,
}  # fmt: skip
ORIGINAL_VIGNETTING = [0.33745797, 0.83766724, 0.20781677]
ORIGINAL_SHADING = [201.86432669, 15.77939197, 149.88198859]


def test_index_entries_written_before_the_families_give_the_same_maps_and_draws():
    defects = synth.DefectParams(**json.loads(json.dumps(ORIGINAL_ENTRY)))
    points = ([0, 10, 63], [0, 50, 95])
    np.testing.assert_allclose(synth.vignetting_gain(defects)[points], ORIGINAL_VIGNETTING, rtol=1e-7)
    np.testing.assert_allclose(synth.dark_shading(defects)[points], ORIGINAL_SHADING, rtol=1e-7)
    # No row noise or banding: the degraded raw is clean + vignetting, per-pixel noise and the smooth shading.
    sensor = synth.sample_sensor(np.random.default_rng(3), cfa="RGGB")
    linear = np.full((64, 96), 0.3)
    expected = synth.black_level_map(sensor, (0, 0), (64, 96)) + (sensor.white_level - sensor.black_level[0]) * (
        0.3 * synth.vignetting_gain(defects)
        + synth.noise_std(0.3 * synth.vignetting_gain(defects), defects) * synth.standard_normal_field(defects)
    ) + synth.dark_shading(defects)
    np.testing.assert_allclose(synth.simulate_raw(linear, sensor, defects), expected)
    # With the new families excluded, the same generator state draws the same parameters as before them.
    drawn = synth.sample_defects(np.random.default_rng(3), (64, 96), sensor, exclude=NEW_FAMILIES)
    assert {key: value for key, value in synth._jsonable(dataclasses.asdict(drawn)).items() if key in ORIGINAL_ENTRY} == ORIGINAL_ENTRY


def _ray_gains(defects, center, angle, radii):
    rows = center[0] - 0.5 + radii * np.cos(angle)
    cols = center[1] - 0.5 + radii * np.sin(angle)
    return synth.vignetting_at(defects, rows, cols)


@pytest.mark.parametrize("law", list(synth.VIGNETTE_LAWS))
@pytest.mark.parametrize("elliptical", [False, True])
def test_vignetting_laws_fall_off_from_one_at_their_centre(law, elliptical):
    for seed in range(6):
        include = (law, "vignette-elliptical") if elliptical else (law,)
        _, defects = make_defects(frame_shape=(120, 180), seed=seed, include=include)
        assert defects.vignette_law == synth.VIGNETTE_LAWS[law] and law in defects.families
        assert (defects.vignette_aspect != 1.0) == elliptical
        gain = synth.vignetting_gain(defects)
        assert 0 < gain.min() and gain.max() <= 1 and gain.min() < 0.9
        center = defects.vignette_center
        assert _ray_gains(defects, center, 0.0, np.zeros(1))[0] == pytest.approx(1.0)
        radii = np.linspace(0, 120, 200)
        rays = np.stack([_ray_gains(defects, center, angle, radii) for angle in np.linspace(0, 2 * np.pi, 16, endpoint=False)])
        if law != "vignette-poly":  # a polynomial may flatten (clipped at 1) but the other laws only fall
            assert np.all(np.diff(rays, axis=1) <= 1e-12)
        if elliptical:  # distance d across the ellipse's axis falls off as distance aspect·d along it
            theta, aspect = defects.vignette_angle, defects.vignette_aspect
            across = _ray_gains(defects, center, theta + np.pi / 2, np.array([40.0]))
            assert across == pytest.approx(_ray_gains(defects, center, theta, np.array([40.0 * aspect])), rel=1e-9)
            assert across != pytest.approx(_ray_gains(defects, center, theta, np.array([40.0])), rel=1e-4)
        else:
            assert np.ptp(rays[:, 100]) < 1e-9
    # The laws themselves, along a circular radius r in half-diagonals.
    _, cos4 = make_defects(frame_shape=(100, 100), include=("vignette-cos4",), vignette_cut=(0.8, 0.3), vignette_focal=1.5)
    _, poly = make_defects(frame_shape=(100, 100), include=("vignette-poly",), vignette_poly=(-0.5, 0.1, -0.05))
    half_diagonal = 50 * np.sqrt(2)
    r = np.array([0.0, 0.4, 0.7, 1.0])
    np.testing.assert_allclose(_ray_gains(cos4, cos4.vignette_center, 0.3, r * half_diagonal)[:3], 1 / (1 + (r[:3] / 1.5) ** 2) ** 2)
    assert _ray_gains(cos4, cos4.vignette_center, 0.3, r[3:] * half_diagonal)[0] == pytest.approx(0.7 / (1 + 1 / 1.5**2) ** 2)
    np.testing.assert_allclose(_ray_gains(poly, poly.vignette_center, 0.3, r * half_diagonal), 1 - 0.5 * r**2 + 0.1 * r**4 - 0.05 * r**6)


def test_without_vignetting_removes_every_law():
    for law in synth.VIGNETTE_LAWS:
        _, defects = make_defects(include=(law, "vignette-elliptical"))
        assert synth.vignetting_gain(defects).min() < 0.95
        np.testing.assert_array_equal(synth.vignetting_gain(synth.without_vignetting(defects)), 1.0)


def test_shading_families_are_never_negative_and_have_their_shape():
    for seed in range(5):
        for family in ("shading-poly", "shading-glow"):
            _, defects = make_defects(frame_shape=(96, 128), seed=seed, include=(family,))
            _, plain = make_defects(frame_shape=(96, 128), seed=seed)
            shading = synth.dark_shading(defects)
            assert shading.min() >= 0 and not np.allclose(shading, synth.dark_shading(plain))
    # Amp glow alone: brightest at its source, decaying away from it.
    sensor = synth.sample_sensor(np.random.default_rng(0), cfa="RGGB")
    only = [name for name in synth.FAMILIES if name not in ("vignette-rational", "shading-glow")]
    glow = synth.sample_defects(np.random.default_rng(4), (96, 128), sensor, exclude=only, include=("shading-glow",))
    glow.shading_channel_scale = [1.0] * 4
    glow.glow_source, glow.glow_length = (-0.5, 0.5), 0.1  # top-right corner
    shading = synth.dark_shading(glow)
    assert shading.min() >= 0
    assert shading[:8, -8:].mean() > 5 * shading[-8:, :8].mean() + 1
    assert np.all(np.diff(shading[0, ::2]) >= -1e-9)  # rising towards the right along the top row


@pytest.mark.parametrize("family, axis", [("banding-row", 1), ("banding-col", 0)])
def test_banding_is_constant_along_its_rows_or_columns(family, axis):
    sensor = synth.sample_sensor(np.random.default_rng(0), cfa="RGGB")
    only = [name for name in synth.FAMILIES if name not in ("vignette-rational", family)]
    defects = synth.sample_defects(np.random.default_rng(1), (64, 96), sensor, exclude=only, include=(family,))
    assert family in defects.families
    shading = synth.dark_shading(defects)
    assert shading.min() >= 0
    np.testing.assert_allclose(np.ptp(shading, axis=axis), 0.0, atol=1e-9)  # constant along the band
    bands = shading.mean(axis=axis)
    assert bands.std() > 0.2 and bands.max() < 15 * max(1.0, (sensor.white_level - sensor.black_level[0]) / 4095)
    # Fixed pattern: the same offsets at the same absolute position, whatever the crop.
    np.testing.assert_array_equal(synth.dark_shading(defects, (10, 20), (8, 8)), shading[10:18, 20:28])


def test_row_noise_is_one_offset_per_row_per_frame():
    sensor, defects = make_defects(frame_shape=(200, 160), include=("noise-row",), vignette_strength=0.0,
                                   shading_amplitude=0.0, shading_gradient=(0.0, 0.0), shading_waves=[],
                                   shot_noise=0.0, read_noise=0.0)  # fmt: skip
    assert defects.row_noise > 0 and "noise-row" in defects.families
    linear = np.full((200, 160), 0.4)
    span = sensor.white_level - synth.black_level_map(sensor, (0, 0), linear.shape)
    residual = (synth.simulate_raw(linear, sensor, defects) - synth.simulate_raw(linear, sensor)) / span
    np.testing.assert_allclose(np.ptp(residual, axis=1), 0.0, atol=1e-12)
    assert residual[:, 0].std() == pytest.approx(defects.row_noise, rel=0.25)
    # On packed planes: the two planes of a sensor row share its offset, the other row's planes do not.
    planes = synth.degrade_planes(np.full((4, 100, 80), 0.4, np.float32), sensor, defects, (0, 0), 2, np.random.default_rng(0))
    assert np.all(np.ptp(planes, axis=2) == 0)  # constant along each packed row
    np.testing.assert_array_equal(planes[0], planes[1])
    np.testing.assert_array_equal(planes[2], planes[3])
    assert not np.array_equal(planes[0], planes[2])
    assert (planes[0, :, 0] - 0.4).std() == pytest.approx(defects.row_noise, rel=0.3)


def test_read_noise_family_leaves_the_brooks_line():
    offsets = []
    for seed in range(60):
        _, defects = make_defects(seed=seed, include=("noise-read",))
        offsets.append(np.log(defects.read_noise) - (2.18 * np.log(defects.shot_noise) + 1.20))
    offsets = np.array(offsets)
    assert np.all(np.abs(offsets) <= np.log(10.0) + 1e-9)
    assert np.mean(np.abs(offsets) > 3 * 0.26) > 0.4  # the original scatter would almost never go this far


def test_held_out_families_never_in_training_draws_and_always_in_held_out_draws():
    sensor = synth.sample_sensor(np.random.default_rng(0))
    seen = set()
    for seed in range(300):
        defects = synth.sample_defects(np.random.default_rng(seed), (60, 80), sensor)
        seen.update(defects.families)
        assert defects.vignette_law != "poly" and defects.column_banding == 0.0
        assert not set(synth.HELD_OUT_FAMILIES) & set(defects.families)
    assert seen == set(synth.FAMILIES) - set(synth.HELD_OUT_FAMILIES)  # every other family does occur
    for seed in range(50):
        defects = synth.sample_defects(np.random.default_rng(seed), (60, 80), sensor, **synth.held_out_selection(True))
        assert defects.vignette_law == "poly" and defects.column_banding > 0
        assert set(synth.HELD_OUT_FAMILIES) <= set(defects.families)
    with pytest.raises(RcamError, match="unknown defect"):
        synth.sample_defects(np.random.default_rng(0), (60, 80), sensor, exclude=("vignette-bogus",))
    with pytest.raises(RcamError, match="both included and excluded"):
        synth.sample_defects(np.random.default_rng(0), (60, 80), sensor, include=("vignette-poly",))
    with pytest.raises(RcamError, match="at most one"):
        synth.sample_defects(np.random.default_rng(0), (60, 80), sensor, exclude=(), include=("vignette-poly", "vignette-cos4"))


@pytest.mark.parametrize("family", NEW_FAMILIES + ORIGINAL_FAMILIES)
def test_degrade_planes_agrees_with_simulate_raw_for_every_family(family):
    exclude = ["vignette-rational"] if family in synth.VIGNETTE_LAWS and family != "vignette-rational" else []
    sensor = synth.sample_sensor(np.random.default_rng(5), cfa="GRBG")
    defects = synth.sample_defects(np.random.default_rng(6), (192, 256), sensor, exclude=exclude, include=(family,))
    # The noise is random in both (checked separately): switch it off to compare the maps.
    defects.shot_noise = defects.read_noise = defects.row_noise = 0.0
    linear = np.random.default_rng(7).uniform(0.02, 0.9, (192, 256))
    clean = _packed_normalised(synth.quantize_raw(synth.simulate_raw(linear, sensor), sensor), sensor)
    degraded = _packed_normalised(synth.quantize_raw(synth.simulate_raw(linear, sensor, defects), sensor), sensor)
    rng = np.random.default_rng(0)
    crop = synth.degrade_planes(clean[:, 5:37, 7:47], sensor, defects, (10, 14), 2, rng)
    sample = synth.degrade_planes(clean[:, ::3, ::3], sensor, defects, (0, 0), 6, rng)
    for produced, expected in ((crop, degraded[:, 5:37, 7:47]), (sample, degraded[:, ::3, ::3])):
        assert np.abs(produced - expected).max() < 0.01
        assert abs(float((produced - expected).mean())) < 1e-3
    if family.startswith("banding"):
        # Banding is exact per row/column (not per 2x2 cell like the smooth maps): with and without it, the
        # two paths differ by the same offsets, up to the rounding of each (2 DN).
        plain = dataclasses.replace(defects, row_banding=0.0, column_banding=0.0)
        degraded_plain = _packed_normalised(synth.quantize_raw(synth.simulate_raw(linear, sensor, plain), sensor), sensor)
        crop_plain = synth.degrade_planes(clean[:, 5:37, 7:47], sensor, plain, (10, 14), 2, rng)
        expected_bands = (degraded - degraded_plain)[:, 5:37, 7:47]
        span = sensor.white_level - max(sensor.black_level)
        assert np.abs(expected_bands).max() > 5 / span
        assert np.abs((crop - crop_plain) - expected_bands).max() <= 2.01 / (span - 10)


def test_real_camera_matrices_are_invertible_and_normalised_like_the_mix():
    names = set()
    for seed in range(40):
        name, matrix = synth.real_camera_xyz_to_camera(np.random.default_rng(seed))
        names.add(name)
        original = synth.XYZ_TO_CAMERA_D65[name]
        assert not np.array_equal(matrix, original)
        assert np.abs(matrix - original).max() < 0.25 * np.abs(original).max()
        camera_from_srgb = synth.camera_from_linear_srgb(matrix)
        np.testing.assert_allclose(camera_from_srgb @ np.ones(3), np.ones(3))
        assert np.linalg.cond(camera_from_srgb) < 50
        np.testing.assert_allclose(np.linalg.inv(camera_from_srgb) @ camera_from_srgb, np.eye(3), atol=1e-9)
    assert len(names) >= 15 and len(synth.XYZ_TO_CAMERA_D65) >= 25
    _, params = synth.unprocess(smooth_photo(), np.random.default_rng(0), camera_share=1.0, wide_share=0.0)
    assert params.camera in synth.XYZ_TO_CAMERA_D65
    _, params = synth.unprocess(smooth_photo(), np.random.default_rng(0), camera_share=0.0, wide_share=0.0)
    assert params.camera == ""


def test_wide_exposure_and_white_balance():
    photo = smooth_photo()
    levels, reds, blues = [], [], []
    for seed in range(30):
        camera, params = synth.unprocess(photo, np.random.default_rng(seed), wide_share=1.0)
        assert params.wide
        levels.append(np.percentile(camera.max(axis=2), 99.5))
        reds.append(params.red_gain)
        blues.append(params.blue_gain)
    assert min(levels) >= 0.3 - 1e-3 and max(levels) <= 2.0 + 1e-3
    assert min(levels) < 0.6 and max(levels) > 1.5  # well outside Brooks et al.'s 0.85..1.3
    assert min(reds) < 1.7 and max(reds) > 2.5 and min(blues) < 1.5 and max(blues) > 2.2
    assert np.corrcoef(reds, blues)[0, 1] < -0.5  # tungsten to shade: red and blue gains move apart


def test_rcam_synth_held_out_makes_a_set_of_only_held_out_frames(tmp_path, run):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(smooth_photo(40, 56)).save(photos / "a.png")
    out = tmp_path / "val"
    code, stdout, _ = run("synth", photos, "--out-dir", out, "--variants", "2", "--seed", "3", "--held-out")
    assert code == 0 and "index.jsonl" in stdout
    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        defects = synth.DefectParams(**record["defects"])
        assert record["held_out"] is True and defects.vignette_law == "poly" and defects.column_banding > 0
    # The same folder without --held-out: the held-out pairs are not taken as finished training pairs.
    assert run("synth", photos, "--out-dir", out, "--variants", "2", "--seed", "3")[0] == 0
    records = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for record in records:
        defects = synth.DefectParams(**record["defects"])
        assert record["held_out"] is False and defects.vignette_law != "poly" and defects.column_banding == 0
