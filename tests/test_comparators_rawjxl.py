"""rawjxl (rcam.comparators.planes_jxl): rcam's own planes through JPEG XL, then LibRaw's render, and in `rcam eval`."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rcam.codec.rawio import network_input_and_white, read_raw, reference_render
from rcam.comparators import planes_jxl
from rcam.demo import sample_scene
from rcam.errors import RcamError
from rcam.measure.evaluate import format_table, run_eval
from rcam.measure.metrics import psnr


def test_planes_come_back_from_jpeg_xl_with_their_negative_values_and_green_difference():
    rng = np.random.default_rng(3)
    rows, cols = np.mgrid[0:48, 0:64] / 16.0
    base = 0.4 + 0.3 * np.sin(rows) * np.cos(cols)
    planes = np.stack([base - 0.45, base + 0.02, base - 0.02, base + 0.5]).astype(np.float32)  # red below 0, blue above 0.9
    planes += rng.normal(0, 0.002, planes.shape).astype(np.float32)
    fine = planes_jxl.decode_planes(*planes_jxl.encode_planes(planes, 0.25))
    assert fine.shape == planes.shape and fine.dtype == np.float32
    assert np.abs(fine - planes).mean() < 0.006  # about 1.5 levels of 255, most of it the added noise
    assert fine[0].min() < -0.02  # not clipped at 0
    assert np.mean(fine[1] - fine[2]) == pytest.approx(0.04, abs=0.004)  # the greens' difference survives
    coarse_streams = planes_jxl.encode_planes(planes, 4.0)
    assert sum(map(len, coarse_streams)) < sum(map(len, planes_jxl.encode_planes(planes, 0.25)))
    with pytest.raises(RcamError, match="packed planes"):
        planes_jxl.encode_planes(planes[:3], 1.0)


def test_libraw_renders_uncompressed_planes_as_the_file_itself(make_dng):
    path = make_dng("planes.dng", 96, 128, cfa="GBRG", orientation=6)
    image = read_raw(path)
    planes, white = network_input_and_white(image)
    crop = (slice(image.pad_top, image.pad_top + image.height), slice(image.pad_left, image.pad_left + image.width))
    rendered = planes_jxl.libraw_render(planes, image.cam_to_srgb, white, crop)
    reference = reference_render(path)
    assert rendered.shape == (96, 128, 3)  # sensor orientation, visible area
    assert psnr(np.rot90(reference, 1), rendered) > 45 or psnr(np.rot90(reference, -1), rendered) > 45


def test_a_round_trip_counts_every_stream_and_loses_more_at_larger_distances(make_dng):
    path = make_dng("trip.dng", 96, 128, orientation=6)
    reference = reference_render(path)
    sizes, scores = [], []
    for distance in (0.25, 4.0):
        size, decoded = planes_jxl.round_trip(path, distance)
        assert decoded.shape == reference.shape and decoded.dtype == np.uint8  # oriented as the reference
        planes, _ = network_input_and_white(read_raw(path))
        assert size == planes_jxl.SIDE_INFO_BYTES + sum(map(len, planes_jxl.encode_planes(planes, distance)))
        sizes.append(size)
        scores.append(psnr(reference, decoded))
    assert sizes[0] > sizes[1] and scores[0] > scores[1] and scores[0] > 38


def test_run_eval_sweeps_rawjxl_over_its_own_distances(tiny_codec, tmp_path):
    from rcam.codec.engine import decode_bytes, encode_file
    from rcam.codec.output import quantize

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(sample_scene(64, 80, seed=4)).save(photos / "p0.png")

    def rcam_codec(raw_path, lam):
        data = encode_file(tiny_codec, raw_path, lam, tone_fit=False).data
        return len(data), quantize(decode_bytes(tiny_codec, data), 8)

    lambdas = [0.005, 0.1]
    results = run_eval(
        photos, "S", lambdas, ["jpeg"], tmp_path / "out", rcam_codec, qualities={"jpeg": [30, 60, 90]},
        progress=False, speed=False, end_to_end=[planes_jxl.evaluation_comparator()],
    )  # fmt: skip
    rows = [row for row in results["points"] if row["codec"] == "rawjxl"]
    assert [row["param"] for row in rows] == list(planes_jxl.DISTANCES)
    assert [row["param"] for row in results["points"] if row["codec"] == "rcam"] == lambdas
    assert all(a["bpp"] > b["bpp"] for a, b in zip(rows, rows[1:]))  # larger distance, fewer bits
    assert set(results["bd"]["averaged"]) == {"jpeg", "rawjxl"}
    assert results["setup"]["end_to_end_params"] == {"rawjxl": "d"}
    table = format_table(results)
    assert any(line.startswith("rawjxl") and "d=0.25" in line for line in table.splitlines())
    assert any(line.startswith("rcam") and "λ=0.1" in line for line in table.splitlines())


def test_cli_eval_lists_rawjxl_and_measures_it_on_raw_files(run, tiny_model_path, make_dng, tmp_path):
    status, out, _ = run("eval", "--help")
    assert status == 0 and "rawjxl" in out
    raws = tmp_path / "raws"
    raws.mkdir()
    make_dng("a.dng", 64, 96, folder=raws)
    status, out, err = run(
        "eval", raws, "--protocol", "R", "--baselines", "jpeg,rawjxl", "--lambdas", "0.01", "--no-speed",
        "--model", tiny_model_path, "--out-dir", tmp_path / "out", "--device", "cpu",
    )  # fmt: skip
    assert status == 0, err
    assert sum(line.startswith("rawjxl") for line in out.splitlines()) >= len(planes_jxl.DISTANCES)
