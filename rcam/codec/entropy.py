"""Entropy coding of one tile's latents with constriction, with parameters both sides derive bit-exactly.

Why exact: a range decoder that uses a probability model differing in a single element from the encoder's
decodes garbage from then on. So everything the coder's models depend on is integer arithmetic:
- z is coded with per-channel categorical tables, integers computed once from the weights (`z_tables`);
- the hyper-synthesis network is re-run in fixed point (`IntegerHyperSynthesis`): integer weights and
  activations, evaluated in float64 on the CPU where every partial sum is an integer below 2^53, hence exact
  in any summation order, on any machine and thread count;
- the scale of each y element is an index into a fixed table of integer standard deviations, and its mean is
  an integer in 1/1024 units, so ŷ = symbol + mean is the same number on both sides.
The float hyper-synthesis is what training sees. The fixed-point copy differs from it by the rounding of weights
(to 2^-12) and activations (to 2^-10) compounded through the layers, not by less than 2^-10 as this once said:
for rcam-small's means about 0.01 at |z| <= 2 and 0.3 at |z| = 64 (tests/test_entropy.py bounds it layer by
layer). Both sides use the fixed-point numbers, so this costs a little rate and never exactness.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from torch import nn

from rcam.errors import RcamError

FIXED_POINT_BITS = 10  # activations, means and scales are integers in units of 2^-10
WEIGHT_BITS = 12  # weights are integers in units of 2^-12
ACTIVATION_LIMIT = 2**20  # |activation| bound in fixed-point units (1024.0): keeps every sum below 2^53
Z_MAX = 64  # z symbols are clamped to [-Z_MAX, Z_MAX]
Y_MAX = 1023  # y symbols (y - mean, rounded) are clamped to [-Y_MAX, Y_MAX]
Z_TABLE_BITS = 16  # z probabilities are stored as integers out of about 2^16
# Standard deviations of the y model, in units of 2^-10: exp(linspace(log 0.11, log 64, 64)), rounded.
SCALE_TABLE_Q10 = (
    113, 125, 138, 153, 169, 187, 207, 229, 253, 280, 309, 342, 379, 419, 464, 513, 567, 628, 694, 768, 850,
    940, 1040, 1151, 1273, 1409, 1559, 1724, 1908, 2110, 2335, 2583, 2858, 3162, 3498, 3870, 4281, 4736, 5240,
    5797, 6414, 7096, 7850, 8685, 9608, 10630, 11761, 13011, 14395, 15925, 17618, 19492, 21564, 23857, 26394,
    29201, 32306, 35741, 39541, 43746, 48398, 53544, 59237, 65536,
)  # fmt: skip
_SCALE_TABLE = np.asarray(SCALE_TABLE_Q10, dtype=np.float64) / 2**FIXED_POINT_BITS
_SCALE_TABLE_Q10 = torch.tensor(SCALE_TABLE_Q10, dtype=torch.float64)  # built once, searched per tile


@dataclass(frozen=True)
class _IntegerLayer:
    weight: torch.Tensor  # float64 holding integers (units 2^-WEIGHT_BITS)
    bias: torch.Tensor  # float64 holding integers (units 2^-(WEIGHT_BITS + FIXED_POINT_BITS))
    transposed: bool
    stride: int
    padding: int
    output_padding: int
    relu: bool


class IntegerHyperSynthesis:
    """Fixed-point copy of the hyper-synthesis (conv / deconv / ReLU only): ẑ (ints) -> (mean_q, scale_index)."""

    def __init__(self, network: nn.Sequential):
        modules = list(network)
        self.layers: list[_IntegerLayer] = []
        for position, module in enumerate(modules):
            if isinstance(module, nn.ReLU):
                continue
            if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                raise TypeError(f"cannot run {type(module).__name__} in fixed point")
            relu = position + 1 < len(modules) and isinstance(modules[position + 1], nn.ReLU)
            weight = module.weight.detach().to("cpu", torch.float64)
            bias = module.bias.detach().to("cpu", torch.float64)
            self.layers.append(
                _IntegerLayer(
                    weight=torch.round(weight * 2**WEIGHT_BITS),
                    bias=torch.round(bias * 2 ** (WEIGHT_BITS + FIXED_POINT_BITS)),
                    transposed=isinstance(module, nn.ConvTranspose2d),
                    stride=module.stride[0],
                    padding=module.padding[0],
                    output_padding=module.output_padding[0] if isinstance(module, nn.ConvTranspose2d) else 0,
                    relu=relu,
                )
            )
        limit = 2**53 / (ACTIVATION_LIMIT * 2)
        for layer in self.layers:
            # Worst case of one output: every input at the limit times the sum of |weights| feeding it.
            fan_in_sum = layer.weight.abs().sum(dim=(0, 2, 3) if layer.transposed else (1, 2, 3)).max()
            if float(fan_in_sum) >= limit:
                raise RcamError("hyper-synthesis weights too large for exact fixed-point evaluation")

    def __call__(self, z_symbols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, Cz, h, w) integers -> means in 2^-10 units and scale-table indices, each (B, M, 4h, 4w) int64."""
        activation = z_symbols.to("cpu", torch.float64) * 2**FIXED_POINT_BITS
        # No intra-op threads: the result is exact anyway, and this keeps it cheap next to the main network.
        for layer in self.layers:
            if layer.transposed:
                out = F.conv_transpose2d(
                    activation, layer.weight, None, layer.stride, layer.padding, layer.output_padding
                )
            else:
                out = F.conv2d(activation, layer.weight, None, layer.stride, layer.padding)
            out = out + layer.bias[None, :, None, None]
            # Back to 2^-10 units: round half up, an exact operation on integers in float64.
            activation = torch.floor(out / 2**WEIGHT_BITS + 0.5)
            if layer.relu:
                activation = activation.clamp_min(0)
            activation = activation.clamp(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)
        means, scales = activation.chunk(2, dim=1)
        # Smallest table entry >= the predicted scale (as compressai's build_indexes), compared as integers.
        index = torch.searchsorted(_SCALE_TABLE_Q10, scales.contiguous()).clamp_max(len(SCALE_TABLE_Q10) - 1)
        return means.to(torch.int64), index


