"""RAWtoBit (Jeong & Jung, ECCV Workshops 2022) as a comparator: the RAW-to-bitstream network (RBN), its two
teachers and the paper's attention-transfer distillation, trained on rcam's data and coded with rcam's own
entropy coder and .rcb container, so its bpp counts every byte of a real file as rcam's does.

The three networks (paper §3.3, Fig. 2), shapes for a packed tile (B, 4, h, w), h and w multiples of 32:
- RBN: an encoder of strided 3x3 convolutions with GDN, packed planes -> y (B, M, h/8, w/8); a mean-scale
  hyperprior; a decoder after LiteISPNet (transposed convolutions, each followed by a residual channel
  attention group of two blocks) -> sRGB (B, 3, 2h, 2w). No skip connection between encoder and decoder.
- compression teacher: the RBN's encoder (its last layer K channels wide) and hyperprior, and a decoder back to
  the packed planes: a learned RAW codec. Its encoder teaches the RBN's encoder.
- ISP teacher: an sRGB autoencoder, (B, 3, 2h, 2w) -> latent at the RBN's latent size -> the RBN's decoder
  structure -> sRGB. Its decoder teaches the RBN's decoder.
Distillation (Eq. 1-3): attention maps are channel sums (no absolute value) of the outputs of corresponding
convolutions, L2-normalised per sample; the loss is their mean squared difference, weighted by
α0·γ^(k²), which decays as training goes on (α0 = 1e6 for the encoder pairs, 1e5 for the decoder pairs).

Where this differs from the paper, and why:
- No autoregressive context model: a serial context model would need its own exact path and is slow on a CPU,
  so the RBN is a mean-scale hyperprior codec (Minnen et al. without context) coded by rcam's exact coder
  (rcam.codec.entropy). rcam's own model has since gained a channel-wise and a checkerboard context; on
  protocol S, where RAWtoBit is measured, they moved rcam's lead by 0.05 and 0.01 dB (README, 'What ships').
- Variable rate: one RBN and one compression teacher for all λ, with rcam's gain units (rcam.codec.models.GainUnits,
  λ drawn per sample) instead of seven models per λ. The same CPU budget as rcam's model could not train seven
  RBNs and seven teachers; one model per λ at a seventh of the budget each would handicap it more than the
  gain units do. It also lets `rcam eval` measure RAWtoBit at exactly rcam's λ.
- Input: rcam's network input (rcam.codec.rawio.network_input: the file's white balance, colour matrix, exposure and
  sRGB curve applied to the packed planes), not black/white-normalised camera RGB: the paper trains on one
  camera, our data mixes cameras, and both codecs should start from the same information.
- The first encoder convolution has stride 1, so y sits at 1/16 of the output resolution, as in Minnen et
  al.'s sRGB codec and in rcam (rcam's tiles and container assume it).
- Widths are scaled down to train on a CPU (CONFIGS["small"]); CONFIGS["paper"] has the paper's encoder (256
  channels, 3x3 kernels, 192 latent channels).
- The KD decay is stated in steps (kd_decay_steps: α = α0/e there) rather than epochs: the paper's γ = 0.99999
  over ~49-step epochs reaches α0/e after about 15.5 k of its 1 M steps; our runs are a few thousand steps.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from compressai.layers import GDN
from torch import nn
from tqdm import tqdm

from rcam.codec import engine, zoo
from rcam.codec.entropy import latent_coder
from rcam.errors import RcamError
from rcam.measure.evaluate import EndToEndCodec
from rcam.codec.layers import conv, deconv
from rcam.codec.models import LAMBDA_RANGE, GainUnits, hyper_transforms, parameter_count, quantise_latent
from rcam.codec.output import quantize
from rcam.training.train import StopRequest, read_config, start_run, learning_rate, load_dataset, rd_loss, sample_batch, sample_lambdas
from rcam.codec.zoo import (
    METADATA_KEY, Z_TABLE_KEY, Codec, as_float32, codec_from_model, file_digest, open_weights, resolve_weights,
    save_checkpoint, write_manifest_entry,
)  # fmt: skip

FAMILY = "rawtobit"  # weights files and manifest entries of the RBN say so (rcam.codec.zoo refuses them as rcam models)
DEFAULT_WEIGHTS = "rawtobit-small"  # the manifest name `rcam eval --baselines rawtobit` loads
STAGES = ("isp_teacher", "compression_teacher", "rbn")


@dataclass(frozen=True)
class RawToBitConfig:
    """Widths of the RBN and its teachers, plus the few fields rcam's codec engine reads of any model."""

    name: str
    encoder_channels: int = 48  # RBN / compression teacher encoder width (paper: 256)
    latent_channels: int = 64  # M: channels of y (paper: 192)
    hyper_channels: int = 64  # Nh: channels of z and the hyper transforms (paper, after Minnen et al.: 192)
    decoder_channels: tuple[int, int, int] = (48, 32, 24)  # widths of the decoder's three levels, coarse to fine
    attention_blocks: int = 2  # residual channel attention blocks per group (paper: 2)
    attention_reduction: int = 8  # channel attention squeeze (RCAN: 16)
    teacher_latent_channels: int = 64  # K: the compression teacher's latent (paper: 192 at low rates, 320 at high)
    teacher_decoder_channels: int = 48  # the compression teacher's RAW decoder width
    isp_encoder_channels: int = 48  # the ISP teacher's sRGB encoder width
    # rcam's codec engine (rcam.codec.engine) reads these of every model; the RBN uses no thumbnail or coordinates.
    thumbnail: int = 16
    coordinates: str = "absolute"
    skeleton: bool = False

    @property
    def looks(self) -> tuple[str, ...]:
        """RAWtoBit renders one target, the clean look (SPEC §3)."""
        return ("clean",)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(values: dict) -> "RawToBitConfig":
        """Inverse of to_dict (JSON turns the width tuple into a list)."""
        values = dict(values)
        values["decoder_channels"] = tuple(values.get("decoder_channels", RawToBitConfig.decoder_channels))
        return RawToBitConfig(**values)


