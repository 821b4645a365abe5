"""The compression-aware ISP with CAS-Net (Uhm et al., IEEE Access 2021;
../shared/papers/casnet_compression_aware_isp_access2021.txt) as a comparator ISP.

Two networks, trained in order:
1. CAS-Net g (`ArtifactNet`), the compression artifacts simulation network: the paper's "reversed
   artifact-reduction setup", i.e. a U-Net trained to map a clean sRGB image y to its real JPEG-decoded
   version c(y) with L_cas = |g(y) − c(y)|₁ (Eq. 1). Our pairs are crops of the clean-look target renders
   and those crops through the JPEG baseline itself (libjpeg-turbo, 4:2:0, the `rcam eval` settings).
2. ISP-Net f (`IspNet`): a 4-level U-Net with channel attention in its decoder, on the bilinearly
   demosaiced RAW. Trained first compression-agnostic with L_isp = |f(x) − y|₁ (Eq. 2, phase "agnostic"),
   then fine-tuned through the frozen CAS-Net with L_total = λ_isp·L_isp + λ_comp·|g(f(x)) − g(y)|₁
   (Eqs. 3, 4; λ_isp = 0.1, λ_comp = 1 and the learning rate × 0.1, as in the paper; phase "aware").
At test time CAS-Net is not used: the ISP's output goes through the real codec.

Choices at our scale (README, "Comparators"):
- One CAS-Net for a range of qualities instead of one per quality factor: the JPEG quality enters as a
  constant input plane (q/100), drawn per sample from `qualities`, so the ISP can be made aware of the
  whole sweep `rcam eval` runs. CAS-Net is residual (g(y) = y + U-Net(y, q), the U-Net's last convolution
  starting at zero): at high quality JPEG is close to the identity.
- ISP-Net input: rcam's network input (the RAW with black/white, white balance, colour matrix,
  auto-brightness and the sRGB curve applied per 2×2 cell), bilinearly demosaiced as in the paper; its
  output is added to that demosaic (`input_skip`).
- Widths: see the configs (the paper's nets start at 32 channels and double per level).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from rcam.comparators.baselines import encode_decode
from rcam.comparators.networks import UNet, bilinear_demosaic

DEFAULT_QUALITIES = (30, 95)  # JPEG qualities drawn (uniform integers, both ends included)


def _tuple_fields(config) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(config).items()}


@dataclass(frozen=True)
class ArtifactNetConfig:
    """CAS-Net's sizes: the paper's U-Net is 32 doubling to 256 over 4 levels, 3 convolutions per block."""

    widths: tuple[int, ...] = (16, 24, 32, 48)
    convs: int = 2

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return _tuple_fields(self)


class ArtifactNet(nn.Module):
    """CAS-Net g: clean sRGB (B, 3, H, W) in [0, 1] and JPEG quality (B,) -> the JPEG-decoded image it predicts."""

    def __init__(self, config: ArtifactNetConfig = ArtifactNetConfig()):
        super().__init__()
        self.config = config
        self.unet = UNet(4, 3, config.widths, convs=config.convs, zero_head=True)  # starts as the identity

    def forward(self, srgb: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W), (B,) qualities 1-100 -> (B, 3, H, W); JPEG's 8×8 grid is taken to start at the top left."""
        plane = (quality.to(srgb) / 100.0)[:, None, None, None].expand(-1, 1, *srgb.shape[-2:])
        return srgb + self.unet(torch.cat([srgb, plane], dim=1))


@dataclass(frozen=True)
class IspNetConfig:
    """ISP-Net's sizes: the paper's U-Net is 32 doubling to 256 over 4 levels, 3 convolutions per block."""

    widths: tuple[int, ...] = (16, 24, 32, 48)
    convs: int = 2
    input_skip: bool = True

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return _tuple_fields(self)


