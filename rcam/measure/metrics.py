"""Image quality metrics on 8-bit sRGB images (SPEC §8): PSNR, MS-SSIM in dB, mean CIEDE2000, bpp.

LPIPS is deliberately absent: its network weights cannot be downloaded on the project's machines.
"""

import math

import numpy as np
import torch
from pytorch_msssim import ms_ssim
from scipy.ndimage import gaussian_filter

from rcam.errors import RcamError

# MS-SSIM's five scales with an 11-tap window need the short side to exceed (11 - 1) * 2**4 = 160 px.
MS_SSIM_MIN_SIDE = 161

# Below this many pixels MS-SSIM runs on one thread (see ms_ssim_value).
_MS_SSIM_THREADED_PIXELS = 1 << 20

# Pixels per chunk for CIEDE2000, so a 24 MP image does not allocate several GiB of float64 temporaries.
_CIEDE_CHUNK_PIXELS = 1 << 20


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    """Raise RcamError unless a and b are equal-shape (H,W,3) uint8 images."""
    for name, img in (("first", a), ("second", b)):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            shape = getattr(img, "shape", None)
            dtype = getattr(img, "dtype", type(img).__name__)
            raise RcamError(f"metrics need (H,W,3) uint8 images; the {name} is {shape} {dtype}")
    if a.shape != b.shape:
        raise RcamError(f"metrics need images of the same size; got {a.shape} and {b.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise RcamError(f"metrics need a non-empty image; got {a.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB (peak 255) between two (H,W,3) uint8 images over all channels; inf when identical."""
    _check_pair(a, b)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    if mse == 0:
        return math.inf
    return float(10.0 * np.log10(255.0**2 / mse))


def ms_ssim_value(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM in [0, 1] of two (H,W,3) uint8 images (5 scales, standard weights, data range 255).

    Images whose short side is under 161 px are mirror-padded (numpy 'symmetric') to 161 px on both
    images before measuring: this keeps the standard 5-scale definition, at the cost of counting some
    border content twice. Only tiny test images are affected; real photographs are far larger.
    """
    _check_pair(a, b)
    height, width = a.shape[:2]
    pad_h = max(0, MS_SSIM_MIN_SIDE - height)
    pad_w = max(0, MS_SSIM_MIN_SIDE - width)
    if pad_h or pad_w:
        widths = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        a = np.pad(a, widths, mode="symmetric")
        b = np.pad(b, widths, mode="symmetric")
    # (H,W,3) uint8 -> (1,3,H,W) float32 on the CPU; float32 resolves 1 - MS-SSIM far below 1e-4 (40 dB)
    # and halves the memory of float64 on 20+ MP photographs.
    ta = torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))).unsqueeze(0).float()
    tb = torch.from_numpy(np.ascontiguousarray(b.transpose(2, 0, 1))).unsqueeze(0).float()
    # Small images run single-threaded: torch's threaded depthwise convolutions are then dominated by
    # thread synchronisation and become 10x slower when another process (training) holds a core.
    threads = torch.get_num_threads()
    single_thread = a.shape[0] * a.shape[1] < _MS_SSIM_THREADED_PIXELS and threads > 1
    try:
        if single_thread:
            torch.set_num_threads(1)
        with torch.no_grad():
            value = ms_ssim(ta, tb, data_range=255, size_average=True)
    finally:
        if single_thread:
            torch.set_num_threads(threads)
    return float(value)


def ms_ssim_db(a: np.ndarray, b: np.ndarray) -> float:
    """MS-SSIM in dB, -10·log10(1 - MS-SSIM), of two (H,W,3) uint8 images; inf when MS-SSIM is 1."""
    value = ms_ssim_value(a, b)
    if value >= 1.0:
        return math.inf
    return float(-10.0 * math.log10(1.0 - value))


# sRGB (IEC 61966-2-1) linear RGB -> CIE XYZ, D65; its row sums are the D65 white used for Lab.
_SRGB_TO_XYZ = np.array([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
])
_WHITE_XYZ = _SRGB_TO_XYZ.sum(axis=1)


def _srgb_decode_lut() -> np.ndarray:
    """(256,) float64 table: 8-bit sRGB code value -> linear light in [0, 1] (sRGB EOTF)."""
    code = np.arange(256) / 255.0
    return np.where(code <= 0.04045, code / 12.92, ((code + 0.055) / 1.055) ** 2.4)


_SRGB_TO_LINEAR = _srgb_decode_lut()


