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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from rcam.codec.rawio import reference_render
from rcam.errors import RcamError
from rcam.training.dng import BAYER_PATTERNS, write_bayer_dng

# Published D65 ColorMatrix (XYZ -> camera) values of real cameras (Adobe DNG Converter values as listed in
# dcraw's / LibRaw's adobe_coeff table, x1e4). The first seven are the ones the convex mix draws from (the
# original family); the rest widen the single-camera family to 28 sensors of eight makers.
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
        "Canon EOS 6D": [7034, -804, -1014, -4420, 12564, 2058, -851, 1994, 5758],
        "Canon EOS 7D": [6844, -996, -856, -3876, 11761, 2396, -593, 1772, 6198],
        "Canon EOS 80D": [7457, -671, -937, -4849, 12495, 2643, -1213, 2354, 5492],
        "Canon PowerShot G12": [13244, -5501, -1248, -1508, 9858, 1935, -270, 1083, 4366],
        "Nikon D90": [7309, -1403, -519, -8474, 16008, 2622, -2434, 2826, 8064],
        "Nikon D500": [8813, -3210, -1036, -4703, 12868, 2021, -1054, 1940, 6129],
        "Nikon D750": [9020, -2890, -715, -4535, 12436, 2348, -934, 1919, 7086],
        "Nikon D810": [9369, -3195, -791, -4488, 12430, 2301, -893, 1796, 6872],
        "Sony DSLR-A900": [5209, -1072, -397, -8845, 16120, 2919, -1618, 1803, 8654],
        "Sony DSC-RX100": [8651, -2754, -1057, -3464, 12207, 1373, -568, 1398, 4434],
        "Sony ILCE-6300": [5973, -1695, -419, -3826, 11797, 2293, -639, 1398, 5789],
        "Sony ILCE-7RM2": [6629, -1900, -483, -4618, 12349, 2550, -622, 1381, 6514],
        "Fujifilm X100": [12161, -4457, -1069, -5034, 12874, 2400, -795, 1724, 6904],
        "Fujifilm X-A2": [10763, -4560, -917, -3346, 11311, 2322, -475, 1135, 5843],
        "Olympus E-M1": [7687, -1984, -606, -4327, 11928, 2721, -1381, 2339, 6452],
        "Olympus E-M5MarkII": [9422, -3258, -711, -2655, 10898, 2015, -512, 1354, 5512],
        "Pentax K-3": [7415, -2052, -721, -5186, 12788, 2682, -1446, 2157, 6773],
        "Pentax K-5": [8713, -2833, -743, -4342, 11900, 2772, -722, 1543, 6247],
        "Panasonic DMC-LX100": [8844, -3538, -768, -3709, 11762, 2200, -698, 1792, 5220],
        "Panasonic DMC-FZ1000": [7830, -2696, -763, -3325, 11667, 1866, -641, 1712, 4824],
        "Samsung NX1": [10686, -4042, -1052, -3595, 13238, 276, -464, 1259, 5931],
    }.items()
}
MIX_CAMERAS = tuple(XYZ_TO_CAMERA_D65)[:7]  # the convex-mix family's cameras

# Share of frames whose colour matrix is one real camera's (perturbed) instead of a convex mix: a mix of
# seven matrices averages their differences away, so the mixes span far less than real cameras do.
CAMERA_SHARE = 0.5
# Share of frames with the wide exposure and white-balance ranges instead of Brooks et al.'s.
WIDE_SHARE = 0.5

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
    """A random convex combination of the mix family's camera matrices: (3, 3) XYZ -> camera."""
    matrices = np.stack([XYZ_TO_CAMERA_D65[name] for name in MIX_CAMERAS])
    weights = rng.uniform(1e-8, 1.0, size=len(matrices))
    weights /= weights.sum()
    return np.tensordot(weights, matrices, axes=1)