CONFIGS = {
    "small": RawToBitConfig(name="small"),
    # The paper's encoder and latent; its decoder levels after LiteISPNet (256/128/64 features).
    "paper": RawToBitConfig(
        name="paper", encoder_channels=256, latent_channels=192, hyper_channels=192, decoder_channels=(256, 128, 64),
        attention_reduction=16, teacher_latent_channels=192, teacher_decoder_channels=192, isp_encoder_channels=192,
    ),
}


# ------------------------------------------------------------------------------------------------ networks


class ChannelAttentionBlock(nn.Module):
    """RCAB (Zhang et al., RCAN): conv-ReLU-conv, rescaled per channel by a squeeze-excitation of its mean, plus input."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(channels // reduction, 4)
        self.body = nn.Sequential(conv(channels, channels), nn.ReLU(inplace=True), conv(channels, channels))
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        return x + features * self.attention(features)


class ChannelAttentionGroup(nn.Module):
    """RCAG: a few RCABs and a conv, with a residual connection around them."""

    def __init__(self, channels: int, blocks: int, reduction: int):
        super().__init__()
        self.body = nn.Sequential(*(ChannelAttentionBlock(channels, reduction) for _ in range(blocks)), conv(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class RawEncoder(nn.Module):
    """Packed planes (B, 4, h, w) -> latent (B, out, h/8, w/8): 3x3 convolutions with GDN (RBN and compression teacher)."""

    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.convs = nn.ModuleList([conv(4, channels), conv(channels, channels, 3, 2), conv(channels, channels, 3, 2), conv(channels, out_channels, 3, 2)])
        self.normalisations = nn.ModuleList(GDN(channels) for _ in range(3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (latent, the outputs of the first three convolutions: the distilled features)."""
        features = []
        for layer, normalisation in zip(self.convs, self.normalisations):
            x = layer(x)
            features.append(x)
            x = normalisation(x)
        return self.convs[-1](x), features


