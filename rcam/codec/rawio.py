"""RAW input: read a 2x2 Bayer file with LibRaw (rawpy) into packed, normalised planes, and the reference render.

The reader returns the visible sensor area as four half-resolution planes in canonical R, G1, G2, B order
(G1 shares rows with R, G2 with B), whatever the file's CFA phase. The phase is unified by reflect-padding
one row at the top and/or one column at the left (Liu et al. 2019, "Bayer pattern unification"): reflection
by one pixel keeps every pixel's colour, so the padded mosaic starts with R. Odd sizes get one reflected row
or column at the bottom/right. The decoder crops the same amounts off again.
"""

from __future__ import annotations

import os
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rawpy

from rcam.errors import RcamError

# LibRaw refuses far larger files itself; this bound keeps a hostile header from asking us for gigabytes.
MAX_SENSOR_PIXELS = 200_000_000
# LibRaw's auto-brightness clips this fraction of the brightest pixels (its auto_bright_thr default).
AUTO_BRIGHT_FRACTION = 0.01


@dataclass(frozen=True)
class RawImage:
    """A Bayer RAW file after black/white normalisation, with what the pipeline needs from its metadata."""

    planes: np.ndarray  # (4, Hp, Wp) float32, R,G1,G2,B; 0 = black level, 1 = white level (not clipped)
    height: int  # visible sensor rows (before CFA padding)
    width: int  # visible sensor columns
    pad_top: int  # rows reflected in at the top to make the mosaic start with R (0 or 1)
    pad_left: int  # columns reflected in at the left (0 or 1)
    wb_gains: np.ndarray  # (3,) as-shot white-balance multipliers for R, G, B, normalised so the smallest is 1
    cam_to_srgb: np.ndarray  # (3, 3) camera RGB -> linear sRGB (LibRaw's rgb_cam)
    flip: int  # LibRaw orientation code: bit 4 = transpose, 2 = flip rows, 1 = flip columns
    cfa: str  # the file's own pattern, e.g. "GBRG"

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the reference render: the visible frame, transposed for 90° orientations."""
        return (self.width, self.height) if self.flip & 4 else (self.height, self.width)


def _open(path: Path) -> rawpy.RawPy:
    """Open and unpack a RAW file, turning every LibRaw failure into an RcamError that says which failure it is."""
    path = Path(path)
    if not path.exists():
        raise RcamError(f"{path}: no such file")
    if not path.is_file():
        raise RcamError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise RcamError(f"{path}: empty file")
    raw = rawpy.RawPy()
    with _libraw_remarks(path) as remarks:
        try:
            raw.open_file(str(path))
            sizes = raw.sizes
            if sizes.raw_height * sizes.raw_width > MAX_SENSOR_PIXELS:
                raise RcamError(
                    f"{path}: declares a {sizes.raw_width}x{sizes.raw_height} sensor, "
                    f"over the {MAX_SENSOR_PIXELS // 1_000_000} MP rcam accepts"
                )
            raw.unpack()
        except (rawpy.LibRawFileUnsupportedError, rawpy.LibRawIOError):
            # LibRaw says only "unsupported" or "I/O error" whatever went wrong; the file's own structure
            # tells a text file from a truncated or oversized DNG.
            if reason := _diagnose(path):
                raise RcamError(f"{path}: {reason}") from None
            if remark := remarks():
                raise RcamError(f"{path}: truncated or damaged (LibRaw: {remark})") from None
            raise RcamError(f"{path}: not a RAW file LibRaw can read (a format it does not know, or damaged)") from None
        except rawpy.LibRawError as error:
            raise RcamError(f"{path}: LibRaw cannot read it ({_libraw_message(error)})") from None
        if remark := remarks():  # LibRaw went on past a data error: the pixels are not what the camera recorded
            reason = _diagnose(path)
            raise RcamError(f"{path}: {reason or 'damaged RAW data'} (LibRaw: {remark})")
    return raw


# LibRaw refuses images with a side outside these (LibRaw 0.22: 21 and 64001 are refused, 22 and 64000 read).
LIBRAW_MIN_SIDE = 22
LIBRAW_MAX_SIDE = 64000
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_TAG_SUBFILE, _TAG_WIDTH, _TAG_LENGTH, _TAG_BITS, _TAG_COMPRESSION = 254, 256, 257, 258, 259
_TAG_STRIP_OFFSETS, _TAG_STRIP_BYTES = 273, 279


def _diagnose(path: Path) -> str | None:
    """Why LibRaw refused a file, from its first bytes and (for TIFF-based RAW, DNG included) its first IFD.

    None when nothing here explains it (then LibRaw's own remark is all there is). Reads at most the IFD and
    the values it points to, never the image data.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if head[:2] not in (b"II", b"MM"):
            return _not_tiff(head + handle.read(504))
        order = "<" if head[:2] == b"II" else ">"
        if len(head) < 8:
            return f"truncated: the file ends inside its 8-byte TIFF header ({size} bytes)"
        magic, ifd = struct.unpack(order + "HI", head[2:8])
        if magic != 42:  # BigTIFF and the RAW formats that only start like TIFF (ORF, RW2): LibRaw knows best
            return None
        handle.seek(ifd)
        count_bytes = handle.read(2)
        if len(count_bytes) < 2:
            return f"truncated: its first IFD (at byte {ifd}) lies past the end of the file ({size} bytes)"
        (count,) = struct.unpack(order + "H", count_bytes)
        entries = handle.read(12 * count)
        if len(entries) < 12 * count:
            return f"truncated: the file ends inside its first IFD ({count} entries from byte {ifd}, file {size} bytes)"
        values: dict[int, list[int]] = {}
        for number in range(count):
            code, kind, items, inline = struct.unpack_from(order + "HHI4s", entries, 12 * number)
            length = _TIFF_TYPE_SIZES.get(kind, 1) * items
            if length > 4 and struct.unpack(order + "I", inline)[0] + length > size:
                return f"truncated: the values of TIFF tag {code} lie past the end of the file ({size} bytes)"
            if kind in (3, 4) and length <= 4:
                values[code] = list(struct.unpack(order + ("H" if kind == 3 else "I") * items, inline[:length]))
            elif kind in (3, 4) and code in (_TAG_STRIP_OFFSETS, _TAG_STRIP_BYTES):
                handle.seek(struct.unpack(order + "I", inline)[0])
                values[code] = list(struct.unpack(order + ("H" if kind == 3 else "I") * items, handle.read(length)))
    if values.get(_TAG_SUBFILE, [0])[0] != 0 or _TAG_WIDTH not in values or _TAG_LENGTH not in values:
        return None  # the first IFD is a preview: the RAW image is elsewhere
    width, height = values[_TAG_WIDTH][0], values[_TAG_LENGTH][0]
    if min(width, height) < LIBRAW_MIN_SIDE:
        return f"declares a {width}x{height} image, under the {LIBRAW_MIN_SIDE} pixels a side LibRaw reads"
    if max(width, height) > LIBRAW_MAX_SIDE:
        return f"declares a {width}x{height} image, over the {LIBRAW_MAX_SIDE} pixels a side LibRaw reads"
    offsets, counts = values.get(_TAG_STRIP_OFFSETS, []), values.get(_TAG_STRIP_BYTES, [])
    if any(offset + length > size for offset, length in zip(offsets, counts)):
        return f"truncated: its image data runs past the end of the file ({size} bytes)"
    if values.get(_TAG_COMPRESSION, [1])[0] == 1 and counts:  # uncompressed: the declared size must be there
        needed = width * height * values.get(_TAG_BITS, [16])[0] // 8
        if needed > sum(counts):
            return f"truncated: declares a {width}x{height} image ({needed} bytes) but holds {sum(counts)} bytes of it"
    return None


def _not_tiff(head: bytes) -> str | None:
    """What a file that is not TIFF-structured seems to be, from its first bytes."""
    if head.startswith(b"\xff\xd8\xff"):
        return "a JPEG image, not a RAW file"
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in head):
        return "a text file, not a RAW file"
    return None  # some other RAW format (RAF, CR3, ...), perhaps damaged: LibRaw's word stands