def srgb_to_lab(img: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB -> (..., 3) float64 CIELAB: sRGB EOTF -> linear -> XYZ (D65) -> Lab (D65 white)."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.shape[-1:] != (3,):
        raise RcamError(f"srgb_to_lab needs (..., 3) uint8 values; got {img.shape} {img.dtype}")
    xyz = (_SRGB_TO_LINEAR[img] @ _SRGB_TO_XYZ.T) / _WHITE_XYZ
    # CIE 1976 f(t): cube root above (6/29)^3, linear segment below.
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def _pow7(x: np.ndarray) -> np.ndarray:
    """x**7 by multiplication (several times faster than numpy's general power on large arrays)."""
    x2 = x * x
    return x2 * x2 * x2 * x


def ciede2000_lab(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 ΔE between CIELAB colours (..., 3) (L*, a*, b*), kL = kC = kH = 1; shape (...).

    The formula as written in Sharma, Wu & Dalal (2005), with their conventions for zero chroma and for
    hue differences of exactly 180°. (scikit-image's deltaE_ciede2000 misses their pair 10 by 0.04
    because rounding puts that exact 180° on the wrong side, hence this implementation.)
    """
    lab1 = np.asarray(lab1, dtype=np.float64)
    lab2 = np.asarray(lab2, dtype=np.float64)
    if lab1.shape != lab2.shape or lab1.shape[-1:] != (3,):
        raise RcamError(f"CIEDE2000 needs two (..., 3) Lab arrays of the same shape; got {lab1.shape}, {lab2.shape}")
    l1, a1, b1 = np.moveaxis(lab1, -1, 0)
    l2, a2, b2 = np.moveaxis(lab2, -1, 0)

    # a* is stretched for near-neutral colours (the G term) before chroma and hue are taken.
    chroma_mean7 = _pow7((np.sqrt(a1 * a1 + b1 * b1) + np.sqrt(a2 * a2 + b2 * b2)) / 2)
    g = 0.5 * (1 - np.sqrt(chroma_mean7 / (chroma_mean7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.sqrt(a1p * a1p + b1 * b1), np.sqrt(a2p * a2p + b2 * b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360.0  # arctan2(0, 0) = 0, the paper's convention
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360.0
    chroma_product = c1p * c2p
    neutral = chroma_product == 0

    # Hue difference and mean hue both branch on |h2' - h1'| > 180°. A tolerance far below the data's
    # precision keeps an exact 180° on the "<= 180" side despite rounding in arctan2.
    hue_diff = h2p - h1p
    wraps = np.abs(hue_diff) > 180.0 + 1e-9
    dhp = np.where(neutral, 0.0, np.where(wraps, hue_diff - 360.0 * np.sign(hue_diff), hue_diff))
    hue_sum = h1p + h2p
    mean_hp = np.where(wraps, np.where(hue_sum < 360.0, hue_sum + 360.0, hue_sum - 360.0) / 2, hue_sum / 2)
    mean_hp = np.where(neutral, hue_sum, mean_hp)

    d_lp = l2 - l1
    d_cp = c2p - c1p
    d_hp = 2 * np.sqrt(chroma_product) * np.sin(np.radians(dhp) / 2)
    mean_lp = (l1 + l2) / 2
    mean_cp = (c1p + c2p) / 2

    t = (1 - 0.17 * np.cos(np.radians(mean_hp - 30)) + 0.24 * np.cos(np.radians(2 * mean_hp))
         + 0.32 * np.cos(np.radians(3 * mean_hp + 6)) - 0.20 * np.cos(np.radians(4 * mean_hp - 63)))
    d_theta = 30 * np.exp(-(((mean_hp - 275) / 25) ** 2))
    mean_cp7 = _pow7(mean_cp)
    r_c = 2 * np.sqrt(mean_cp7 / (mean_cp7 + 25.0**7))
    s_l = 1 + 0.015 * (mean_lp - 50) ** 2 / np.sqrt(20 + (mean_lp - 50) ** 2)
    s_c = 1 + 0.045 * mean_cp
    s_h = 1 + 0.015 * mean_cp * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    term_l, term_c, term_h = d_lp / s_l, d_cp / s_c, d_hp / s_h
    return np.sqrt(term_l**2 + term_c**2 + term_h**2 + r_t * term_c * term_h)


def ciede2000(a: np.ndarray, b: np.ndarray) -> float:
    """Mean CIEDE2000 ΔE over all pixels of two (H,W,3) uint8 sRGB images."""
    _check_pair(a, b)
    flat_a = a.reshape(-1, 3)
    flat_b = b.reshape(-1, 3)
    total = 0.0
    for start in range(0, flat_a.shape[0], _CIEDE_CHUNK_PIXELS):
        stop = start + _CIEDE_CHUNK_PIXELS
        delta = ciede2000_lab(srgb_to_lab(flat_a[start:stop]), srgb_to_lab(flat_b[start:stop]))
        total += float(delta.sum())
    return total / flat_a.shape[0]


def bits_per_pixel(num_bytes: int, num_pixels: int) -> float:
    """bpp = 8 × compressed bytes / output pixels (SPEC §8: the whole file counts)."""
    if num_pixels <= 0:
        raise RcamError(f"bits per pixel needs a positive pixel count; got {num_pixels}")
    if num_bytes < 0:
        raise RcamError(f"bits per pixel needs a non-negative byte count; got {num_bytes}")
    return 8.0 * num_bytes / num_pixels


def dark_offset(reference: np.ndarray, decoded: np.ndarray, fraction: float = 0.05, sigma: float = 2.0) -> float:
    """Mean decoded − reference (8-bit levels) over the darkest `fraction` of the reference's areas; (H,W,3) images.

    The areas are chosen on the reference's luma blurred by a Gaussian of `sigma` pixels: chosen pixel by pixel
    on a noisy render, the darkest pixels are those whose noise happened to be negative (clipped at black),
    and any decoder that smooths noise, even the reference blurred by σ 2, would read as several levels
    "lifted" there (5.4 levels on the Canon DNG). Lifted shadows are an area's level, which this measures.
    """
    _check_pair(reference, decoded)
    luma = gaussian_filter(reference.astype(np.float64).mean(axis=2), sigma)
    dark = luma <= np.percentile(luma, 100 * fraction)
    return float(decoded[dark].astype(np.float64).mean() - reference[dark].astype(np.float64).mean())


def all_metrics(reference: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """The evaluation's metrics of a decoded (H,W,3) uint8 image against its reference, keyed by name."""
    return {
        "psnr": psnr(reference, decoded),
        "ms_ssim_db": ms_ssim_db(reference, decoded),
        "ciede2000": ciede2000(reference, decoded),
    }