def z_tables(entropy_bottleneck: EntropyBottleneck) -> np.ndarray:
    """Per-channel probabilities of z symbols -Z_MAX..Z_MAX as integers: (Cz, 2·Z_MAX+1) int64, each entry >= 1."""
    channels = entropy_bottleneck.channels
    support = torch.arange(-Z_MAX, Z_MAX + 1, dtype=torch.float32)
    values = support[None, None, :].repeat(channels, 1, 1)
    with torch.no_grad():
        likelihood, _, _ = entropy_bottleneck._likelihood(values.to(next(entropy_bottleneck.parameters()).device))
    probabilities = likelihood.reshape(channels, -1).double().cpu().numpy()
    return np.maximum(np.round(probabilities * 2**Z_TABLE_BITS), 1).astype(np.int64)


@dataclass(frozen=True)
class TileLatents:
    """What one tile's stream decodes to: ŷ after gains are undone elsewhere, plus the raw symbols."""

    y_hat: torch.Tensor  # (1, M, h, w) float32, symbol + mean, in the gained domain
    y_symbols: np.ndarray  # (M·h·w,) int32
    z_symbols: np.ndarray  # (Cz·hz·wz,) int32


class LatentCoder:
    """Range-codes (z, y) of one tile into one constriction ANS stream and back."""

    def __init__(self, hyper_synthesis: IntegerHyperSynthesis, z_table: np.ndarray):
        self.hyper_synthesis = hyper_synthesis
        self.z_models = [constriction.stream.model.Categorical(row.astype(np.float64), perfect=False) for row in z_table]
        self.y_model = constriction.stream.model.QuantizedGaussian(-Y_MAX, Y_MAX)

    def _y_parameters(self, z_symbols: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        means_q, scale_index = self.hyper_synthesis(z_symbols)
        means = means_q.to(torch.float64) / 2**FIXED_POINT_BITS
        return means, _SCALE_TABLE[scale_index.numpy().ravel()]

    def encode(self, y: torch.Tensor, z: torch.Tensor) -> tuple[bytes, TileLatents]:
        """y (1, M, h, w) and z (1, Cz, h/4, w/4) floats -> (stream bytes, the latents the decoder will see)."""
        z_symbols = torch.round(z.detach().to("cpu", torch.float64)).clamp(-Z_MAX, Z_MAX)
        means, stds = self._y_parameters(z_symbols)
        y_symbols = torch.round(y.detach().to("cpu", torch.float64) - means).clamp(-Y_MAX, Y_MAX)
        coder = constriction.stream.stack.AnsCoder()
        # ANS is a stack: push y first so that the decoder pops z first.
        y_flat = y_symbols.numpy().astype(np.int32).ravel()
        coder.encode_reverse(y_flat, self.y_model, np.zeros_like(stds), stds)
        z_channels = z_symbols.numpy().astype(np.int32)[0]
        for channel in range(len(self.z_models) - 1, -1, -1):
            coder.encode_reverse(z_channels[channel].ravel() + Z_MAX, self.z_models[channel])
        stream = coder.get_compressed().tobytes()
        y_hat = (y_symbols + means).float()
        return stream, TileLatents(y_hat=y_hat, y_symbols=y_flat, z_symbols=z_channels.ravel())

    def decode(self, stream: bytes, y_shape: tuple[int, int, int], z_shape: tuple[int, int, int]) -> TileLatents:
        """Stream bytes -> latents, for a tile whose y is (M, h, w) and z (Cz, h/4, w/4)."""
        if len(stream) % 4:
            raise RcamError("stream length is not a whole number of 32-bit words")
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, dtype=np.uint32).copy())
        channels, z_height, z_width = z_shape
        z_channels = np.stack(
            [coder.decode(self.z_models[c], z_height * z_width).astype(np.int32) - Z_MAX for c in range(channels)]
        ).reshape(1, channels, z_height, z_width)
        means, stds = self._y_parameters(torch.from_numpy(z_channels).to(torch.float64))
        y_flat = coder.decode(self.y_model, np.zeros_like(stds), stds).astype(np.int32)
        if not coder.is_empty():
            # Leftover words mean the stream does not belong to this geometry and model.
            raise RcamError("stream has data left over after decoding (corrupt or wrong model)")
        y_hat = (torch.from_numpy(y_flat.reshape(1, *y_shape)).to(torch.float64) + means).float()
        return TileLatents(y_hat=y_hat, y_symbols=y_flat, z_symbols=z_channels.ravel())