def real_camera_xyz_to_camera(rng: np.random.Generator, perturbation: float = 0.03) -> tuple[str, np.ndarray]:
    """One real camera's matrix, perturbed: (its name, (3, 3) XYZ -> camera).

    The perturbation M (I + e E), E ~ N(0, 1) per entry, mixes the camera channels a little, as another copy
    or firmware of the sensor would; e = 0.03. Redrawn while the result is ill-conditioned or a channel's
    white response (the row sum LibRaw normalises by) falls below half of the camera's own.
    """
    names = list(XYZ_TO_CAMERA_D65)
    name = names[int(rng.integers(len(names)))]
    matrix = XYZ_TO_CAMERA_D65[name]
    white = matrix @ XYZ_FROM_LINEAR_SRGB @ np.ones(3)
    for _ in range(100):
        perturbed = matrix @ (np.eye(3) + perturbation * rng.standard_normal((3, 3)))
        if np.linalg.cond(perturbed) < 4 * np.linalg.cond(matrix) and np.all(
            perturbed @ XYZ_FROM_LINEAR_SRGB @ np.ones(3) > 0.5 * white
        ):
            return name, perturbed
    return name, matrix.copy()


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
    camera: str = ""  # the real camera whose (perturbed) matrix this is; "" for a convex mix
    wide: bool = False  # exposure and white balance from the wide ranges

    @property
    def as_shot_neutral(self) -> tuple[float, float, float]:
        """Camera response to the illuminant, (R, G, B) with G = 1 (DNG AsShotNeutral)."""
        return (1.0 / self.red_gain, 1.0, 1.0 / self.blue_gain)


