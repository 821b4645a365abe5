"""RealCamNet: packed RAW tile -> latent y (CADR, CPE, CIMC) -> mean-scale hyperprior -> CSA decoder -> sRGB.

Shapes, with a packed tile of (B, 4, h, w), h and w multiples of 32:
  y: (B, M, h/8, w/8), z: (B, Nh, h/32, w/32), output: (B, 3, 2h, 2w) sRGB in [0, 1] (unclamped while training).

With `skeleton` the CSA decoder reconstructs the packed planes (the encoder's input space), the classical
path of rcam.codec.skeleton develops them, and a correction head adds what that path gets wrong, one per look.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
from torch import nn

from rcam.codec.container import LOOKS  # a look tensor holds indices into it, as the header does
from rcam.codec.layers import CADR, CSA, GFT, GlobalPrior, LocalPrior, VignettingEstimator, conv, deconv, devignette, log_gain_at
from rcam.codec.skeleton import band_limit_packed, develop_packed
from rcam.errors import RcamError

# λ values with their own learned gain vector; any λ in between is interpolated (Cui et al., CVPR 2021).
LAMBDA_ANCHORS = (0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
LAMBDA_RANGE = (LAMBDA_ANCHORS[0], LAMBDA_ANCHORS[-1])
# Total downsampling from the packed tile to z: tiles must be multiples of this.
TILE_MULTIPLE = 32


@dataclass(frozen=True)
class ModelConfig:
    """Width and depth of a RealCamNet, plus the ablation switches."""

    name: str
    channels: int = 64  # N: transform width
    latent_channels: int = 96  # M: channels of y
    hyper_channels: int = 64  # Nh: channels of z and the hyper transforms
    prior_channels: int = 32  # D: colour prior width
    encoder_blocks: int = 1  # CSA(+LFT) blocks per encoder stage (two stages)
    decoder_blocks: int = 1  # CSA blocks per decoder stage (two stages)
    heads: int = 2
    window: int = 8
    thumbnail: int = 64  # side of the whole-image thumbnail fed to the global prior
    cadr: bool = True  # ablation: without CADR the first layer is a plain conv
    coordinates: str = "absolute"  # ablation: "relative" gives each tile coordinates from 0 to 1
    global_prior: bool = True  # ablation: without the global prior GFT is the identity
    # CADR's modulation also sees the global prior, which also gets the frame's brightness layout (off for
    # weights trained before these existed).
    cadr_prior: bool = False
    # An estimator of the frame's lens falloff (from the thumbnail) whose estimate is divided out of the input
    # before the encoder; trained with its own supervised loss (off for weights trained before it existed).
    vignetting: bool = False
    # SPEC §4: the decoder reconstructs the packed planes, a classical demosaic and colour path develops them
    # and the network adds a correction per look (off for weights trained before it existed: clean look only).
    skeleton: bool = False
    # Ablation of the skeleton (issue 17): an end-to-end decoder that renders both looks, its RGB tail one
    # output group per look, so it can be trained on exactly the skeleton model's data and budget.
    look_tails: bool = False
    # Issue 17 item 4: a channel-wise context model (Minnen & Singh 2020) refines the hyperprior's means and
    # scales slice by slice from the slices decoded before (0: the mean-scale hyperprior alone, as before it).
    context_slices: int = 0
    context_width: int = 32
    # A checkerboard spatial context within each slice (He et al. 2021): half the positions ("anchors") are
    # coded with the channel-wise parameters, the other half refined from the anchors around them (width of
    # its networks; 0: none, as every model before it). Needs context_slices.
    context_spatial: int = 0

    @property
    def looks(self) -> tuple[str, ...]:
        """The looks this model can render."""
        return LOOKS if self.skeleton or self.look_tails else LOOKS[:1]

    def to_dict(self) -> dict:
        return asdict(self)


CONFIGS = {
    "small": ModelConfig(name="small", cadr_prior=True),
    # Paper scale: about 49 M parameters (RealCamNet reports 49.01 M); this one has 51.3 M.
    "paper": ModelConfig(
        name="paper",
        channels=384,
        latent_channels=320,
        hyper_channels=256,
        prior_channels=64,
        encoder_blocks=5,
        decoder_blocks=5,
        heads=6,
        window=8,
        thumbnail=256,
        cadr_prior=True,
        skeleton=True,
        context_slices=5,  # the paper's code: 5 slices of a channel-wise context model
        context_width=48,
    ),
}


class GainUnits(nn.Module):
    """Per-channel gains on y for each anchor λ, interpolated exponentially in log λ (variable-rate coding)."""

    def __init__(self, channels: int):
        super().__init__()
        anchors = torch.tensor(LAMBDA_ANCHORS, dtype=torch.float64)
        self.register_buffer("log_anchors", anchors.log().float(), persistent=False)
        # Start from the usual rule that the quantisation step shrinks like λ^-1/2.
        start = 0.5 * (anchors / 0.01).log().float()
        self.log_gain = nn.Parameter(start[:, None].repeat(1, channels))
        self.log_inverse_gain = nn.Parameter(-start[:, None].repeat(1, channels))

    def forward(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """λ (B,) -> (gain, inverse gain), each (B, M, 1, 1)."""
        log_lam = lam.float().log().clamp(self.log_anchors[0], self.log_anchors[-1])
        upper = torch.searchsorted(self.log_anchors, log_lam.contiguous()).clamp(1, len(self.log_anchors) - 1)
        lower = upper - 1
        t = ((log_lam - self.log_anchors[lower]) / (self.log_anchors[upper] - self.log_anchors[lower]))[:, None]
        gain = (1 - t) * self.log_gain[lower] + t * self.log_gain[upper]
        inverse = (1 - t) * self.log_inverse_gain[lower] + t * self.log_inverse_gain[upper]
        return gain.exp()[:, :, None, None], inverse.exp()[:, :, None, None]


def hyper_transforms(latent_channels: int, hyper_channels: int) -> tuple[nn.Sequential, nn.Sequential]:
    """Mean-scale hyperprior transforms (Minnen et al. 2018): y (B,M,h,w) -> z (B,Nh,h/4,w/4), and ẑ -> means and
    scales of y (B,2M,h,w). Shared by every codec rcam.entropy codes (RealCamNet, the RAWtoBit comparator)."""
    m, nh = latent_channels, hyper_channels
    analysis = nn.Sequential(
        conv(m, nh, 3), nn.ReLU(inplace=True), conv(nh, nh, 5, 2), nn.ReLU(inplace=True), conv(nh, nh, 5, 2)
    )
    # Only conv/deconv and ReLU here: this network is re-run in exact integer arithmetic (entropy.py).
    synthesis = nn.Sequential(
        deconv(nh, nh), nn.ReLU(inplace=True), deconv(nh, nh * 3 // 2), nn.ReLU(inplace=True), conv(nh * 3 // 2, 2 * m, 3)
    )
    return analysis, synthesis


class ChannelContext(nn.Module):
    """Channel-wise context model without latent residual prediction: y's channels in `slices` equal slices,
    each slice's means and scales = the hyperprior's + a correction from them and the rounded slices before it.

    Only conv and ReLU, the last layer zero at the start (the hyperprior's parameters unchanged), so that
    entropy.IntegerConvNet can re-run it exactly on both sides of the range coder."""

    def __init__(self, latent_channels: int, slices: int, width: int, spatial_width: int = 0):
        super().__init__()
        if latent_channels % slices:
            raise RcamError(f"{latent_channels} latent channels do not split into {slices} equal slices")
        size = latent_channels // slices
        self.slice_size = size
        self.nets = nn.ModuleList()
        for index in range(slices):
            # 3x3 on the inputs (neighbours of decoded slices), then 1x1: most of the gain at a tenth of the cost.
            net = nn.Sequential(conv(2 * size + index * size, width, 3), nn.ReLU(inplace=True), conv(width, width, 1),
                                nn.ReLU(inplace=True), conv(width, 2 * size, 1))  # fmt: skip
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
            self.nets.append(net)
        # Checkerboard: a non-anchor's correction from its four anchor neighbours' symbols and scales (the 3x3
        # kernel's other taps only ever meet zeros, and entropy.IntegerChannelContext leaves them out).
        self.spatial_nets = nn.ModuleList()
        for _ in range(slices if spatial_width else 0):
            net = nn.Sequential(conv(2 * size, spatial_width, 3), nn.ReLU(inplace=True), conv(spatial_width, spatial_width, 1),
                                nn.ReLU(inplace=True), conv(spatial_width, 2 * size, 1))  # fmt: skip
            nn.init.zeros_(net[-1].weight)
            nn.init.zeros_(net[-1].bias)
            self.spatial_nets.append(net)

    def forward(self, y: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gained y and the hyperprior's means and scales, each (B,M,h,w) -> refined (means, scales), each (B,M,h,w).

        Each slice sees the slices before it rounded around their own means (as the decoder has them), with
        straight-through gradients; with a spatial context, non-anchors also see their anchor neighbours' symbols."""
        refined_means, refined_scales, decoded = [], [], []
        anchors = checkerboard(*y.shape[-2:], device=y.device).to(y.dtype) if self.spatial_nets else None
        for index, net in enumerate(self.nets):
            part = slice(index * self.slice_size, (index + 1) * self.slice_size)
            own_means, own_scales = means[:, part], scales[:, part]
            delta_means, delta_scales = net(torch.cat([own_means, own_scales, *decoded], dim=1)).chunk(2, dim=1)
            slice_means, slice_scales = own_means + delta_means, own_scales + delta_scales
            y_slice = y[:, part]
            if anchors is not None:
                symbols = torch.round(y_slice - slice_means).detach()
                spatial_means, spatial_scales = self.spatial_nets[index](torch.cat([symbols, slice_scales], dim=1) * anchors).chunk(2, dim=1)
                slice_means = slice_means + spatial_means * (1 - anchors)
                slice_scales = slice_scales + spatial_scales * (1 - anchors)
            decoded.append(y_slice + (torch.round(y_slice - slice_means) + slice_means - y_slice).detach())
            refined_means.append(slice_means)
            refined_scales.append(slice_scales)
        return torch.cat(refined_means, dim=1), torch.cat(refined_scales, dim=1)


def checkerboard(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(height, width) bool: the spatial context's anchors, the latent positions whose row + column is even."""
    rows = torch.arange(height, device=device)[:, None]
    columns = torch.arange(width, device=device)[None, :]
    return (rows + columns) % 2 == 0


def quantise_latent(model: nn.Module, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training path of the hyperprior of `model` (hyper_analysis, entropy_bottleneck, hyper_synthesis,
    gaussian_conditional, and channel_context where it has one): gained y (B,M,h,w) -> (ŷ, rounded around its mean,
    straight-through; likelihoods of y and z).

    Rate terms use additive noise while training; the decoder sees rounded ŷ, as at inference."""
    z = model.hyper_analysis(y)
    z_hat, z_likelihoods = model.entropy_bottleneck(z, training=model.training)
    if model.training:
        z_hat = z + (torch.round(z) - z).detach()
    means, scales = model.hyper_synthesis(z_hat).chunk(2, dim=1)
    context = getattr(model, "channel_context", None)
    if context is not None:
        means, scales = context(y, means, scales)
    _, y_likelihoods = model.gaussian_conditional(y, scales, means=means, training=model.training)
    y_hat = torch.round(y - means) + means
    return y + (y_hat - y).detach(), {"y": y_likelihoods, "z": z_likelihoods}


def _per_look(groups: torch.Tensor, look: torch.Tensor) -> torch.Tensor:
    """(B, L·C, h, w) outputs, one group of C channels per look, and look (B,) -> each sample's group (B, C, h, w)."""
    batch, channels, height, width = groups.shape
    grouped = groups.view(batch, len(LOOKS), channels // len(LOOKS), height, width)
    return grouped[torch.arange(batch, device=look.device), look]


class RealCamNet(nn.Module):
    """The whole codec network; `forward` is the training path, the codec module drives inference."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        n, m, nh, d = config.channels, config.latent_channels, config.hyper_channels, config.prior_channels
        heads, window = config.heads, config.window

        if config.vignetting and config.coordinates != "absolute":
            raise RcamError("the vignetting estimator needs absolute coordinates (its estimate is a map of the whole frame)")
        if config.context_spatial and not config.context_slices:
            raise RcamError("context_spatial refines the channel-wise context's slices: set context_slices too")
        self.vignetting = VignettingEstimator() if config.vignetting else None
        self.global_prior = GlobalPrior(d, layout=config.cadr_prior) if config.global_prior else None
        self.local_prior = LocalPrior(d)
        cadr_prior = d if config.cadr_prior and config.global_prior else None
        self.cadr = CADR(4, n, prior_channels=cadr_prior) if config.cadr else None
        self.first = None if config.cadr else conv(4, n)
        self.down1 = conv(n, n, 3, 2)
        self.encoder_stage1 = nn.ModuleList(CSA(n, heads, window, d) for _ in range(config.encoder_blocks))
        self.down2 = conv(n, n, 3, 2)
        self.encoder_stage2 = nn.ModuleList(CSA(n, heads, window, d) for _ in range(config.encoder_blocks))
        self.down3 = conv(n, m, 3, 2)
        self.gft = GFT(m, d)
        self.gains = GainUnits(m)

        self.hyper_analysis, self.hyper_synthesis = hyper_transforms(m, nh)
        self.entropy_bottleneck = EntropyBottleneck(nh)
        self.gaussian_conditional = GaussianConditional(None)
        self.channel_context = (
            ChannelContext(m, config.context_slices, config.context_width, config.context_spatial) if config.context_slices else None
        )

        self.up1 = deconv(m, n)
        self.decoder_stage1 = nn.ModuleList(CSA(n, heads, window) for _ in range(config.decoder_blocks))
        self.up2 = deconv(n, n)
        self.decoder_stage2 = nn.ModuleList(CSA(n, heads, window) for _ in range(config.decoder_blocks))
        self.up3 = deconv(n, n)
        if config.skeleton:
            self.plane_head = conv(n, 4)
            # Zero at the start: the output is the skeleton's development until training finds corrections.
            self.correction = conv(n, 12 * len(LOOKS))
            nn.init.zeros_(self.correction.weight)
            nn.init.zeros_(self.correction.bias)
        else:
            self.tail = conv(n, 12 * len(config.looks))

    def analysis(self, x: torch.Tensor, coords: torch.Tensor, thumbnail: torch.Tensor, look: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder E: packed tile (B,4,h,w), coordinates (B,2,h,w), thumbnail (B,4,S,S), look (B,) indices into
        LOOKS (None: clean) -> y (B,M,h/8,w/8), before gains. The faithful look keeps the lens falloff."""
        if self.vignetting is not None:
            # Detached: the estimator learns only from its own loss (train.py), not from the codec's.
            devignetted = devignette(x, log_gain_at(self.vignetting(thumbnail).detach(), coords))
            x = devignetted if look is None else torch.where((look == 0)[:, None, None, None], devignetted, x)
        half_prior, quarter_prior = self.local_prior(x)
        global_prior = self.global_prior(thumbnail) if self.global_prior is not None else None
        features = self.cadr(x, coords, global_prior) if self.cadr is not None else self.first(x)
        features = self.down1(features)
        for block in self.encoder_stage1:
            features = block(features, half_prior)
        features = self.down2(features)
        for block in self.encoder_stage2:
            features = block(features, quarter_prior)
        y = self.down3(features)
        if global_prior is not None:
            y = self.gft(y, global_prior)
        return y.float()  # float32 also under bfloat16 autocast: the gains, rounding and entropy coding follow

    def synthesis(
        self, y_hat: torch.Tensor, development: tuple[torch.Tensor, torch.Tensor] | None = None, look: torch.Tensor | None = None
    ) -> torch.Tensor:  # fmt: skip
        """Decoder D: ŷ after inverse gains (B,M,h/8,w/8) -> sRGB (B,3,2h,2w).

        A skeleton model also needs the development (colour matrix (B,3,3), white (B,)) and the look (B,).
        """
        return self.synthesis_parts(y_hat, development, look)[0]

    def synthesis_parts(
        self, y_hat: torch.Tensor, development: tuple[torch.Tensor, torch.Tensor] | None = None, look: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """synthesis, also returning the reconstructed planes (B,4,h,w) of a skeleton model (else None)."""
        features = self.up1(y_hat)
        for block in self.decoder_stage1:
            features = block(features)
        features = self.up2(features)
        for block in self.decoder_stage2:
            features = block(features)
        features = self.up3(features)
        # Under bfloat16 autocast (the engine's fast inference on CPUs with native bfloat16) the plane head, the
        # tail and the classical path run in float32: the planes and their development are where 8-bit
        # mantissas would show in the pixels. The correction is small and band-limited, so its conv may not.
        correction = self.correction(features).float() if self.config.skeleton else None
        with torch.autocast(features.device.type, enabled=False):
            return self._heads(features.float(), correction, development, look)

    def _heads(
        self, features: torch.Tensor, correction: torch.Tensor | None, development: tuple[torch.Tensor, torch.Tensor] | None,
        look: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        """Last features (B,n,h,w) and a skeleton model's correction conv output -> (sRGB (B,3,2h,2w), planes
        (B,4,h,w) or None): synthesis_parts' tail."""
        if not self.config.skeleton:
            if not self.config.look_tails:
                return F.pixel_shuffle(self.tail(features), 2), None
            if look is None:
                raise RcamError("a model with one tail per look needs the look")
            return F.pixel_shuffle(_per_look(self.tail(features), look), 2), None
        if development is None or look is None:
            raise RcamError("a skeleton model's synthesis needs the frame's development and look")
        planes = self.plane_head(features)
        # Both packed (colour c at CFA position p in channel 4·c + p): one pixel shuffle for their sum.
        return F.pixel_shuffle(develop_packed(planes, *development) + band_limit_packed(_per_look(correction, look)), 2), planes

    def hyper_parameters(self, z_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ẑ -> (means, scales) of the scaled latent, float path used in training."""
        means, scales = self.hyper_synthesis(z_hat).chunk(2, dim=1)
        return means, scales

    def forward(
        self, x: torch.Tensor, coords: torch.Tensor, thumbnail: torch.Tensor, lam: torch.Tensor,
        look: torch.Tensor | None = None, development: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict:  # fmt: skip
        """Training pass: rate terms by additive noise, the decoder sees rounded ŷ (straight-through)."""
        gain, inverse_gain = self.gains(lam)
        y_hat, likelihoods = quantise_latent(self, self.analysis(x, coords, thumbnail, look) * gain)
        rgb, planes = self.synthesis_parts(y_hat * inverse_gain, development, look)
        return {"rgb": rgb, "planes": planes, "likelihoods": likelihoods}


def build_model(config: ModelConfig | str) -> RealCamNet:
    """A RealCamNet from a config or the name of a shipped one ("small", "paper")."""
    if isinstance(config, str):
        config = CONFIGS[config]
    return RealCamNet(config)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def rate_bits(likelihoods: dict[str, torch.Tensor]) -> torch.Tensor:
    """Total bits of all likelihood tensors (sum over elements and batch)."""
    return sum(-torch.log2(lik).sum() for lik in likelihoods.values())


