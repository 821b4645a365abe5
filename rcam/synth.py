"""Synthetic RAW data: unprocess sRGB photos into Bayer DNGs with sensor/lens defects and a clean twin.

Follows Brooks et al., "Unprocessing Images for Learned Raw Denoising" (CVPR 2019): invert the tone curve
and gamma, go to camera space with a random real camera colour matrix, invert the white balance, then
mosaic. On top of that each sample gets position-dependent defects (vignetting, dark shading) and
shot + read noise; its clean twin is the same RAW without them, and the training target is LibRaw's
reference render of the clean twin (SPEC section 3).

Units: "linear" images are camera-space values where 1.0 is the sensor's white level (clipping point);
"DN" values are raw digital numbers including the black level.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from rcam.dng import BAYER_PATTERNS, write_bayer_dng
from rcam.errors import RcamError
from rcam.rawio import reference_render

# Published D65 ColorMatrix (XYZ -> camera) values of real cameras (Adobe DNG Converter / dcraw table, x1e4).
XYZ_TO_CAMERA_D65: dict[str, np.ndarray] = {
    name: np.array(values, dtype=np.float64).reshape(3, 3) / 10000.0
    for name, values in {
        "Canon EOS 5D Mark II": [4716, 603, -830, -7798, 15474, 2480, -1496, 1937, 6651],
        "Canon EOS 5D Mark III": [6722, -635, -963, -4287, 12460, 2028, -908, 2162, 5668],
        "Canon EOS 550D": [6941, -1164, -857, -3825, 11597, 2534, -416, 1540, 6039],
        "Nikon D3": [8139, -2171, -663, -8747, 16541, 2295, -1925, 2008, 8093],
        "Nikon D5100": [8198, -2239, -724, -4871, 12389, 2798, -1043, 2050, 7181],
        "Sony ILCE-7M2": [5271, -712, -347, -6153, 13653, 2763, -1601, 2366, 7242],
        "Sony ILCE-7M3": [7374, -2389, -551, -5435, 13162, 2519, -1006, 1795, 6552],
    }.items()
}

# Linear sRGB (D65) -> CIE XYZ, IEC 61966-2-1.
XYZ_FROM_LINEAR_SRGB = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


# ----------------------------------------------------------------------------------------------------
# Unprocessing (sRGB -> camera-linear)


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """Inverse sRGB transfer function: encoded values in [0, 1] -> linear light in [0, 1]."""
    srgb = np.asarray(srgb, dtype=np.float64)
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def inverse_smoothstep(y: np.ndarray) -> np.ndarray:
    """Inverse of the global tone curve 3x^2 - 2x^3 assumed by Brooks et al.; [0, 1] -> [0, 1]."""
    y = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
    return 0.5 - np.sin(np.arcsin(1.0 - 2.0 * y) / 3.0)


def random_xyz_to_camera(rng: np.random.Generator) -> np.ndarray:
    """A random convex combination of the published camera matrices: (3, 3) XYZ -> camera."""
    matrices = np.stack(list(XYZ_TO_CAMERA_D65.values()))
    weights = rng.uniform(1e-8, 1.0, size=len(matrices))
    weights /= weights.sum()
    return np.tensordot(weights, matrices, axes=1)


def camera_from_linear_srgb(xyz_to_camera: np.ndarray) -> np.ndarray:
    """(3, 3) linear sRGB -> camera matrix with rows summing to 1, as LibRaw derives it from ColorMatrix1.

    Row normalisation makes sRGB white map to camera (1, 1, 1); LibRaw inverts exactly this matrix, so
    the reference render of an unprocessed image gets the original colours back.
    """
    camera_from_srgb = np.asarray(xyz_to_camera, dtype=np.float64) @ XYZ_FROM_LINEAR_SRGB
    return camera_from_srgb / camera_from_srgb.sum(axis=1, keepdims=True)


@dataclass
class UnprocessParams:
    """How a photo was turned into camera-linear values."""

    xyz_to_camera: list[list[float]]  # (3, 3) D65 ColorMatrix1 written to the DNGs
    red_gain: float  # white-balance gains of the scene illuminant (camera WB multiplies by them)
    blue_gain: float
    exposure: float  # scale applied to the white-balanced linear image; values above 1 clip
    tone_curve: bool  # whether the smoothstep tone curve was inverted

    @property
    def as_shot_neutral(self) -> tuple[float, float, float]:
        """Camera response to the illuminant, (R, G, B) with G = 1 (DNG AsShotNeutral)."""
        return (1.0 / self.red_gain, 1.0, 1.0 / self.blue_gain)


def unprocess(
    srgb: np.ndarray, rng: np.random.Generator, *, tone_curve: bool = True
) -> tuple[np.ndarray, UnprocessParams]:
    """sRGB photo (H, W, 3) uint8 -> (camera-linear (H, W, 3) float32, 1.0 = white level; params).

    Values above 1 are highlights that the sensor will clip. Colour: random mix of real camera matrices;
    illuminant: red gain ~ U[1.9, 2.4], blue gain ~ U[1.5, 1.9] (Brooks et al.); exposure: random, set
    so the brightest ~0.5 % of pixels land around the clipping point (some clip, some do not).
    """
    srgb = np.asarray(srgb)
    if srgb.ndim != 3 or srgb.shape[2] != 3 or srgb.dtype != np.uint8:
        raise RcamError(f"unprocess expects an (H, W, 3) uint8 sRGB image, got {srgb.shape} {srgb.dtype}")
    encoded = srgb.astype(np.float64) / 255.0
    if tone_curve:
        encoded = inverse_smoothstep(encoded)
    linear = srgb_to_linear(encoded)

    xyz_to_camera = random_xyz_to_camera(rng)
    camera = linear @ camera_from_linear_srgb(xyz_to_camera).T
    red_gain = rng.uniform(1.9, 2.4)
    blue_gain = rng.uniform(1.5, 1.9)
    camera /= np.array([red_gain, 1.0, blue_gain])

    # Scale a high percentile of the brightest channel to U[0.85, 1.3] of white: exposures above 1 clip.
    bright = float(np.percentile(camera.max(axis=2), 99.5))
    exposure = float(min(rng.uniform(0.85, 1.3) / max(bright, 1e-3), 16.0))
    camera *= exposure

    params = UnprocessParams(
        xyz_to_camera=xyz_to_camera.tolist(),
        red_gain=float(red_gain),
        blue_gain=float(blue_gain),
        exposure=exposure,
        tone_curve=tone_curve,
    )
    return np.maximum(camera, 0.0).astype(np.float32), params


def cfa_channels(cfa: str) -> np.ndarray:
    """(2, 2) colour index (0 R, 1 G, 2 B) of each CFA position, row-major from the frame origin."""
    if cfa not in BAYER_PATTERNS:
        raise RcamError(f"unknown Bayer CFA {cfa!r}; expected one of {', '.join(BAYER_PATTERNS)}")
    return np.array(BAYER_PATTERNS[cfa]).reshape(2, 2)


def mosaic(camera_linear: np.ndarray, cfa: str) -> np.ndarray:
    """Sample an (H, W, 3) image through a Bayer CFA (RGGB/BGGR/GRBG/GBRG) -> (H, W), same dtype."""
    channels = cfa_channels(cfa)
    out = np.empty(camera_linear.shape[:2], dtype=camera_linear.dtype)
    for dy in range(2):
        for dx in range(2):
            out[dy::2, dx::2] = camera_linear[dy::2, dx::2, channels[dy, dx]]
    return out


# ----------------------------------------------------------------------------------------------------
# Sensor (levels) and defects


@dataclass
class SensorParams:
    """Raw encoding shared by a degraded sample and its clean twin."""

    cfa: str
    bits: int
    black_level: list[int]  # per 2x2 CFA position, row-major from the frame origin (DN)
    white_level: int  # DN; 2**bits - 1


def sample_sensor(rng: np.random.Generator, cfa: str | None = None) -> SensorParams:
    """Random CFA phase, bit depth 10..14, black about 2**(bits-4) (sometimes per-position), white 2**bits-1."""
    cfa = cfa if cfa is not None else str(rng.choice(list(BAYER_PATTERNS)))
    cfa_channels(cfa)  # validates
    bits = int(rng.integers(10, 15))
    base = 2 ** (bits - 4)
    black = int(round(base * rng.uniform(0.8, 1.25)))
    if rng.random() < 0.5:
        # Per-readout-channel offsets of a few DN, as real sensors have.
        spread = max(1, 2 ** (bits - 11))
        levels = [black + int(v) for v in rng.integers(-2 * spread, 2 * spread + 1, size=4)]
    else:
        levels = [black] * 4
    return SensorParams(cfa=cfa, bits=bits, black_level=levels, white_level=2**bits - 1)


@dataclass
class DefectParams:
    """Position-dependent lens/sensor defects of one synthetic frame (absolute frame coordinates)."""

    frame_shape: tuple[int, int]  # (H, W) of the full sensor frame these maps are defined on
    vignette_center: tuple[float, float]  # (row, col) in pixels; off the frame centre
    vignette_strength: float  # gain = 1 / (1 + strength * r^2)^2, r = distance / half-diagonal
    shading_amplitude: float  # DN at the far corners (dark shading / amp glow)
    shading_gradient: tuple[float, float]  # DN per unit normalised (row, col) position
    shading_waves: list[tuple[float, float, float, float]]  # (amplitude DN, freq row, freq col, phase)
    shading_channel_scale: list[float]  # per 2x2 CFA position, row-major from the frame origin
    shot_noise: float  # variance per unit signal (signal normalised so 1 = white - black)
    read_noise: float  # signal-independent variance (same normalisation)
    noise_seed: int


def sample_defects(rng: np.random.Generator, frame_shape: tuple[int, int], sensor: SensorParams) -> DefectParams:
    """Random vignetting, dark shading and Brooks-style shot/read noise for a frame of (H, W) pixels."""
    height, width = frame_shape
    center = (
        height / 2 + rng.uniform(-0.1, 0.1) * height,
        width / 2 + rng.uniform(-0.1, 0.1) * width,
    )
    span = sensor.white_level - max(sensor.black_level)
    # Dark shading: up to ~2 % of the signal range at the corners, so it shows in the shadows.
    corner = span * float(np.exp(rng.uniform(np.log(0.002), np.log(0.02))))
    gradient = (float(rng.uniform(-0.3, 0.3) * corner), float(rng.uniform(-0.3, 0.3) * corner))
    waves = [
        (float(rng.uniform(0.0, 0.15) * corner), float(rng.uniform(0.3, 2.0)), float(rng.uniform(0.3, 2.0)),
         float(rng.uniform(0, 2 * np.pi)))
        for _ in range(2)
    ]
    # Brooks et al.: log-uniform shot noise, read noise on a line in log space with Gaussian scatter.
    log_shot = rng.uniform(np.log(1e-4), np.log(1.2e-2))
    log_read = 2.18 * log_shot + 1.20 + rng.normal(0.0, 0.26)
    return DefectParams(
        frame_shape=(int(height), int(width)),
        vignette_center=(float(center[0]), float(center[1])),
        vignette_strength=float(rng.uniform(0.2, 1.0)),
        shading_amplitude=corner,
        shading_gradient=gradient,
        shading_waves=waves,
        shading_channel_scale=[float(v) for v in rng.uniform(0.7, 1.3, size=4)],
        shot_noise=float(np.exp(log_shot)),
        read_noise=float(np.exp(log_read)),
        noise_seed=int(rng.integers(0, 2**63 - 1)),
    )


def _absolute_grid(offset: tuple[int, int], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Absolute (row, col) pixel coordinates of a crop, as (h, 1) and (1, w) arrays."""
    rows = np.arange(offset[0], offset[0] + shape[0], dtype=np.float64)[:, None]
    cols = np.arange(offset[1], offset[1] + shape[1], dtype=np.float64)[None, :]
    return rows, cols