class SRGBDecoder(nn.Module):
    """Latent (B, M, h/8, w/8) -> sRGB (B, 3, 2h, 2w) after LiteISPNet: transposed convolutions (in place of its
    inverse wavelet transforms) each followed by an RCAG, then a conv to 12 channels and a pixel shuffle."""

    def __init__(self, latent_channels: int, widths: tuple[int, int, int], blocks: int, reduction: int):
        super().__init__()
        inputs = (latent_channels, *widths[:-1])
        self.ups = nn.ModuleList(deconv(c_in, c_out) for c_in, c_out in zip(inputs, widths))
        self.groups = nn.ModuleList(ChannelAttentionGroup(width, blocks, reduction) for width in widths)
        self.tail = conv(widths[-1], 12)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (sRGB, the outputs of the three transposed convolutions: the distilled features)."""
        features = []
        for up, group in zip(self.ups, self.groups):
            y = up(y)
            features.append(y)
            y = group(y)
        return F.pixel_shuffle(self.tail(y), 2), features


class _HyperpriorCodec(nn.Module):
    """Gain units and the mean-scale hyperprior of rcam (rcam.codec.models), shared by the RBN and the compression teacher."""

    def __init__(self, latent_channels: int, hyper_channels: int):
        super().__init__()
        self.gains = GainUnits(latent_channels)
        self.hyper_analysis, self.hyper_synthesis = hyper_transforms(latent_channels, hyper_channels)
        self.entropy_bottleneck = EntropyBottleneck(hyper_channels)
        self.gaussian_conditional = GaussianConditional(None)

    def quantise(self, y: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unscaled y (B, M, h, w), λ (B,) -> (ŷ with the gain undone, likelihoods of y and z)."""
        gain, inverse_gain = self.gains(lam)
        y_hat, likelihoods = quantise_latent(self, y * gain)
        return y_hat * inverse_gain, likelihoods


class RBN(_HyperpriorCodec):
    """The RAW-to-bitstream network; `forward` is the training path, rcam.codec.engine drives it for real files."""

    def __init__(self, config: RawToBitConfig):
        super().__init__(config.latent_channels, config.hyper_channels)
        self.config = config
        self.vignetting = None  # rcam.codec.engine asks every model for its lens-falloff estimator
        self.encoder = RawEncoder(config.encoder_channels, config.latent_channels)
        self.decoder = SRGBDecoder(config.latent_channels, config.decoder_channels, config.attention_blocks, config.attention_reduction)

    def analysis(self, x: torch.Tensor, coords: torch.Tensor | None = None, thumbnail: torch.Tensor | None = None, look=None) -> torch.Tensor:
        """Packed tile (B, 4, h, w) -> y (B, M, h/8, w/8) before gains (rcam.codec.engine's signature; the rest is unused)."""
        return self.encoder(x)[0]

    def synthesis(self, y_hat: torch.Tensor, development=None, look=None) -> torch.Tensor:
        """ŷ after inverse gains (B, M, h/8, w/8) -> sRGB (B, 3, 2h, 2w) (rcam.codec.engine's signature)."""
        return self.decoder(y_hat)[0]

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> dict:
        """Training pass: packed planes (B, 4, h, w), λ (B,) -> sRGB, likelihoods and the distilled features."""
        y, encoder_features = self.encoder(x)
        y_hat, likelihoods = self.quantise(y, lam)
        rgb, decoder_features = self.decoder(y_hat)
        return {"rgb": rgb, "likelihoods": likelihoods, "encoder_features": encoder_features, "decoder_features": decoder_features}


