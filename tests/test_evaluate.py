"""Tests for the cascades (rcam.comparators.baselines) and the `rcam eval` engine (rcam.measure.evaluate) on tiny data."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcam.comparators import baselines
from rcam.errors import RcamError
from rcam.measure.evaluate import format_table, run_eval

# Fake RAW files hold an .npy image; the fake render just loads it. The fake rcam codec is JPEG at the
# baseline's own settings with 10 % fewer bytes, so its BD-rate against the JPEG baseline is exactly -10 %.
LAMBDAS = [0.005, 0.01, 0.025]
LAMBDA_TO_QUALITY = {0.005: 30, 0.01: 50, 0.025: 70}
QUALITIES = {"jpeg": [30, 50, 70], "webp": [30, 60, 90], "jpegxl": [30, 60, 90], "avif": [20, 45, 70]}


def _natural_image(height: int, width: int, seed: int) -> np.ndarray:
    """(H,W,3) uint8 test image with smooth gradients, edges and mild noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], axis=-1) * 80 + 128
    base[height // 3 : height // 2, width // 4 : width // 2] += 60  # a sharp-edged block
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def _fake_render(path: Path) -> np.ndarray:
    with open(path, "rb") as handle:
        return np.load(handle)


def _fake_codec(raw_path: Path, lam: float) -> tuple[int, np.ndarray]:
    point = baselines.encode_decode("jpeg", _fake_render(raw_path), LAMBDA_TO_QUALITY[lam])
    return round(point.num_bytes * 0.9), point.decoded


def _fake_timer(raw_path: Path, lam: float) -> tuple[float, float]:
    return 0.2, 0.1


def _write_fake_raws(folder: Path, count: int, shape=(48, 64)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"img{index}.dng"
        with open(path, "wb") as handle:
            np.save(handle, _natural_image(*shape, seed=index))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------ baselines


@pytest.mark.parametrize("name", sorted(baselines.BASELINES))
def test_baseline_sweep_bytes_grow_with_quality(name):
    img = _natural_image(40, 56, seed=3)
    points = baselines.sweep(name, img)
    sizes = [point.num_bytes for point in points]
    assert [point.quality for point in points] == sorted(baselines.BASELINES[name].qualities)
    assert all(later >= earlier for earlier, later in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] > sizes[0]
    for point in points:
        assert point.decoded.shape == img.shape and point.decoded.dtype == np.uint8
        assert point.bpp == pytest.approx(8 * point.num_bytes / (40 * 56))


def test_baseline_errors():
    with pytest.raises(RcamError, match="unknown baseline"):
        baselines.get_baseline("bmp")
    with pytest.raises(RcamError):
        baselines.encode_decode("jpeg", np.zeros((8, 8), np.uint8), 50)


def test_time_cascade(tmp_path):
    (raw,) = _write_fake_raws(tmp_path, 1)
    timing = baselines.time_cascade(raw, _fake_render)
    assert timing["megapixels"] == pytest.approx(48 * 64 / 1e6)
    assert timing["total_s"] == pytest.approx(timing["render_s"] + timing["encode_s"])
    assert timing["num_bytes"] > 0 and timing["s_per_mp"] > 0


# ------------------------------------------------------------------------------------------- run_eval


def test_run_eval_protocol_r_smoke(tmp_path, capsys):
    _write_fake_raws(tmp_path / "raws", 2)
    out = tmp_path / "out"
    results = run_eval(
        tmp_path / "raws", "R", LAMBDAS, ["jpeg", "webp", "jpegxl", "avif"], out, _fake_codec, _fake_timer,
        render=_fake_render, qualities=QUALITIES, progress=False,
    )
    for name in ("results.json", "points.csv", "curves.csv", "bd.csv", "speed.csv", "rd.png"):
        assert (out / name).is_file(), name
    assert Image.open(out / "rd.png").size[0] > 500
    saved = json.loads((out / "results.json").read_text())
    assert saved["setup"]["images"] == 2
    assert len(saved["points"]) == 2 * (3 + 4 * 3)
    with open(out / "points.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * (3 + 4 * 3)

    # rcam = JPEG at 0.9× bytes: exactly -10 % against JPEG, same quality at equal quality settings.
    jpeg_bd = results["bd"]["averaged"]["jpeg"]
    for metric in ("psnr", "ms_ssim_db", "ciede2000"):
        assert jpeg_bd[metric]["bd_rate_pct"] == pytest.approx(-10.0, abs=0.05)  # bytes are rounded
    assert jpeg_bd["psnr"]["bd_metric"] > 0
    assert jpeg_bd["ciede2000"]["bd_metric"] < 0
    summary = results["bd"]["per_image_summary"]["jpeg"]["psnr"]
    assert summary["images"] == 2 and summary["bd_rate_pct_median"] == pytest.approx(-10.0, abs=0.05)

    rcam_curve = results["curves"]["rcam"]
    assert [point["param"] for point in rcam_curve] == LAMBDAS
    assert all(math.isfinite(point["psnr"]) for point in rcam_curve)

    speed = results["speed"]
    assert speed["encode_s_per_mp"] == pytest.approx(0.2 / (48 * 64 / 1e6))
    assert speed["decode_s_per_mp"] == pytest.approx(0.1 / (48 * 64 / 1e6))
    assert speed["cascade_s_per_mp"] > 0 and speed["peak_rss_self_mib"] > 0

    table = format_table(results)
    assert "jpeg" in table and "BDR-PSNR" in table and "LPIPS" in table and "cascade" in table
    assert " -10.0" in table

    # A second run takes every baseline point from the cache and gives the same numbers.
    again = run_eval(
        tmp_path / "raws", "R", LAMBDAS, ["jpeg", "webp", "jpegxl", "avif"], out, _fake_codec,
        render=_fake_render, qualities=QUALITIES, progress=False, speed=False,
    )
    assert again["setup"]["baseline_cache_hits"] == 2 * 4 * 3
    assert again["curves"] == results["curves"]
    assert again["speed"] is None


def test_run_eval_protocol_s_with_fake_synthesis(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(2):
        Image.fromarray(_natural_image(40, 52, seed=10 + index)).save(photos / f"p{index}.png")

    def fake_make_pair(photo, out_dir, rng, name):
        clean = np.asarray(Image.open(photo).convert("RGB"))
        noisy = np.clip(clean.astype(int) + rng.integers(-6, 7, clean.shape), 0, 255).astype(np.uint8)
        degraded, clean_dng = out_dir / f"{name}_degraded.dng", out_dir / f"{name}_clean.dng"
        target = out_dir / f"{name}_target.png"
        for path, img in ((degraded, noisy), (clean_dng, clean)):
            with open(path, "wb") as handle:
                np.save(handle, img)
        Image.fromarray(clean).save(target)
        return degraded, clean_dng, target

    results = run_eval(
        photos, "S", LAMBDAS, ["jpeg"], tmp_path / "out", _fake_codec, render=_fake_render,
        make_pair=fake_make_pair, qualities={"jpeg": [30, 50, 70]}, progress=False, speed=False,
    )
    assert [image["image"] for image in results["images"]] == ["p0", "p1"]
    assert all(image["codec_input"].endswith("_degraded.dng") for image in results["images"])
    assert (tmp_path / "out" / "synth" / "p0_target.png").is_file()
    # Both compress the degraded render against the clean target, so the -10 % relation still holds.
    assert results["bd"]["averaged"]["jpeg"]["psnr"]["bd_rate_pct"] == pytest.approx(-10.0, abs=0.05)


def test_run_eval_real_dng_through_rawio(tmp_path):
    from rcam.codec.rawio import reference_render
    from rcam.training.dng import write_bayer_dng

    raws = tmp_path / "raws"
    raws.mkdir()
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:96]
    mosaic = (2000 + 30 * x + 20 * y + rng.normal(0, 40, (64, 96))).clip(0, 65535).astype(np.uint16)
    write_bayer_dng(raws / "tiny.dng", mosaic, cfa="RGGB", white_level=16383 * 4)

    def codec(raw_path, lam):
        point = baselines.encode_decode("jpeg", reference_render(raw_path), LAMBDA_TO_QUALITY[lam])
        return point.num_bytes, point.decoded

    results = run_eval(
        raws, "R", LAMBDAS, ["jpeg"], tmp_path / "out", codec, qualities={"jpeg": [30, 50, 70]}, progress=False,
    )
    assert results["bd"]["averaged"]["jpeg"]["psnr"]["bd_rate_pct"] == pytest.approx(0.0, abs=1e-6)
    assert results["speed"]["cascade_render_s_per_mp"] > 0


def test_run_eval_errors(tmp_path):
    _write_fake_raws(tmp_path / "raws", 1)
    common = {"render": _fake_render, "progress": False, "speed": False}
    with pytest.raises(RcamError, match="protocol"):
        run_eval(tmp_path / "raws", "X", LAMBDAS, ["jpeg"], tmp_path / "out", _fake_codec, **common)
    with pytest.raises(RcamError, match="no RAW files"):
        (tmp_path / "empty").mkdir()
        run_eval(tmp_path / "empty", "R", LAMBDAS, ["jpeg"], tmp_path / "out", _fake_codec, **common)
    with pytest.raises(RcamError, match="unknown baseline"):
        run_eval(tmp_path / "raws", "R", LAMBDAS, ["gif"], tmp_path / "out", _fake_codec, **common)

    def cropping_codec(raw_path, lam):
        num_bytes, decoded = _fake_codec(raw_path, lam)
        return num_bytes, decoded[:-2]

    with pytest.raises(RcamError, match="decoded to"):
        run_eval(tmp_path / "raws", "R", LAMBDAS, ["jpeg"], tmp_path / "out", cropping_codec, **common)
    assert not (tmp_path / "out" / "results.json").exists()


def test_command_timer_runs_whole_commands(tmp_path):
    import sys

    from rcam.measure.evaluate import make_command_timer, timed_command

    # A stand-in for the rcam CLI: writes the file named after -o, fails on a 'bad' input.
    fake_cli = tmp_path / "fake_rcam.py"
    fake_cli.write_text(
        "import sys\n"
        "args = sys.argv[1:]\n"
        "if 'bad' in args[1]:\n"
        "    sys.exit('rcam: ' + args[1] + ': not a RAW file')\n"
        "open(args[args.index('-o') + 1], 'wb').write(b'x' * 100)\n"
    )
    timer = make_command_timer([sys.executable, fake_cli], ["--device", "cpu"])
    timing = timer(tmp_path / "photo.dng", 0.01)
    assert timing["encode_s"] > 0 and timing["decode_s"] > 0
    assert timing["encode_peak_mib"] > 1 and timing["decode_peak_mib"] > 1
    with pytest.raises(RcamError, match="not a RAW file"):
        timer(tmp_path / "bad.dng", 0.01)
    seconds, peak = timed_command([sys.executable, "-c", "pass"])
    assert seconds > 0 and peak > 1
