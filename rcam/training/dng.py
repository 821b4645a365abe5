"""Write minimal, uncompressed DNG files (Bayer, generic CFA, LinearRaw) that LibRaw / rawpy reads.

Used by the synthetic-data engine (rcam.training.synth) and by tests that need RAW files with known content.
Tag numbers and meanings follow the DNG 1.4 specification and TIFF/EP.

LibRaw quirks worth knowing (LibRaw 0.22 via rawpy 0.28):
- it refuses images (or active areas) narrower or shorter than 22 pixels ("Unsupported file format");
  files smaller than that are still written, they are valid DNGs;
- an active area with an odd top/left is moved in to the next even row/column;
- rawpy's rgb_xyz_matrix reads as zeros for these files although the ColorMatrix1 is used for rendering;
- for 4-colour CFAs color_desc is always b"GMCY" and raw_pattern holds plane indices (CFAPlaneColor
  order); CFA patterns wider than 2 columns (other than 6x6 X-Trans) are not represented correctly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile

from rcam.errors import RcamError

# TIFF field types used in extratags.
_BYTE, _ASCII, _SHORT, _LONG, _RATIONAL, _SRATIONAL = 1, 2, 3, 4, 5, 10

# TIFF / TIFF-EP / DNG tag numbers.
_TAG_NEW_SUBFILE_TYPE = 254
_TAG_MAKE = 271
_TAG_MODEL = 272
_TAG_ORIENTATION = 274
_TAG_CFA_REPEAT_PATTERN_DIM = 33421
_TAG_CFA_PATTERN = 33422
_TAG_DNG_VERSION = 50706
_TAG_DNG_BACKWARD_VERSION = 50707
_TAG_UNIQUE_CAMERA_MODEL = 50708
_TAG_CFA_PLANE_COLOR = 50710
_TAG_CFA_LAYOUT = 50711
_TAG_LINEARIZATION_TABLE = 50712
_TAG_BLACK_LEVEL_REPEAT_DIM = 50713
_TAG_BLACK_LEVEL = 50714
_TAG_WHITE_LEVEL = 50717
_TAG_COLOR_MATRIX_1 = 50721
_TAG_AS_SHOT_NEUTRAL = 50728
_TAG_CALIBRATION_ILLUMINANT_1 = 50778
_TAG_ACTIVE_AREA = 50829

_PHOTOMETRIC_CFA = 32803
_PHOTOMETRIC_LINEAR_RAW = 34892
_ILLUMINANT_D65 = 21

# CFA colour codes of TIFF/EP (used in CFAPattern and CFAPlaneColor).
RED, GREEN, BLUE, CYAN, MAGENTA, YELLOW = 0, 1, 2, 3, 4, 5

# The four Bayer phases as a row-major 2x2 pattern of colour codes.
BAYER_PATTERNS: dict[str, tuple[int, int, int, int]] = {
    "RGGB": (RED, GREEN, GREEN, BLUE),
    "BGGR": (BLUE, GREEN, GREEN, RED),
    "GRBG": (GREEN, RED, BLUE, GREEN),
    "GBRG": (GREEN, BLUE, RED, GREEN),
}

# Canon EOS 5D Mark II D65 ColorMatrix (XYZ -> camera), as published by Adobe (DNG Converter / dcraw table).
CANON_5D_MARK_II_XYZ_TO_CAMERA = np.array(
    [[4716, 603, -830], [-7798, 15474, 2480], [-1496, 1937, 6651]], dtype=np.float64
) / 10000.0

# Fujifilm's 6x6 X-Trans layout (0 R, 1 G, 2 B): used to write non-Bayer test files that rcam must refuse.
XTRANS_PATTERN = [
    [1, 1, 0, 1, 1, 2],
    [1, 1, 2, 1, 1, 0],
    [2, 0, 1, 0, 2, 1],
    [1, 1, 2, 1, 1, 0],
    [1, 1, 0, 1, 1, 2],
    [0, 2, 1, 2, 0, 1],
]

DEFAULT_XYZ_TO_CAMERA = CANON_5D_MARK_II_XYZ_TO_CAMERA

# Rationals are written with this fixed denominator: 1e-6 precision, and |value| < 2147 fits in 32 bits.
_RATIONAL_DENOMINATOR = 1_000_000


def _rationals(values: Sequence[float], *, signed: bool) -> tuple[int, ...]:
    """Flatten floats into (numerator, denominator) pairs for a (S)RATIONAL tag."""
    pairs: list[int] = []
    limit = 2**31 - 1 if signed else 2**32 - 1
    for value in values:
        value = float(value)
        if not np.isfinite(value) or (value < 0 and not signed):
            raise RcamError(f"cannot store {value!r} as a DNG {'SRATIONAL' if signed else 'RATIONAL'}")
        numerator = round(value * _RATIONAL_DENOMINATOR)
        if abs(numerator) > limit:
            raise RcamError(f"value {value!r} is too large for a DNG rational tag")
        pairs += [numerator, _RATIONAL_DENOMINATOR]
    return tuple(pairs)


def _check_orientation(orientation: int) -> int:
    if int(orientation) != orientation or not 1 <= orientation <= 8:
        raise RcamError(f"orientation must be an EXIF orientation 1..8, got {orientation!r}")
    return int(orientation)


def _check_image(image: np.ndarray, ndim: int, what: str) -> np.ndarray:
    """Return the image as uint16, refusing values that would not survive the conversion."""
    image = np.asarray(image)
    if image.ndim != ndim:
        raise RcamError(f"{what} must have {ndim} dimensions, got shape {image.shape}")
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise RcamError(f"{what} must be at least 2x2 pixels, got shape {image.shape}")
    if image.dtype != np.uint16:
        if not np.issubdtype(image.dtype, np.integer):
            raise RcamError(f"{what} must be integer (uint16) data, got dtype {image.dtype}")
        if image.size and (image.min() < 0 or image.max() > 65535):
            raise RcamError(f"{what} values must lie in 0..65535")
        image = image.astype(np.uint16)
    return np.ascontiguousarray(image)


def _common_tags(
    *,
    white_level: int,
    xyz_to_camera,
    as_shot_neutral,
    orientation: int,
    linearization_table,
    make: str,
    model: str,
    num_planes: int,
) -> list[tuple]:
    """Tags shared by CFA and LinearRaw files (colour, levels, orientation, identity)."""
    if not 1 <= int(white_level) <= 65535:
        raise RcamError(f"white_level must be in 1..65535, got {white_level!r}")
    matrix = np.asarray(
        DEFAULT_XYZ_TO_CAMERA if xyz_to_camera is None else xyz_to_camera, dtype=np.float64
    )
    if matrix.shape != (num_planes, 3):
        raise RcamError(f"xyz_to_camera must have shape ({num_planes}, 3), got {matrix.shape}")
    neutral = np.ones(num_planes) if as_shot_neutral is None else np.asarray(as_shot_neutral, float)
    if neutral.shape != (num_planes,) or np.any(neutral <= 0):
        raise RcamError(f"as_shot_neutral must be {num_planes} positive values, got {as_shot_neutral!r}")

    tags = [
        (_TAG_NEW_SUBFILE_TYPE, _LONG, 1, 0, True),  # 0 = the main (full-resolution raw) image
        (_TAG_MAKE, _ASCII, 0, make, True),
        (_TAG_MODEL, _ASCII, 0, model, True),
        (_TAG_ORIENTATION, _SHORT, 1, _check_orientation(orientation), True),
        (_TAG_DNG_VERSION, _BYTE, 4, (1, 4, 0, 0), True),
        (_TAG_DNG_BACKWARD_VERSION, _BYTE, 4, (1, 1, 0, 0), True),
        (_TAG_UNIQUE_CAMERA_MODEL, _ASCII, 0, f"{make} {model}", True),
        (_TAG_WHITE_LEVEL, _LONG, 1, int(white_level), True),
        (_TAG_COLOR_MATRIX_1, _SRATIONAL, matrix.size, _rationals(matrix.ravel(), signed=True), True),
        (_TAG_AS_SHOT_NEUTRAL, _RATIONAL, num_planes, _rationals(neutral, signed=False), True),
        (_TAG_CALIBRATION_ILLUMINANT_1, _SHORT, 1, _ILLUMINANT_D65, True),
    ]
    if linearization_table is not None:
        table = np.asarray(linearization_table)
        if table.ndim != 1 or not 2 <= table.size <= 65536 or not np.issubdtype(table.dtype, np.integer):
            raise RcamError("linearization_table must be a 1-D integer array of 2..65536 entries")
        if table.min() < 0 or table.max() > 65535:
            raise RcamError("linearization_table values must lie in 0..65535")
        tags.append((_TAG_LINEARIZATION_TABLE, _SHORT, table.size, tuple(int(v) for v in table), True))
    return tags


def _black_level_tags(black_level) -> list[tuple]:
    """BlackLevelRepeatDim + BlackLevel: one value (1x1) or four values (2x2, row-major CFA positions)."""
    levels = np.atleast_1d(np.asarray(black_level)).ravel()
    if levels.size == 1:
        repeat = (1, 1)
    elif levels.size == 4:
        repeat = (2, 2)
    else:
        raise RcamError(f"black_level must be one value or four (2x2 CFA positions), got {black_level!r}")
    if np.any(levels < 0) or np.any(levels > 65535) or np.any(levels != np.round(levels)):
        raise RcamError(f"black levels must be integers in 0..65535, got {black_level!r}")
    return [
        (_TAG_BLACK_LEVEL_REPEAT_DIM, _SHORT, 2, repeat, True),
        (_TAG_BLACK_LEVEL, _LONG, levels.size, tuple(int(v) for v in levels), True),
    ]


def _active_area_tags(active_area, shape: tuple[int, int]) -> list[tuple]:
    """ActiveArea (top, left, bottom, right): the non-masked sensor pixels."""
    if active_area is None:
        return []
    top, left, bottom, right = (int(v) for v in active_area)
    if not (0 <= top < bottom <= shape[0] and 0 <= left < right <= shape[1]):
        raise RcamError(f"active_area {active_area!r} does not fit an image of shape {shape}")
    return [(_TAG_ACTIVE_AREA, _LONG, 4, (top, left, bottom, right), True)]


def _write(path, image: np.ndarray, photometric: int, tags: list[tuple]) -> Path:
    """Write one uncompressed IFD with the given tags; no tifffile metadata, software or description."""
    path = Path(os.fspath(path))
    tifffile.imwrite(
        path,
        image,
        photometric=photometric,
        planarconfig="contig" if image.ndim == 3 else None,
        compression=None,
        metadata=None,
        software=False,
        extratags=tags,
    )
    return path


def write_cfa_dng(
    path,
    mosaic: np.ndarray,
    *,
    repeat_dim: tuple[int, int] = (2, 2),
    pattern: Sequence[int] = BAYER_PATTERNS["RGGB"],
    cfa_plane_color: Sequence[int] = (RED, GREEN, BLUE),
    black_level=0,
    white_level: int = 65535,
    as_shot_neutral: Sequence[float] | None = None,
    xyz_to_camera=None,
    orientation: int = 1,
    linearization_table=None,
    active_area: Sequence[int] | None = None,
    make: str = "rcam",
    model: str = "Synthetic",
) -> Path:
    """Write a (H, W) uint16 mosaic as a CFA DNG with any repeat pattern (Bayer, X-Trans 6x6, CMYG).

    pattern: row-major colour codes (0 R, 1 G, 2 B, 3 C, 4 M, 5 Y), repeat_dim[0] * repeat_dim[1] of them.
    cfa_plane_color: the colour code of each plane; as_shot_neutral and xyz_to_camera have one entry /
    row per plane. black_level: one value, or four for the 2x2 CFA positions (row-major).
    active_area: optional (top, left, bottom, right) of the non-masked pixels. As in the DNG SDK (and
    LibRaw), the CFA and black-level patterns then start at the active area's top-left corner.
    """
    mosaic = _check_image(mosaic, 2, "mosaic")
    rows, cols = (int(v) for v in repeat_dim)
    pattern = tuple(int(v) for v in pattern)
    planes = tuple(int(v) for v in cfa_plane_color)
    if rows < 1 or cols < 1 or len(pattern) != rows * cols:
        raise RcamError(f"CFA pattern needs repeat_dim[0] * repeat_dim[1] = {rows * cols} values, got {len(pattern)}")
    if len(set(planes)) != len(planes) or not 3 <= len(planes) <= 4:
        raise RcamError(f"cfa_plane_color must name 3 or 4 distinct colours, got {cfa_plane_color!r}")
    if not set(pattern) <= set(planes):
        raise RcamError(f"CFA pattern {pattern} uses colours not in cfa_plane_color {planes}")

    if xyz_to_camera is None and len(planes) == 4:
        raise RcamError("a 4-colour CFA needs an explicit 4x3 xyz_to_camera matrix")
    tags = _common_tags(
        white_level=white_level,
        xyz_to_camera=xyz_to_camera,
        as_shot_neutral=as_shot_neutral,
        orientation=orientation,
        linearization_table=linearization_table,
        make=make,
        model=model,
        num_planes=len(planes),
    )
    tags += [
        (_TAG_CFA_REPEAT_PATTERN_DIM, _SHORT, 2, (rows, cols), True),
        (_TAG_CFA_PATTERN, _BYTE, len(pattern), pattern, True),
        (_TAG_CFA_PLANE_COLOR, _BYTE, len(planes), planes, True),
        (_TAG_CFA_LAYOUT, _SHORT, 1, 1, True),  # 1 = rectangular (square) layout
    ]
    tags += _black_level_tags(black_level)
    tags += _active_area_tags(active_area, mosaic.shape)
    return _write(path, mosaic, _PHOTOMETRIC_CFA, sorted(tags, key=lambda tag: tag[0]))


def write_bayer_dng(
    path,
    mosaic: np.ndarray,
    *,
    cfa: str = "RGGB",
    black_level=0,
    white_level: int = 65535,
    as_shot_neutral: Sequence[float] = (1.0, 1.0, 1.0),
    xyz_to_camera=None,
    orientation: int = 1,
    linearization_table=None,
    active_area: Sequence[int] | None = None,
    make: str = "rcam",
    model: str = "Synthetic",
) -> Path:
    """Write a (H, W) uint16 Bayer mosaic (cfa in RGGB/BGGR/GRBG/GBRG) as a DNG that rawpy renders.

    black_level: one value or four values for the 2x2 CFA positions (row-major, in raw DN).
    as_shot_neutral: camera-space (R, G, B) response to the scene illuminant (LibRaw WB = 1 / neutral).
    xyz_to_camera: 3x3 D65 ColorMatrix1 (default: Canon EOS 5D Mark II).
    orientation: EXIF orientation 1..8.
    linearization_table: optional uint16 LUT that LibRaw applies to the stored values.
    """
    if cfa not in BAYER_PATTERNS:
        raise RcamError(f"unknown Bayer CFA {cfa!r}; expected one of {', '.join(BAYER_PATTERNS)}")
    return write_cfa_dng(
        path,
        mosaic,
        repeat_dim=(2, 2),
        pattern=BAYER_PATTERNS[cfa],
        cfa_plane_color=(RED, GREEN, BLUE),
        black_level=black_level,
        white_level=white_level,
        as_shot_neutral=as_shot_neutral,
        xyz_to_camera=xyz_to_camera,
        orientation=orientation,
        linearization_table=linearization_table,
        active_area=active_area,
        make=make,
        model=model,
    )


def write_linear_dng(
    path,
    rgb: np.ndarray,
    *,
    black_level=0,
    white_level: int = 65535,
    as_shot_neutral: Sequence[float] = (1.0, 1.0, 1.0),
    xyz_to_camera=None,
    orientation: int = 1,
    make: str = "rcam",
    model: str = "Synthetic",
) -> Path:
    """Write a (H, W, 3) uint16 camera-RGB image as a LinearRaw (already demosaiced) DNG."""
    rgb = _check_image(rgb, 3, "rgb")
    if rgb.shape[2] != 3:
        raise RcamError(f"rgb must have 3 samples per pixel, got shape {rgb.shape}")
    levels = np.atleast_1d(np.asarray(black_level)).ravel()
    if levels.size != 1 or levels[0] < 0 or levels[0] > 65535:
        raise RcamError(f"a linear DNG takes one black level in 0..65535, got {black_level!r}")
    tags = _common_tags(
        white_level=white_level,
        xyz_to_camera=xyz_to_camera,
        as_shot_neutral=as_shot_neutral,
        orientation=orientation,
        linearization_table=None,
        make=make,
        model=model,
        num_planes=3,
    )
    tags.append((_TAG_BLACK_LEVEL, _LONG, 1, int(levels[0]), True))
    return _write(path, rgb, _PHOTOMETRIC_LINEAR_RAW, sorted(tags, key=lambda tag: tag[0]))
