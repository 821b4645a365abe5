"""rawjxl: JPEG XL on rcam's own encoder input, then LibRaw's render. The classical ablation of rcam's learned codec.

The RAW file is read and normalised exactly as rcam's encoder reads it (rcam.codec.rawio.network_input_and_white:
white balance, colour matrix, auto-brightness level, sRGB curve, four packed planes R, G1, G2, B). JPEG XL codes
those planes instead of rcam's analysis, hyperprior and range coder: R, the mean green and B as one 16-bit colour
image, the green difference G1 - G2 as one 16-bit grey image. The decoder puts the decoded planes back into a
DNG of white-balanced camera values and LibRaw renders it, as a lossy-DNG workflow (code the mosaic, develop
later) would. Nothing removes defects, so it makes the faithful look; in protocol S it keeps the defects as the
LibRaw cascades do.

What it answers: how far rcam's learned transform and entropy model are from a classical image codec coding the
same planes (measured at stop 23: on the real DNGs JPEG XL needs a fraction of rcam's bits for the same PSNR; on
the synthetic val pairs rcam needs fewer).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import imagecodecs
import numpy as np
import rawpy
import torch
import torch.nn.functional as F

from rcam.codec.rawio import apply_flip, network_input_and_white, read_raw
from rcam.codec.skeleton import camera_planes
from rcam.errors import RcamError
from rcam.training.dng import write_bayer_dng

NAME = "rawjxl"
LABEL = "planes + JPEG XL, LibRaw render"
DISTANCES = (0.25, 0.5, 1.0, 2.0, 4.0)  # JPEG XL's Butteraugli distances: the sweep, best quality first
EFFORT = 7  # as the JPEG XL cascade (rcam.comparators.baselines)
# The green difference is small: scaled up and coded at twice the distance (it carries detail, not colour).
GREEN_DIFFERENCE_GAIN = 4.0
GREEN_DIFFERENCE_DISTANCE = 2.0
# Encoder-space planes are not clipped to [0, 1] (dark noise goes below 0, saturated colours above 1).
PLANE_RANGE = (-0.25, 1.25)
# What a file needs besides the two JPEG XL streams: colour matrix (9 float32), auto-brightness level, frame
# geometry and orientation, two stream lengths. Counted in every file's size.
SIDE_INFO_BYTES = 64
# LibRaw's linear sRGB (D65) -> XYZ: its camera matrix is derived from an XYZ -> camera matrix through it.
XYZ_FROM_SRGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])


def _to_uint16(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip(np.rint((values - low) / (high - low) * 65535), 0, 65535).astype(np.uint16)


def _from_uint16(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return values.astype(np.float32) / 65535 * (high - low) + low


def encode_planes(planes: np.ndarray, distance: float) -> tuple[bytes, bytes]:
    """Encoder-space planes (4, h, w) -> (colour stream, green-difference stream), JPEG XL at `distance`."""
    if planes.ndim != 3 or planes.shape[0] != 4:
        raise RcamError(f"expected packed planes (4, h, w), got {planes.shape}")
    colour = np.stack([planes[0], 0.5 * (planes[1] + planes[2]), planes[3]], axis=-1)
    difference = 0.5 + GREEN_DIFFERENCE_GAIN * (planes[1] - planes[2])
    return (
        imagecodecs.jpegxl_encode(_to_uint16(colour, *PLANE_RANGE), distance=distance, effort=EFFORT),
        imagecodecs.jpegxl_encode(_to_uint16(difference, 0.0, 1.0), distance=distance * GREEN_DIFFERENCE_DISTANCE, effort=EFFORT),
    )


def decode_planes(colour_stream: bytes, difference_stream: bytes) -> np.ndarray:
    """encode_planes' streams -> encoder-space planes (4, h, w) float32."""
    colour = _from_uint16(imagecodecs.jpegxl_decode(colour_stream), *PLANE_RANGE)
    difference = (_from_uint16(imagecodecs.jpegxl_decode(difference_stream), 0.0, 1.0) - 0.5) / GREEN_DIFFERENCE_GAIN
    green = colour[..., 1]
    return np.stack([colour[..., 0], green + 0.5 * difference, green - 0.5 * difference, colour[..., 2]])


def file_size(streams: tuple[bytes, bytes]) -> int:
    """The bytes a file of encode_planes' streams takes, side information included."""
    return SIDE_INFO_BYTES + sum(len(stream) for stream in streams)


def libraw_render(planes: np.ndarray, cam_to_srgb: np.ndarray, white: float, crop: tuple[slice, slice]) -> np.ndarray:
    """Encoder-space planes (4, h, w) -> LibRaw's standard render: uint8 (H, W, 3), sensor orientation, cropped.

    `cam_to_srgb` and `white` are the frame's colour matrix and auto-brightness level (rawio.normalise_planes).
    The planes go back to white-balanced camera values (white = 65535) in an RGGB DNG whose ColorMatrix1 makes
    LibRaw derive exactly `cam_to_srgb` and whose neutral makes its white balance 1.
    """
    matrix = torch.tensor(cam_to_srgb, dtype=torch.float32)[None]
    camera = camera_planes(torch.from_numpy(np.ascontiguousarray(planes, np.float32))[None], matrix, torch.tensor([white], dtype=torch.float32))
    mosaic = F.pixel_shuffle(camera, 2)[0, 0].numpy()
    # LibRaw normalises each row of camera <- sRGB to sum 1, so any row scale of this matrix is fine.
    xyz_to_camera = np.linalg.inv(cam_to_srgb.astype(np.float64)) @ np.linalg.inv(XYZ_FROM_SRGB)
    with tempfile.TemporaryDirectory() as folder:
        path = write_bayer_dng(Path(folder) / "planes.dng", np.clip(np.rint(mosaic * 65535), 0, 65535).astype(np.uint16), xyz_to_camera=xyz_to_camera)
        with rawpy.imread(str(path)) as raw:
            image = raw.postprocess(use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB, output_bps=8, gamma=(2.4, 12.92))
    return image[crop]


def round_trip(raw_path: Path, distance: float) -> tuple[int, np.ndarray]:
    """A RAW file -> (file size in bytes, SIDE_INFO_BYTES included; LibRaw's render of the decoded planes, (H, W, 3)
    uint8 in the file's orientation)."""
    image = read_raw(raw_path)
    planes, white = network_input_and_white(image)
    streams = encode_planes(planes, distance)
    crop = (slice(image.pad_top, image.pad_top + image.height), slice(image.pad_left, image.pad_left + image.width))
    rendered = libraw_render(decode_planes(*streams), image.cam_to_srgb, white, crop)
    return file_size(streams), apply_flip(rendered, image.flip)


def evaluation_comparator(device=None, look: str = "faithful"):
    """`rcam eval --baselines rawjxl`: round_trip as an rcam.measure.evaluate.EndToEndCodec, swept over DISTANCES."""
    from rcam.measure.evaluate import EndToEndCodec

    note = (
        f"{NAME}: rcam's encoder input (normalised packed planes) coded by JPEG XL (effort {EFFORT}, distances "
        f"{', '.join(f'{d:g}' for d in DISTANCES)}; green difference at {GREEN_DIFFERENCE_DISTANCE:g}x the distance), "
        f"rendered by LibRaw from the decoded planes; {SIDE_INFO_BYTES} bytes of side information counted. Keeps defects "
        f"(faithful look) whatever look rcam is measured in."
    )
    return EndToEndCodec(NAME, LABEL, round_trip, note, params=DISTANCES, param_name="d")