class CompressionTeacher(_HyperpriorCodec):
    """A learned RAW codec: packed planes -> the RBN's encoder structure (K-channel latent) -> hyperprior -> planes."""

    def __init__(self, config: RawToBitConfig):
        k, width = config.teacher_latent_channels, config.teacher_decoder_channels
        super().__init__(k, config.hyper_channels)
        self.config = config
        self.encoder = RawEncoder(config.encoder_channels, k)
        self.decoder = nn.Sequential(
            deconv(k, width), GDN(width, inverse=True), deconv(width, width), GDN(width, inverse=True), deconv(width, 4)
        )

    def forward(self, x: torch.Tensor, lam: torch.Tensor) -> dict:
        """Packed planes (B, 4, h, w), λ (B,) -> reconstructed planes, likelihoods and the encoder's features."""
        y, encoder_features = self.encoder(x)
        y_hat, likelihoods = self.quantise(y, lam)
        return {"planes": self.decoder(y_hat), "likelihoods": likelihoods, "encoder_features": encoder_features}


class ISPTeacher(nn.Module):
    """An sRGB autoencoder whose decoder has the RBN's structure: (B, 3, H, W) -> (B, M, H/16, W/16) -> (B, 3, H, W)."""

    def __init__(self, config: RawToBitConfig):
        super().__init__()
        self.config = config
        width = config.isp_encoder_channels
        # Minnen et al.'s analysis transform for sRGB (5x5, stride 2, GDN): its latent sits where the RBN's does.
        self.encoder = nn.Sequential(
            conv(3, width, 5, 2), GDN(width), conv(width, width, 5, 2), GDN(width), conv(width, width, 5, 2), GDN(width),
            conv(width, config.latent_channels, 5, 2),
        )  # fmt: skip
        self.decoder = SRGBDecoder(config.latent_channels, config.decoder_channels, config.attention_blocks, config.attention_reduction)

    def forward(self, rgb: torch.Tensor) -> dict:
        """sRGB (B, 3, H, W) -> its reconstruction and the decoder's distilled features."""
        reconstruction, decoder_features = self.decoder(self.encoder(rgb))
        return {"rgb": reconstruction, "decoder_features": decoder_features}


STAGE_MODELS = {"isp_teacher": ISPTeacher, "compression_teacher": CompressionTeacher, "rbn": RBN}


def build(stage: str, config: RawToBitConfig | str) -> nn.Module:
    """The network of a training stage ("isp_teacher", "compression_teacher", "rbn") at a width config or its name."""
    if stage not in STAGE_MODELS:
        raise RcamError(f"unknown RAWtoBit stage {stage!r}; choose from {', '.join(STAGES)}")
    if isinstance(config, str):
        if config not in CONFIGS:
            raise RcamError(f"unknown RAWtoBit model {config!r}; choose from {', '.join(CONFIGS)}")
        config = CONFIGS[config]
    return STAGE_MODELS[stage](config)


# ------------------------------------------------------------------------------------------- distillation


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Eq. 1 and the normalisation of Eq. 2: (B, C, H, W) -> (B, H·W) channel sums (signed), unit L2 norm per sample."""
    return F.normalize(features.sum(dim=1).flatten(1), dim=1)


def attention_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Σ_j L_AT^j (Eq. 2) over corresponding feature pairs: (1/N_j)·‖M_S/‖M_S‖ − M_T/‖M_T‖‖², averaged over the batch."""
    return sum(((attention_map(s) - attention_map(t)) ** 2).mean(dim=1).mean() for s, t in zip(student, teacher, strict=True))


def distillation_weight(alpha0: float, step: int, decay_steps: float) -> float:
    """Eq. 3, α0·γ^(k²) with k in steps: α0·exp(−(step/decay_steps)²), α0/e at decay_steps; 0 decay_steps: no KD."""
    return alpha0 * math.exp(-((step / decay_steps) ** 2)) if decay_steps > 0 else 0.0


