"""rcam/codec/entropy.py directly: the fixed-point hyper-synthesis' overflow guard and its exactness at the limit,
its distance from the float network training sees, the clamping of latents outside the coded range, and y's
tables (format 5) against the Gaussians of earlier versions."""

from __future__ import annotations

import copy

import constriction
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rcam.codec import entropy
from rcam.codec.entropy import (
    ACTIVATION_LIMIT,
    FIXED_POINT_BITS,
    SCALE_TABLE_Q10,
    WEIGHT_BITS,
    Y_MAX,
    Z_MAX,
    Y_SCALE_SIXTEENTHS,
    Z_VARIANTS,
    IntegerHyperSynthesis,
    corrected_indices,
    measured_cumulatives,
    scale_indices,
    y_cumulatives,
    y_scale_choice,
    y_tables,
    z_variant_choice,
    z_variant_tables,
)
from rcam.codec.models import checkerboard
from rcam.codec.zoo import codec_from_model
from rcam.errors import RcamError

# The guard's limit on a layer's sum of |weights| (in weight units 2^-12): every input at ±ACTIVATION_LIMIT
# times it, plus the bias, must stay below 2^53 so float64 holds every partial sum exactly.
WEIGHT_SUM_LIMIT = 2**53 / (2 * ACTIVATION_LIMIT) / 2**WEIGHT_BITS


def one_by_one(weights: list[float], bias: float = 0.0) -> nn.Sequential:
    conv = nn.Conv2d(len(weights), 1, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weights, dtype=torch.float32).view(1, -1, 1, 1))
        conv.bias.fill_(bias)
    return nn.Sequential(conv)


def test_weights_too_large_for_exact_arithmetic_are_refused():
    with pytest.raises(RcamError, match="too large"):
        IntegerHyperSynthesis(one_by_one([WEIGHT_SUM_LIMIT / 2, WEIGHT_SUM_LIMIT / 2]))
    IntegerHyperSynthesis(one_by_one([WEIGHT_SUM_LIMIT / 2 - 1, WEIGHT_SUM_LIMIT / 2 - 1]))  # just under: accepted