def unprocess(
    srgb: np.ndarray, rng: np.random.Generator, *, tone_curve: bool = True, camera_share: float = CAMERA_SHARE,
    wide_share: float = WIDE_SHARE,
) -> tuple[np.ndarray, UnprocessParams]:  # fmt: skip
    """sRGB photo (H, W, 3) uint8 -> (camera-linear (H, W, 3) float32, 1.0 = white level; params).

    Values above 1 are highlights that the sensor will clip. Colour: a random mix of real camera matrices, or
    for a camera_share of frames one real camera's matrix, perturbed (real_camera_xyz_to_camera).
    Illuminant: red gain ~ U[1.9, 2.4], blue gain ~ U[1.5, 1.9] (Brooks et al., daylight); exposure set so the
    brightest ~0.5 % of pixels land at U[0.85, 1.3] of white (some clip, some do not). A wide_share of frames
    instead has illuminants from tungsten to shade (red 1.3..2.8, blue 2.6..1.3, anticorrelated, each x
    U[0.9, 1.1]) and that level log-uniform in [0.3, 2] of white (dark, low-key frames to heavy clipping).
    """
    srgb = np.asarray(srgb)
    if srgb.ndim != 3 or srgb.shape[2] != 3 or srgb.dtype != np.uint8:
        raise RcamError(f"unprocess expects an (H, W, 3) uint8 sRGB image, got {srgb.shape} {srgb.dtype}")
    encoded = srgb.astype(np.float64) / 255.0
    if tone_curve:
        encoded = inverse_smoothstep(encoded)
    linear = srgb_to_linear(encoded)

    # The original draws come first and are always made, so that with both shares 0 a seed gives the frames
    # it gave before the wider families existed.
    xyz_to_camera = random_xyz_to_camera(rng)
    red_gain = rng.uniform(1.9, 2.4)
    blue_gain = rng.uniform(1.5, 1.9)
    level = rng.uniform(0.85, 1.3)
    camera_name = ""
    if camera_share > 0 and rng.random() < camera_share:
        camera_name, xyz_to_camera = real_camera_xyz_to_camera(rng)
    wide = wide_share > 0 and rng.random() < wide_share
    if wide:
        warmth = rng.uniform(0.0, 1.0)  # 0: tungsten (little red, much blue), 1: shade
        red_gain = (1.3 + 1.5 * warmth) * rng.uniform(0.9, 1.1)
        blue_gain = (2.6 - 1.3 * warmth) * rng.uniform(0.9, 1.1)
        level = float(np.exp(rng.uniform(np.log(0.3), np.log(2.0))))

    camera = linear @ camera_from_linear_srgb(xyz_to_camera).T
    camera /= np.array([red_gain, 1.0, blue_gain])
    # Scale a high percentile of the brightest channel to `level` of white: levels above 1 clip.
    bright = float(np.percentile(camera.max(axis=2), 99.5))
    exposure = float(min(level / max(bright, 1e-3), 16.0))
    camera *= exposure

    params = UnprocessParams(
        xyz_to_camera=xyz_to_camera.tolist(),
        red_gain=float(red_gain),
        blue_gain=float(blue_gain),
        exposure=exposure,
        tone_curve=tone_curve,
        camera=camera_name,
        wide=bool(wide),
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


# Defect families. Each frame has exactly one vignetting law; the other families are optional parts added
# to the original ones (shading-corner: r^4 corner glow + tilt + two waves; shot + read noise on the Brooks
# line), each with its own probability. Held-out families are kept out of training draws, so that a
# validation set made of only them (`rcam synth --held-out`) measures generalisation to defects the model
# never saw instead of recall of our generator.
FAMILIES: dict[str, str] = {
    "vignette-rational": "falloff 1 / (1 + k r^2)^2, k ~ U[0.2, 1] (the original law)",
    "vignette-cos4": "natural falloff cos^4(atan(r / f)) times a mechanical cut-off beyond a knee radius",
    "vignette-poly": "radial polynomial 1 + a r^2 + b r^4 + c r^6 clipped to (0, 1] (DNG FixVignetteRadial)",
    "vignette-elliptical": "the law's radius on a rotated ellipse (axis ratio 0.7..1.4) instead of a circle",
    "shading-corner": "dark shading: r^4 corner glow, tilt and two slow waves (the original field)",
    "shading-poly": "dark shading: a random polynomial field of order 1 to 3",
    "shading-glow": "amp glow: exponential decay from one corner or edge midpoint",
    "banding-row": "fixed offsets per sensor row, a few DN",
    "banding-col": "fixed offsets per sensor column, a few DN",
    "noise-row": "temporal row noise: one offset per sensor row, drawn per frame",
    "noise-read": "read noise off the Brooks shot/read line (per-camera spread, x0.1..x10 in variance)",
}
VIGNETTE_LAWS = {"vignette-rational": "rational", "vignette-cos4": "cos4", "vignette-poly": "poly"}
# Probability of each optional family in a frame (when neither included nor excluded).
FAMILY_PROBABILITY = {
    "vignette-elliptical": 0.4, "shading-poly": 0.4, "shading-glow": 0.3, "banding-row": 0.3, "banding-col": 0.3,
    "noise-row": 0.3, "noise-read": 0.3,
}  # fmt: skip
# The generalisation check: a falloff law of another shape than the two trained ones (polynomial, as DNG
# opcodes and lens profiles write it; it may flatten or steepen towards the edge) with column banding, a
# fixed pattern along the axis the model only sees as row banding in training.
HELD_OUT_FAMILIES = ("vignette-poly", "banding-col")


@dataclass
class DefectParams:
    """Position-dependent lens/sensor defects of one synthetic frame (absolute frame coordinates).

    Fields after noise_seed came with the wider families; their defaults are the original behaviour, so
    index.jsonl files written before them give the same maps.
    """

    frame_shape: tuple[int, int]  # (H, W) of the full sensor frame these maps are defined on
    vignette_center: tuple[float, float]  # (row, col) in pixels; off the frame centre
    vignette_strength: float  # rational law: gain = 1 / (1 + strength * r^2)^2, r = distance / half-diagonal
    shading_amplitude: float  # DN at the far corners (dark shading / amp glow)
    shading_gradient: tuple[float, float]  # DN per unit normalised (row, col) position
    shading_waves: list[tuple[float, float, float, float]]  # (amplitude DN, freq row, freq col, phase)
    shading_channel_scale: list[float]  # per 2x2 CFA position, row-major from the frame origin
    shot_noise: float  # variance per unit signal (signal normalised so 1 = white - black)
    read_noise: float  # signal-independent variance (same normalisation)
    noise_seed: int
    vignette_law: str = "rational"  # "rational", "cos4" or "poly"
    vignette_focal: float = 1.0  # cos4 law: focal length in half-diagonals, gain cos^4(atan(r / focal))
    vignette_cut: tuple[float, float] = (1.0, 0.0)  # cos4 law: mechanical cut-off (knee radius, depth at r >= 1)
    vignette_poly: tuple[float, float, float] = (0.0, 0.0, 0.0)  # poly law: (a, b, c) of 1 + a r^2 + b r^4 + c r^6
    vignette_aspect: float = 1.0  # elliptical: distance along the rotated column axis is multiplied by this
    vignette_angle: float = 0.0  # elliptical: rotation of the ellipse's axes (radians)
    shading_poly: list[float] = field(default_factory=list)  # DN coefficients of v, u, v^2, vu, u^2, v^3, v^2u, vu^2, u^3
    glow_amplitude: float = 0.0  # amp glow: DN at its source
    glow_source: tuple[float, float] = (0.0, 0.0)  # amp glow: normalised (v, u) position, a corner or edge midpoint
    glow_length: float = 0.1  # amp glow: decay length as a fraction of the frame's longer side
    row_banding: float = 0.0  # DN scale of the fixed per-row offsets
    column_banding: float = 0.0  # DN scale of the fixed per-column offsets
    banding_seed: int = 0
    row_noise: float = 0.0  # std (normalised like read noise) of a per-row offset drawn per frame
    families: list[str] = field(default_factory=list)  # the families drawn (informative; [] in older files)


def _check_families(names: Iterable[str], what: str) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise RcamError(f"unknown defect famil{'ies' if len(unknown) > 1 else 'y'} in {what}: {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    return names


def _frame_radius_max(frame_shape, center, aspect, angle) -> float:
    """Largest normalised vignetting radius over the frame (at a corner: r^2 is a convex quadratic form)."""
    height, width = frame_shape
    rows = np.array([0.0, 0.0, height, height])
    cols = np.array([0.0, width, 0.0, width])
    return float(np.sqrt(_radius2(frame_shape, center, aspect, angle, rows - 0.5, cols - 0.5)).max())


def sample_defects(
    rng: np.random.Generator, frame_shape: tuple[int, int], sensor: SensorParams, *,
    exclude: Iterable[str] = HELD_OUT_FAMILIES, include: Iterable[str] = (),
) -> DefectParams:  # fmt: skip
    """Random defects for a frame of (H, W) pixels, from the FAMILIES not in `exclude`.

    Families in `include` are always present (at most one vignetting law). By default the held-out families
    are excluded (training data); a held-out set uses include=HELD_OUT_FAMILIES, exclude=().
    With every new family excluded (only vignette-rational and shading-corner left), a generator in a given
    state draws exactly the parameters it drew before the families existed.
    """
    exclude, include = set(_check_families(exclude, "exclude")), set(_check_families(include, "include"))
    if exclude & include:
        raise RcamError(f"defect families both included and excluded: {', '.join(sorted(exclude & include))}")
    laws = [name for name in VIGNETTE_LAWS if name in include] or [name for name in VIGNETTE_LAWS if name not in exclude]
    if len(laws) != 1 and any(name in include for name in VIGNETTE_LAWS):
        raise RcamError(f"at most one vignetting law can be included, got {', '.join(laws)}")
    height, width = frame_shape
    # The original draws, in their original order.
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
    defects = DefectParams(
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
    if not laws:
        raise RcamError("every vignetting law is excluded")
    if "shading-corner" in exclude:
        defects.shading_amplitude, defects.shading_gradient, defects.shading_waves = 0.0, (0.0, 0.0), []

    def drawn(name: str) -> bool:
        # Only optional families that can be drawn use a random number: the original stream stays intact.
        if name in include or name not in FAMILY_PROBABILITY:
            return name in include
        return name not in exclude and rng.random() < FAMILY_PROBABILITY[name]

    law = laws[0] if len(laws) == 1 else laws[int(rng.integers(len(laws)))]
    families = [law] + (["shading-corner"] if "shading-corner" not in exclude else [])
    defects.vignette_law = VIGNETTE_LAWS[law]
    if drawn("vignette-elliptical"):
        families.append("vignette-elliptical")
        defects.vignette_aspect = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
        defects.vignette_angle = float(rng.uniform(0.0, np.pi))
    if law == "vignette-cos4":
        defects.vignette_strength = 0.0
        defects.vignette_focal = float(rng.uniform(0.9, 2.5))  # corner field angle 22..48 degrees
        defects.vignette_cut = (float(rng.uniform(0.5, 0.9)), float(rng.uniform(0.0, 0.5)) if rng.random() < 0.6 else 0.0)
    elif law == "vignette-poly":
        defects.vignette_strength = 0.0
        defects.vignette_poly = _draw_vignette_poly(rng, defects)
    if drawn("shading-poly"):
        families.append("shading-poly")
        # Each term reaches about +-corner at the frame's edge (|v|, |u| <= 0.5); the order is 1 to 3.
        order = int(rng.integers(1, 4))
        powers = [1, 1, 2, 2, 2, 3, 3, 3, 3]
        defects.shading_poly = [
            float(rng.uniform(-1.0, 1.0) * corner * 2.0**p) if p <= order else 0.0 for p in powers
        ]
    if drawn("shading-glow"):
        families.append("shading-glow")
        sources = [(v, u) for v in (-0.5, 0.0, 0.5) for u in (-0.5, 0.0, 0.5) if (v, u) != (0.0, 0.0)]
        defects.glow_source = sources[int(rng.integers(len(sources)))]
        defects.glow_amplitude = span * float(np.exp(rng.uniform(np.log(0.002), np.log(0.03))))
        defects.glow_length = float(rng.uniform(0.05, 0.3))
    banding_scale = max(1.0, span / 4095.0)  # "a few DN" of a 12-bit range, scaled with the bit depth
    if drawn("banding-row"):
        families.append("banding-row")
        defects.row_banding = float(rng.uniform(0.3, 1.5) * banding_scale)
    if drawn("banding-col"):
        families.append("banding-col")
        defects.column_banding = float(rng.uniform(0.3, 1.5) * banding_scale)
    if defects.row_banding or defects.column_banding:
        defects.banding_seed = int(rng.integers(0, 2**63 - 1))
    if drawn("noise-row"):
        families.append("noise-row")
        # A tenth to a half of the read noise's std, as in measured CMOS row noise.
        defects.row_noise = float(np.sqrt(defects.read_noise) * rng.uniform(0.1, 0.5))
    if drawn("noise-read"):
        families.append("noise-read")
        defects.read_noise = float(np.exp(2.18 * log_shot + 1.20 + rng.uniform(np.log(0.1), np.log(10.0))))
        if defects.row_noise:
            defects.row_noise = float(np.sqrt(defects.read_noise) * rng.uniform(0.1, 0.5))
    defects.families = families
    return defects


def _draw_vignette_poly(rng: np.random.Generator, defects: DefectParams) -> tuple[float, float, float]:
    """(a, b, c) of a radial polynomial falloff: gain U[0.25, 0.85] at r = 1, at least 0.1 over the frame."""
    r_max = _frame_radius_max(defects.frame_shape, defects.vignette_center, defects.vignette_aspect, defects.vignette_angle)
    r = np.linspace(0.0, max(r_max, 1.0), 64)
    for _ in range(100):
        edge = rng.uniform(0.25, 0.85)
        a, c = rng.uniform(-1.2, -0.1), rng.uniform(-0.4, 0.4)
        b = edge - 1.0 - a - c  # so that 1 + a + b + c = edge
        gain = 1 + a * r**2 + b * r**4 + c * r**6
        if gain.min() >= 0.1:
            return float(a), float(b), float(c)
    edge = 0.5
    return float(edge - 1.0), 0.0, 0.0  # plain quadratic falloff; never reached in practice


def without_vignetting(defects: DefectParams) -> DefectParams:
    """The same defects with no lens falloff (gain 1 everywhere), whatever the law."""
    return replace(defects, vignette_law="rational", vignette_strength=0.0)


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


def _radius2(frame_shape, center, aspect, angle, rows, cols) -> np.ndarray:
    """Squared vignetting radius (units of the half-diagonal) at pixel positions; elliptical when aspect != 1."""
    half_diagonal = 0.5 * math.hypot(*frame_shape)
    d_row, d_col = rows + 0.5 - center[0], cols + 0.5 - center[1]
    if aspect == 1.0 and angle == 0.0:
        return (d_row**2 + d_col**2) / (half_diagonal**2)  # the original expression, bit for bit
    along = d_row * math.cos(angle) + d_col * math.sin(angle)
    across = (-d_row * math.sin(angle) + d_col * math.cos(angle)) * aspect
    return (along**2 + across**2) / (half_diagonal**2)


def vignetting_at(defects: DefectParams, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Lens falloff in (0, 1] at absolute sensor pixel positions (broadcastable row and column arrays); 1 at the centre."""
    r2 = _radius2(defects.frame_shape, defects.vignette_center, defects.vignette_aspect, defects.vignette_angle, rows, cols)
    if defects.vignette_law == "rational":
        return 1.0 / (1.0 + defects.vignette_strength * r2) ** 2
    r = np.sqrt(r2)
    if defects.vignette_law == "cos4":
        # cos^4(atan x) = 1 / (1 + x^2)^2: the natural falloff alone is the rational law with k = 1 / f^2. What
        # the rational law cannot make is the mechanical cut-off (the lens barrel clipping the aperture),
        # a shoulder that starts at the knee radius and ends `depth` lower at the corner.
        knee, depth = defects.vignette_cut
        t = np.clip((r - knee) / max(1.0 - knee, 1e-6), 0.0, 1.0)
        return np.cos(np.arctan(r / defects.vignette_focal)) ** 4 * (1.0 - depth * t * t * (3.0 - 2.0 * t))
    if defects.vignette_law == "poly":
        a, b, c = defects.vignette_poly
        return np.clip(1.0 + a * r2 + b * r2**2 + c * r2**3, 1e-3, 1.0)
    raise RcamError(f"unknown vignetting law {defects.vignette_law!r}")


# Monomials (power of v, power of u) of DefectParams.shading_poly, in order.
_SHADING_MONOMIALS = ((1, 0), (0, 1), (2, 0), (1, 1), (0, 2), (3, 0), (2, 1), (1, 2), (0, 3))


def _shading_field(defects: DefectParams, v: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Unscaled smooth dark-shading field (DN) at normalised positions v (rows), u (cols) in [-0.5, 0.5]."""
    corner_r4 = ((u**2 + v**2) / 0.5) ** 2  # 0 at the centre, 1 at the corners
    field = defects.shading_amplitude * corner_r4
    field = field + defects.shading_gradient[0] * v + defects.shading_gradient[1] * u
    for amplitude, freq_row, freq_col, phase in defects.shading_waves:
        field = field + amplitude * np.cos(2 * np.pi * (freq_row * v + freq_col * u) + phase)
    for coefficient, (p, q) in zip(defects.shading_poly, _SHADING_MONOMIALS):
        if coefficient:
            field = field + coefficient * v**p * u**q
    if defects.glow_amplitude:
        height, width = defects.frame_shape
        distance = np.hypot((v - defects.glow_source[0]) * height, (u - defects.glow_source[1]) * width) / max(height, width)
        field = field + defects.glow_amplitude * np.exp(-distance / defects.glow_length)
    return field


def dark_shading(
    defects: DefectParams, offset: tuple[int, int] = (0, 0), shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Additive fixed-pattern offset (h, w) in DN above black for the crop at absolute `offset`.

    Low-frequency: strongest in the corners (r^4 glow), plus a tilt and two slow waves, and where drawn a
    polynomial field and an amp glow; each CFA position (absolute row/col parity) has its own scale of that
    field. Row and column banding add per-row / per-column offsets. Never negative.
    """
    shape = defects.frame_shape if shape is None else shape
    return dark_shading_at(defects, *_absolute_grid(offset, shape))


def dark_shading_at(defects: DefectParams, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Dark shading (DN) at absolute sensor pixel positions (integer, broadcastable row and column arrays)."""
    scale = np.asarray(defects.shading_channel_scale).reshape(2, 2)
    rows_int, cols_int = rows.astype(np.int64), cols.astype(np.int64)
    shading = _lifted_shading(defects, rows, cols) * scale[rows_int % 2, cols_int % 2]
    if defects.row_banding or defects.column_banding:
        row_offsets, column_offsets = banding_offsets(defects)
        shading = shading + _take_clamped(row_offsets, rows_int) + _take_clamped(column_offsets, cols_int)
    return shading


def banding_offsets(defects: DefectParams) -> tuple[np.ndarray, np.ndarray]:
    """Fixed banding offsets (DN, >= 0) of every sensor row (H,) and column (W,), from defects.banding_seed.

    Read-out offsets, not charge: the same for every CFA colour in a row (or column), so not scaled per channel.
    """
    height, width = defects.frame_shape
    offsets = []
    for axis, (size, scale) in enumerate(((height, defects.row_banding), (width, defects.column_banding))):
        if not scale:
            offsets.append(np.zeros(size))
            continue
        z = np.random.default_rng([defects.banding_seed, axis]).standard_normal(size)
        offsets.append(scale * (z - z.min()))
    return offsets[0], offsets[1]


def _take_clamped(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """values[index] with indices clamped to the array (padding rows/columns outside the frame repeat its edge)."""
    return values[np.clip(index, 0, len(values) - 1)]


def _lifted_shading(defects: DefectParams, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The smooth shading field (DN) before its per-CFA-position scale, at (possibly fractional) pixel positions."""
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


def row_noise_field(
    defects: DefectParams, offset: tuple[int, int] = (0, 0), shape: tuple[int, int] | None = None
) -> np.ndarray:
    """The frame's N(0, 1) per-row draw (h, 1), seeded by defects.noise_seed, for the rows of the crop at `offset`."""
    shape = defects.frame_shape if shape is None else shape
    # A stream of its own, so that the per-pixel field is the one frames without row noise have.
    rows = np.random.default_rng([defects.noise_seed, 1]).standard_normal(defects.frame_shape[0])
    return rows[offset[0] : offset[0] + shape[0], None]


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
    if defects.row_noise:
        noise = noise + defects.row_noise * row_noise_field(defects, offset, shape)
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
    Banding is taken at each plane's exact sensor rows and columns; row noise draws one fresh offset per
    sensor row, shared by the two planes on that row.
    """
    height, width = clean.shape[1:]
    # Vignetting and shading are smooth: evaluated once per 2x2 cell, at its centre, for all four planes.
    rows = (first[0] + 0.5 + step * np.arange(height))[:, None]
    cols = (first[1] + 0.5 + step * np.arange(width))[None, :]
    vignetting = vignetting_at(defects, rows, cols).astype(np.float32)
    shading = _lifted_shading(defects, rows, cols).astype(np.float32)
    scale = np.asarray(defects.shading_channel_scale).reshape(2, 2)
    banded = bool(defects.row_banding or defects.column_banding)
    if banded:  # banding is not smooth: taken at each plane's own sensor rows and columns
        row_offsets, column_offsets = banding_offsets(defects)
    if defects.row_noise:
        # One offset per sensor row: planes (dy, 0) and (dy, 1) share the rows first[0] + step·i + dy.
        row_noise = defects.row_noise * rng.standard_normal((2, height, 1), dtype=np.float32)
    planes = np.empty(clean.shape, dtype=np.float32)
    for plane in range(4):
        dy, dx = divmod(plane, 2)
        position = (first[0] + dy, first[1] + dx)
        black = float(black_level_map(sensor, position, (1, 1))[0, 0])
        span = sensor.white_level - black
        signal = np.asarray(clean[plane], dtype=np.float32)
        signal = np.where(signal >= 1.0, np.float32(1.0), np.minimum(signal * vignetting, np.float32(1.0)))
        noise = noise_std(signal, defects).astype(np.float32) * rng.standard_normal(signal.shape, dtype=np.float32)
        if defects.row_noise:
            noise = noise + row_noise[dy]
        raw_dn = black + span * (signal + noise) + shading * scale[position[0] % 2, position[1] % 2]
        if banded:
            plane_rows = position[0] + step * np.arange(height)
            plane_cols = position[1] + step * np.arange(width)
            raw_dn = raw_dn + (
                _take_clamped(row_offsets, plane_rows)[:, None] + _take_clamped(column_offsets, plane_cols)[None, :]
            ).astype(np.float32)
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


def held_out_selection(held_out: bool) -> dict:
    """sample_defects' family selection for a held-out set (only the held-out families, always) or training data."""
    return dict(exclude=(), include=HELD_OUT_FAMILIES) if held_out else dict(exclude=HELD_OUT_FAMILIES, include=())


def _write_pair(
    srgb: np.ndarray, out_dir: Path, rng: np.random.Generator, name: str, orientation: int, tone_curve: bool,
    held_out: bool = False,
) -> tuple[PairFiles, dict]:  # fmt: skip
    """Synthesize one sample from an sRGB image and write its three files; returns them and the parameters."""
    camera_linear, unprocess_params = unprocess(srgb, rng, tone_curve=tone_curve)
    frame_shape = camera_linear.shape[:2]
    sensor = sample_sensor(rng)
    defects = sample_defects(rng, frame_shape, sensor, **held_out_selection(held_out))
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
        "held_out": held_out,
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
    held_out: bool = False,
) -> PairFiles:
    """Photo -> (degraded DNG, clean-twin DNG, target PNG = reference render of the clean twin) in out_dir.

    Files: {name}_degraded.dng, {name}_clean.dng, {name}_target.png. orientation (EXIF 1..8) is only
    written to the DNG tags; the mosaic stays in sensor orientation and LibRaw rotates the render.
    held_out: defects of the held-out families (HELD_OUT_FAMILIES) instead of the training ones.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, _ = _write_pair(load_photo(photo_path, max_side), out_dir, rng, name, orientation, tone_curve, held_out)
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
    held_out: bool = False,
) -> Path:
    """Synthesize variants_per_photo pairs per photo into out_dir; resumable; returns index.jsonl's path.

    Each pair's randomness depends only on (seed, pair name), so a resumed run makes the same data.
    Index lines (JSON): name, photo, seed, degraded, clean, target (file names in out_dir) and all parameters.
    held_out: a validation set whose every frame has the held-out defect families (HELD_OUT_FAMILIES);
    otherwise they never occur.
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
        and record.get("held_out", False) == held_out
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
            files, params = _write_pair(load_photo(photo, max_side), out_dir, rng, name, 1, tone_curve, held_out)
            record = {"name": name, "photo": str(photo), "seed": seed}
            record |= {key: path.name for key, path in files._asdict().items()}
            record |= params
            index.write(json.dumps(record) + "\n")
            index.flush()
    return index_path