# --------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class RawToBitTrainConfig:
    """One training stage of RAWtoBit; stored in its run folder and checkpoint. Data options mean what they mean
    in rcam.training.train.TrainConfig (the same dataset, patch sampling and clean-look targets as rcam's model)."""

    stage: str  # "isp_teacher", "compression_teacher" or "rbn"
    dataset: str
    run_dir: str
    comparator: str = FAMILY  # `rcam train-comparator` dispatches on it
    model: str = "small"
    model_overrides: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 8
    patch: int = 64  # packed pixels (a 128x128 output crop)
    learning_rate: float = 3e-4
    final_learning_rate: float = 3e-5
    lambda_min: float = LAMBDA_RANGE[0]
    lambda_max: float = LAMBDA_RANGE[1]
    clean_fraction: float = 0.3
    fresh_defects: bool = True
    held_out_families: list = field(default_factory=lambda: ["vignette-poly", "banding-col"])  # rcam.training.synth.HELD_OUT_FAMILIES
    limit: int = 0  # use only the first N pairs of the dataset (0: all), for quick measurements
    # The rbn stage: the teachers' checkpoints (their run folders' last.pt) and the distillation of Eq. 3.
    isp_teacher: str = ""
    compression_teacher: str = ""
    kd_encoder_alpha: float = 1e6
    kd_decoder_alpha: float = 1e5
    kd_decay_steps: float = 150.0
    checkpoint_every: int = 250
    log_every: int = 25
    threads: int = 1
    seed: int = 0
    device: str = "cpu"

    @staticmethod
    def load(path: Path) -> "RawToBitTrainConfig":
        """Read a JSON config file."""
        return read_config(RawToBitTrainConfig, path, "RAWtoBit training config")

    def model_config(self) -> RawToBitConfig:
        """The widths this run trains."""
        if self.model not in CONFIGS:
            raise RcamError(f"unknown RAWtoBit model {self.model!r}; choose from {', '.join(CONFIGS)}")
        overrides = dict(self.model_overrides)
        if "decoder_channels" in overrides:
            overrides["decoder_channels"] = tuple(overrides["decoder_channels"])
        return replace(CONFIGS[self.model], **overrides)


def _load_checkpoint(path: Path) -> dict:
    """A RAWtoBit training checkpoint (last.pt) as a dict; anything else is a clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:
        raise RcamError(f"{path}: cannot read RAWtoBit checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("comparator") != FAMILY:
        raise RcamError(f"{path}: not a RAWtoBit training checkpoint")
    return state


def load_teacher(path: Path, stage: str, config: RawToBitConfig) -> nn.Module:
    """A trained teacher from its checkpoint, frozen, in eval mode; its widths must match the RBN's where KD pairs them."""
    state = _load_checkpoint(Path(path))
    if state["stage"] != stage:
        raise RcamError(f"{path}: a {state['stage']} checkpoint, expected the {stage}")
    teacher_config = RawToBitConfig.from_dict(state["model_config"])
    shared = ("encoder_channels",) if stage == "compression_teacher" else ("latent_channels", "decoder_channels", "attention_blocks")
    for name in shared:
        if getattr(teacher_config, name) != getattr(config, name):
            raise RcamError(f"{path}: the {stage} has {name} {getattr(teacher_config, name)}, the RBN {getattr(config, name)}")
    teacher = build(stage, teacher_config)
    teacher.load_state_dict(state["model"])
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def _bits_per_output_pixel(likelihoods: dict[str, torch.Tensor], output_pixels: int) -> torch.Tensor:
    """Per-sample bits over the sRGB output's pixels (B,): the paper's and rcam's bpp, also for the RAW teacher."""
    batch = next(iter(likelihoods.values())).shape[0]
    return sum(-torch.log2(lik).reshape(batch, -1).sum(dim=1) for lik in likelihoods.values()) / output_pixels