def test_exact_at_the_limit_of_the_guard():
    """Largest accepted weights and inputs whose activations sit at the clamp: the float64 result equals exact
    integer arithmetic (Python ints), rounding half up and clamping as documented."""
    weights = [WEIGHT_SUM_LIMIT / 4 - 1, -(WEIGHT_SUM_LIMIT / 4 - 1), WEIGHT_SUM_LIMIT / 4 - 1, 0.7]
    network = IntegerHyperSynthesis(one_by_one(weights, bias=3.3))
    layer = network.layers[0]
    w = [int(v) for v in layer.weight.flatten().tolist()]
    b = int(layer.bias.item())
    for z in ([64, -64, 64, 64], [64, 64, 64, -64], [1, 2, 3, 4], [-64, 64, -64, 7]):
        # The network clamps its own output, so drive it with already-clamped 2^-10 activations directly.
        activation = torch.tensor(z, dtype=torch.float64).view(1, 4, 1, 1) * 2**FIXED_POINT_BITS
        out = F.conv2d(activation, layer.weight) + layer.bias.view(1, 1, 1, 1)
        got = float(torch.floor(out / 2**WEIGHT_BITS + 0.5).clamp(-ACTIVATION_LIMIT, ACTIVATION_LIMIT))
        exact_sum = sum(wi * zi * 2**FIXED_POINT_BITS for wi, zi in zip(w, z)) + b
        exact = max(-ACTIVATION_LIMIT, min(ACTIVATION_LIMIT, (2 * exact_sum + 2**WEIGHT_BITS) // 2 ** (WEIGHT_BITS + 1)))
        assert got == exact, (z, got, exact)
        assert abs(exact_sum) < 2**53


def fixed_point_bound(network: nn.Sequential, z: torch.Tensor) -> torch.Tensor:
    """Per-value bound on |float network - fixed-point copy| for input z, propagated layer by layer: the
    error carried in through |W|, the weight rounding times |activation|, the bias rounding, and half a unit
    (2^-11) of output rounding. ReLU and the clamp are 1-Lipschitz."""
    error = torch.zeros_like(z, dtype=torch.float64)
    activation = z.to(torch.float64)
    for module in network:
        if isinstance(module, nn.ReLU):
            activation = activation.clamp_min(0)
            continue
        weight = module.weight.detach().double()
        bias = module.bias.detach().double()
        weight_error = (weight - torch.round(weight * 2**WEIGHT_BITS) / 2**WEIGHT_BITS).abs()
        bias_error = (bias - torch.round(bias * 2 ** (WEIGHT_BITS + FIXED_POINT_BITS)) / 2 ** (WEIGHT_BITS + FIXED_POINT_BITS)).abs()
        if isinstance(module, nn.ConvTranspose2d):
            op = lambda x, w: F.conv_transpose2d(x, w, None, module.stride, module.padding, module.output_padding)  # noqa: E731
        else:
            op = lambda x, w: F.conv2d(x, w, None, module.stride, module.padding)  # noqa: E731
        error = op(error, weight.abs()) + op(activation.abs() + error, weight_error) + bias_error.view(1, -1, 1, 1) + 2.0 ** -(FIXED_POINT_BITS + 1)
        activation = op(activation, weight) + bias.view(1, -1, 1, 1)
    return error


@pytest.mark.parametrize("spread", [2, 64])
def test_fixed_point_means_stay_within_the_rounding_bound(tiny_codec, shipped_codec, spread):
    """The documented relation between the two hyper-syntheses: they differ only by the rounding of weights
    and activations, never by more than that rounding can explain."""
    generator = torch.Generator().manual_seed(spread)
    for coded in (tiny_codec, shipped_codec):
        model = coded.model
        z = torch.randint(-spread, spread + 1, (1, model.config.hyper_channels, 4, 4), generator=generator).double()
        with torch.no_grad():
            float_means, _ = model.hyper_parameters(z.float())
        fixed_means, _ = coded.coder.hyper_synthesis(z)
        difference = (float_means.double() - fixed_means.double() / 2**FIXED_POINT_BITS).abs()
        bound = fixed_point_bound(model.hyper_synthesis, z).chunk(2, dim=1)[0]
        assert (difference <= bound + 1e-5).all(), float((difference - bound).max())  # 1e-5: float32 of the float network


def test_latents_outside_the_coded_range_are_clamped_alike_on_both_sides(tiny_codec):
    config = tiny_codec.model.config
    y_shape, z_shape = (config.latent_channels, 4, 4), (config.hyper_channels, 1, 1)
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(1, *y_shape, generator=generator) * 3
    y[0, 0, 0, 0], y[0, 1, 2, 3] = 1e6, -1e6  # far outside ±Y_MAX around any mean
    z = torch.randn(1, *z_shape, generator=generator)
    z[0, 0, 0, 0], z[0, 1, 0, 0] = 500.0, -500.0  # outside ±Z_MAX
    stream, sent = tiny_codec.coder.encode(y, z)
    received = tiny_codec.coder.decode(stream, y_shape, z_shape)
    assert sent.z_symbols[0] == Z_MAX and sent.z_symbols[1] == -Z_MAX
    symbols = sent.y_symbols.reshape(y_shape)
    assert symbols[0, 0, 0] == Y_MAX and symbols[1, 2, 3] == -Y_MAX
    assert np.abs(sent.y_symbols).max() == Y_MAX
    np.testing.assert_array_equal(received.y_symbols, sent.y_symbols)
    np.testing.assert_array_equal(received.z_symbols, sent.z_symbols)
    assert torch.equal(received.y_hat, sent.y_hat)
    # Values inside the range survive: ŷ is within half a step of y wherever y was not clamped.
    inside = torch.from_numpy(np.abs(symbols) < Y_MAX)[None]
    assert ((sent.y_hat - y).abs()[inside] <= 0.5 + 1e-6).all()


def context_codec(slices: int, seed: int = 0, trained: bool = True, spatial: int = 0):
    """A tiny model with a channel-wise context model (and a checkerboard one of width `spatial`); `trained`: its
    zero-started last layers given values."""
    import dataclasses

    from conftest import TINY_CONFIG

    from rcam.codec.models import RealCamNet

    torch.manual_seed(seed)
    model = RealCamNet(dataclasses.replace(TINY_CONFIG, context_slices=slices, context_width=8, context_spatial=spatial)).eval()
    if trained:
        with torch.no_grad():
            for net in [*model.channel_context.nets, *model.channel_context.spatial_nets]:
                net[-1].weight.normal_(0, 0.3)
                net[-1].bias.normal_(0, 0.3)
    return codec_from_model(model)


def exact_round_trip(coded, seed: int):
    """Random 8 x 8 latents through `coded`'s coder and back, checked exact: (y, z, stream, sent latents)."""
    config = coded.model.config
    y_shape, z_shape = (config.latent_channels, 8, 8), (config.hyper_channels, 2, 2)
    generator = torch.Generator().manual_seed(seed)
    y = torch.randn(1, *y_shape, generator=generator) * 4
    z = torch.randn(1, *z_shape, generator=generator) * 2
    stream, sent = coded.coder.encode(y, z)
    received = coded.coder.decode(stream, y_shape, z_shape)
    np.testing.assert_array_equal(received.y_symbols, sent.y_symbols)
    assert torch.equal(received.y_hat, sent.y_hat)
    assert ((sent.y_hat - y).abs() <= 0.5 + 1e-6).all()
    return y, z, stream, sent


def test_context_coded_latents_round_trip_exactly_and_differ_from_the_hyperprior_alone():
    y, z, stream, sent = exact_round_trip(context_codec(4), seed=5)
    y_shape, z_shape = tuple(y.shape[1:]), tuple(z.shape[1:])
    # The same latents without the context model: other means, so other symbols and other bytes.
    hyper_only = context_codec(4, trained=False)
    hyper_only.coder.context = None
    hyper_stream, hyper_sent = hyper_only.coder.encode(y, z)
    assert hyper_stream != stream and not np.array_equal(hyper_sent.y_symbols, sent.y_symbols)
    with pytest.raises(RcamError, match="left over"):  # a context-coded stream is no hyperprior-only stream
        hyper_only.coder.decode(stream, y_shape, z_shape)


def test_a_zero_started_context_model_codes_the_same_bytes_as_the_hyperprior_alone():
    """Its last layers start at zero (models.ChannelContext): a model gaining one codes as it did before, to the
    byte in the position-ordered streams of versions 1-4; format 5 groups each slice by scale on its own, so
    there the symbols and the length are the same, not the order."""
    coded = context_codec(2, trained=False)
    config = coded.model.config
    generator = torch.Generator().manual_seed(6)
    y = torch.randn(1, config.latent_channels, 8, 8, generator=generator) * 4
    z = torch.randn(1, config.hyper_channels, 2, 2, generator=generator) * 2
    with_context, sent = coded.coder.encode(y, z)
    legacy_with_context, _ = coded.coder.encode(y, z, legacy=True)
    coded.coder.context = None
    assert coded.coder.encode(y, z, legacy=True)[0] == legacy_with_context
    alone, alone_sent = coded.coder.encode(y, z)
    np.testing.assert_array_equal(alone_sent.y_symbols, sent.y_symbols)
    assert abs(len(alone) - len(with_context)) <= 4


def test_fixed_point_context_means_follow_the_float_context():
    """The float context model training sees and its fixed-point copy agree to the rounding of weights and
    activations (a few 2^-10 units through three layers), given the same decoded slices."""
    coded = context_codec(4, seed=2)
    model, coder = coded.model, coded.coder
    generator = torch.Generator().manual_seed(7)
    y = torch.randn(1, model.config.latent_channels, 8, 8, generator=generator) * 4
    z = torch.round(torch.randn(1, model.config.hyper_channels, 2, 2, generator=generator) * 2)
    _, sent = coder.encode(y, z)
    means_q, scales_q = coder.hyper_synthesis.raw(z.double())
    size = coder.context.slice_size
    decoded_q = [sent.y_hat[:, i * size : (i + 1) * size].double() * 2**FIXED_POINT_BITS for i in range(3)]
    tile = coder.context.for_tile(means_q, scales_q)
    for index, slice_q in enumerate(decoded_q):
        tile.decoded(index, slice_q)
    fixed_means, _ = tile.parameters(3)
    with torch.no_grad():
        net = model.channel_context.nets[3]
        inputs = torch.cat([means_q[:, 3 * size :], scales_q[:, 3 * size :], *decoded_q], dim=1).float() / 2**FIXED_POINT_BITS
        float_means = means_q[:, 3 * size :].float() / 2**FIXED_POINT_BITS + net(inputs).chunk(2, dim=1)[0]
    assert (float_means.double() - fixed_means / 2**FIXED_POINT_BITS).abs().max() < 0.02


def test_checkerboard_coded_latents_round_trip_exactly():
    """A spatial context (anchors first, then the rest from the anchors around them) decodes to the very
    symbols and ŷ sent, and moves the non-anchors' means only."""
    coded = context_codec(2, seed=3, spatial=8)
    y, z, _, sent = exact_round_trip(coded, seed=8)
    channel_model = copy.deepcopy(coded.model)  # the same networks, the spatial ones back at their zero start
    for net in channel_model.channel_context.spatial_nets:
        torch.nn.init.zeros_(net[-1].weight)
        torch.nn.init.zeros_(net[-1].bias)
    _, channel_sent = codec_from_model(channel_model).coder.encode(y, z)
    size = coded.coder.context.slice_size  # the first slice: later ones read the first's ŷ everywhere
    moved = (channel_sent.y_hat[:, :size] != sent.y_hat[:, :size]).any(dim=1)[0]
    assert moved.any() and not (moved & checkerboard(8, 8)).any()


def test_fixed_point_spatial_context_follows_the_float_one():
    """IntegerChannelContext.spatial_corrections (the first layer gathered to the four anchor neighbours, in
    fixed point) gives the float ChannelContext's means and scales at the non-anchors, to the rounding."""
    coded = context_codec(2, seed=4, spatial=8)
    model, coder = coded.model, coded.coder
    generator = torch.Generator().manual_seed(9)
    y = torch.randn(1, model.config.latent_channels, 8, 12, generator=generator) * 4
    z = torch.round(torch.randn(1, model.config.hyper_channels, 2, 3, generator=generator) * 2)
    means_q, scales_q = coder.hyper_synthesis.raw(z.double())
    anchors = checkerboard(8, 12)
    size = coder.context.slice_size
    slice_means_q, slice_scales_q = coder.context.for_tile(means_q, scales_q).parameters(0)
    symbols = torch.round(y[:, :size].double() - slice_means_q / 2**FIXED_POINT_BITS)
    board = coder.context.layout(8, 12)
    anchor_positions = board.order[board.anchors]
    assert torch.equal(anchor_positions, torch.nonzero(anchors.ravel()).ravel())
    assert torch.equal(board.order[board.others], torch.nonzero(~anchors.ravel()).ravel())
    delta_means, delta_scales = coder.context.spatial_corrections(
        0, symbols.view(size, -1)[:, anchor_positions], slice_scales_q.view(size, -1)[:, anchor_positions], board
    )  # fmt: skip
    fixed_means = slice_means_q[..., ~anchors] + delta_means
    fixed_scales = slice_scales_q[..., ~anchors] + delta_scales
    with torch.no_grad():
        float_means, float_scales = model.channel_context(y, means_q.float() / 2**FIXED_POINT_BITS, scales_q.float() / 2**FIXED_POINT_BITS)
    assert fixed_means.shape == (1, size, int((~anchors).sum()))
    # The spatial networks moved the non-anchors (the test would pass trivially without them)...
    assert delta_means.abs().max() > 0.1 * 2**FIXED_POINT_BITS
    # ...as the float model does.
    assert (float_means[:, :size][..., ~anchors].double() - fixed_means / 2**FIXED_POINT_BITS).abs().max() < 0.03
    assert (float_scales[:, :size][..., ~anchors].double() - fixed_scales / 2**FIXED_POINT_BITS).abs().max() < 0.03
    # Anchors keep the channel-wise parameters.
    assert (float_means[:, :size][..., anchors].double() - slice_means_q[..., anchors] / 2**FIXED_POINT_BITS).abs().max() < 0.03


def test_split_first_layer_gives_the_whole_networks_integers():
    """TileContext sums each context network's first layer by input (own means and scales; each decoded slice as
    it comes): with inputs beyond the clamp, its parameters equal IntegerConvNet.run on the concatenated input,
    bit for bit."""
    coder = context_codec(4, seed=11).coder
    size, context = coder.context.slice_size, coder.context
    generator = torch.Generator().manual_seed(12)
    integers = lambda channels: torch.round(torch.randn(1, channels, 8, 12, generator=generator, dtype=torch.float64) * 2**19)  # noqa: E731
    means_q, scales_q = integers(4 * size), integers(4 * size)
    decoded_q = [integers(size) * 4 for _ in range(3)]  # some beyond ACTIVATION_LIMIT: clamped on both paths
    assert max(float(d.abs().max()) for d in decoded_q) > ACTIVATION_LIMIT
    tile = context.for_tile(means_q, scales_q)
    for index in range(4):
        part = slice(index * size, (index + 1) * size)
        whole = context.nets[index].run(torch.cat([means_q[:, part], scales_q[:, part], *decoded_q[:index]], dim=1))
        delta_means, delta_scales = whole.chunk(2, dim=1)
        split_means, split_scales = tile.parameters(index)
        assert torch.equal(split_means, means_q[:, part] + delta_means)
        assert torch.equal(split_scales, scales_q[:, part] + delta_scales)
        if index < 3:
            tile.decoded(index, decoded_q[index])


# ---------------------------------------------------------------------------------------------------------
# y's tables (format 5): the probabilities of versions 1-4, coded grouped by scale index


def gaussian_and_table_streams(table, std: float, symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gaussian, categorical = constriction.stream.stack.AnsCoder(), constriction.stream.stack.AnsCoder()
    model = constriction.stream.model.QuantizedGaussian(-Y_MAX, Y_MAX)
    gaussian.encode_reverse(symbols, model, np.zeros(len(symbols)), np.full(len(symbols), std))
    categorical.encode_reverse(symbols + Y_MAX, table)
    return gaussian.get_compressed(), categorical.get_compressed()


def test_y_tables_give_every_symbol_its_quantised_gaussian_probability():
    """Each table codes symbols to the very words QuantizedGaussian(-Y_MAX, Y_MAX) at its scale does, so the
    tables are the models of versions 1-4, only faster to decode."""
    tables = y_tables()
    assert len(tables) == len(SCALE_TABLE_Q10)
    generator = np.random.default_rng(0)
    for table, std_q in zip(tables, SCALE_TABLE_Q10):
        std = std_q / 2**FIXED_POINT_BITS
        typical = np.round(generator.normal(0, 2 * std, 2000))
        symbols = np.clip(np.concatenate([typical, [-Y_MAX, Y_MAX, 0, 1, -1]]), -Y_MAX, Y_MAX).astype(np.int32)
        from_gaussian, from_table = gaussian_and_table_streams(table, std, symbols)
        assert len(from_gaussian) > 2 and np.array_equal(from_gaussian, from_table), std


def test_y_tables_take_constrictions_numbers_where_erf_rounds_otherwise():
    """If this machine's erf put a cumulative on the other side of an integer, the table would differ from
    constriction's Gaussian: y_tables notices and reads the numbers off constriction instead."""
    std = SCALE_TABLE_Q10[20] / 2**FIXED_POINT_BITS
    np.testing.assert_array_equal(measured_cumulatives(std), y_cumulatives(std))

    def one_off(std: float) -> np.ndarray:
        cumulatives = y_cumulatives(std)
        cumulatives[Y_MAX] += 1  # the left cumulative of symbol 0, inside the bell: the weights stay >= 0
        return cumulatives

    symbols = np.arange(-3, 4, dtype=np.int32)
    assert not np.array_equal(*gaussian_and_table_streams(entropy._categorical(one_off(std)), std, symbols))
    repaired = y_tables(one_off)
    for table, std_q in zip(repaired, SCALE_TABLE_Q10):
        assert np.array_equal(*gaussian_and_table_streams(table, std_q / 2**FIXED_POINT_BITS, symbols))


@pytest.mark.parametrize("slices, spatial", [(0, 0), (4, 0), (2, 8)])
def test_format_5_streams_hold_the_symbols_of_legacy_ones(slices, spatial):
    """Format 5 pops z's variant indices, z with those variants, then each of y's coding steps grouped by scale
    index; versions 1-4 z with the tables themselves and y in position order: other bytes, no more of them than
    the indices' bit per channel, and each stream decodes exactly with its own layout only."""
    coded = context_codec(slices, seed=2, spatial=spatial, trained=slices > 0)
    y, z, stream, sent = exact_round_trip(coded, seed=11)
    y_shape, z_shape = tuple(y.shape[1:]), tuple(z.shape[1:])
    legacy_stream, legacy_sent = coded.coder.encode(y, z, legacy=True)
    np.testing.assert_array_equal(legacy_sent.y_symbols, sent.y_symbols)
    np.testing.assert_array_equal(legacy_sent.z_symbols, sent.z_symbols)
    assert legacy_stream != stream and len(stream) <= len(legacy_stream) + z_shape[0] // 8 + 8
    received = coded.coder.decode(legacy_stream, y_shape, z_shape, legacy=True)
    np.testing.assert_array_equal(received.y_symbols, sent.y_symbols)
    assert torch.equal(received.y_hat, sent.y_hat)
    try:
        misread = coded.coder.decode(stream, y_shape, z_shape, legacy=True).y_symbols
    except RcamError:
        misread = None
    assert misread is None or not np.array_equal(misread, sent.y_symbols)


def test_z_variants_are_exact_integers_that_move_only_the_zero_symbols_share():
    table = np.array([[3, 10, 60, 10, 5], [1, 2, 97, 0, 0]], dtype=np.int64)
    variants = z_variant_tables(table)
    assert variants.shape == (len(Z_VARIANTS), 2, 5) and variants.dtype == np.int64
    np.testing.assert_array_equal(variants[Z_VARIANTS.index(0)], np.maximum(8 * table, 1))
    shares = variants[:, :, 2] / variants.sum(axis=-1)
    assert (np.diff(shares, axis=0) > 0).all()  # symbol 0 gains with k
    others = variants[:, 0, [0, 1, 3, 4]]
    np.testing.assert_allclose(others / others.sum(axis=1, keepdims=True), np.tile([3, 10, 10, 5], (len(Z_VARIANTS), 1)) / 28)
    assert (variants >= 1).all()  # every symbol stays codable


def test_the_encoder_picks_the_variant_that_codes_a_channel_shortest():
    """Channels of all zeros take the variant richest in zeros, channels spread wider one poorer in zeros,
    channels like the table itself the table (its index costs 1 bit, any other about 4.8)."""
    z_table = np.round(np.exp(-np.abs(np.arange(-Z_MAX, Z_MAX + 1)) / 1.5)[None].repeat(3, axis=0) * 2**16).astype(np.int64) + 1
    variants = z_variant_tables(z_table).astype(np.float64)
    log_probabilities = np.log2(variants / variants.sum(axis=-1, keepdims=True))
    generator = np.random.default_rng(0)
    like_table = generator.choice(np.arange(-Z_MAX, Z_MAX + 1), 200, p=z_table[0] / z_table[0].sum())
    symbols = np.stack([np.zeros(200, np.int64), generator.integers(-4, 5, 200), like_table])
    chosen = [Z_VARIANTS[index] for index in z_variant_choice(symbols, log_probabilities)]
    assert chosen[0] == Z_VARIANTS[-1] and chosen[1] < 0 and chosen[2] == 0


def test_mostly_zero_z_costs_fewer_bytes_than_with_the_tables_themselves(tiny_codec):
    config = tiny_codec.model.config
    generator = torch.Generator().manual_seed(3)
    y = torch.randn(1, config.latent_channels, 32, 32, generator=generator)
    z = torch.zeros(1, config.hyper_channels, 8, 8)
    z[0, 0, 0, 0] = 3.0
    stream, sent = tiny_codec.coder.encode(y, z)
    legacy_stream, _ = tiny_codec.coder.encode(y, z, legacy=True)
    assert len(stream) < len(legacy_stream)
    received = tiny_codec.coder.decode(stream, (config.latent_channels, 32, 32), (config.hyper_channels, 8, 8))
    np.testing.assert_array_equal(received.z_symbols, sent.z_symbols)
    assert torch.equal(received.y_hat, sent.y_hat)


def test_scale_corrections_are_integer_products_per_channel():
    scales_q = torch.tensor([100.0, 1000.0, 5000.0, 100.0, 1000.0, 5000.0], dtype=torch.float64)  # two channels
    np.testing.assert_array_equal(corrected_indices(scales_q, np.array([16, 16])), scale_indices(scales_q).numpy())
    corrected = corrected_indices(scales_q, np.array([16, 22]))
    np.testing.assert_array_equal(corrected[:3], scale_indices(scales_q[:3]).numpy())
    np.testing.assert_array_equal(corrected[3:], scale_indices(torch.floor(scales_q[3:] * 22 / 16)).numpy())
    assert (corrected[3:] > corrected[:3]).all()


def test_the_encoder_corrects_a_channel_s_scales_towards_its_symbols():
    """Symbols much smaller than their predicted scale take the smallest factor, much larger the largest, and
    symbols spread as predicted keep the scales (that index costs 1 bit, the others about 2.6)."""
    generator = np.random.default_rng(1)
    index = int(scale_indices(torch.tensor([4.0 * 2**FIXED_POINT_BITS], dtype=torch.float64))[0])  # std about 4
    n = 4000
    symbols = np.concatenate([np.round(generator.normal(0, 1.0, n)), np.round(generator.normal(0, 16.0, n)), np.round(generator.normal(0, 4.0, n))])
    channels = np.repeat(np.arange(3), n)
    chosen = [Y_SCALE_SIXTEENTHS[c] for c in y_scale_choice(channels, np.full(3 * n, index), symbols.astype(np.int64), 3)]
    assert chosen == [min(Y_SCALE_SIXTEENTHS), max(Y_SCALE_SIXTEENTHS), 16]


def test_tiles_that_gain_nothing_send_no_indices():
    """Where no variant or correction pays for its indices, the encoder says so with one flag and sends none:
    such a tile costs what it did in versions 1-4 but for two bits (the grey card of test_artifacts.py)."""
    z_table = np.round(np.exp(-np.abs(np.arange(-Z_MAX, Z_MAX + 1)) / 1.5)[None].repeat(2, axis=0) * 2**16).astype(np.int64) + 1
    variants = z_variant_tables(z_table).astype(np.float64)
    log_probabilities = np.log2(variants / variants.sum(axis=-1, keepdims=True))
    generator = np.random.default_rng(2)
    like_table = generator.choice(np.arange(-Z_MAX, Z_MAX + 1), (2, 40), p=z_table[0] / z_table[0].sum())
    assert z_variant_choice(like_table, log_probabilities) is None
    index = int(scale_indices(torch.tensor([4.0 * 2**FIXED_POINT_BITS], dtype=torch.float64))[0])
    as_predicted = np.round(generator.normal(0, 4.0, 300)).astype(np.int64)
    assert y_scale_choice(np.repeat(np.arange(3), 100), np.full(300, index), as_predicted, 3) is None
