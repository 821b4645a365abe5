"""Training: random patches of synthetic RAW pairs, loss R + λ·255²·MSE with λ drawn per sample, resumable.

A run lives in one folder: `last.pt` (model, optimiser, step; written every `checkpoint_every` steps and on
Ctrl-C) and `log.jsonl`. Running the same config again resumes where the run stopped.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from rcam.codec.layers import VignettingEstimator
from rcam.codec.models import CONFIGS, LAMBDA_RANGE, ModelConfig, RealCamNet, quantise_latent, rate_bits
from rcam.codec.rawio import RawImage, auto_bright_white, network_input_and_white, normalise_planes, read_raw, reference_render, undo_flip
from rcam.codec.tiling import Tile, coordinate_map, thumbnail
from rcam.errors import RcamError
from rcam.training.synth import (
    HELD_OUT_FAMILIES,
    DefectParams,
    SensorParams,
    degrade_planes,
    sample_defects,
    vignetting_at,
    without_vignetting,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; stored in the run folder and the checkpoint manifest."""

    dataset: str  # index.jsonl written by rcam.training.synth.build_dataset
    run_dir: str
    model: str = "small"
    model_overrides: dict = field(default_factory=dict)  # e.g. {"cadr": false} for ablations
    steps: int = 20000
    batch_size: int = 8
    patch: int = 64  # packed pixels (a 128×128 sensor crop)
    learning_rate: float = 3e-4
    final_learning_rate: float = 3e-5
    lambda_min: float = LAMBDA_RANGE[0]
    lambda_max: float = LAMBDA_RANGE[1]
    val_fraction: float = 0.0  # the dataset has no val images: validation uses separate pairs
    checkpoint_every: int = 500
    log_every: int = 50
    threads: int = 2
    seed: int = 0
    device: str = "auto"
    init_from: str = ""  # start weights from this checkpoint (fine-tuning); ignored when resuming
    init_exclude: list = field(default_factory=list)  # name prefixes not taken from init_from, e.g. ["vignetting."]
    val_every: int = 2500  # steps between validations (0: never)
    val_pairs: str = ""  # index.jsonl of synthetic pairs made from the val photos (never trained on)
    val_raw: str = ""  # folder of real DNGs, scored against their own reference render
    val_lambda: float = 0.01
    # Share of patches taken from the clean twin instead of the degraded RAW. Real files carry no synthetic
    # defects; a model that only ever saw them "corrects" vignetting that is not there.
    clean_fraction: float = 0.0
    # Draw new defects (vignetting, dark shading, noise) for every patch from the clean twin instead of reading
    # the degraded DNG: the dataset's few hundred frames would otherwise show the model only a few hundred
    # vignetting layouts, and it learns them by heart instead of learning to estimate one from the frame.
    fresh_defects: bool = False
    # Exponential moving average of the weights (0: off). Validation, best.pt and so exports use the average:
    # single checkpoints of this small model swing by 0.2 in validation cost from one validation to the next.
    ema_decay: float = 0.0
    # The vignetting estimator (models with `vignetting`): examples drawn at the start of a run from sub-windows
    # of the clean twins with fresh falloffs (a few hundred whole frames are too few layouts to learn from),
    # steps of supervised pre-training before the codec's first step, then one step per codec step.
    vignetting_examples: int = 20000
    vignetting_pretrain_steps: int = 3000
    vignetting_learning_rate: float = 1e-3
    vignetting_batch: int = 64
    # Regularisation of the estimator (dropout on its head, AdamW weight decay): unregularised, it learns the
    # training scenes and does worse than a constant falloff on held-out frames (stage 6: log-gain MSE 0.062
    # against 0.031).
    vignetting_dropout: float = 0.0
    vignetting_weight_decay: float = 0.0
    # Skeleton models (SPEC §3, §4): share of patches trained for the faithful look (input the degraded DNG as
    # written, target its own reference render; or a clean twin with its render), the rest for the clean look.
    faithful_fraction: float = 0.0
    # Weight of the skeleton's plane reconstruction loss (MSE against the input planes, on patches whose target
    # keeps them: faithful look or clean input), in the units of the image term; it gives the new plane head a
    # direct signal, where the skeleton's clipping would hide gradients from a bad start.
    plane_weight: float = 0.0
    # Weight of the periodic part of the output's error (periodic_error), in the units of the image term. A
    # flat frame decoded by stage 9 carried 7.7x the reference's energy at the 4-pixel period (the synthesis's
    # last upsampling, seen through the demosaic) and 3.3x at 8 pixels: MSE barely sees a pattern that weak,
    # so it needs a weight of its own to be trained away.
    periodic_weight: float = 0.0
    periodic_periods: list = field(default_factory=lambda: [2, 4, 8])  # output pixels, each dividing 2 · patch
    # Share of patches taken from the flattest of FLAT_CANDIDATES random places in their frame (least target
    # variance): flat noisy areas are where a decoder's periodic texture shows, and random crops of photos
    # rarely land in one (stage 10 lowered that texture on training patches but raised it on a flat grey frame).
    flat_fraction: float = 0.0
    # Defect families (rcam.training.synth.FAMILIES) that fresh defects and vignetting examples never draw: kept for a
    # validation set made with `rcam synth --held-out`, which then measures generalisation to unseen defects.
    held_out_families: list = field(default_factory=lambda: list(HELD_OUT_FAMILIES))
    # A channel-wise context model new to the starting weights (models.ModelConfig.context_slices) is first
    # trained alone for its rate, on the starting encoder's latents of context_examples patches analysed once
    # (batches of context_batch, cosine from context_learning_rate to a tenth), then with the whole codec. From
    # frozen latents it learns in minutes what the joint loss, one small batch a step, takes hours to teach it.
    context_pretrain_steps: int = 3000
    context_examples: int = 2000
    # Also the hyperprior (its transforms and z's entropy bottleneck) in that pre-training, for y's and z's bits:
    # the encoder and decoder still untouched, the hyperprior may leave to the context what it now predicts.
    context_pretrain_hyper: bool = False
    context_learning_rate: float = 1e-3
    context_batch: int = 8

    @staticmethod
    def load(path: Path) -> "TrainConfig":
        """Read a JSON config file."""
        return read_config(TrainConfig, path, "training config")

    def model_config(self) -> ModelConfig:
        """The model this run trains."""
        return replace(CONFIGS[self.model], **self.model_overrides)