class _StageStep:
    """The loss of one training step of a stage: __call__(batch, λ, step) -> dict of terms, "loss" first."""

    def __init__(self, config: RawToBitTrainConfig, model: nn.Module, device: torch.device):
        self.config, self.model, self.device = config, model, device
        self.teachers = None
        if config.stage == "rbn":
            if not (config.isp_teacher and config.compression_teacher):
                raise RcamError("the rbn stage needs the isp_teacher and compression_teacher checkpoints (train those stages first)")
            self.teachers = (
                load_teacher(Path(config.isp_teacher), "isp_teacher", model.config).to(device),
                load_teacher(Path(config.compression_teacher), "compression_teacher", model.config).to(device),
            )

    def __call__(self, batch: dict, lam: torch.Tensor, step: int) -> dict:
        stage, model = self.config.stage, self.model
        if stage == "isp_teacher":  # the paper trains it with the L2 loss
            mse = ((model(batch["target"])["rgb"] - batch["target"]) ** 2).mean()
            return {"loss": mse * 255.0**2, "mse255": mse * 255.0**2}
        if stage == "compression_teacher":
            output = model(batch["x"], lam)
            height, width = batch["x"].shape[-2:]
            bpp = _bits_per_output_pixel(output["likelihoods"], 4 * height * width)
            mse = ((output["planes"] - batch["x"]) ** 2).flatten(1).mean(dim=1)
            loss = (bpp + lam * 255.0**2 * mse).mean()
            return {"loss": loss, "bpp": bpp.mean(), "mse255": (mse * 255.0**2).mean()}
        output = model(batch["x"], lam)
        terms = rd_loss(output, batch["target"], lam)
        isp_teacher, compression_teacher = self.teachers
        with torch.no_grad():
            decoder_targets = isp_teacher(batch["target"])["decoder_features"]
            encoder_targets = compression_teacher.encoder(batch["x"])[1]
        encoder_at = attention_loss(output["encoder_features"], encoder_targets)
        decoder_at = attention_loss(output["decoder_features"], decoder_targets)
        alpha_encoder = distillation_weight(self.config.kd_encoder_alpha, step, self.config.kd_decay_steps)
        alpha_decoder = distillation_weight(self.config.kd_decoder_alpha, step, self.config.kd_decay_steps)
        loss = terms["loss"] + alpha_encoder * encoder_at + alpha_decoder * decoder_at  # Eq. 4
        return {"loss": loss, "rd": terms["loss"], "bpp": terms["bpp"], "mse255": terms["mse255"], "at_encoder": encoder_at, "at_decoder": decoder_at}


