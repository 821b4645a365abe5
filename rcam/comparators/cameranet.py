"""CameraNet (Liang et al., IEEE TIP 2021; ../shared/papers/cameranet_tip2021.txt) as a comparator ISP.

Two 5-level U-Nets. Restore-Net takes the packed planes at half resolution to a linear full-resolution image
(demosaicing, denoising, and here also the synthetic data's vignetting and dark shading), ending in a
sub-pixel convolution; Enhance-Net clips that to [0, 1], applies the sRGB curve and maps it to the final
sRGB image (tone and colour), with dilations 1, 2, 2, 4, 8 and residual blocks. Both have the paper's global
transform block at the lowest level (Eq. 4). Losses: restoration = L1 + L1 of logs against the linear
target (Eq. 5), enhancement = L1 against the sRGB target (Eq. 6), trained in two steps: both nets
independently (Enhance-Net fed the restoration target), then jointly with λ·L_r + (1 − λ)·L_o (Eq. 7).

Choices at our scale and on our data (README, "Comparators"):
- Input: rcam's own network input (rawio.network_input_and_white: black/white levels, as-shot white
  balance, colour matrix and auto-brightness per 2×2 cell, the camera metadata ω the paper allows) with the
  sRGB curve undone, so Restore-Net works in linear light as the paper's does. No noise-level input: our
  DNGs carry no noise profile.
- Intermediate space: linear sRGB instead of CIE XYZ (one fixed 3×3 apart). The restoration target is the
  clean-look target render with the sRGB curve undone; the enhancement target is the render itself. On
  LibRaw renders the enhancement is therefore the sRGB curve and 8-bit rounding, nothing more.
- Both nets add their output to a fixed estimate (`input_skip`; their last convolution starts at zero):
  Restore-Net to the bilinear demosaic of its input, Enhance-Net to its own input; a few thousand CPU steps
  do not teach a U-Net the identity.
- Widths: see CameraNetConfig (the paper's nets total 26.5 M parameters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcam.comparators.networks import UNet, bilinear_demosaic
from rcam.codec.skeleton import linear_to_srgb, srgb_to_linear

ENHANCE_DILATIONS = (1, 2, 2, 4, 8)  # the paper's, level 1 to 5


@dataclass(frozen=True)
class CameraNetConfig:
    """CameraNet's sizes. The paper's U-Nets double from 32 to 512 channels (26.5 M parameters in all);
    the defaults here are the CPU scale (about 0.3 M), `paper_scale()` the paper's."""

    restore_widths: tuple[int, ...] = (16, 24, 32, 48, 64)
    enhance_widths: tuple[int, ...] = (12, 16, 24, 32, 48)
    convs: int = 2
    input_skip: bool = True

    def __post_init__(self):
        object.__setattr__(self, "restore_widths", tuple(int(w) for w in self.restore_widths))
        object.__setattr__(self, "enhance_widths", tuple(int(w) for w in self.enhance_widths))

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @staticmethod
    def paper_scale() -> "CameraNetConfig":
        """The widths of the paper's U-Nets (32 doubling to 512 per level)."""
        return CameraNetConfig(restore_widths=(32, 64, 128, 256, 512), enhance_widths=(32, 64, 128, 256, 512))


class CameraNet(nn.Module):
    """Restore-Net then Enhance-Net; `render` is the ISP the cascades use."""

    def __init__(self, config: CameraNetConfig = CameraNetConfig()):
        super().__init__()
        self.config = config
        skip = config.input_skip
        self.restore_net = UNet(4, 3, config.restore_widths, convs=config.convs, global_transform=True, out_scale=2, zero_head=skip)
        # Enhance-Net runs at half resolution too (pixel unshuffle in, sub-pixel convolution out).
        self.enhance_net = UNet(
            12, 3, config.enhance_widths, convs=config.convs, dilations=ENHANCE_DILATIONS[: len(config.enhance_widths)],
            residual=True, global_transform=True, out_scale=2, zero_head=skip,
        )  # fmt: skip

    def restore(self, planes: torch.Tensor) -> torch.Tensor:
        """rcam network-input planes (B, 4, h, w) (sRGB-encoded) -> restored linear sRGB I_r (B, 3, 2h, 2w)."""
        linear = srgb_to_linear(planes)
        restored = self.restore_net(linear)
        return restored + bilinear_demosaic(linear) if self.config.input_skip else restored

    def enhance(self, linear: torch.Tensor) -> torch.Tensor:
        """Linear image (B, 3, H, W), H and W even -> enhanced sRGB I_o (B, 3, H, W) (not clipped)."""
        encoded = linear_to_srgb(linear.clamp(0.0, 1.0))
        enhanced = self.enhance_net(F.pixel_unshuffle(encoded, 2))
        return enhanced + encoded if self.config.input_skip else enhanced

    def forward(self, planes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Planes (B, 4, h, w) -> {"linear": I_r, "srgb": I_o}, both (B, 3, 2h, 2w)."""
        restored = self.restore(planes)
        return {"linear": restored, "srgb": self.enhance(restored)}

    def render(self, planes: torch.Tensor) -> torch.Tensor:
        """The ISP: planes (B, 4, h, w) -> sRGB (B, 3, 2h, 2w) in [0, 1]."""
        return self(planes)["srgb"].clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------- training

LOG_EPSILON = 1e-3  # ε of Eq. 5: below it (about 0.9% of white in sRGB terms) the log term is flat


def restoration_loss(restored: torch.Tensor, target_linear: torch.Tensor) -> torch.Tensor:
    """Eq. 5: L1 in linear light plus L1 of the logs (errors as the eye weighs them); scalar."""
    log_term = (torch.log(restored.clamp(min=LOG_EPSILON)) - torch.log(target_linear.clamp(min=LOG_EPSILON))).abs().mean()
    return (restored - target_linear).abs().mean() + log_term


def enhancement_loss(enhanced: torch.Tensor, target_srgb: torch.Tensor) -> torch.Tensor:
    """Eq. 6: L1 against the sRGB target; scalar."""
    return (enhanced - target_srgb).abs().mean()


class CameraNetTraining:
    """The paper's two-step scheme as training phases: "independent" (each net on its own target), "joint"."""

    phases = ("independent", "joint")
    lr_scales = {"independent": 1.0, "joint": 1.0}

    def __init__(self, model: CameraNet, loss_weights: dict):
        self.model = model
        # λ of Eq. 7; the paper sets it per scenario, larger where restoration dominates (ours: defects, noise).
        self.joint_lambda = float(loss_weights.get("joint_lambda", 0.5))

    def trainable(self, phase: str) -> list[nn.Parameter]:
        """Both nets are trained in both phases (separately in the first: their losses share no parameter)."""
        return list(self.model.parameters())

    def losses(self, batch: dict, phase: str, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (x: planes, target: sRGB (B, 3, 2h, 2w) in [0, 1]); "loss" is minimised."""
        target_linear = srgb_to_linear(batch["target"])
        restored = self.model.restore(batch["x"])
        restoration = restoration_loss(restored, target_linear)
        if phase == "independent":
            # Enhance-Net learns from the restoration target, not from Restore-Net's output (the paper's step 1).
            enhancement = enhancement_loss(self.model.enhance(target_linear), batch["target"])
            loss = restoration + enhancement
        else:
            enhancement = enhancement_loss(self.model.enhance(restored), batch["target"])
            loss = self.joint_lambda * restoration + (1.0 - self.joint_lambda) * enhancement
        return {"loss": loss, "restoration": restoration, "enhancement": enhancement}