def vignetting_gain(
    defects: DefectParams, offset: tuple[int, int] = (0, 0), shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Multiplicative lens falloff (h, w) in (0, 1] for the crop at absolute `offset` of the frame."""
    shape = defects.frame_shape if shape is None else shape
    return vignetting_at(defects, *_absolute_grid(offset, shape))


def vignetting_at(defects: DefectParams, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Lens falloff at absolute sensor pixel positions (broadcastable row and column arrays)."""
    half_diagonal = 0.5 * math.hypot(*defects.frame_shape)
    r2 = ((rows + 0.5 - defects.vignette_center[0]) ** 2 + (cols + 0.5 - defects.vignette_center[1]) ** 2) / (
        half_diagonal**2
    )
    return 1.0 / (1.0 + defects.vignette_strength * r2) ** 2


def _shading_field(defects: DefectParams, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Unscaled dark-shading field (DN) at normalised positions v (rows), u (cols) in [-0.5, 0.5]."""
    corner_r4 = ((u**2 + v**2) / 0.5) ** 2  # 0 at the centre, 1 at the corners
    field = defects.shading_amplitude * corner_r4
    field = field + defects.shading_gradient[0] * v + defects.shading_gradient[1] * u
    for amplitude, freq_row, freq_col, phase in defects.shading_waves:
        field = field + amplitude * np.cos(2 * np.pi * (freq_row * v + freq_col * u) + phase)
    return field


def dark_shading(
    defects: DefectParams, offset: tuple[int, int] = (0, 0), shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Additive fixed-pattern offset (h, w) in DN above black for the crop at absolute `offset`.

    Low-frequency: strongest in the corners (r^4 glow), plus a tilt and two slow waves; each CFA position
    (absolute row/col parity) has its own scale. Never negative.
    """
    shape = defects.frame_shape if shape is None else shape
    return dark_shading_at(defects, *_absolute_grid(offset, shape))


def dark_shading_at(defects: DefectParams, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Dark shading (DN) at absolute sensor pixel positions (integer, broadcastable row and column arrays)."""
    scale = np.asarray(defects.shading_channel_scale).reshape(2, 2)
    return _lifted_shading(defects, rows, cols) * scale[rows.astype(np.int64) % 2, cols.astype(np.int64) % 2]


def _lifted_shading(defects: DefectParams, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The shading field (DN) before its per-CFA-position scale, at (possibly fractional) pixel positions."""
    height, width = defects.frame_shape
    field = _shading_field(defects, (rows + 0.5) / height - 0.5, (cols + 0.5) / width - 0.5)
    # Shading only adds charge: lift by the minimum over the whole frame (coarse grid; the field is smooth),
    # which depends on the frame, not on the crop.
    coarse_v = np.linspace(-0.5, 0.5, 65)[:, None]
    coarse_u = np.linspace(-0.5, 0.5, 65)[None, :]
    return np.maximum(field - _shading_field(defects, coarse_v, coarse_u).min(), 0.0)


def standard_normal_field(
    defects: DefectParams, offset: tuple[int, int] = (0, 0), shape: tuple[int, int] | None = None
) -> np.ndarray:
    """The frame's fixed N(0, 1) draw (h, w), seeded by defects.noise_seed, cropped at absolute `offset`."""
    shape = defects.frame_shape if shape is None else shape
    field = np.random.default_rng(defects.noise_seed).standard_normal(defects.frame_shape)
    return field[offset[0] : offset[0] + shape[0], offset[1] : offset[1] + shape[1]]


def noise_std(signal: np.ndarray, defects: DefectParams) -> np.ndarray:
    """Heteroscedastic noise std (normalised units, 1 = white - black) for a linear signal of the same shape."""
    return np.sqrt(defects.shot_noise * np.maximum(signal, 0.0) + defects.read_noise)


def black_level_map(sensor: SensorParams, offset: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Black level (h, w) in DN of each pixel of the crop at absolute `offset`."""
    levels = np.asarray(sensor.black_level, dtype=np.float64).reshape(2, 2)
    row_parity = (np.arange(offset[0], offset[0] + shape[0]) % 2)[:, None]
    col_parity = (np.arange(offset[1], offset[1] + shape[1]) % 2)[None, :]
    return levels[row_parity, col_parity]


def simulate_raw(
    mosaic_linear: np.ndarray,
    sensor: SensorParams,
    defects: DefectParams | None = None,
    offset: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Linear mosaic (h, w) (1 = white) -> raw DN (h, w) float64, before rounding and clipping.

    Without defects this is the clean twin: black + signal * (white - black). With defects the signal is
    vignetted, gets shot + read noise, and dark shading is added, all at absolute frame position `offset`.
    """
    shape = mosaic_linear.shape
    black = black_level_map(sensor, offset, shape)
    span = sensor.white_level - black
    signal = np.asarray(mosaic_linear, dtype=np.float64)
    if defects is None:
        return black + span * signal
    # Sensor clipping (full well) happens to the light that arrives, before read-out noise and offsets.
    signal = np.minimum(signal * vignetting_gain(defects, offset, shape), 1.0)
    noise = noise_std(signal, defects) * standard_normal_field(defects, offset, shape)
    return black + span * (signal + noise) + dark_shading(defects, offset, shape)


def quantize_raw(raw_dn: np.ndarray, sensor: SensorParams) -> np.ndarray:
    """Round raw DN to integers and clip to the ADC range [0, white level] -> uint16."""
    return np.clip(np.rint(raw_dn), 0, sensor.white_level).astype(np.uint16)


def degrade_planes(
    clean: np.ndarray, sensor: SensorParams, defects: DefectParams, first: tuple[int, int], step: int,
    rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """Packed clean raw planes (4, h, w), normalised (0 = black, 1 = white) -> the same with `defects`, freshly drawn noise.

    What simulate_raw + quantize_raw + read_raw would give, computed on packed planes so that training can
    draw new defects for every crop: packed pixel (i, j) of plane c = (dy, dx) sits at absolute sensor
    position (first[0] + step·i + dy, first[1] + step·j + dx) (step 2 for a crop, 2k for a k-strided sample).
    Where the clean twin is clipped the light beyond white is unknown; such pixels stay clipped (highlights
    are usually far over), where a DNG from rcam synth, which knows the light, may dim them below white.
    """
    height, width = clean.shape[1:]
    # Vignetting and shading are smooth: evaluated once per 2x2 cell, at its centre, for all four planes.
    rows = (first[0] + 0.5 + step * np.arange(height))[:, None]
    cols = (first[1] + 0.5 + step * np.arange(width))[None, :]
    vignetting = vignetting_at(defects, rows, cols).astype(np.float32)
    shading = _lifted_shading(defects, rows, cols).astype(np.float32)
    scale = np.asarray(defects.shading_channel_scale).reshape(2, 2)
    planes = np.empty(clean.shape, dtype=np.float32)
    for plane in range(4):
        dy, dx = divmod(plane, 2)
        position = (first[0] + dy, first[1] + dx)
        black = float(black_level_map(sensor, position, (1, 1))[0, 0])
        span = sensor.white_level - black
        signal = np.asarray(clean[plane], dtype=np.float32)
        signal = np.where(signal >= 1.0, np.float32(1.0), np.minimum(signal * vignetting, np.float32(1.0)))
        noise = noise_std(signal, defects).astype(np.float32) * rng.standard_normal(signal.shape, dtype=np.float32)
        raw_dn = black + span * (signal + noise) + shading * scale[position[0] % 2, position[1] % 2]
        planes[plane] = (np.clip(np.rint(raw_dn), 0, sensor.white_level) - black) / span
    return planes


# ----------------------------------------------------------------------------------------------------
# Files: photo -> (degraded DNG, clean DNG, target PNG)


class PairFiles(NamedTuple):
    """Paths of one synthetic training / evaluation sample."""

    degraded: Path  # Bayer DNG with vignetting, dark shading and noise
    clean: Path  # its defect-free twin
    target: Path  # PNG: the reference render of the clean twin


def load_photo(path, max_side: int | None = None) -> np.ndarray:
    """Read a photo as (H, W, 3) uint8 sRGB, upright (EXIF orientation applied), longest side <= max_side."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError) as error:
        raise RcamError(f"{path}: cannot read photo ({error})") from error
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _jsonable(value):
    """Dataclass / numpy values -> plain JSON types."""
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _write_pair(
    srgb: np.ndarray, out_dir: Path, rng: np.random.Generator, name: str, orientation: int, tone_curve: bool
) -> tuple[PairFiles, dict]:
    """Synthesize one sample from an sRGB image and write its three files; returns them and the parameters."""
    camera_linear, unprocess_params = unprocess(srgb, rng, tone_curve=tone_curve)
    frame_shape = camera_linear.shape[:2]
    sensor = sample_sensor(rng)
    defects = sample_defects(rng, frame_shape, sensor)
    mosaic_linear = mosaic(camera_linear, sensor.cfa)
    clean = quantize_raw(simulate_raw(mosaic_linear, sensor), sensor)
    degraded = quantize_raw(simulate_raw(mosaic_linear, sensor, defects), sensor)

    files = PairFiles(
        out_dir / f"{name}_degraded.dng", out_dir / f"{name}_clean.dng", out_dir / f"{name}_target.png"
    )
    dng_tags = dict(
        cfa=sensor.cfa,
        black_level=sensor.black_level,
        white_level=sensor.white_level,
        as_shot_neutral=unprocess_params.as_shot_neutral,
        xyz_to_camera=np.asarray(unprocess_params.xyz_to_camera),
        orientation=orientation,
    )
    # Write under temporary names and rename, so an interrupted run never leaves a file that looks finished.
    for final, raw in ((files.degraded, degraded), (files.clean, clean)):
        partial = final.with_name(final.name + ".part")
        write_bayer_dng(partial, raw, **dng_tags)
        os.replace(partial, final)
    target = reference_render(files.clean)
    partial = files.target.with_name(files.target.name + ".part")
    Image.fromarray(target).save(partial, format="PNG")
    os.replace(partial, files.target)

    params = {
        "frame_shape": list(frame_shape),
        "orientation": orientation,
        "sensor": asdict(sensor),
        "defects": asdict(defects),
        "unprocess": asdict(unprocess_params),
        "as_shot_neutral": list(unprocess_params.as_shot_neutral),
    }
    return files, _jsonable(params)


def make_pair(
    photo_path,
    out_dir,
    rng: np.random.Generator,
    name: str,
    *,
    orientation: int = 1,
    max_side: int | None = None,
    tone_curve: bool = True,
) -> PairFiles:
    """Photo -> (degraded DNG, clean-twin DNG, target PNG = reference render of the clean twin) in out_dir.

    Files: {name}_degraded.dng, {name}_clean.dng, {name}_target.png. orientation (EXIF 1..8) is only
    written to the DNG tags; the mosaic stays in sensor orientation and LibRaw rotates the render.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, _ = _write_pair(load_photo(photo_path, max_side), out_dir, rng, name, orientation, tone_curve)
    return files


def list_photos(photo_dirs: Iterable) -> list[Path]:
    """Photo files directly inside each directory, sorted (JPEG, PNG, TIFF, BMP, WebP)."""
    photos: list[Path] = []
    for directory in photo_dirs:
        directory = Path(directory)
        if not directory.is_dir():
            raise RcamError(f"{directory}: not a directory of photos")
        photos += sorted(p for p in directory.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
    return photos


def _read_index(index_path: Path) -> dict[str, dict]:
    """Records of an existing index by name; a torn last line (interrupted run) is ignored."""
    records: dict[str, dict] = {}
    if index_path.exists():
        for line in index_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("name"), str):
                records[record["name"]] = record
    return records


def build_dataset(
    photo_dirs: Sequence,
    out_dir,
    variants_per_photo: int,
    seed: int,
    max_side: int | None = None,
    *,
    tone_curve: bool = True,
) -> Path:
    """Synthesize variants_per_photo pairs per photo into out_dir; resumable; returns index.jsonl's path.

    Each pair's randomness depends only on (seed, pair name), so a resumed run makes the same data.
    Index lines (JSON): name, photo, seed, degraded, clean, target (file names in out_dir) and all parameters.
    """
    if variants_per_photo < 1:
        raise RcamError(f"variants_per_photo must be at least 1, got {variants_per_photo}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.jsonl"
    # Keep the finished pairs made with these settings; rewrite the index with only those, so it never
    # lists a name twice or a pair whose files are gone.
    done = {
        name: record
        for name, record in _read_index(index_path).items()
        if record.get("seed") == seed
        and record.get("unprocess", {}).get("tone_curve") == tone_curve
        and all(isinstance(record.get(key), str) and (out_dir / record[key]).exists() for key in PairFiles._fields)
    }
    partial_index = index_path.with_name(index_path.name + ".part")
    partial_index.write_text("".join(json.dumps(record) + "\n" for record in done.values()))
    os.replace(partial_index, index_path)

    photos = list_photos(photo_dirs)
    jobs = [
        (photo, f"{photo.parent.name}_{photo.stem}_v{variant}")
        for photo in photos
        for variant in range(variants_per_photo)
    ]
    with open(index_path, "a") as index, tqdm(jobs, desc="synthesizing", unit="pair") as progress:
        for photo, name in progress:
            if name in done:
                continue
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            files, params = _write_pair(load_photo(photo, max_side), out_dir, rng, name, 1, tone_curve)
            record = {"name": name, "photo": str(photo), "seed": seed}
            record |= {key: path.name for key, path in files._asdict().items()}
            record |= params
            index.write(json.dumps(record) + "\n")
            index.flush()
    return index_path
