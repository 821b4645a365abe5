"""The "cascades" rcam is compared with (SPEC §8): reference render, then a standard image codec.

Each baseline encodes and decodes an 8-bit sRGB image in process with imagecodecs over a quality sweep
chosen so that typical photographs span roughly 0.1–3 bpp (measured on camera renders and photos of the
project's data; smooth images land lower, noisy ones higher).

A learned-ISP cascade is named ISP+CODEC (e.g. cameranet+jpegxl): the learned ISP (rcam.comparators) renders
the RAW instead of LibRaw, and the codec's own baseline compresses that render with the same sweep. Here it
is the codec's Baseline with the ISP's name in `isp`; whoever runs it supplies the ISP's render.
"""

import dataclasses

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np

from rcam.errors import RcamError
from rcam.measure.metrics import bits_per_pixel


@dataclass(frozen=True)
class Baseline:
    """One standard codec: its name, default quality sweep (higher = more bytes) and fixed settings."""

    name: str
    label: str
    qualities: tuple[float, ...]
    settings: dict
    encode: Callable[[np.ndarray, float, int | None], bytes]
    decode: Callable[[bytes], np.ndarray]
    isp: str | None = None  # the learned ISP that renders the RAW (LEARNED_ISPS); None: LibRaw's reference render


@dataclass
class BaselinePoint:
    """One operating point of a baseline on one image: quality, compressed size and decoded image."""

    codec: str
    quality: float
    num_bytes: int
    bpp: float
    decoded: np.ndarray  # (H,W,3) uint8


def _encode_jpeg(img: np.ndarray, quality: float, numthreads: int | None) -> bytes:
    """JPEG with libjpeg-turbo, 4:2:0 chroma subsampling, optimised Huffman tables; single-threaded."""
    return imagecodecs.jpeg8_encode(img, level=int(quality), subsampling="420", optimize=True)


def _encode_webp(img: np.ndarray, quality: float, numthreads: int | None) -> bytes:
    """Lossy WebP (libwebp, default method 4); imagecodecs would otherwise pick lossless."""
    return imagecodecs.webp_encode(img, level=float(quality), lossless=False, numthreads=numthreads)


def _encode_jpegxl(img: np.ndarray, quality: float, numthreads: int | None) -> bytes:
    """JPEG XL (libjxl) at effort 7; quality 0–100 is mapped to a Butteraugli distance by libjxl."""
    return imagecodecs.jpegxl_encode(img, level=int(quality), effort=7, numthreads=numthreads)


def _encode_avif(img: np.ndarray, quality: float, numthreads: int | None) -> bytes:
    """AVIF (libavif, default AV1 encoder, YUV 4:4:4 like avifenc's default) at speed 6."""
    return imagecodecs.avif_encode(img, level=int(quality), speed=6, pixelformat="444", numthreads=numthreads)


BASELINES: dict[str, Baseline] = {
    baseline.name: baseline
    for baseline in (
        Baseline(
            "jpeg", "JPEG", (10, 20, 35, 50, 65, 80, 90, 95),
            {"library": "libjpeg-turbo", "subsampling": "420", "optimize": True},
            _encode_jpeg, imagecodecs.jpeg8_decode,
        ),
        Baseline(
            "webp", "WebP", (10, 25, 45, 65, 80, 90, 95),
            {"library": "libwebp", "lossless": False},
            _encode_webp, imagecodecs.webp_decode,
        ),
        Baseline(
            "jpegxl", "JPEG XL", (10, 25, 45, 65, 80, 90, 95),
            {"library": "libjxl", "effort": 7},
            _encode_jpegxl, imagecodecs.jpegxl_decode,
        ),
        Baseline(
            "avif", "AVIF", (10, 20, 30, 45, 60, 75, 85),
            {"library": "libavif", "speed": 6, "pixelformat": "444"},
            _encode_avif, imagecodecs.avif_decode,
        ),
    )
}


# Other spellings of codec names.
CODEC_ALIASES = {"jxl": "jpegxl"}

# The learned ISPs of the seed papers (rcam.comparators) that cascades can start with, and their labels.
LEARNED_ISPS = {"cameranet": "CameraNet", "casnet": "CAS-Net ISP"}


