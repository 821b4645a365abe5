"""The bundled default input and the demo job: make a sample DNG, encode, decode, report bpp and PSNR.

The sample is generated, not shipped: a procedural scene (colour patches, gradients, edges, texture) goes
through the synthetic-RAW engine, so it is a real Bayer DNG with vignetting, dark shading and noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from rcam.codec.engine import decode_bytes, encode_file
from rcam.codec.output import encode_image, write_atomic
from rcam.codec.rawio import reference_render
from rcam.codec.zoo import Codec
from rcam.measure.metrics import psnr
from rcam.training.synth import make_pair


def sample_scene(height: int = 480, width: int = 640, seed: int = 7) -> np.ndarray:
    """A deterministic photo-like test scene: (height, width, 3) uint8 sRGB."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    # Sky-to-ground gradient with a soft sun.
    sky = np.stack([0.35 + 0.3 * rows / height, 0.5 + 0.2 * rows / height, 0.85 - 0.3 * rows / height], axis=-1)
    sun = np.exp(-((rows - 0.25 * height) ** 2 + (cols - 0.75 * width) ** 2) / (0.02 * height * width))[..., None]
    image = sky + 0.6 * sun
    # Textured ground: smooth noise at a few scales.
    ground = rows > 0.6 * height
    texture = sum(
        np.asarray(Image.fromarray(rng.random((height // s + 1, width // s + 1)).astype(np.float32)).resize((width, height), Image.Resampling.BICUBIC))
        / (1 + i)
        for i, s in enumerate((64, 16, 4))
    )
    image[ground] = (np.array([0.3, 0.45, 0.2]) * (0.6 + 0.4 * texture[..., None]))[ground]
    # A colour chart (6 x 4 patches) with black borders: saturated colours and neutral steps.
    colours = rng.random((4, 6, 3))
    colours[3] = np.linspace(0.05, 0.95, 6)[:, None]
    top, left, patch = int(0.1 * height), int(0.08 * width), max(8, int(0.06 * width))
    for r in range(4):
        for c in range(6):
            y, x = top + r * (patch + 4), left + c * (patch + 4)
            image[y : y + patch, x : x + patch] = colours[r, c]
    # Fine detail: a radial line pattern (moiré-prone for demosaicing).
    centre_y, centre_x = int(0.75 * height), int(0.3 * width)
    angle = np.arctan2(rows - centre_y, cols - centre_x)
    disc = (rows - centre_y) ** 2 + (cols - centre_x) ** 2 < (0.18 * height) ** 2
    image[disc] = (0.5 + 0.45 * np.sign(np.sin(36 * angle)))[disc][:, None]
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_sample_dng(out_dir: Path, seed: int = 7):
    """Write the sample scene as a synthetic camera DNG (with defects) and its clean twin; returns the PairFiles."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scene = out_dir / "sample_scene.png"
    Image.fromarray(sample_scene(seed=seed)).save(scene)
    return make_pair(scene, out_dir, np.random.default_rng(seed), "sample")


def run_demo(codec: Codec, out_dir: Path, raw_path: Path | None = None, lam: float = 0.01) -> dict:
    """Encode and decode `raw_path` (default: the generated sample); write .rcb and PNG; return bpp and PSNR."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = None if raw_path else make_sample_dng(out_dir)
    raw_path = Path(raw_path) if raw_path else sample.degraded
    encoded = encode_file(codec, raw_path, lam)
    write_atomic(out_dir / (raw_path.stem + ".rcb"), encoded.data)
    decoded = decode_bytes(codec, encoded.data)
    write_atomic(out_dir / (raw_path.stem + ".png"), encode_image(decoded, "png"))
    reference = reference_render(raw_path)
    decoded_8bit = np.round(decoded * 255).astype(np.uint8)
    pixels = reference.shape[0] * reference.shape[1]
    result = {
        "input": str(raw_path),
        "bytes": len(encoded.data),
        "bpp": 8 * len(encoded.data) / pixels,
        "psnr": psnr(decoded_8bit, reference),
        "size": f"{reference.shape[1]}x{reference.shape[0]}",
        "output": str(out_dir / (raw_path.stem + ".png")),
    }
    if sample is not None:  # the generated sample has a defect-free twin: the codec's real target
        result["psnr_clean"] = psnr(decoded_8bit, np.asarray(Image.open(sample.target).convert("RGB")))
    return result