@dataclass
class CleanFrame:
    """A clean twin kept as raw planes, so that training can put freshly drawn defects on each crop of it."""

    raw: torch.Tensor  # (4, Hp, Wp) float16 raw planes (0 = black, 1 = white), before white balance
    sample: np.ndarray  # (4, hs, ws) float32 = raw[:, ::stride, ::stride]: the frame's brightness and thumbnail
    stride: int
    frame_shape: tuple[int, int]  # visible sensor (H, W)
    pad_top: int
    pad_left: int
    wb_gains: np.ndarray
    cam_to_srgb: np.ndarray
    sensor: SensorParams
    clean_white: float = 1.0  # the clean twin's own auto-brightness level

    # The strided sample has about this many rows and columns: a few per thumbnail cell.
    SAMPLE_SIDE = 128

    @classmethod
    def from_raw(cls, image: RawImage, sensor: SensorParams) -> "CleanFrame":
        """Keep what fresh_crop needs of a clean twin read with read_raw."""
        stride = max(1, min(image.planes.shape[1:]) // cls.SAMPLE_SIDE)
        return cls(
            raw=torch.from_numpy(image.planes).half(), sample=np.ascontiguousarray(image.planes[:, ::stride, ::stride]),
            stride=stride, frame_shape=(image.height, image.width), pad_top=image.pad_top, pad_left=image.pad_left,
            wb_gains=image.wb_gains, cam_to_srgb=image.cam_to_srgb, sensor=sensor,
            clean_white=auto_bright_white(image.planes, image.wb_gains, image.cam_to_srgb),
        )  # fmt: skip


def fresh_crop(
    frame: CleanFrame, top: int, left: int, patch: int, thumbnail_size: int, defects: DefectParams | None,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
    """Network input of a (patch × patch) packed crop at (top, left) with `defects` (None: clean), its frame's
    thumbnail and auto-brightness level.

    The frame's auto-brightness and thumbnail come from the strided sample with the same defects, so the crop
    is normalised as the whole degraded frame would be. Returns ((4, patch, patch), (4, S, S)) float32, white.
    """
    crop = frame.raw[:, top : top + patch, left : left + patch].float().numpy()
    sample = frame.sample
    if defects is not None:
        crop_first = (2 * top - frame.pad_top, 2 * left - frame.pad_left)
        crop = degrade_planes(crop, frame.sensor, defects, crop_first, 2, rng)
        sample = degrade_planes(sample, frame.sensor, defects, (-frame.pad_top, -frame.pad_left), 2 * frame.stride, rng)
    white, frame_thumbnail = sample_thumbnail(frame, sample, thumbnail_size)
    x = normalise_planes(crop, frame.wb_gains, frame.cam_to_srgb, white)
    return torch.from_numpy(x), frame_thumbnail, white


def sample_thumbnail(frame: CleanFrame, sample: np.ndarray, thumbnail_size: int) -> tuple[float, torch.Tensor]:
    """A strided sample (4, hs, ws) of a frame -> (its auto-brightness level, its network thumbnail (4, S, S))."""
    white = auto_bright_white(sample, frame.wb_gains, frame.cam_to_srgb)
    planes = normalise_planes(sample, frame.wb_gains, frame.cam_to_srgb, white)
    return white, thumbnail(torch.from_numpy(planes), thumbnail_size)


@dataclass
class TrainingImage:
    """One training pair in memory: network input planes, target render, thumbnail (and the clean twin's).

    With fresh defects only the clean twin is kept (`clean_frame`); `planes` and `thumbnail` are then None.
    """

    planes: torch.Tensor | None  # (4, Hp, Wp) float16
    target: torch.Tensor  # (3, 2Hp, 2Wp) uint8, aligned with the padded mosaic
    thumbnail: torch.Tensor | None  # (4, S, S) float32
    clean_planes: torch.Tensor | None = None  # (4, Hp, Wp) float16, the defect-free twin's input
    clean_thumbnail: torch.Tensor | None = None  # (4, S, S) float32
    clean_frame: CleanFrame | None = None
    cam_to_srgb: torch.Tensor | None = None  # (3, 3) float32, the frame's colour matrix (skeleton development)
    white: float = 1.0  # auto-brightness level of `planes`
    clean_white: float = 1.0  # of `clean_planes`
    faithful_target: torch.Tensor | None = None  # (3, 2Hp, 2Wp) uint8: the degraded DNG's own render, padded


def _input_planes(raw_path: Path) -> tuple[torch.Tensor, RawImage, float]:
    image = read_raw(raw_path)
    planes, white = network_input_and_white(image)
    return torch.from_numpy(planes), image, white


def _padded_target(target: Path | np.ndarray, image: RawImage) -> torch.Tensor:
    """The target render (orientation 1; a PNG path or an (H, W, 3) uint8 array) padded like the packed mosaic: (3, 2Hp, 2Wp) uint8."""
    render = target if isinstance(target, np.ndarray) else np.asarray(Image.open(target).convert("RGB"))
    if render.shape[:2] != (image.height, image.width):
        raise RcamError(f"{target}: size {render.shape[:2]} does not match its RAW ({image.height}, {image.width})")
    padded_height, padded_width = 2 * image.planes.shape[1], 2 * image.planes.shape[2]
    render = np.pad(
        render,
        ((image.pad_top, padded_height - image.height - image.pad_top), (image.pad_left, padded_width - image.width - image.pad_left), (0, 0)),
        mode="edge",
    )
    return torch.from_numpy(render).permute(2, 0, 1).contiguous()


def load_pair(
    degraded: Path, target: Path, thumbnail_size: int, clean: Path | None = None, faithful: bool = False
) -> TrainingImage:  # fmt: skip
    """Read a degraded DNG, its target render (orientation 1) and optionally its clean twin into aligned tensors.

    faithful: also render the degraded DNG itself (LibRaw), the faithful look's target.
    """
    planes, image, white = _input_planes(degraded)
    pair = TrainingImage(
        planes=planes.half(), target=_padded_target(target, image), thumbnail=thumbnail(planes, thumbnail_size),
        cam_to_srgb=torch.from_numpy(image.cam_to_srgb.astype(np.float32)), white=white,
    )  # fmt: skip
    if faithful:
        pair.faithful_target = _padded_target(undo_flip(reference_render(degraded), image.flip), image)
    if clean is not None:
        clean_planes, _, clean_white = _input_planes(clean)
        if clean_planes.shape != planes.shape:
            raise RcamError(f"{clean}: clean twin size {tuple(clean_planes.shape)} does not match {degraded}")
        pair.clean_planes = clean_planes.half()
        pair.clean_thumbnail = thumbnail(clean_planes, thumbnail_size)
        pair.clean_white = clean_white
    return pair


def load_clean_frame(clean: Path, target: Path, sensor: SensorParams) -> TrainingImage:
    """Read a clean twin as raw planes (for fresh defects) and its target render."""
    image = read_raw(clean)
    return TrainingImage(
        planes=None, target=_padded_target(target, image), thumbnail=None, clean_frame=CleanFrame.from_raw(image, sensor),
        cam_to_srgb=torch.from_numpy(image.cam_to_srgb.astype(np.float32)),
    )  # fmt: skip


def load_dataset(
    index: Path, thumbnail_size: int, limit: int | None = None, with_clean: bool = False, fresh_defects: bool = False,
    faithful: bool = False,
) -> list[TrainingImage]:  # fmt: skip
    """All pairs listed in an index.jsonl (paths relative to the index's folder), with a progress bar.

    fresh_defects: keep the clean twins as raw planes, with their sensor from the index (see fresh_crop).
    faithful: also keep each degraded DNG's planes and its own render (the faithful look's pairs).
    """
    index = Path(index)
    if not index.is_file():
        raise RcamError(f"{index}: dataset index not found (build it with `rcam synth`)")
    entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()][:limit]
    images = []
    for entry in tqdm(entries, desc="loading pairs", unit="pair"):
        if fresh_defects:
            image = load_clean_frame(index.parent / entry["clean"], index.parent / entry["target"], SensorParams(**entry["sensor"]))
            if faithful:
                pair = load_pair(index.parent / entry["degraded"], index.parent / entry["target"], thumbnail_size, faithful=True)
                image.planes, image.thumbnail, image.white, image.faithful_target = pair.planes, pair.thumbnail, pair.white, pair.faithful_target
            images.append(image)
            continue
        clean = index.parent / entry["clean"] if with_clean else None
        images.append(load_pair(index.parent / entry["degraded"], index.parent / entry["target"], thumbnail_size, clean, faithful))
    return images


FLAT_CANDIDATES = 8  # places a flat patch is chosen among (TrainConfig.flat_fraction)


def flattest_place(target: torch.Tensor, height: int, width: int, patch: int, rng: np.random.Generator) -> tuple[int, int]:
    """(top, left) in packed pixels of the patch whose target crop ((3, 2H, 2W) render) varies least, among
    FLAT_CANDIDATES random places."""
    places = [(int(rng.integers(0, max(height - patch, 0) + 1)), int(rng.integers(0, max(width - patch, 0) + 1))) for _ in range(FLAT_CANDIDATES)]
    spread = [float(target[:, 2 * top : 2 * (top + patch), 2 * left : 2 * (left + patch)].float().var()) for top, left in places]
    return places[int(np.argmin(spread))]


def sample_batch(
    images: list[TrainingImage], batch_size: int, patch: int, absolute: bool, rng: np.random.Generator,
    clean_fraction: float = 0.0, thumbnail_size: int | None = None, faithful_fraction: float = 0.0,
    held_out: Sequence[str] = HELD_OUT_FAMILIES, flat_fraction: float = 0.0,
) -> dict:  # fmt: skip
    """Random patches with their absolute offsets, thumbnails, look, development and whether the input is
    defect-free; a clean_fraction share comes from clean twins, a faithful_fraction share has the faithful look.

    Images loaded with fresh defects get a new draw of defects per patch (thumbnail_size is then needed) for
    the clean look; faithful patches with defects read the degraded DNG and target its own render. A
    flat_fraction share of patches sits where the target is flattest (flattest_place).
    """
    # Frames smaller than a patch cannot give a whole one (the smallest training frames are 159 packed pixels
    # high), and a batch stacks equal crops: patches come from the frames that hold one. When none does (tiny
    # test sets), every frame gives what it has, as large as it is.
    eligible = [image for image in images if min(image.target.shape[1:]) // 2 >= patch] or images  # target: (3, 2Hp, 2Wp)
    inputs, targets, coords, thumbs, looks, matrices, whites, clean_inputs = [], [], [], [], [], [], [], []
    for _ in range(batch_size):
        image = eligible[rng.integers(len(eligible))]
        clean = clean_fraction > 0 and rng.random() < clean_fraction
        faithful = faithful_fraction > 0 and rng.random() < faithful_fraction
        frame = image.clean_frame if not (faithful and not clean) else None
        planes = frame.raw if frame is not None else image.planes
        _, height, width = planes.shape
        if flat_fraction > 0 and rng.random() < flat_fraction:  # the scene's flatness: the clean target tells it
            top, left = flattest_place(image.target, height, width, patch, rng)
        else:
            top = int(rng.integers(0, max(height - patch, 0) + 1))
            left = int(rng.integers(0, max(width - patch, 0) + 1))
        target = image.target
        if frame is not None:
            if thumbnail_size is None:
                raise RcamError("fresh defects need the model's thumbnail size")
            defects = None if clean else sample_defects(rng, frame.frame_shape, frame.sensor, exclude=held_out)
            crop, image_thumbnail, white = fresh_crop(frame, top, left, patch, thumbnail_size, defects, rng)
        else:
            image_thumbnail, white = image.thumbnail, image.white
            if clean:
                if image.clean_planes is None:
                    raise RcamError("clean_fraction > 0 needs the clean twins loaded (load_dataset(..., with_clean=True))")
                planes, image_thumbnail, white = image.clean_planes, image.clean_thumbnail, image.clean_white
            elif faithful:
                if image.faithful_target is None:
                    raise RcamError("faithful_fraction > 0 needs the degraded DNGs' renders (load_dataset(..., faithful=True))")
                target = image.faithful_target
            crop = planes[:, top : top + patch, left : left + patch].float()
        inputs.append(crop)
        targets.append(target[:, 2 * top : 2 * (top + patch), 2 * left : 2 * (left + patch)].float() / 255.0)
        coords.append(coordinate_map(Tile(top, left, patch, patch), height, width, absolute=absolute))
        thumbs.append(image_thumbnail)
        looks.append(int(faithful))
        matrices.append(image.cam_to_srgb if image.cam_to_srgb is not None else torch.eye(3))
        whites.append(white)
        clean_inputs.append(clean)
    return {
        "x": torch.stack(inputs), "target": torch.stack(targets), "coords": torch.stack(coords), "thumbnail": torch.stack(thumbs),
        "look": torch.tensor(looks, dtype=torch.long), "cam_to_srgb": torch.stack(matrices),
        "white": torch.tensor(whites, dtype=torch.float32), "clean_input": torch.tensor(clean_inputs),
    }  # fmt: skip


def vignetting_examples(
    frames: list[CleanFrame], count: int, thumbnail_size: int, rng: np.random.Generator, clean_fraction: float = 0.3,
    held_out: Sequence[str] = HELD_OUT_FAMILIES,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Thumbnails (N, 4, S, S) float16 of random frames with fresh defects and their log falloff (N, 1, G, G) float32.

    Each example's frame is a random sub-window (half to all of each side) of a clean twin's strided sample,
    flipped and transposed at random: a thumbnail shows the scene's own brightness layout, and a few hundred
    whole frames teach an estimator those layouts by heart (on held-out frames it then does worse than a
    constant). A clean_fraction share has no falloff (log falloff 0) but noise and dark shading like the rest:
    every real sensor has those, and noise-free examples would teach the estimator that noise means falloff.
    """
    grid = VignettingEstimator.GRID
    thumbnails, log_gains = [], []
    for _ in tqdm(range(count), desc="vignetting examples", unit="frame", leave=False):
        frame = frames[rng.integers(len(frames))]
        sample = frame.sample
        _, sample_height, sample_width = sample.shape
        height = max(8, int(sample_height * rng.uniform(0.5, 1.0)))
        width = max(8, int(sample_width * rng.uniform(0.5, 1.0)))
        top, left = rng.integers(0, sample_height - height + 1), rng.integers(0, sample_width - width + 1)
        sample = sample[:, top : top + height, left : left + width]
        if rng.random() < 0.5:
            sample = sample[:, :, ::-1]
        if rng.random() < 0.5:
            sample = sample[:, ::-1, :]
        if rng.random() < 0.5:
            sample = sample.transpose(0, 2, 1)
        sample = np.ascontiguousarray(sample)
        step = 2 * frame.stride  # sensor pixels per sample pixel
        frame_shape = (sample.shape[1] * step, sample.shape[2] * step)
        defects = sample_defects(rng, frame_shape, frame.sensor, exclude=held_out)
        if rng.random() < clean_fraction:
            defects = without_vignetting(defects)
        sample = degrade_planes(sample, frame.sensor, defects, (0, 0), step, rng)
        centres = (np.arange(grid) + 0.5) / grid
        log_gain = np.log(vignetting_at(defects, centres[:, None] * frame_shape[0], centres[None, :] * frame_shape[1]))
        thumbnails.append(sample_thumbnail(frame, sample, thumbnail_size)[1].half())
        log_gains.append(torch.from_numpy(log_gain.astype(np.float32))[None])
    return torch.stack(thumbnails), torch.stack(log_gains)


def vignetting_step(
    estimator: VignettingEstimator, optimizer: torch.optim.Optimizer, examples: tuple[torch.Tensor, torch.Tensor],
    batch_size: int, rng: np.random.Generator, dropout: float = 0.0,
) -> float:  # fmt: skip
    """One supervised step of the estimator on a random batch of examples; returns its MSE on log falloff."""
    thumbnails, log_gains = examples
    device = next(estimator.parameters()).device
    index = torch.from_numpy(rng.integers(0, len(thumbnails), batch_size))
    predicted = estimator(thumbnails[index].float().to(device), dropout)
    loss = ((predicted - log_gains[index].to(device)) ** 2).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def sample_lambdas(batch_size: int, low: float, high: float, rng: np.random.Generator) -> torch.Tensor:
    """λ per sample, log-uniform in [low, high]."""
    return torch.from_numpy(np.exp(rng.uniform(math.log(low), math.log(high), batch_size))).float()


def periodic_error(residual: torch.Tensor, periods: Sequence[int]) -> torch.Tensor:
    """(B, C, H, W) error -> (B,) power of its part that repeats with each period (pixels), summed over periods.

    The error averaged over every position of the same phase (y mod p, x mod p) is the pattern a period-p
    texture leaves; its variance over the p x p phases (per channel, its mean taken out) is that texture's
    power. Random error averages out of it (a 1 / (H W / p²) share remains), so the term is aimed at the
    decoder's upsampling lattice, not at detail.
    """
    batch, channels, height, width = residual.shape
    total = residual.new_zeros(batch)
    for period in periods:
        if height % period or width % period:
            raise RcamError(f"periodic_periods: {period} does not divide the {height}x{width} training output")
        pattern = residual.reshape(batch, channels, height // period, period, width // period, period).mean(dim=(2, 4))
        pattern = pattern - pattern.mean(dim=(2, 3), keepdim=True)
        total = total + pattern.pow(2).mean(dim=(1, 2, 3))
    return total


def rd_loss(
    output: dict, target: torch.Tensor, lam: torch.Tensor, planes_target: torch.Tensor | None = None,
    planes_mask: torch.Tensor | None = None, plane_weight: float = 0.0, periodic_weight: float = 0.0,
    periods: Sequence[int] = (),
) -> dict:  # fmt: skip
    """Per-sample R + λ·255²·MSE, averaged; also returns bpp and MSE (8-bit scale) for logging.

    With plane_weight, a skeleton model's reconstructed planes also pay plane_weight·λ·255²·MSE against
    planes_target (B, 4, h, w) on the samples planes_mask (B,) picks. With periodic_weight, the output's
    periodic_error at `periods` pays periodic_weight·λ·255² too (logged as `periodic255`).
    """
    batch, _, height, width = target.shape
    bits = sum(-torch.log2(lik).reshape(batch, -1).sum(dim=1) for lik in output["likelihoods"].values())
    bpp = bits / (height * width)
    mse = ((output["rgb"] - target) ** 2).reshape(batch, -1).mean(dim=1)
    distortion = mse
    if plane_weight and output.get("planes") is not None:
        plane_mse = ((output["planes"] - planes_target) ** 2).reshape(batch, -1).mean(dim=1)
        distortion = distortion + plane_weight * planes_mask.float() * plane_mse
    terms = {}
    if periodic_weight:
        periodic = periodic_error(output["rgb"] - target, periods)
        distortion = distortion + periodic_weight * periodic
        terms["periodic255"] = (periodic * 255.0**2).mean()
    loss = (bpp + lam.to(bpp.device) * 255.0**2 * distortion).mean()
    return {"loss": loss, "bpp": bpp.mean(), "mse255": (mse * 255.0**2).mean()} | terms


def validation_sets(config: TrainConfig) -> dict[str, list[tuple[Path, Path | None]]]:
    """The val sets that exist and hold images: name -> [(RAW path, target path or None for its own render)]."""
    sets = {}
    if config.val_pairs and Path(config.val_pairs).is_file():
        index = Path(config.val_pairs)
        entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]
        sets["val_pairs"] = [(index.parent / e["degraded"], index.parent / e["target"]) for e in entries]
    if config.val_raw and Path(config.val_raw).is_dir():
        sets["val_raw"] = [(p, None) for p in sorted(Path(config.val_raw).glob("*.dng"))]
    return {name: items for name, items in sets.items() if items}


def validate(model: RealCamNet, config: TrainConfig) -> dict:
    """Real encode/decode of the val pairs (clean look) and real DNGs (faithful look where the model has it:
    the target is the file's own render) at val_lambda: mean bpp and PSNR per set."""
    from rcam.codec.engine import decode_bytes, encode_file, tone_reference
    from rcam.codec.output import quantize
    from rcam.codec.zoo import codec_from_model
    from rcam.measure.metrics import psnr

    sets = validation_sets(config)
    was_training = model.training
    model.eval()
    codec = codec_from_model(model, device=next(model.parameters()).device)
    results = {}
    for name, items in sets.items():
        bpps, psnrs = [], []
        look = "faithful" if name == "val_raw" and "faithful" in model.config.looks else "clean"
        for raw_path, target_path in items:
            reference = np.asarray(Image.open(target_path).convert("RGB")) if target_path else reference_render(raw_path)
            tone_target = reference if look == "faithful" else tone_reference(codec, raw_path)
            encoded = encode_file(codec, raw_path, config.val_lambda, reference=tone_target, look=look)
            decoded = quantize(decode_bytes(codec, encoded.data), 8)
            bpps.append(8 * len(encoded.data) / (reference.shape[0] * reference.shape[1]))
            psnrs.append(psnr(decoded, reference))
        results[name] = {"bpp": float(np.mean(bpps)), "psnr": float(np.mean(psnrs)), "images": len(items)}
    model.train(was_training)
    return results


def validation_cost(scores: dict, lam: float) -> float:
    """Held-out rate-distortion cost: mean over val sets of bpp + λ·MSE (8-bit scale), the training objective's form.

    Lower is better; each set (synthetic pairs, real DNGs) counts once, however many images it holds.
    """
    if not scores:
        raise RcamError("validation found no images: set val_pairs or val_raw to existing paths")
    costs = [result["bpp"] + lam * 255.0**2 * 10.0 ** (-result["psnr"] / 10.0) for result in scores.values()]
    return float(np.mean(costs))


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RcamError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def read_config(kind: type, path: Path, what: str):
    """A JSON file -> the dataclass `kind` built from its keys; unreadable files and unknown keys raise RcamError."""
    try:
        return kind(**json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError) as error:  # ValueError: bad JSON, or not text at all (UnicodeDecodeError)
        raise RcamError(f"{path}: not a valid {what} ({error})") from None


def start_run(config) -> tuple[torch.device, Path]:
    """A training run's set-up from its config (threads, device, run_dir): torch threads set, run_dir made with
    the config written into it -> (device, run_dir)."""
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    return device, run_dir


def record_validation(log, progress, step: int, scores: dict, improved: bool, heading: str = "validation", **extra) -> None:
    """One validation in a run's log.jsonl (flushed) and on the progress bar, saying when it made a new best.pt."""
    log.write(json.dumps({"step": step, "val": scores, **extra, "best": improved}) + "\n")
    log.flush()
    progress.write(f"step {step} {heading}: {scores}" + (" (best so far, saved best.pt)" if improved else ""))


class StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM while a training loop runs: noted, so the loop finishes its step, saves and
    stops; restore() puts the previous handlers back."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = (signal.signal(signal.SIGINT, self._request), signal.signal(signal.SIGTERM, self._request))

    def _request(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        """The handlers from before."""
        signal.signal(signal.SIGINT, self._previous[0])
        signal.signal(signal.SIGTERM, self._previous[1])


def learning_rate(config: TrainConfig, step: int) -> float:
    """Cosine decay from learning_rate to final_learning_rate over the run."""
    progress = min(step / max(config.steps, 1), 1.0)
    return config.final_learning_rate + 0.5 * (config.learning_rate - config.final_learning_rate) * (1 + math.cos(math.pi * progress))


# Modules added after rcam-small v1 was trained; zero-initialised, so older weights still define the model.
ZERO_STARTED_MODULES = ("cadr.prior_modulation.", "global_prior.layout_head.", "correction.")
# The skeleton's plane head replaces the end-to-end decoder's RGB tail: a model gaining a skeleton starts it
# afresh (its starting weights' `tail.` is left out with init_exclude).
FRESH_MODULES = ("plane_head.", "channel_context.")
# (The context model's last layers start at zero: the model codes as its starting weights did until trained.)
# The vignetting estimator: weights without it are fine, train() pre-trains it before the codec's first step.
PRETRAINED_MODULES = ("vignetting.",)


# Outputs with one channel group per look (models.ModelConfig.look_tails): weights with one group start every look.
PER_LOOK_MODULES = ("tail.",)


def _per_look_copies(model: RealCamNet, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Single-look tensors of PER_LOOK_MODULES repeated once per look where the model has one group per look."""
    shapes = {name: value.shape for name, value in model.state_dict().items()}
    copies = dict(tensors)
    for name, value in tensors.items():
        wanted = shapes.get(name)
        if name.startswith(PER_LOOK_MODULES) and wanted is not None and wanted[0] == value.shape[0] * len(model.config.looks):
            copies[name] = value.repeat(len(model.config.looks), *([1] * (value.dim() - 1)))
    return copies


def load_starting_weights(model: RealCamNet, path: Path, exclude: tuple[str, ...] = ()) -> tuple[int, list[str]]:
    """Fine-tuning start: weights from a training checkpoint (.pt) or a shipped .safetensors file.

    Returns their training steps and the names of the model's tensors they lacked. Tensors whose names start
    with a prefix in `exclude` are not taken from them (they count as lacking).

    Modules the starting weights lack are allowed only where they start at zero (CADR's and the global
    prior's new inputs), so the fine-tuned model starts out exactly as the weights it came from, or where
    train() pre-trains them (the vignetting estimator).
    """
    from rcam.codec.zoo import checkpoint_weights, read_weights

    if path.suffix == ".safetensors":
        tensors, steps = read_weights(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise RcamError(f"{path}: cannot read starting weights ({error})") from None
        tensors = checkpoint_weights(state) if "model" in state else state
        steps = int(state.get("step", 0)) + int(state.get("earlier_steps", 0))
    tensors = {name: value for name, value in tensors.items() if not name.startswith(tuple(exclude))}
    tensors = _per_look_copies(model, tensors)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as error:  # tensor shapes differ
        raise RcamError(f"{path}: weights do not fit model '{model.config.name}' ({str(error).splitlines()[-1].strip()})") from None
    missing = [key for key in result.missing_keys if not key.startswith(ZERO_STARTED_MODULES + PRETRAINED_MODULES + FRESH_MODULES)]
    zero_started = [key for key in result.missing_keys if key.startswith(ZERO_STARTED_MODULES)]
    if missing or result.unexpected_keys or any(model.state_dict()[key].any() for key in zero_started):
        raise RcamError(f"{path}: weights do not fit model '{model.config.name}' (missing {missing}, unexpected {result.unexpected_keys})")
    return steps, list(result.missing_keys)


def pretrain_vignetting(
    estimator: VignettingEstimator, optimizer: torch.optim.Optimizer, examples: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig, rng: np.random.Generator, log_path: Path,
) -> None:  # fmt: skip
    """Supervised steps of the estimator alone (cosine from vignetting_learning_rate to a tenth), before the codec's."""
    steps = config.vignetting_pretrain_steps
    total = 0.0
    with log_path.open("a") as log:
        for step in tqdm(range(1, steps + 1), desc="vignetting estimator", unit="step"):
            for group in optimizer.param_groups:
                group["lr"] = config.vignetting_learning_rate * (0.55 + 0.45 * math.cos(math.pi * step / steps))
            total += vignetting_step(estimator, optimizer, examples, config.vignetting_batch, rng, config.vignetting_dropout)
            if step % config.log_every == 0 or step == steps:
                log.write(json.dumps({"vignetting_pretrain_step": step, "vignetting": total / (step % config.log_every or config.log_every)}) + "\n")
                total = 0.0


def frozen_latents(model: RealCamNet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A batch through the analysis as at inference (no gradient, the estimator without dropout): unscaled y (B,M,h,w)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        y = model.analysis(batch["x"], batch["coords"], batch["thumbnail"], batch["look"])
    model.train(was_training)
    return y


def context_rate(model: RealCamNet, y: torch.Tensor, lam: torch.Tensor, with_z: bool = False) -> torch.Tensor:
    """Bits per element of unscaled latents y (B,M,h,w) at λ (B,) under the model's entropy model, by additive
    noise as in training (rounding, as at inference, would give the means no gradient at all); `with_z`: z's
    bits counted too (still per element of y)."""
    was_training = model.training
    model.train()
    gain, _ = model.gains(lam)
    _, likelihoods = quantise_latent(model, y * gain)
    model.train(was_training)
    bits = -torch.log2(likelihoods["y"]).sum() + (-torch.log2(likelihoods["z"]).sum() if with_z else 0.0)
    return bits / likelihoods["y"].numel()


def pretrain_context(model: RealCamNet, images: list[TrainingImage], config: TrainConfig, rng: np.random.Generator, device: torch.device, log_path: Path) -> None:
    """The channel-wise context model alone, for its rate (TrainConfig.context_pretrain_steps), on the latents of
    context_examples patches analysed once by the starting encoder."""
    absolute = model.config.coordinates == "absolute"
    latents = []
    for _ in tqdm(range(math.ceil(config.context_examples / config.context_batch)), desc="context examples", unit="batch"):
        batch = sample_batch(
            images, config.context_batch, config.patch, absolute, rng, config.clean_fraction, model.config.thumbnail, config.faithful_fraction,
            held_out=tuple(config.held_out_families),
        )  # fmt: skip
        latents.append(frozen_latents(model, {k: v.to(device) for k, v in batch.items()}))
    latents = torch.cat(latents)
    trained = [model.channel_context]
    if config.context_pretrain_hyper:
        trained += [model.hyper_analysis, model.hyper_synthesis, model.entropy_bottleneck]
    optimizer = torch.optim.Adam([p for module in trained for p in module.parameters()], lr=config.context_learning_rate)
    steps, total = config.context_pretrain_steps, 0.0
    with log_path.open("a") as log:
        for step in tqdm(range(1, steps + 1), desc="context model", unit="step"):
            for group in optimizer.param_groups:
                group["lr"] = config.context_learning_rate * (0.55 + 0.45 * math.cos(math.pi * step / steps))
            chosen = torch.from_numpy(rng.integers(0, len(latents), config.context_batch)).to(device)
            lam = sample_lambdas(config.context_batch, config.lambda_min, config.lambda_max, rng).to(device)
            bits = context_rate(model, latents[chosen], lam, with_z=config.context_pretrain_hyper)
            optimizer.zero_grad(set_to_none=True)
            bits.backward()
            optimizer.step()
            total += float(bits.detach())
            if step % config.log_every == 0 or step == steps:
                figure = "bits_per_y_element" if config.context_pretrain_hyper else "y_bits_per_element"  # with z's bits or without
                log.write(json.dumps({"context_pretrain_step": step, figure: total / (step % config.log_every or config.log_every)}) + "\n")
                log.flush()
                total = 0.0


def train(config: TrainConfig, images: list[TrainingImage] | None = None) -> Path:
    """Run (or resume) training; returns the path of the last checkpoint."""
    if config.val_every and not validation_sets(config):
        raise RcamError(f"val_every is {config.val_every} but neither val_pairs nor val_raw holds images: make them or set val_every to 0")
    if not 0.0 <= config.ema_decay < 1.0:
        raise RcamError(f"ema_decay is {config.ema_decay}: use 0 (off) or a value in (0, 1), e.g. 0.999")
    if config.model_config().vignetting and not (config.fresh_defects and config.vignetting_examples > 0):
        raise RcamError("a model with the vignetting estimator trains with fresh_defects and vignetting_examples > 0 (its examples come from the clean twins)")
    device, run_dir = start_run(config)
    model_config = config.model_config()
    model = RealCamNet(model_config).to(device)
    estimator = model.vignetting
    # The estimator has its own optimizer and loss; the codec's loss never reaches it (models.py detaches it).
    codec_parameters = [p for name, p in model.named_parameters() if not name.startswith(PRETRAINED_MODULES)]
    optimizer = torch.optim.Adam(codec_parameters, lr=config.learning_rate)
    estimator_optimizer = (
        torch.optim.AdamW(estimator.parameters(), lr=config.vignetting_learning_rate, weight_decay=config.vignetting_weight_decay)
        if estimator is not None else None
    )  # fmt: skip
    estimator_ready = estimator is None  # pre-trained (or loaded trained)
    context_ready = True  # False: a context model new to the starting weights, pre-trained before the codec
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay)) if config.ema_decay else None
    checkpoint_path = run_dir / "last.pt"
    best_path = run_dir / "best.pt"  # the checkpoint with the lowest validation cost so far
    best_cost = math.inf
    step = 0
    earlier_steps = 0  # steps behind the starting weights (fine-tuning), so exports state the whole budget
    rng = np.random.default_rng(config.seed)
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        earlier_steps = int(state.get("earlier_steps", 0))
        best_cost = float(state.get("best_cost", math.inf))
        if estimator is not None and "vignetting_optimizer" in state:
            estimator_optimizer.load_state_dict(state["vignetting_optimizer"])
            estimator_ready = True
        if average is not None and "average" in state:  # else the average starts again from these weights
            average.module.load_state_dict(state["average"])
            average.n_averaged.fill_(int(state["average_updates"]))
        rng = np.random.default_rng([config.seed, step])  # a fresh stream per resume, reproducible
    elif config.init_from:
        earlier_steps, lacking = load_starting_weights(model, Path(config.init_from), tuple(config.init_exclude))
        estimator_ready = not any(key.startswith(PRETRAINED_MODULES) for key in lacking)
        context_ready = model.channel_context is None or not any(key.startswith("channel_context.") for key in lacking)
    if images is None:
        images = load_dataset(
            Path(config.dataset), model_config.thumbnail, with_clean=config.clean_fraction > 0, fresh_defects=config.fresh_defects,
            faithful=config.faithful_fraction > 0,
        )
    examples = None
    if estimator is not None:
        examples = vignetting_examples(
            [image.clean_frame for image in images], config.vignetting_examples, model_config.thumbnail, rng,
            held_out=tuple(config.held_out_families),
        )  # fmt: skip

    evaluated = model if average is None else average.module  # what validation scores (zoo.checkpoint_weights)

    def save(path: Path = checkpoint_path) -> None:
        tmp = path.with_suffix(".tmp")
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "earlier_steps": earlier_steps}
        if average is not None:
            state |= {"average": average.module.state_dict(), "average_updates": int(average.n_averaged)}
        if estimator is not None:
            state |= {"vignetting_optimizer": estimator_optimizer.state_dict()}
        torch.save(state | {"model_config": model_config.to_dict(), "best_cost": best_cost}, tmp)
        tmp.replace(path)

    if not estimator_ready:
        pretrain_vignetting(estimator, estimator_optimizer, examples, config, rng, run_dir / "log.jsonl")
        save()  # a resume skips the pre-training (the estimator optimizer's state in last.pt says it is done)

    if not context_ready and config.context_pretrain_steps:
        pretrain_context(model, images, config, rng, device, run_dir / "log.jsonl")
        if average is not None:  # the average starts from the pre-trained context, not its zero start
            average.module.load_state_dict(model.state_dict())
        save()  # a resume starts from last.pt, whose context is trained

    if estimator is not None:
        for group in estimator_optimizer.param_groups:
            group["lr"] = 0.1 * config.vignetting_learning_rate  # where the pre-training ends, kept from here on

    stop = StopRequest()  # Ctrl-C or SIGTERM: finish the step, save, stop
    absolute = model_config.coordinates == "absolute"
    model.train()
    started = time.time()
    sums = {"loss": 0.0, "bpp": 0.0, "mse255": 0.0} | ({"vignetting": 0.0} if estimator is not None else {})
    sums |= {"periodic255": 0.0} if config.periodic_weight else {}
    progress = tqdm(total=config.steps, initial=step, desc="training", unit="step")
    try:
        with (run_dir / "log.jsonl").open("a") as log:
            while step < config.steps and not stop.requested:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, step)
                batch = sample_batch(
                    images, config.batch_size, config.patch, absolute, rng, config.clean_fraction, model_config.thumbnail, config.faithful_fraction,
                    held_out=tuple(config.held_out_families), flat_fraction=config.flat_fraction,
                )  # fmt: skip
                lam = sample_lambdas(config.batch_size, config.lambda_min, config.lambda_max, rng)
                batch = {k: v.to(device) for k, v in batch.items()}
                development = (batch["cam_to_srgb"], batch["white"]) if model_config.skeleton else None
                output = model(batch["x"], batch["coords"], batch["thumbnail"], lam.to(device), batch["look"], development)
                # The planes the skeleton should get back are the input itself where the target keeps them.
                keeps_planes = (batch["look"] == 1) | batch["clean_input"]
                terms = rd_loss(
                    output, batch["target"], lam, batch["x"], keeps_planes, config.plane_weight, config.periodic_weight, config.periodic_periods
                )  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                torch.nn.utils.clip_grad_norm_(codec_parameters, 1.0)
                optimizer.step()
                figures = {key: float(value.detach()) for key, value in terms.items()}
                if estimator is not None:
                    figures["vignetting"] = vignetting_step(estimator, estimator_optimizer, examples, config.vignetting_batch, rng, config.vignetting_dropout)
                if average is not None:
                    average.update_parameters(model)
                step += 1
                progress.update(1)
                for key in sums:
                    sums[key] += figures[key]
                if step % config.log_every == 0:
                    record = {key: value / config.log_every for key, value in sums.items()}
                    record.update(step=step, lr=learning_rate(config, step), seconds=round(time.time() - started, 1))
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    progress.set_postfix(loss=f"{record['loss']:.3f}", bpp=f"{record['bpp']:.3f}", mse=f"{record['mse255']:.1f}")
                    sums = dict.fromkeys(sums, 0.0)
                if step % config.checkpoint_every == 0:
                    save()
                if config.val_every and step % config.val_every == 0:
                    scores = validate(evaluated, config)
                    cost = validation_cost(scores, config.val_lambda)
                    improved = cost < best_cost
                    if improved:  # later steps can be worse on held-out data: keep the best one to export
                        best_cost = cost
                        save(best_path)
                    record_validation(log, progress, step, scores, improved, f"validation at lambda {config.val_lambda}, cost {cost:.4f}", val_cost=cost)
    finally:
        save()
        progress.close()
        stop.restore()
    return checkpoint_path