def train_stage(config: RawToBitTrainConfig, images: list | None = None) -> Path:
    """Run (or resume) one stage; returns the path of its last checkpoint (run_dir/last.pt).

    `images` (rcam.training.train.load_dataset's pairs) skips loading the dataset, as in rcam.training.train.train.
    """
    if config.stage not in STAGES:
        raise RcamError(f"unknown RAWtoBit stage {config.stage!r}; choose from {', '.join(STAGES)}")
    device, run_dir = start_run(config)
    model_config = config.model_config()
    model = build(config.stage, model_config).to(device)
    loss_of = _StageStep(config, model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    checkpoint_path = run_dir / "last.pt"
    step = 0
    rng = np.random.default_rng(config.seed)
    if checkpoint_path.exists():
        state = _load_checkpoint(checkpoint_path)
        if state["stage"] != config.stage:
            raise RcamError(f"{checkpoint_path}: holds the {state['stage']} stage, the config trains the {config.stage}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        rng = np.random.default_rng([config.seed, step])  # a fresh stream per resume, reproducible
    if images is None:
        images = load_dataset(
            Path(config.dataset), model_config.thumbnail, limit=config.limit or None,
            with_clean=config.clean_fraction > 0 and not config.fresh_defects, fresh_defects=config.fresh_defects,
        )  # fmt: skip
    # The ISP teacher sees only the targets: clean patches spare drawing defects it would never look at.
    clean_fraction = 1.0 if config.stage == "isp_teacher" and config.fresh_defects else config.clean_fraction

    def save() -> None:
        tmp = checkpoint_path.with_suffix(".tmp")
        torch.save({
            "comparator": FAMILY, "stage": config.stage, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "step": step, "model_config": model_config.to_dict(), "train_config": asdict(config),
            "parameters": parameter_count(model),
        }, tmp)  # fmt: skip
        tmp.replace(checkpoint_path)

    stop = StopRequest()  # Ctrl-C or SIGTERM: finish the step, save, stop
    model.train()
    sums: dict[str, float] = {}
    started, logged_at, logged_step, logged_cpu = time.time(), time.time(), step, time.process_time()
    progress = tqdm(total=config.steps, initial=step, desc=f"rawtobit {config.stage}", unit="step")
    try:
        with (run_dir / "log.jsonl").open("a") as log:
            while step < config.steps and not stop.requested:
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(config, step)
                batch = sample_batch(
                    images, config.batch_size, config.patch, True, rng, clean_fraction, model_config.thumbnail,
                    held_out=tuple(config.held_out_families),
                )  # fmt: skip
                batch = {key: value.to(device) for key, value in batch.items()}
                lam = sample_lambdas(config.batch_size, config.lambda_min, config.lambda_max, rng).to(device)
                terms = loss_of(batch, lam, step)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                progress.update(1)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                if step % config.log_every == 0 or step == config.steps:
                    count = step - logged_step
                    record = {key: value / count for key, value in sums.items()}
                    now, cpu = time.time(), time.process_time()
                    # Wall and CPU seconds per step: on a shared machine the wall time says more about the neighbours.
                    record.update(
                        step=step, lr=learning_rate(config, step), seconds=round(now - started, 1),
                        s_per_step=round((now - logged_at) / count, 3), cpu_s_per_step=round((cpu - logged_cpu) / count, 3),
                    )  # fmt: skip
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    progress.set_postfix({key: f"{record[key]:.4g}" for key in ("loss", "bpp", "mse255") if key in record})
                    sums, logged_at, logged_step, logged_cpu = {}, now, step, cpu
                if step % config.checkpoint_every == 0:
                    save()
    finally:
        save()
        progress.close()
        stop.restore()
    return checkpoint_path


def train_from_config(path: Path, steps: int | None = None, device: str | None = None) -> tuple[Path, bool]:
    """`rcam train-comparator CONFIG` for RAWtoBit: train (or resume) the stage a JSON config describes.

    Returns (checkpoint, whether the stage reached its steps: False after Ctrl-C)."""
    config = RawToBitTrainConfig.load(path)
    if steps:
        config = replace(config, steps=steps)
    if device:
        config = replace(config, device=device)
    checkpoint = train_stage(config)
    return checkpoint, int(_load_checkpoint(checkpoint)["step"]) >= config.steps


# ---------------------------------------------------------------------------------------- weights and coding


def export_rbn(checkpoint: Path, name: str = DEFAULT_WEIGHTS, weights_dir: Path | None = None, half: bool = False) -> Path:
    """The rbn stage's checkpoint -> weights/NAME.safetensors (the RBN only, with its z tables) and a manifest entry
    that records every stage's steps and parameters (the teachers' from the checkpoints the RBN was distilled from)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else zoo.WEIGHTS_DIR
    state = _load_checkpoint(Path(checkpoint))
    if state["stage"] != "rbn":
        raise RcamError(f"{checkpoint}: a {state['stage']} checkpoint; export the rbn stage's")
    config = RawToBitConfig.from_dict(state["model_config"])
    model = RBN(config)
    model.load_state_dict(state["model"])
    stages = {"rbn": _stage_summary(state, Path(checkpoint))}
    train_config = state["train_config"]
    for stage in ("isp_teacher", "compression_teacher"):
        teacher_path = Path(train_config[stage])
        if teacher_path.is_file():
            stages[stage] = _stage_summary(_load_checkpoint(teacher_path), teacher_path)
    total_steps = sum(summary["steps"] for summary in stages.values())
    path = save_checkpoint(model, weights_dir / f"{name}.safetensors", half=half, total_steps=total_steps, family=FAMILY)
    write_manifest_entry(
        name,
        {
            "family": FAMILY, "file": path.name, "sha256": file_digest(path).hex(), "config": config.to_dict(),
            "lambda_range": list(LAMBDA_RANGE), "parameters": parameter_count(model),
            "training": {"total_steps": total_steps, "stages": stages},
        },
        weights_dir,
        replace=True,
    )  # fmt: skip
    return path


def _stage_summary(state: dict, path: Path) -> dict:
    return {"steps": int(state["step"]), "parameters": int(state.get("parameters", 0)), "checkpoint": str(path), "config": state["train_config"]}


def load_rawtobit(name_or_path: str = DEFAULT_WEIGHTS, device: str | torch.device = "cpu", weights_dir: Path | None = None):
    """Shipped RBN weights (manifest name or .safetensors path) -> an rcam.codec.zoo.Codec that rcam.codec.engine encodes and
    decodes like rcam's own model: same tiles, exact integer hyperprior, constriction range coder, .rcb container."""
    weights_dir = Path(weights_dir) if weights_dir is not None else zoo.WEIGHTS_DIR  # read now: tests point it elsewhere
    try:
        name, path = resolve_weights(name_or_path, weights_dir)
    except RcamError as error:
        raise RcamError(
            f"RAWtoBit weights unavailable ({error}); train configs/rawtobit-*.json with `rcam train-comparator` "
            "and export with `rcam export-comparator`"
        ) from None
    tensors, metadata = open_weights(path)
    try:
        info = json.loads(metadata[METADATA_KEY])
        if info.get("family") != FAMILY:
            raise ValueError(f"family {info.get('family', 'rcam')!r}")
        config = RawToBitConfig.from_dict(info["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise RcamError(f"{path}: not RAWtoBit weights ({error})") from None
    z_table = tensors.pop(Z_TABLE_KEY, None)
    model = RBN(config)
    try:
        model.load_state_dict(as_float32(tensors))
    except RuntimeError as error:
        raise RcamError(f"{path}: weights do not fit RAWtoBit config '{config.name}' ({str(error).splitlines()[0]})") from None
    if z_table is None:
        raise RcamError(f"{path}: no z probability tables (export it with `rcam export-comparator`)")
    model.eval()
    coder = latent_coder(model, z_table.numpy())
    device = torch.device(device)
    return Codec(name=name, digest=file_digest(path)[:16], model=model.to(device), coder=coder, device=device)


def codec_from_rbn(model: RBN, name: str = "rawtobit-in-training", device: str | torch.device = "cpu"):
    """An RBN in memory (tests, training) as an rcam.codec.zoo.Codec; its digest is zero, as rcam.codec.zoo.codec_from_model's."""
    return codec_from_model(model.eval(), name, device)


def encode_file(codec, raw_path: Path, lam: float):
    """A RAW file -> rcam.codec.engine.Encoded (.rcb bytes naming the RAWtoBit model), clean look, no tone field: the
    RBN's own output, nothing of rcam's encoder-side corrections."""
    return engine.encode_file(codec, Path(raw_path), lam, tone_fit=False, look="clean")


def decode_bytes(codec, data: bytes) -> np.ndarray:
    """.rcb bytes of a RAWtoBit file -> (H, W, 3) float32 sRGB in [0, 1], oriented (rcam.codec.engine.decode_bytes)."""
    return engine.decode_bytes(codec, data)


def eval_codec(codec):
    """The callable rcam.measure.evaluate measures: (raw_path, λ) -> (whole .rcb file bytes, decoded (H, W, 3) uint8)."""

    def run(raw_path: Path, lam: float) -> tuple[int, np.ndarray]:
        data = encode_file(codec, raw_path, lam).data
        return len(data), quantize(decode_bytes(codec, data), 8)

    return run


def evaluation_comparator(device: str | torch.device = "cpu", look: str = "clean", weights: str = DEFAULT_WEIGHTS):
    """`rcam eval --baselines rawtobit`: the shipped RBN as an rcam.measure.evaluate.EndToEndCodec (clean look only)."""
    if look != "clean":
        raise RcamError(f"rawtobit renders the clean look only, this run measures {look!r}: use --protocol S (or --look clean)")
    codec = load_rawtobit(weights, device)
    note = (
        f"rawtobit: RAWtoBit's RBN (two-teacher distillation, mean-scale hyperprior without context model), weights "
        f"{codec.name} ({codec.digest.hex()[:12]}); real .rcb files through rcam's entropy coder, every byte counted."
    )
    return EndToEndCodec(FAMILY, "RAWtoBit", eval_codec(codec), note)
