"""Entropy coding of one tile's latents with constriction, with parameters both sides derive bit-exactly.

Why exact: a range decoder that uses a probability model differing in a single element from the encoder's
decodes garbage from then on. So everything the coder's models depend on is integer arithmetic:
- z is coded with per-channel categorical tables, integers computed once from the weights (`z_tables`);
- the hyper-synthesis network is re-run in fixed point (`IntegerHyperSynthesis`): integer weights and
  activations, evaluated in float64 on the CPU where every partial sum is an integer below 2^53, hence exact
  in any summation order, on any machine and thread count;
- the scale of each y element is an index into a fixed table of integer standard deviations, and its mean is
  an integer in 1/1024 units, so ŷ = symbol + mean is the same number on both sides;
- a channel-wise context model's networks are re-run the same way, fed the earlier slices' ŷ in 1/1024 units,
  integers that both sides hold alike; so are the checkerboard's spatial networks, fed the anchors' symbols.
The float hyper-synthesis is what training sees. The fixed-point copy differs from it by the rounding of weights
(to 2^-12) and activations (to 2^-10) compounded through the layers, not by less than 2^-10 as this once said:
for rcam-small's means about 0.01 at |z| <= 2 and 0.3 at |z| = 64 (tests/test_entropy.py bounds it layer by
layer). Both sides use the fixed-point numbers, so this costs a little rate and never exactness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import constriction
import numpy as np
import torch
import torch.nn.functional as F
from compressai.entropy_models import EntropyBottleneck
from torch import nn

from rcam.codec.models import checkerboard
from rcam.errors import RcamError

FIXED_POINT_BITS = 10  # activations, means and scales are integers in units of 2^-10
WEIGHT_BITS = 12  # weights are integers in units of 2^-12
ACTIVATION_LIMIT = 2**20  # |activation| bound in fixed-point units (1024.0): keeps every sum below 2^53
Z_MAX = 64  # z symbols are clamped to [-Z_MAX, Z_MAX]
Y_MAX = 1023  # y symbols (y - mean, rounded) are clamped to [-Y_MAX, Y_MAX]
Z_TABLE_BITS = 16  # z probabilities are stored as integers out of about 2^16
# Format 5's z table variants, per tile and channel: variant k > 0 mixes k/8 of the probability into symbol 0,
# k < 0 takes |k|/8 of symbol 0's probability away, k = 0 is the table itself (z_variant_tables).
Z_VARIANTS = tuple(range(-7, 8))
Z_BASE_VARIANT = Z_VARIANTS.index(0)
# The variant indices' own model: the table itself half the time, every other variant alike.
Z_VARIANT_WEIGHTS = np.asarray([len(Z_VARIANTS) - 1 if k == 0 else 1 for k in Z_VARIANTS], dtype=np.float64)
# Format 5's y scale corrections, per tile and channel: the channel's scales times s/16 before the table lookup.
Y_SCALE_SIXTEENTHS = (11, 13, 14, 16, 18, 20, 22)
Y_BASE_SCALE = Y_SCALE_SIXTEENTHS.index(16)
Y_SCALE_WEIGHTS = np.asarray([len(Y_SCALE_SIXTEENTHS) - 1 if s == 16 else 1 for s in Y_SCALE_SIXTEENTHS], dtype=np.float64)
_ESTIMATED_MAGNITUDES = 16  # |y symbol| the encoder's choice of corrections tells apart (larger ones count as 15)
Y_PRECISION = 24  # constriction's default models: y probabilities are integers out of 2^24
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
    rounding_bias: torch.Tensor  # the bias plus half the 2^-10 output unit: floor(sum / 2^12) then rounds half up


class IntegerConvNet:
    """Fixed-point copy of a conv / deconv / ReLU network: activations in 2^-10 units in, and out, exactly."""

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
            bias = torch.round(module.bias.detach().to("cpu", torch.float64) * 2 ** (WEIGHT_BITS + FIXED_POINT_BITS))
            self.layers.append(
                _IntegerLayer(
                    weight=torch.round(weight * 2**WEIGHT_BITS),
                    bias=bias,
                    rounding_bias=bias + 2 ** (WEIGHT_BITS - 1),
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
                raise RcamError("entropy-model weights too large for exact fixed-point evaluation")

    def run(self, activation: torch.Tensor, first: int = 0) -> torch.Tensor:
        """(B, C, h, w) float64 integers in 2^-10 units -> the network's output, the same kind of numbers (from
        layer `first` on)."""
        # Clamped on the way in as after every layer, so the worst case above holds for any input.
        activation = activation.clamp(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)
        for layer in self.layers[first:]:
            if layer.transposed:
                out = F.conv_transpose2d(
                    activation, layer.weight, layer.rounding_bias, layer.stride, layer.padding, layer.output_padding
                )
            else:
                out = F.conv2d(activation, layer.weight, layer.rounding_bias, layer.stride, layer.padding)
            activation = to_units(out, layer)
        return activation


def to_units(sums: torch.Tensor, layer: _IntegerLayer) -> torch.Tensor:
    """A layer's sums (rounding bias included) -> its activations in 2^-10 units, rounded half up, after its ReLU
    and clamp: exact on integers in float64, computed in place."""
    return sums.div_(2**WEIGHT_BITS).floor_().clamp_(0 if layer.relu else -ACTIVATION_LIMIT, ACTIVATION_LIMIT)


def scale_indices(scales_q: torch.Tensor) -> torch.Tensor:
    """Scales in 2^-10 units (float64 integers) -> indices into SCALE_TABLE_Q10 (int64, same shape)."""
    # Smallest table entry >= the predicted scale (as compressai's build_indexes), compared as integers.
    return torch.searchsorted(_SCALE_TABLE_Q10, scales_q.contiguous()).clamp_max(len(SCALE_TABLE_Q10) - 1)


class IntegerHyperSynthesis(IntegerConvNet):
    """Fixed-point copy of the hyper-synthesis: ẑ (ints) -> (mean_q, scale_index)."""

    def raw(self, z_symbols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, Cz, h, w) integers -> means and scales in 2^-10 units, each (B, M, 4h, 4w) float64 integers."""
        return self.run(z_symbols.to("cpu", torch.float64) * 2**FIXED_POINT_BITS).chunk(2, dim=1)

    def __call__(self, z_symbols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (B, Cz, h, w) integers -> means in 2^-10 units and scale-table indices, each (B, M, 4h, 4w) int64."""
        means, scales = self.raw(z_symbols)
        return means.to(torch.int64), scale_indices(scales)


class IntegerChannelContext:
    """Fixed-point copy of models.ChannelContext: one slice's means and scales from the hyperprior's and the
    slices decoded before it (ŷ in 2^-10 units, exact on both sides, so the refinement is exact too); with a
    spatial context, the non-anchors' refinement from the anchor symbols around them."""

    def __init__(self, context: nn.Module):
        self.slice_size = context.slice_size
        self.nets = [IntegerConvNet(net) for net in context.nets]
        # Each network's first layer split by input: the slice's own means and scales, and each earlier slice's ŷ,
        # that slice's weights for every later network stacked, so a decoded slice feeds them all in one conv.
        size = self.slice_size
        self.own_weights = [net.layers[0].weight[:, : 2 * size] for net in self.nets]
        self.later_weights = [
            torch.cat([net.layers[0].weight[:, (2 + j) * size : (3 + j) * size] for net in self.nets[j + 1 :]])
            for j in range(len(self.nets) - 1)
        ]  # fmt: skip
        self.spatial_nets = [IntegerConvNet(_gathered(net)) for net in context.spatial_nets]
        self.spatial_kernel = context.spatial_nets[0][0].kernel_size[0] if context.spatial_nets else 0

    @property
    def spatial(self) -> bool:
        return bool(self.spatial_nets)

    def for_tile(self, means_q: torch.Tensor, scales_q: torch.Tensor) -> TileContext:
        """A tile's context state, from the hyperprior's means and scales (1, M, h, w) in 2^-10 units."""
        return TileContext(self, means_q, scales_q)

    def layout(self, height: int, width: int) -> Checkerboard:
        """The checkerboard of an h x w slice for this context's spatial networks."""
        positions = torch.arange(height * width)
        is_anchor = checkerboard(height, width).ravel()
        anchors, others = positions[is_anchor], positions[~is_anchor]
        anchor_number = torch.full((height * width + 1,), len(anchors))  # outside the slice: the zero column
        anchor_number[anchors] = torch.arange(len(anchors))
        rows, columns = others // width, others % width
        radius = self.spatial_kernel // 2
        neighbours = []
        for a, b in _odd_taps(self.spatial_kernel):
            row, column = rows + a - radius, columns + b - radius
            inside = (row >= 0) & (row < height) & (column >= 0) & (column < width)
            neighbours.append(anchor_number[torch.where(inside, row * width + column, height * width)])
        return Checkerboard(order=torch.cat([anchors, others]), anchor_count=len(anchors), neighbours=torch.stack(neighbours))

    def spatial_corrections(
        self, index: int, anchor_symbols: torch.Tensor, anchor_scales_q: torch.Tensor, board: Checkerboard
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Slice `index`'s anchor symbols and channel-wise anchor scales (2^-10 units), each (S, La) in the board's
        order -> the corrections of the means and scales at the non-anchors (2^-10 units), each (S, L)."""
        inputs = F.pad(torch.cat([anchor_symbols * 2**FIXED_POINT_BITS, anchor_scales_q]), (0, 1))  # last column: zeros
        # Every non-anchor's anchor neighbours as channels of one column (channel by channel, tap by tap, as
        # _gathered orders the weights): the first layer is a 1x1 over them.
        gathered = inputs.index_select(1, board.neighbours.ravel()).view(-1, board.neighbours.shape[1])
        corrections = self.spatial_nets[index].run(gathered[None, :, :, None])
        return corrections.view(2, self.slice_size, -1).unbind(0)


@dataclass(frozen=True)
class Checkerboard:
    """A slice's flat positions (row·w + column) in coding order, anchors first, and each non-anchor's anchor
    neighbours at the spatial network's odd taps, as numbers among the anchors (La where a tap leaves the slice)."""

    order: torch.Tensor  # (h·w,) int64: the La anchors, then the L others
    anchor_count: int  # La
    neighbours: torch.Tensor  # (taps, L) int64

    @property
    def anchors(self) -> slice:
        """The anchors' columns of a tensor in coding order."""
        return slice(None, self.anchor_count)

    @property
    def others(self) -> slice:
        """The non-anchors' columns of a tensor in coding order."""
        return slice(self.anchor_count, None)


class TileContext:
    """One tile's channel-wise context while its slices are coded in order: each network's first-layer sums
    gather the decoded slices' contributions as they come (integers, so the sums are exact in any order and
    equal the whole first layer's)."""

    def __init__(self, context: IntegerChannelContext, means_q: torch.Tensor, scales_q: torch.Tensor):
        self.context, self.means_q, self.scales_q = context, means_q, scales_q
        self.sums: list[torch.Tensor | None] = [None] * len(context.nets)

    def decoded(self, index: int, slice_q: torch.Tensor) -> None:
        """Slice `index`'s ŷ (1, S, h, w) in 2^-10 units, into the first-layer sums of every later slice."""
        if index + 1 >= len(self.context.nets):
            return
        first = self.context.nets[0].layers[0]  # every network's first layer has the same width and padding
        inputs = slice_q.clamp(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)  # as IntegerConvNet.run clamps its input
        sums = F.conv2d(inputs, self.context.later_weights[index], None, 1, first.padding)
        contributions = sums.split(first.weight.shape[0], dim=1)
        for later, contribution in enumerate(contributions, start=index + 1):
            self.sums[later] = contribution if self.sums[later] is None else self.sums[later].add_(contribution)

    def parameters(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice `index`'s means and scales (1, S, h, w) in 2^-10 units, once the slices before it are in."""
        size = self.context.slice_size
        part = slice(index * size, (index + 1) * size)
        own_means, own_scales = self.means_q[:, part], self.scales_q[:, part]
        net = self.context.nets[index]
        own = torch.cat([own_means, own_scales], dim=1).clamp_(-ACTIVATION_LIMIT, ACTIVATION_LIMIT)
        sums = F.conv2d(own, self.context.own_weights[index], net.layers[0].rounding_bias, 1, net.layers[0].padding)
        if self.sums[index] is not None:
            sums += self.sums[index]
        delta_means, delta_scales = net.run(to_units(sums, net.layers[0]), first=1).chunk(2, dim=1)
        return own_means + delta_means, own_scales + delta_scales


def _refine_others(
    context: IntegerChannelContext, index: int, anchor_symbols: torch.Tensor, means_o: torch.Tensor, scales_o: torch.Tensor, board: Checkerboard
) -> None:  # fmt: skip
    """Slice `index`'s means and scales (S, h·w) in coding order, 2^-10 units: the non-anchors' corrected in place
    from the anchors' symbols (S, La), as encoder and decoder both do once the anchors are known."""
    delta_means, delta_scales = context.spatial_corrections(index, anchor_symbols, scales_o[:, board.anchors], board)
    means_o[:, board.others] += delta_means
    scales_o[:, board.others] += delta_scales


def _flat(slice_tensor: torch.Tensor) -> torch.Tensor:
    """(1, S, h, w) -> (S, h·w), a view: what the checkerboard's flat positions index."""
    return slice_tensor.view(slice_tensor.shape[1], -1)


def _unordered(values_o: torch.Tensor, board: Checkerboard, shape: tuple[int, ...]) -> torch.Tensor:
    """(S, h·w) values in the board's coding order -> (1, S, h, w) in spatial order."""
    return torch.empty_like(values_o).index_copy_(1, board.order, values_o).view(shape)


def _odd_taps(kernel: int) -> list[tuple[int, int]]:
    """The taps of a kernel x kernel correlation that land on anchors when centred on a non-anchor."""
    return [(a, b) for a in range(kernel) for b in range(kernel) if (a + b - 2 * (kernel // 2)) % 2]


def _gathered(net: nn.Sequential) -> nn.Sequential:
    """A spatial network whose first k x k convolution becomes a 1x1 over its odd taps (IntegerChannelContext.
    spatial_corrections gathers those neighbours as channels): the same sums, without the taps that meet zeros."""
    first = net[0]
    taps = _odd_taps(first.kernel_size[0])
    gathered = nn.Conv2d(first.in_channels * len(taps), first.out_channels, 1)
    with torch.no_grad():  # input channel c·taps + t: channel c at tap t
        gathered.weight.copy_(torch.stack([first.weight[:, :, a, b] for a, b in taps], dim=2).flatten(1)[..., None, None])
        gathered.bias.copy_(first.bias)
    return nn.Sequential(gathered, *list(net)[1:])


def z_tables(entropy_bottleneck: EntropyBottleneck) -> np.ndarray:
    """Per-channel probabilities of z symbols -Z_MAX..Z_MAX as integers: (Cz, 2·Z_MAX+1) int64, each entry >= 1."""
    channels = entropy_bottleneck.channels
    support = torch.arange(-Z_MAX, Z_MAX + 1, dtype=torch.float32)
    values = support[None, None, :].repeat(channels, 1, 1)
    with torch.no_grad():
        likelihood, _, _ = entropy_bottleneck._likelihood(values.to(next(entropy_bottleneck.parameters()).device))
    probabilities = likelihood.reshape(channels, -1).double().cpu().numpy()
    return np.maximum(np.round(probabilities * 2**Z_TABLE_BITS), 1).astype(np.int64)


def y_cumulatives(std: float) -> np.ndarray:
    """The integer cumulatives constriction's QuantizedGaussian(-Y_MAX, Y_MAX) gives N(0, std) on -Y_MAX..Y_MAX,
    less its leak (one unit per symbol before): (2·Y_MAX+2,) float64 integers from 0 to 2^24 − (2·Y_MAX+1)."""
    free_weight = 2**Y_PRECISION - (2 * Y_MAX + 1)
    edges = np.arange(-Y_MAX, Y_MAX) + 0.5  # between neighbouring symbols
    cdf = np.array([(1.0 + math.erf(edge / (std * math.sqrt(2.0)))) / 2.0 for edge in edges])
    return np.concatenate([[0.0], np.floor(free_weight * cdf), [float(free_weight)]])


def measured_cumulatives(std: float) -> np.ndarray:
    """y_cumulatives(std) read off constriction itself, symbol by symbol (slow: about 12 ms)."""
    gaussian = constriction.stream.model.QuantizedGaussian(-Y_MAX, Y_MAX)
    lefts = []
    for symbol in range(-Y_MAX + 1, Y_MAX + 1):
        # One symbol pushed on an empty ANS coder (state 0) leaves the state ((0 // p) << 24) | (0 % p + left) = left.
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(np.array([symbol], np.int32), gaussian, np.zeros(1), np.array([std]))
        lefts.append(sum(int(word) << (32 * place) for place, word in enumerate(coder.get_compressed())))
    leaks = np.arange(1, 2 * Y_MAX + 1)
    return np.concatenate([[0.0], np.asarray(lefts, np.float64) - leaks, [float(2**Y_PRECISION - (2 * Y_MAX + 1))]])


def _categorical(cumulatives: np.ndarray) -> constriction.stream.model.Categorical:
    # Integer weights summing to the free weight: constriction's fast quantisation then keeps them as they are
    # (scale 1) and adds the same one-unit leak per symbol, so the model's cumulatives are these plus the leak.
    return constriction.stream.model.Categorical(np.diff(cumulatives), perfect=False)


def _codes_alike(table: constriction.stream.model.Categorical, std: float) -> bool:
    """Whether `table` codes every y symbol as QuantizedGaussian(-Y_MAX, Y_MAX) at `std` does (the same bytes)."""
    symbols = np.arange(-Y_MAX, Y_MAX + 1, dtype=np.int32)
    symbols = np.concatenate([symbols, symbols[::-1], symbols[(np.arange(len(symbols)) * 877) % len(symbols)]])
    gaussian, categorical = constriction.stream.stack.AnsCoder(), constriction.stream.stack.AnsCoder()
    gaussian.encode_reverse(symbols, constriction.stream.model.QuantizedGaussian(-Y_MAX, Y_MAX), np.zeros(len(symbols)), np.full(len(symbols), std))
    categorical.encode_reverse(symbols + Y_MAX, table)
    return np.array_equal(gaussian.get_compressed(), categorical.get_compressed())


@cache
def y_tables(cumulatives=y_cumulatives) -> tuple[constriction.stream.model.Categorical, ...]:
    """One categorical model per SCALE_TABLE_Q10 entry over y symbol + Y_MAX, with exactly the probabilities that
    constriction's QuantizedGaussian(-Y_MAX, Y_MAX) has at that standard deviation: format version 5 codes y with
    these tables, grouped, where earlier versions coded each symbol with its own Gaussian (6x slower to decode on the Blackmagic DNG's tiles)."""
    tables = []
    for std in _SCALE_TABLE:
        table = _categorical(cumulatives(std))
        if not _codes_alike(table, std):
            # This machine's erf rounds some edge across an integer where constriction's does not: ask constriction.
            table = _categorical(measured_cumulatives(std))
        tables.append(table)
    return tuple(tables)


def corrected_indices(scales_q: torch.Tensor, sixteenths: np.ndarray, uncorrected: np.ndarray | None = None) -> np.ndarray:
    """Flat scales (C·n,) in 2^-10 units, channel-major, and each channel's correction in sixteenths (C,) ->
    indices into SCALE_TABLE_Q10 (C·n,): floor(scale · s / 16), integers, so both sides have the same.
    `uncorrected`: the scales' own indices where the caller has them already (returned when no channel moves)."""
    if (sixteenths == 16).all():
        return scale_indices(scales_q).numpy() if uncorrected is None else uncorrected
    factors = torch.from_numpy(np.repeat(np.asarray(sixteenths, np.float64), len(scales_q) // len(sixteenths)))
    return scale_indices(torch.floor(scales_q * factors / 16)).numpy()


@cache
def _corrected_bits() -> np.ndarray:
    """(len(Y_SCALE_SIXTEENTHS), 64·_ESTIMATED_MAGNITUDES): about how many bits a symbol of magnitude a at table
    index i costs once its scale is corrected by s/16 (the Gaussian at the corrected entry; the encoder's estimate)."""
    magnitudes = np.arange(_ESTIMATED_MAGNITUDES)
    table = np.asarray(SCALE_TABLE_Q10, dtype=np.float64)
    bits = []
    for sixteenths in Y_SCALE_SIXTEENTHS:
        stds = _SCALE_TABLE[scale_indices(torch.from_numpy(np.floor(table * sixteenths / 16))).numpy()]
        cdf = lambda edge, std: (1.0 + math.erf(edge / (std * math.sqrt(2.0)))) / 2.0  # noqa: E731
        probabilities = np.array([[cdf(a + 0.5, std) - cdf(a - 0.5, std) for a in magnitudes] for std in stds])
        bits.append(-np.log2(np.maximum(probabilities, 2.0**-Y_PRECISION)).ravel())
    return np.stack(bits)


def _cheapest(bits: np.ndarray, base: int, weights: np.ndarray) -> np.ndarray | None:
    """Estimated bits (options, channels) -> the option per channel that codes it in the fewest bits with its
    index's own (the indices' model: `weights`), or None where no indices at all, every channel with option
    `base`, cost no more (a tile's flag says which)."""
    with_indices = bits - np.log2(weights / weights.sum())[:, None]
    if with_indices.min(axis=0).sum() >= bits[base].sum():
        return None
    return with_indices.argmin(axis=0)


def y_scale_choice(channels: np.ndarray, indices: np.ndarray, symbols: np.ndarray, count: int) -> np.ndarray | None:
    """Each y symbol's channel, uncorrected table index and value (n,) -> each of the `count` channels' correction
    (an index into Y_SCALE_SIXTEENTHS) that codes it in the fewest bits (estimated), or None (_cheapest)."""
    magnitudes = np.minimum(np.abs(symbols), _ESTIMATED_MAGNITUDES - 1)
    cells = len(SCALE_TABLE_Q10) * _ESTIMATED_MAGNITUDES
    histogram = np.bincount((channels * len(SCALE_TABLE_Q10) + indices) * _ESTIMATED_MAGNITUDES + magnitudes, minlength=count * cells)
    bits = histogram.reshape(count, cells).astype(np.float64) @ _corrected_bits().T
    return _cheapest(bits.T, Y_BASE_SCALE, Y_SCALE_WEIGHTS)


def _y_scale_corrections(
    steps: list[tuple[torch.Tensor, torch.Tensor, int]], indices: list[np.ndarray], per_slice: int, channels: int
) -> np.ndarray | None:  # fmt: skip
    """A tile's coding steps (symbols, scales in 2^-10 units, each flat and channel-major over `per_slice`
    channels; the first channel) and their scales' table indices -> each of its `channels` channels' correction
    (y_scale_choice)."""
    numbers = [first + np.repeat(np.arange(per_slice), len(step_symbols) // per_slice) for step_symbols, _, first in steps]
    symbols = [step_symbols.numpy().astype(np.int64) for step_symbols, _, _ in steps]
    return y_scale_choice(np.concatenate(numbers), np.concatenate(indices), np.concatenate(symbols), channels)


def _by_scale(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale indices (n,) -> (the positions grouped by index, ascending, each group in position order; the count
    of each of the len(SCALE_TABLE_Q10) indices)."""
    order = np.argsort(indices.astype(np.uint8), kind="stable")  # a radix sort over uint8
    return order, np.bincount(indices, minlength=len(SCALE_TABLE_Q10))


def z_variant_tables(z_table: np.ndarray) -> np.ndarray:
    """Integer z tables (Cz, 2·Z_MAX+1) -> their variants (len(Z_VARIANTS), Cz, 2·Z_MAX+1), integers computed
    exactly from them (so both sides have the same): symbol 0's share of the mass moved by k/8."""
    eighths, zero = 8, z_table.shape[1] // 2  # symbol 0 in the middle column
    variants = []
    for k in Z_VARIANTS:
        if k >= 0:
            table = (eighths - k) * z_table
            table[:, zero] += k * z_table.sum(axis=1)
        else:
            table = eighths * z_table
            table[:, zero] -= -k * z_table[:, zero]
        variants.append(np.maximum(table, 1))
    return np.stack(variants)


def z_variant_choice(z_symbols: np.ndarray, log_probabilities: np.ndarray) -> np.ndarray | None:
    """A tile's z symbols (Cz, n) and the variants' log2 probabilities (V, Cz, 2·Z_MAX+1) -> the variant (Cz,)
    that codes each channel in the fewest bits, or None (_cheapest): the encoder's choice."""
    channels = z_symbols.shape[0]
    flat = (np.arange(channels)[:, None] * (2 * Z_MAX + 1) + z_symbols + Z_MAX).ravel()
    counts = np.bincount(flat, minlength=channels * (2 * Z_MAX + 1)).reshape(channels, -1)
    return _cheapest(-(counts[None] * log_probabilities).sum(axis=-1), Z_BASE_VARIANT, Z_VARIANT_WEIGHTS)


@dataclass(frozen=True)
class TileLatents:
    """What one tile's stream decodes to: ŷ after gains are undone elsewhere, plus the raw symbols."""

    y_hat: torch.Tensor  # (1, M, h, w) float32, symbol + mean, in the gained domain
    y_symbols: np.ndarray  # (M·h·w,) int32
    z_symbols: np.ndarray  # (Cz·hz·wz,) int32


class LatentCoder:
    """Range-codes (z, y) of one tile into one constriction ANS stream and back.

    With a channel-wise context model, y's slices are coded in order, each with parameters that depend on the
    slices before it; without one, y is one slice with the hyperprior's parameters (the same bytes as ever).
    Format version 5 on: each z channel with the variant of its table (z_variant_tables) that codes the tile's
    symbols in the fewest bits, each y channel's scales corrected by the factor (Y_SCALE_SIXTEENTHS) that does,
    the indices of both first; within each of y's coding steps, the symbols go by scale index, each group with
    one table (y_tables). `legacy`: the streams of versions 1 to 4, z with the tables themselves, y's scales as
    predicted and in position order, each symbol with its own Gaussian."""

    def __init__(self, hyper_synthesis: IntegerHyperSynthesis, z_table: np.ndarray, context: IntegerChannelContext | None = None):
        self.hyper_synthesis = hyper_synthesis
        self.context = context
        variants = z_variant_tables(z_table).astype(np.float64)
        self.z_models = [[constriction.stream.model.Categorical(row, perfect=False) for row in table] for table in variants]
        self.z_log_probabilities = np.log2(variants / variants.sum(axis=-1, keepdims=True))
        self.z_variant_model = constriction.stream.model.Categorical(Z_VARIANT_WEIGHTS, perfect=False)
        self.y_scale_model = constriction.stream.model.Categorical(Y_SCALE_WEIGHTS, perfect=False)
        self.flag_model = constriction.stream.model.Categorical(np.ones(2), perfect=False)
        self.y_model = constriction.stream.model.QuantizedGaussian(-Y_MAX, Y_MAX)
        self.y_tables = y_tables()

    def _slices(self, channels: int) -> int:
        return 1 if self.context is None else channels // self.context.slice_size

    def _tile_context(self, hyper: tuple[torch.Tensor, torch.Tensor]) -> TileContext | None:
        """The channel-wise context's state for one tile, or None for the hyperprior alone."""
        return None if self.context is None else self.context.for_tile(*hyper)

    def _layout(self, height: int, width: int) -> Checkerboard | None:
        """The checkerboard of an h x w slice, or None without a spatial context (every position at once)."""
        return self.context.layout(height, width) if self.context is not None and self.context.spatial else None

    def encode(self, y: torch.Tensor, z: torch.Tensor, legacy: bool = False) -> tuple[bytes, TileLatents]:
        """y (1, M, h, w) and z (1, Cz, h/4, w/4) floats -> (stream bytes, the latents the decoder will see)."""
        z_symbols = torch.round(z.detach().to("cpu", torch.float64)).clamp(-Z_MAX, Z_MAX)
        hyper = self.hyper_synthesis.raw(z_symbols)
        y = y.detach().to("cpu", torch.float64)
        board = self._layout(*y.shape[-2:])
        tile = self._tile_context(hyper)
        steps, y_hat, decoded_q = [], [], []  # steps: (symbols, scales in 2^-10 units, first channel) per coding step
        for index, y_slice in enumerate(y.chunk(self._slices(y.shape[1]), dim=1)):
            means_q, scales_q = hyper if tile is None else tile.parameters(index)
            first = index * y_slice.shape[1]
            if board is None:
                slice_symbols = torch.round(y_slice - means_q / 2**FIXED_POINT_BITS).clamp(-Y_MAX, Y_MAX)
                steps.append((slice_symbols.ravel(), scales_q.ravel(), first))
                decoded_q.append(slice_symbols * 2**FIXED_POINT_BITS + means_q)
            else:
                # In coding order: the anchors, then the others with parameters that read the anchors' symbols.
                means_o, scales_o = _flat(means_q).index_select(1, board.order), _flat(scales_q).index_select(1, board.order)
                y_o = _flat(y_slice).index_select(1, board.order)
                rounded = lambda part: torch.round(y_o[:, part] - means_o[:, part] / 2**FIXED_POINT_BITS).clamp(-Y_MAX, Y_MAX)  # noqa: E731
                anchor_symbols = rounded(board.anchors)
                _refine_others(self.context, index, anchor_symbols, means_o, scales_o, board)
                other_symbols = rounded(board.others)
                steps += [(anchor_symbols.ravel(), scales_o[:, board.anchors].ravel(), first), (other_symbols.ravel(), scales_o[:, board.others].ravel(), first)]
                symbols_o = torch.cat([anchor_symbols, other_symbols], dim=1)
                decoded_q.append(_unordered(symbols_o * 2**FIXED_POINT_BITS + means_o, board, y_slice.shape))
            if tile is not None:
                tile.decoded(index, decoded_q[-1])
            y_hat.append(decoded_q[-1] / 2**FIXED_POINT_BITS)
        per_slice = y.shape[1] // self._slices(y.shape[1])
        uncorrected = [scale_indices(scales_q).numpy() for _, scales_q, _ in steps]
        corrections = None if legacy else _y_scale_corrections(steps, uncorrected, per_slice, y.shape[1])
        sixteenths = np.asarray(Y_SCALE_SIXTEENTHS)[np.full(y.shape[1], Y_BASE_SCALE) if corrections is None else corrections]
        coder = constriction.stream.stack.AnsCoder()
        # ANS is a stack: push y first so that the decoder pops the indices and z first; y's steps last to first.
        coded_steps = [
            (symbols.numpy().astype(np.int32), corrected_indices(scales_q, sixteenths[first : first + per_slice], indices))
            for (symbols, scales_q, first), indices in zip(steps, uncorrected)
        ]
        self._push_y(coder, coded_steps, legacy)
        y_flat = np.concatenate([symbols for symbols, _ in coded_steps])
        z_channels = z_symbols.numpy().astype(np.int32)[0]
        flat_z = z_channels.reshape(len(z_channels), -1)
        variants = None if legacy else z_variant_choice(flat_z, self.z_log_probabilities)
        for channel in range(len(flat_z) - 1, -1, -1):
            variant = Z_BASE_VARIANT if variants is None else variants[channel]
            coder.encode_reverse(flat_z[channel] + Z_MAX, self.z_models[variant][channel])
        if not legacy:
            self._push_indices(coder, corrections, self.y_scale_model)
            self._push_indices(coder, variants, self.z_variant_model)
        stream = coder.get_compressed().tobytes()
        return stream, TileLatents(y_hat=torch.cat(y_hat, dim=1).float(), y_symbols=y_flat, z_symbols=z_channels.ravel())

    def _push_indices(self, coder: constriction.stream.stack.AnsCoder, indices: np.ndarray | None, model) -> None:
        """Push a tile's flag and, where it is set, its indices (z variants or y corrections) with `model`."""
        if indices is not None:
            coder.encode_reverse(indices.astype(np.int32), model)
        coder.encode_reverse(np.array([indices is not None], np.int32), self.flag_model)

    def _pop_indices(self, coder: constriction.stream.stack.AnsCoder, count: int, model, base: int) -> np.ndarray:
        """The `count` indices _push_indices pushed, `base` for all where its flag is not set."""
        return coder.decode(model, count) if coder.decode(self.flag_model, 1)[0] else np.full(count, base)

    def _push_y(self, coder: constriction.stream.stack.AnsCoder, steps: list[tuple[np.ndarray, np.ndarray]], legacy: bool) -> None:
        """Push y's coding steps, each (symbols int32, scale indices int64), so that the decoder pops them in order:
        slice by slice, each in C order (with a spatial context: its anchors, then the others)."""
        if legacy:
            symbols = np.concatenate([symbols for symbols, _ in steps])
            stds = _SCALE_TABLE[np.concatenate([indices for _, indices in steps])]
            coder.encode_reverse(symbols, self.y_model, np.zeros_like(stds), stds)
            return
        for symbols, indices in reversed(steps):
            order, counts = _by_scale(indices)
            ends = np.cumsum(counts)
            grouped_symbols = symbols[order] + Y_MAX
            for index in np.flatnonzero(counts)[::-1]:
                coder.encode_reverse(grouped_symbols[ends[index] - counts[index] : ends[index]], self.y_tables[index])

    def _pop(self, coder: constriction.stream.stack.AnsCoder, scales_q: torch.Tensor, sixteenths: np.ndarray, legacy: bool) -> torch.Tensor:
        """Decode one coding step, as many y symbols as `scales_q` (2^-10 units; (S, ...), channel-major) has
        elements, its S channels' scales corrected by `sixteenths` (S,): float64, flat."""
        indices = corrected_indices(scales_q.ravel(), sixteenths)
        if legacy:
            stds = _SCALE_TABLE[indices]
            return torch.from_numpy(coder.decode(self.y_model, np.zeros_like(stds), stds).astype(np.float64))
        order, counts = _by_scale(indices)
        groups = [coder.decode(self.y_tables[index], int(counts[index])) for index in np.flatnonzero(counts)]
        symbols = np.empty(len(indices), np.float64)
        symbols[order] = np.concatenate(groups) - Y_MAX if groups else symbols[:0]
        return torch.from_numpy(symbols)

    def decode(self, stream: bytes, y_shape: tuple[int, int, int], z_shape: tuple[int, int, int], legacy: bool = False) -> TileLatents:
        """Stream bytes -> latents, for a tile whose y is (M, h, w) and z (Cz, h/4, w/4)."""
        if len(stream) % 4:
            raise RcamError("stream length is not a whole number of 32-bit words")
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(stream, dtype=np.uint32).copy())
        channels, z_height, z_width = z_shape
        if legacy:
            variants, corrections = np.full(channels, Z_BASE_VARIANT), np.full(y_shape[0], Y_BASE_SCALE)
        else:
            variants = self._pop_indices(coder, channels, self.z_variant_model, Z_BASE_VARIANT)
            corrections = self._pop_indices(coder, y_shape[0], self.y_scale_model, Y_BASE_SCALE)
        sixteenths = np.asarray(Y_SCALE_SIXTEENTHS)[corrections]
        z_channels = np.stack(
            [coder.decode(self.z_models[variants[c]][c], z_height * z_width).astype(np.int32) - Z_MAX for c in range(channels)]
        ).reshape(1, channels, z_height, z_width)
        hyper = self.hyper_synthesis.raw(torch.from_numpy(z_channels).to(torch.float64))
        slices = self._slices(y_shape[0])
        slice_shape = (1, y_shape[0] // slices, *y_shape[1:])
        board = self._layout(*y_shape[1:])
        tile = self._tile_context(hyper)
        symbols, y_hat, decoded_q = [], [], []
        for index in range(slices):
            means_q, scales_q = hyper if tile is None else tile.parameters(index)
            slice_sixteenths = sixteenths[index * slice_shape[1] : (index + 1) * slice_shape[1]]
            if board is None:
                slice_symbols = self._pop(coder, scales_q, slice_sixteenths, legacy).reshape(slice_shape)
                symbols.append(slice_symbols.ravel())
                decoded_q.append(slice_symbols * 2**FIXED_POINT_BITS + means_q)
            else:
                means_o, scales_o = _flat(means_q).index_select(1, board.order), _flat(scales_q).index_select(1, board.order)
                anchor_symbols = self._pop(coder, scales_o[:, board.anchors], slice_sixteenths, legacy).view(slice_shape[1], -1)
                _refine_others(self.context, index, anchor_symbols, means_o, scales_o, board)
                other_symbols = self._pop(coder, scales_o[:, board.others], slice_sixteenths, legacy).view(slice_shape[1], -1)
                symbols += [anchor_symbols.ravel(), other_symbols.ravel()]
                symbols_o = torch.cat([anchor_symbols, other_symbols], dim=1)
                decoded_q.append(_unordered(symbols_o * 2**FIXED_POINT_BITS + means_o, board, slice_shape))
            if tile is not None:
                tile.decoded(index, decoded_q[-1])
            y_hat.append(decoded_q[-1] / 2**FIXED_POINT_BITS)
        if not coder.is_empty():
            # Leftover words mean the stream does not belong to this geometry and model.
            raise RcamError("stream has data left over after decoding (corrupt or wrong model)")
        y_symbols = torch.cat(symbols).numpy().astype(np.int32)
        return TileLatents(y_hat=torch.cat(y_hat, dim=1).float(), y_symbols=y_symbols, z_symbols=z_channels.ravel())


def latent_coder(model: nn.Module, z_table: np.ndarray) -> LatentCoder:
    """The exact coder of a model with a hyperprior (hyper_synthesis) and perhaps a channel_context."""
    context = getattr(model, "channel_context", None)
    return LatentCoder(IntegerHyperSynthesis(model.hyper_synthesis), z_table, None if context is None else IntegerChannelContext(context))
