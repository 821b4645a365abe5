"""Tiling of the packed image with absolute coordinates (paper Eq. 4), seam-free blending and the thumbnail.

Tiles overlap by `overlap` packed pixels; each decoded tile is weighted by a ramp across every edge it shares
with a neighbour, so tile borders blend instead of showing seams. Tile sizes and offsets are multiples of 32,
so neighbours agree on the model's window and pooling grids; edge tiles may reach past the frame and are
filled by reflection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcam.codec.models import TILE_MULTIPLE
from rcam.errors import RcamError

DEFAULT_TILE = 512  # packed pixels (a 1024×1024 sensor crop): the memory / speed knob
DEFAULT_OVERLAP = 32  # packed pixels (64 output pixels) of blending between neighbours


@dataclass(frozen=True)
class Tile:
    """One tile: offset (top, left) and size (height, width) in packed pixels of the full frame."""

    top: int
    left: int
    height: int
    width: int


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def plan_axis(length: int, tile: int, overlap: int) -> tuple[int, int]:
    """Number of tiles and tile size covering `length` packed pixels; tiles start at k·(size − overlap)."""
    if tile % TILE_MULTIPLE or overlap % TILE_MULTIPLE or tile <= overlap:
        raise RcamError(f"tile size {tile} and overlap {overlap} must be multiples of {TILE_MULTIPLE}, tile > overlap")
    count = max(1, math.ceil((length - overlap) / (tile - overlap)))
    # Spread the frame evenly over `count` tiles instead of leaving a mostly empty last tile.
    size = _round_up(math.ceil((length + (count - 1) * overlap) / count), TILE_MULTIPLE)
    # A single tile over a frame no longer than the overlap would come out no larger than the overlap,
    # which the container (rightly) rejects: the tile must exceed the overlap, reflection fills the rest.
    size = max(size, overlap + TILE_MULTIPLE)
    return count, size


def plan_tiles(height: int, width: int, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> list[Tile]:
    """Row-major tile plan over a packed frame of (height, width)."""
    rows, tile_height = plan_axis(height, tile, overlap)
    cols, tile_width = plan_axis(width, tile, overlap)
    return [
        Tile(r * (tile_height - overlap), c * (tile_width - overlap), tile_height, tile_width)
        for r in range(rows)
        for c in range(cols)
    ]


def coordinate_map(tile: Tile, frame_height: int, frame_width: int, absolute: bool = True) -> torch.Tensor:
    """(2, h, w) float32: ((i+m)/H, (j+n)/W) for a tile at offset (m, n) of an (H, W) frame; relative: (i/h, j/w)."""
    rows = torch.arange(tile.height, dtype=torch.float32)
    cols = torch.arange(tile.width, dtype=torch.float32)
    if absolute:
        rows = (rows + tile.top) / frame_height
        cols = (cols + tile.left) / frame_width
    else:
        rows = rows / tile.height
        cols = cols / tile.width
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"))


def crop_tile(planes: torch.Tensor, tile: Tile) -> torch.Tensor:
    """(C, H, W) frame -> (C, h, w) tile, reflecting the frame where the tile reaches past it."""
    _, height, width = planes.shape
    bottom, right = tile.top + tile.height, tile.left + tile.width
    crop = planes[:, tile.top : min(bottom, height), tile.left : min(right, width)]
    pad_bottom, pad_right = bottom - min(bottom, height), right - min(right, width)
    if pad_bottom or pad_right:
        # Reflection needs the pad to be smaller than the crop; replicate covers the rest.
        crop = F.pad(crop[None], (0, min(pad_right, crop.shape[2] - 1), 0, min(pad_bottom, crop.shape[1] - 1)), mode="reflect")[0]
        crop = F.pad(crop[None], (0, right - tile.left - crop.shape[2], 0, bottom - tile.top - crop.shape[1]), mode="replicate")[0]
    return crop


def blend_weights(tile: Tile, tiles_extent: tuple[int, int], overlap: int, scale: int) -> torch.Tensor:
    """(h·scale, w·scale) weights: 1 inside, linear ramps across the overlaps with neighbouring tiles.

    Over a plan_tiles plan the weights of all tiles sum to one at every pixel (the ramps of two neighbours are
    complementary, and the weights are separable), so a weighted sum of the tiles is already their blend.
    """

    def ramp(size: int, has_before: bool, has_after: bool) -> torch.Tensor:
        position = torch.arange(size * scale, dtype=torch.float32) + 0.5
        weight = torch.ones(size * scale)
        length = overlap * scale
        if has_before:
            weight = torch.minimum(weight, position / length)
        if has_after:
            weight = torch.minimum(weight, (size * scale - position) / length)
        return weight

    extent_height, extent_width = tiles_extent
    rows = ramp(tile.height, tile.top > 0, tile.top + tile.height < extent_height)
    cols = ramp(tile.width, tile.left > 0, tile.left + tile.width < extent_width)
    return rows[:, None] * cols[None, :]


def thumbnail(planes: torch.Tensor, size: int) -> torch.Tensor:
    """Whole-image (4, H, W) -> (4, size, size) area-averaged thumbnail for the global prior (computed once)."""
    return F.adaptive_avg_pool2d(planes[None], size)[0]