def baseline_names() -> list[str]:
    """Every baseline name get_baseline accepts (aliases aside): the codecs, then each learned ISP with each codec."""
    return list(BASELINES) + [f"{isp}+{codec}" for isp in LEARNED_ISPS for codec in BASELINES]


def get_baseline(name: str) -> Baseline:
    """Look a baseline up by name: a codec (jpeg, webp, jpegxl or jxl, avif) or ISP+CODEC (e.g. cameranet+jxl)."""
    isp, _, codec = name.strip().lower().rpartition("+")
    codec = CODEC_ALIASES.get(codec, codec)
    if codec not in BASELINES or (isp and isp not in LEARNED_ISPS):
        raise RcamError(f"unknown baseline {name!r}; choose from {', '.join(baseline_names())}")
    baseline = BASELINES[codec]
    if not isp:
        return baseline
    return dataclasses.replace(
        baseline, name=f"{isp}+{codec}", label=f"{LEARNED_ISPS[isp]} + {baseline.label}", settings={"isp": isp, **baseline.settings}, isp=isp
    )  # fmt: skip


def library_versions() -> dict[str, str]:
    """Versions of the codec libraries behind the baselines (part of the cache key and the report)."""
    return {
        "imagecodecs": imagecodecs.__version__,
        "jpeg": imagecodecs.jpeg8_version(),
        "webp": imagecodecs.webp_version(),
        "jpegxl": imagecodecs.jpegxl_version(),
        "avif": imagecodecs.avif_version(),
    }


def _check_image(img: np.ndarray) -> None:
    """Raise RcamError unless img is a non-empty (H,W,3) uint8 image."""
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        shape, dtype = getattr(img, "shape", None), getattr(img, "dtype", type(img).__name__)
        raise RcamError(f"baselines need an (H,W,3) uint8 image; got {shape} {dtype}")


def encode_decode(name: str, img: np.ndarray, quality: float, numthreads: int | None = None) -> BaselinePoint:
    """Encode (H,W,3) uint8 img with baseline `name` at `quality`, decode it back, and measure the size."""
    _check_image(img)
    baseline = get_baseline(name)
    img = np.ascontiguousarray(img)
    data = baseline.encode(img, quality, numthreads)
    decoded = np.asarray(baseline.decode(data))
    if decoded.shape != img.shape or decoded.dtype != np.uint8:
        raise RcamError(f"{baseline.label} decoded to {decoded.shape} {decoded.dtype}, expected {img.shape} uint8")
    height, width = img.shape[:2]
    return BaselinePoint(baseline.name, float(quality), len(data), bits_per_pixel(len(data), height * width), decoded)


def sweep(
    name: str, img: np.ndarray, qualities: Sequence[float] | None = None, numthreads: int | None = None
) -> list[BaselinePoint]:
    """All operating points of baseline `name` on one (H,W,3) uint8 image, in increasing quality."""
    baseline = get_baseline(name)
    qualities = sorted(baseline.qualities if qualities is None else qualities)
    return [encode_decode(name, img, quality, numthreads) for quality in qualities]


def time_cascade(
    raw_path: Path,
    render: Callable[[Path], np.ndarray],
    quality: float = 80,
    numthreads: int | None = None,
) -> dict[str, float]:
    """Time the cascade a user runs today: reference render of a RAW file, then JPEG XL (effort 7) encode.

    Returns seconds for the render, the encode and both, the output megapixels, the JPEG XL bytes and
    seconds per megapixel of the whole cascade.
    """
    start = time.perf_counter()
    rendered = render(Path(raw_path))
    rendered_at = time.perf_counter()
    _check_image(rendered)
    data = _encode_jpegxl(np.ascontiguousarray(rendered), quality, numthreads)
    done = time.perf_counter()
    megapixels = rendered.shape[0] * rendered.shape[1] / 1e6
    total = done - start
    return {
        "render_s": rendered_at - start,
        "encode_s": done - rendered_at,
        "total_s": total,
        "megapixels": megapixels,
        "num_bytes": len(data),
        "s_per_mp": total / megapixels,
    }