@contextmanager
def _libraw_remarks(path: Path) -> Iterator[Callable[[], str]]:
    """Keep what LibRaw prints on stderr (e.g. "Unexpected end of file") off the terminal; yields a callable giving it.

    LibRaw reports data errors with fprintf(stderr) from C, which would add a second, unprefixed line to rcam's
    one-line error. File descriptor 2 goes to a temporary file while LibRaw reads; the text becomes part of the
    RcamError instead.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:

        def remarks() -> str:
            sink.seek(0)
            lines = sink.read().decode("utf-8", "replace").splitlines()
            # LibRaw starts each remark with the file name; drop it, the RcamError names the file already.
            return "; ".join(line.removeprefix(f"{path}: ").strip() for line in lines if line.strip())

        os.dup2(sink.fileno(), 2)
        try:
            yield remarks
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _libraw_message(error: Exception) -> str:
    """LibRaw's error text without the bytes-literal wrapping rawpy gives it."""
    text = error.args[0] if error.args else str(error)
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _bayer_positions(raw: rawpy.RawPy, path: Path) -> tuple[dict[str, tuple[int, int]], str]:
    """Where R, G1, G2 and B sit in the 2x2 CFA cell, or an RcamError for anything that is not 2x2 Bayer."""
    if raw.raw_type != rawpy.RawType.Flat:
        raise RcamError(f"{path}: not a Bayer RAW (linear or demosaiced data); rcam needs a 2x2 Bayer CFA")
    pattern = np.asarray(raw.raw_pattern)
    desc = raw.color_desc.decode("ascii", "replace")
    if pattern.shape != (2, 2):
        raise RcamError(f"{path}: {pattern.shape[0]}x{pattern.shape[1]} CFA (e.g. X-Trans); rcam needs 2x2 Bayer")
    letters = [[desc[pattern[y, x]] if pattern[y, x] < len(desc) else "?" for x in range(2)] for y in range(2)]
    cfa = "".join(letters[0] + letters[1])
    if sorted(cfa) != ["B", "G", "G", "R"] or raw.num_colors != 3:
        raise RcamError(f"{path}: CFA {cfa} with {raw.num_colors} colours is not RGB Bayer; rcam needs a 2x2 Bayer CFA")
    positions = {}
    for y in range(2):
        for x in range(2):
            letter = letters[y][x]
            if letter == "G":
                # G1 is the green on the red row, G2 the one on the blue row.
                letter = "G1" if "R" in letters[y] else "G2"
            positions[letter] = (y, x)
    return positions, cfa