class IspNet(nn.Module):
    """ISP-Net f: U-Net with channel attention on the bilinear demosaic; `render` is the ISP the cascades use."""

    def __init__(self, config: IspNetConfig = IspNetConfig()):
        super().__init__()
        self.config = config
        self.unet = UNet(3, 3, config.widths, convs=config.convs, channel_attention=True, zero_head=config.input_skip)

    def forward(self, planes: torch.Tensor) -> torch.Tensor:
        """rcam network-input planes (B, 4, h, w) -> sRGB (B, 3, 2h, 2w), not clipped."""
        demosaiced = bilinear_demosaic(planes)
        out = self.unet(demosaiced)
        return out + demosaiced if self.config.input_skip else out

    def render(self, planes: torch.Tensor) -> torch.Tensor:
        """The ISP: planes (B, 4, h, w) -> sRGB (B, 3, 2h, 2w) in [0, 1]."""
        return self(planes).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------- training


def draw_qualities(count: int, qualities: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
    """(count,) JPEG qualities, uniform integers in [low, high]."""
    low, high = int(qualities[0]), int(qualities[1])
    return torch.from_numpy(rng.integers(low, high + 1, count)).float()


def real_jpeg(srgb: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """c(y): each image of (B, 3, H, W) in [0, 1] through the JPEG baseline at its quality, decoded; same shape."""
    images = np.round(srgb.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0).astype(np.uint8)
    decoded = [encode_decode("jpeg", image, float(q)).decoded for image, q in zip(images, quality.tolist())]
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float().div(255.0).to(srgb.device)


class ArtifactNetTraining:
    """CAS-Net's pre-training (Eq. 1) on target crops and their real JPEG versions, qualities drawn per crop."""

    phases = ("artifacts",)
    lr_scales = {"artifacts": 1.0}

    def __init__(self, model: ArtifactNet, loss_weights: dict, qualities: tuple[int, int] = DEFAULT_QUALITIES):
        self.model = model
        self.qualities = qualities

    def trainable(self, phase: str) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def losses(self, batch: dict, phase: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """L_cas of one batch of target crops (B, 3, H, W)."""
        clean = batch["target"]
        quality = draw_qualities(len(clean), self.qualities, rng)
        jpeg = real_jpeg(clean, quality)
        simulated = self.model(clean, quality.to(clean.device))
        loss = (simulated - jpeg).abs().mean()
        # How far the plain clean image is from the JPEG: the loss an identity CAS-Net would have.
        identity = (clean - jpeg).abs().mean()
        return {"loss": loss, "identity": identity}


class IspNetTraining:
    """ISP-Net: compression-agnostic pre-training, then compression-aware fine-tuning through frozen CAS-Net."""

    phases = ("agnostic", "aware")
    lr_scales = {"agnostic": 1.0, "aware": 0.1}  # the paper decays the rate by 0.1 for the fine-tuning

    def __init__(
        self, model: IspNet, loss_weights: dict, artifact_net: ArtifactNet, qualities: tuple[int, int] = DEFAULT_QUALITIES
    ):  # fmt: skip
        self.model = model
        self.artifact_net = artifact_net.eval()
        for parameter in self.artifact_net.parameters():
            parameter.requires_grad_(False)  # frozen: the paper's "CAS-Net freeze" did best
        self.isp_weight = float(loss_weights.get("isp", 0.1))
        self.comp_weight = float(loss_weights.get("comp", 1.0))
        self.qualities = qualities

    def trainable(self, phase: str) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def losses(self, batch: dict, phase: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """L_isp (phase agnostic) or L_total (phase aware) of one batch."""
        output = self.model(batch["x"])
        isp = (output - batch["target"]).abs().mean()
        if phase == "agnostic":
            return {"loss": isp, "isp": isp}
        quality = draw_qualities(len(output), self.qualities, rng).to(output.device)
        with torch.no_grad():
            simulated_target = self.artifact_net(batch["target"], quality)
        comp = (self.artifact_net(output, quality) - simulated_target).abs().mean()
        return {"loss": self.isp_weight * isp + self.comp_weight * comp, "isp": isp, "comp": comp}