def _white_balance(raw: rawpy.RawPy) -> np.ndarray:
    """As-shot R, G, B multipliers normalised like LibRaw's scale_colors (smallest = 1); daylight, then 1s, as fallback."""
    for candidate in (raw.camera_whitebalance, raw.daylight_whitebalance):
        gains = np.asarray(candidate, dtype=np.float64)[:3]
        if np.all(np.isfinite(gains)) and np.all(gains > 0):
            return (gains / gains.min()).astype(np.float32)
    return np.ones(3, dtype=np.float32)


def read_raw(path: Path) -> RawImage:
    """Read a 2x2 Bayer RAW file into normalised R,G1,G2,B planes plus its colour and geometry metadata."""
    path = Path(path)
    raw = _open(path)
    try:
        positions, cfa = _bayer_positions(raw, path)
        visible = np.array(raw.raw_image_visible, dtype=np.float32)  # a copy: the view dies with close()
        height, width = visible.shape
        if height < 2 or width < 2:
            raise RcamError(f"{path}: visible area {width}x{height} is smaller than one 2x2 CFA cell")
        pattern = np.asarray(raw.raw_pattern)
        black_per_colour = np.asarray(raw.black_level_per_channel, dtype=np.float32)
        white = float(raw.white_level)
        wb_gains = _white_balance(raw)
        cam_to_srgb = np.asarray(raw.color_matrix, dtype=np.float32)[:, :3]
        flip = int(raw.sizes.flip)
    finally:
        raw.close()
    if not np.all(np.isfinite(cam_to_srgb)) or np.abs(cam_to_srgb).sum() == 0:
        cam_to_srgb = np.eye(3, dtype=np.float32)
    pad_top, pad_left = positions["R"]
    # Black level per mosaic position, laid out like the mosaic's own 2x2 cell; normalised in place, a cell
    # position at a time (full-frame temporaries cost more than the arithmetic: 96 MB each at 24 MP).
    black_cell = black_per_colour[pattern]
    for row in range(2):
        for col in range(2):
            cell = visible[row::2, col::2]
            np.subtract(cell, black_cell[row, col], out=cell)
            np.divide(cell, np.maximum(white - black_cell[row, col], np.float32(1.0)), out=cell)
    pad_bottom = (pad_top + height) % 2
    pad_right = (pad_left + width) % 2
    mosaic = np.pad(visible, ((pad_top, pad_bottom), (pad_left, pad_right)), mode="reflect") if pad_top or pad_left or pad_bottom or pad_right else visible
    planes = np.stack([mosaic[0::2, 0::2], mosaic[0::2, 1::2], mosaic[1::2, 0::2], mosaic[1::2, 1::2]])
    return RawImage(
        planes=np.ascontiguousarray(planes),
        height=height,
        width=width,
        pad_top=pad_top,
        pad_left=pad_left,
        wb_gains=wb_gains,
        cam_to_srgb=cam_to_srgb,
        flip=flip,
        cfa=cfa,
    )


def network_input(image: RawImage, white: float | None = None) -> np.ndarray:
    """Metadata-driven normalisation of packed planes: white balance, colour matrix, exposure, sRGB curve; (4, Hp, Wp) float32.

    This mirrors LibRaw's order (scale and clip, colour matrix, auto-brightness) at half resolution so that the
    network sees camera-independent, roughly display-referred data and can spend its capacity on demosaicing,
    tone, defects and compression. Green detail (G1 - G2) is kept by shifting both greens by the same amount.
    """
    return normalise_planes(image.planes, image.wb_gains, image.cam_to_srgb, white)


def network_input_and_white(image: RawImage, overwrite: bool = False) -> tuple[np.ndarray, float]:
    """network_input and the frame's auto-brightness level. `overwrite`: write the result over image.planes
    (no second frame-sized array), for a caller that reads no raw values from `image` afterwards."""
    return normalise_planes_and_white(image.planes, image.wb_gains, image.cam_to_srgb, out=image.planes if overwrite else None)


def _camera_to_srgb(planes: np.ndarray, wb_gains: np.ndarray, cam_to_srgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw planes (4, h, w) -> (linear sRGB (3, h, w), the shift that takes each green plane to sRGB green).

    The sRGB values are not clipped: LibRaw clips after its demosaic, per pixel, and so does the decoder's
    skeleton (rcam.codec.skeleton); clipping the noise of dark cells here would lift their mean, and no decoder could
    undo that (the skeleton inverts this step exactly).
    """
    red, _, _, blue = np.maximum(planes, 0.0)  # LibRaw clips below black too
    red = np.minimum(red * wb_gains[0], 1.0)
    green1, green2 = greens = _white_balanced_greens(planes, wb_gains)
    blue = np.minimum(blue * wb_gains[2], 1.0)
    green = 0.5 * (green1 + green2)
    camera_rgb = np.stack([red, green, blue]).reshape(3, -1)
    srgb = (cam_to_srgb @ camera_rgb).reshape(3, *red.shape)
    return srgb, greens


def _white_balanced_greens(planes: np.ndarray, wb_gains: np.ndarray) -> np.ndarray:
    """The two green planes of raw planes (4, h, w), clipped at black, white-balanced and clipped at white: (2, h, w)."""
    return np.minimum(np.maximum(planes[1:3], 0.0) * wb_gains[1], 1.0)


def _srgb_frame(planes: np.ndarray, wb_gains: np.ndarray, cam_to_srgb: np.ndarray) -> np.ndarray:
    """_camera_to_srgb's linear sRGB of raw planes (4, h, w), a band of rows at a time (the conversion's
    temporaries are a band's): (3, h, w) float32."""
    srgb = np.empty((3, *planes.shape[1:]), np.float32)
    for top in range(0, planes.shape[1], NORMALISE_BAND_ROWS):
        band = slice(top, top + NORMALISE_BAND_ROWS)
        srgb[:, band] = _camera_to_srgb(planes[:, band], wb_gains, cam_to_srgb)[0]
    return srgb


def _auto_white(srgb: np.ndarray) -> float:
    # LibRaw's auto-brightness: the level that 1% of the pixels of the brightest channel exceed becomes white,
    # counted on its clipped output; a channel at a time, so the clipped copy is one channel's.
    levels = [float(np.quantile(np.clip(channel, 0.0, 1.0).reshape(-1), 1.0 - AUTO_BRIGHT_FRACTION)) for channel in srgb]
    return max(max(levels), 256.0 / 65535.0)


def auto_bright_white(planes: np.ndarray, wb_gains: np.ndarray, cam_to_srgb: np.ndarray) -> float:
    """LibRaw's auto-brightness level for raw planes (4, h, w): the linear sRGB level 1% of the brightest channel exceeds."""
    return _auto_white(_srgb_frame(planes, wb_gains, cam_to_srgb))


def normalise_planes(
    planes: np.ndarray, wb_gains: np.ndarray, cam_to_srgb: np.ndarray, white: float | None = None
) -> np.ndarray:  # fmt: skip
    """network_input for raw planes (4, h, w) and their file's colour metadata -> (4, h, w) float32.

    `white` is the auto-brightness level; by default it is measured on these planes (a whole frame). Training
    passes the whole frame's level when it normalises a crop.
    """
    return normalise_planes_and_white(planes, wb_gains, cam_to_srgb, white)[0]


NORMALISE_BAND_ROWS = 128  # packed rows converted at a time (memory, not results: every value is computed alone)


def normalise_planes_and_white(
    planes: np.ndarray, wb_gains: np.ndarray, cam_to_srgb: np.ndarray, white: float | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """normalise_planes, also returning the auto-brightness level it used.

    A band of rows at a time, so the frame-sized temporaries of the colour conversion (about 10 bytes a sensor
    pixel) are a band's. `out`: a (4, h, w) float32 array to write into; it may be `planes` itself, when the
    caller no longer needs the raw values (rcam.codec.engine.encode_file: 4 bytes a sensor pixel less).
    """
    # Measuring the level needs the whole frame's colour conversion first; keep it (3 bytes a sensor pixel) for
    # the normalisation rather than convert every band twice.
    srgb = _srgb_frame(planes, wb_gains, cam_to_srgb) if white is None else None
    white = _auto_white(srgb) if white is None else white
    out = np.empty(planes.shape, np.float32) if out is None else out
    for top in range(0, planes.shape[1], NORMALISE_BAND_ROWS):
        band = slice(top, top + NORMALISE_BAND_ROWS)
        out[:, band] = _normalised_band(planes[:, band], wb_gains, cam_to_srgb, white, None if srgb is None else srgb[:, band])
    return out, white


def _normalised_band(
    planes: np.ndarray, wb_gains: np.ndarray, cam_to_srgb: np.ndarray, white: float, srgb: np.ndarray | None = None
) -> np.ndarray:  # fmt: skip
    """normalise_planes of a band of rows (4, b, w), given the frame's auto-brightness level and, when the caller
    has it, the band's linear sRGB (3, b, w) from _camera_to_srgb."""
    if srgb is None:
        srgb, greens = _camera_to_srgb(planes, wb_gains, cam_to_srgb)
    else:
        greens = _white_balanced_greens(planes, wb_gains)
    green_shift = srgb[1] - 0.5 * (greens[0] + greens[1])
    out = np.stack([srgb[0], greens[0] + green_shift, greens[1] + green_shift, srgb[2]])
    del srgb, greens, green_shift
    np.divide(out, white, out=out)
    np.clip(out, -1.5, 1.5, out=out)
    # sRGB transfer curve, odd-extended to the negative values of noisy dark cells: the target is gamma-encoded,
    # so the network starts from a near-identity mapping.
    sign = np.sign(out)
    np.abs(out, out=out)
    linear = out <= 0.0031308
    linear_values = 12.92 * out[linear]
    np.power(out, 1 / 2.4, out=out)
    np.multiply(out, 1.055, out=out)
    np.subtract(out, 0.055, out=out)
    out[linear] = linear_values
    np.multiply(out, sign, out=out)
    return out.astype(np.float32, copy=False)


RENDER_BAND_ROWS = 256  # rows of raw values reference_render adjusts at a time (memory, not results)


def _black_per_pixel(raw: rawpy.RawPy, rows: slice = slice(None)) -> np.ndarray:
    """(H, W) float64 black level of each visible pixel (its CFA colour's level), or of the visible rows `rows`."""
    return np.asarray(raw.black_level_per_channel, dtype=np.float64)[raw.raw_colors_visible[rows]]


def raw_values(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The visible raw values as stored: ((H, W) float64 DN, (H, W) black level of each pixel, white level)."""
    path = Path(path)
    raw = _open(path)
    try:
        return raw.raw_image_visible.astype(np.float64), _black_per_pixel(raw), int(raw.white_level)
    finally:
        raw.close()


@dataclass(frozen=True)
class CellFalloff:
    """A lens falloff given per 2x2 CFA cell, as the encoder's packed planes have it: `cells` (Hp, Wp) float32
    gains in (0, 1] over the padded mosaic (rows and columns reflected in by `pad_top`, `pad_left`), of a visible
    area of `height` x `width`. reference_render expands it a band of rows at a time: a map per sensor pixel is
    4 bytes a pixel (380 MB at 100 MP), this a quarter of that."""

    cells: np.ndarray
    pad_top: int
    pad_left: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the visible area, as a per-pixel map's shape."""
        return self.height, self.width

    def rows(self, band: slice) -> np.ndarray:
        """The gains of the visible rows `band`, per sensor pixel: (rows, W) float32."""
        start, stop, _ = band.indices(self.height)
        first = start + self.pad_top  # in the padded mosaic's rows
        cells = self.cells[first // 2 : (stop + self.pad_top + 1) // 2]
        expanded = cells.repeat(2, axis=0)[first % 2 : first % 2 + (stop - start)]
        return expanded.repeat(2, axis=1)[:, self.pad_left : self.pad_left + self.width]


def reference_render(
    path: Path, falloff: np.ndarray | CellFalloff | None = None, raw_noise: np.ndarray | None = None
) -> np.ndarray:  # fmt: skip
    """LibRaw's standard render of a RAW file (SPEC §3): (H, W, 3) uint8 sRGB, orientation applied.

    falloff: (H, W) lens gains in (0, 1] over the visible sensor area, or a CellFalloff; the raw values above
    black are divided by it (and clipped at white) before LibRaw renders: the reference render of the file
    without that falloff, auto-brightness included. raw_noise: (H, W) raw DN added to the visible values (after the falloff) before
    LibRaw renders, e.g. a second draw of the sensor's noise (bench/error_breakdown.py).
    """
    path = Path(path)
    raw = _open(path)
    try:
        visible = raw.raw_image_visible  # a view: LibRaw renders what is written here
        for name, given in (("falloff map", falloff), ("raw noise map", raw_noise)):
            if given is not None and given.shape != visible.shape:
                raise RcamError(f"{path}: a {name} must be {visible.shape[1]}x{visible.shape[0]}, not {given.shape[1::-1]}")
        gains = falloff.cells if isinstance(falloff, CellFalloff) else falloff
        if isinstance(falloff, CellFalloff) and gains.shape != ((falloff.pad_top + falloff.height + 1) // 2, (falloff.pad_left + falloff.width + 1) // 2):
            raise RcamError(f"{path}: a falloff of {gains.shape[1]}x{gains.shape[0]} cells does not cover the padded mosaic")
        if gains is not None and not np.all((gains > 0) & (gains <= 1)):
            raise RcamError(f"{path}: a falloff map must hold gains in (0, 1]")
        if falloff is not None or raw_noise is not None:
            # In bands of rows, the black levels too: float64 copies of the whole frame were several hundred MB
            # at 24 MP, and the encoder renders this beside its analysis.
            for top in range(0, visible.shape[0], RENDER_BAND_ROWS):
                band = slice(top, top + RENDER_BAND_ROWS)
                values = visible[band].astype(np.float64)
                if falloff is not None:
                    black = _black_per_pixel(raw, band)
                    values = black + (values - black) / (falloff.rows(band) if isinstance(falloff, CellFalloff) else falloff[band])
                if raw_noise is not None:
                    values += raw_noise[band]
                visible[band] = np.clip(np.rint(values), 0, raw.white_level).astype(visible.dtype)
        return raw.postprocess(
            use_camera_wb=True, output_color=rawpy.ColorSpace.sRGB, output_bps=8, gamma=(2.4, 12.92)
        )
    except rawpy.LibRawError as error:
        raise RcamError(f"{path}: LibRaw cannot render it ({_libraw_message(error)})") from None
    finally:
        raw.close()


def oriented_view(image: np.ndarray, flip: int) -> np.ndarray:
    """apply_flip as a view of `image` (strided, no copy): for callers that only read it, e.g. to quantise."""
    if flip & 2:
        image = image[::-1]
    if flip & 1:
        image = image[:, ::-1]
    if flip & 4:
        image = image.transpose(1, 0, 2)
    return image


def apply_flip(image: np.ndarray, flip: int) -> np.ndarray:
    """Orient an (H, W, C) image as LibRaw does for its flip code (same result as the reference render)."""
    return np.ascontiguousarray(oriented_view(image, flip))


def undo_flip(image: np.ndarray, flip: int) -> np.ndarray:
    """The inverse of apply_flip: an oriented (H, W, C) image back in sensor orientation."""
    if flip & 4:
        image = image.transpose(1, 0, 2)
    if flip & 1:
        image = image[:, ::-1]
    if flip & 2:
        image = image[::-1]
    return np.ascontiguousarray(image)
