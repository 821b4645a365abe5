"""Encoder-side refinement: a tile's latents optimised against the file's own render before they are coded.

The analysis transform is amortised: one network guesses, for any frame, latents that training's cost
(R + λ·255²·MSE) finds good on average over synthetic frames. An encoder that holds the target can do better for
the frame in hand: gradient steps on each tile's latents through the frozen hyperprior and synthesis (Campos et
al. 2019, content-adaptive optimisation; Yang et al. 2020). For the faithful look the target is LibRaw's render
of the file itself (SPEC §3), which the encoder renders anyway for the tone fit. Only the encoder changes: the
refined latents are coded like any others, so the file is an ordinary .rcb file and decodes as one.

The rate is training's proxy (additive uniform noise, likelihoods of the noisy latents): a straight-through
rounded proxy ran away on the real DNGs (the file 2.8x larger after 30 steps). The decoded image includes the
encoder's tone field (rcam.codec.tone), so the loss applies the field fitted to the unrefined latents; the
encoder fits it again afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch

from rcam.codec.tiling import Tile
from rcam.codec.tone import knot_basis, knots_of

# Adam's first step on the gained latents (their quantisation step is 1), decayed to 0 over the steps on a half
# cosine. Chosen on the real DNGs at λ 0.01, 60 steps: a constant 0.02 gave the Blackmagic file 15604 bytes at
# 37.40 dB, cosine from 0.05 15140 at 37.53 (format 5), from 0.1 14080 at 37.53 (format 6; 0.05: 14349, 37.53;
# 0.2: 14184, 37.49), and the Canon 39985 at 31.39 constant, 38293 at 31.42 cosine from 0.1.
REFINE_LEARNING_RATE = 0.1
REFINE_SEED = 0  # the rate proxy's noise: the same file, steps and machine give the same bytes


def _visible_part(tile: Tile, pad_top: int, pad_left: int, frame: tuple[int, int]) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Where a tile's output (2h, 2w) overlaps the visible frame (H, W): (rows, cols) of the frame and the same
    pixels' (rows, cols) in the tile's output; None where it lies wholly in the CFA padding."""
    top, left = 2 * tile.top - pad_top, 2 * tile.left - pad_left
    first_row, first_col = max(top, 0), max(left, 0)
    last_row, last_col = min(top + 2 * tile.height, frame[0]), min(left + 2 * tile.width, frame[1])
    if last_row <= first_row or last_col <= first_col:
        return None
    in_frame = (slice(first_row, last_row), slice(first_col, last_col))
    return in_frame, (slice(first_row - top, last_row - top), slice(first_col - left, last_col - left))


def tile_target(reference: np.ndarray, tile: Tile, pad_top: int, pad_left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of the visible frame's render (H, W, 3) uint8, sensor orientation, that a tile's synthesis covers
    -> (target (3, 2h, 2w) float32 in [0, 1], mask (1, 2h, 2w): 1 where the tile's output is visible, 0 in the
    padding)."""
    target = torch.zeros(3, 2 * tile.height, 2 * tile.width)
    mask = torch.zeros(1, 2 * tile.height, 2 * tile.width)
    part = _visible_part(tile, pad_top, pad_left, reference.shape[:2])
    if part is not None:
        (rows, cols), (tile_rows, tile_cols) = part
        target[:, tile_rows, tile_cols] = torch.from_numpy(np.ascontiguousarray(reference[rows, cols])).permute(2, 0, 1).float() / 255.0
        mask[:, tile_rows, tile_cols] = 1.0
    return target, mask


def tile_tone(
    tone: tuple[float, ...], tile: Tile, pad_top: int, pad_left: int, frame: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A header's tone field over a tile's output -> (gain, offset), each (3, 2h, 2w) float32 (1 and 0 in the
    padding): what apply_tone does to those pixels, as tensors the loss can carry gradients through."""
    gain, offset = torch.ones(3, 2 * tile.height, 2 * tile.width), torch.zeros(3, 2 * tile.height, 2 * tile.width)
    part = _visible_part(tile, pad_top, pad_left, frame)
    if part is None:
        return gain, offset
    (rows, cols), (tile_rows, tile_cols) = part
    knots = knots_of(tone)
    row_weights = torch.from_numpy(knot_basis(frame[0], knots)[rows].astype(np.float32))
    col_weights = torch.from_numpy(knot_basis(frame[1], knots)[cols].astype(np.float32))
    fields = torch.tensor(tone, dtype=torch.float32).reshape(2, 3, knots, knots)
    for channel in range(3):
        gain[channel, tile_rows, tile_cols] = row_weights @ fields[0, channel] @ col_weights.T
        offset[channel, tile_rows, tile_cols] = row_weights @ fields[1, channel] @ col_weights.T
    return gain, offset


def proxy_bits(model: torch.nn.Module, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Training's rate proxy for gained latents y (1, M, h, w) -> (bits of y and its hyper-latent z with additive
    uniform noise, a scalar; y's predicted means (1, M, h, w), around which the coder rounds). The hyperprior
    sees z rounded, straight-through, as in training."""
    z = model.hyper_analysis(y)
    z_noisy = z + torch.rand(z.shape, generator=generator, device=z.device) - 0.5
    z_rows = z_noisy.permute(1, 0, 2, 3).reshape(z.shape[1], 1, -1)  # the bottleneck's (C, 1, N) layout
    z_likelihood = model.entropy_bottleneck._likelihood(z_rows)
    z_likelihood = z_likelihood[0] if isinstance(z_likelihood, tuple) else z_likelihood
    z_hat = z + (torch.round(z) - z).detach()
    means, scales = model.hyper_synthesis(z_hat).chunk(2, dim=1)
    if model.channel_context is not None:
        means, scales = model.channel_context(y, means, scales)
    y_noisy = y + torch.rand(y.shape, generator=generator, device=y.device) - 0.5
    y_likelihood = model.gaussian_conditional._likelihood(y_noisy, scales, means)
    floor = 1e-9  # compressai's likelihood bound: a latent far in a tail costs about 30 bits, not infinity
    bits = -(torch.log2(z_likelihood.clamp_min(floor)).sum() + torch.log2(y_likelihood.clamp_min(floor)).sum())
    return bits, means


@contextmanager
def frozen(model: torch.nn.Module):
    """The model's parameters take no gradients in the block (refinement's backward passes reach only the
    latents); the flags are restored after."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def refine_latents(
    model: torch.nn.Module, y: torch.Tensor, inverse_gain: torch.Tensor, synthesis_conditions: tuple, target: torch.Tensor,
    mask: torch.Tensor, tone: tuple[torch.Tensor, torch.Tensor], lam: float, steps: int,
    seed: int = REFINE_SEED, learning_rate: float = REFINE_LEARNING_RATE, progress: Callable[[], None] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Gained latents y (1, M, h, w) -> the latents after `steps` Adam steps (the rate `learning_rate` decayed to 0
    on a half cosine) on R + λ·255²·MSE of the tile's decoded, tone-corrected output (3, 2h, 2w) against `target`
    where `mask` is 1.

    synthesis_conditions: (development, look) as the synthesis takes them; tone: (gain, offset) from tile_tone.
    The model's parameters are not changed; hold it frozen() around the call. `progress()` is called after
    each step.
    """
    generator = torch.Generator(device=y.device).manual_seed(seed)
    pixels = mask.sum().clamp_min(1.0)
    tone_gain, tone_offset = tone
    refined = y.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([refined], lr=learning_rate)
    for step in range(steps):
        optimiser.param_groups[0]["lr"] = learning_rate * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        bits, means = proxy_bits(model, refined, generator)
        # The decoder's ŷ (rounded around the predicted means), straight-through for the gradient.
        y_hat = refined + (torch.round(refined - means) + means - refined).detach()
        rgb = model.synthesis(y_hat * inverse_gain, *synthesis_conditions)[0]
        # As the decoder: clamped, tone-corrected, clamped again (apply_tone).
        decoded = (rgb.clamp(0.0, 1.0) * tone_gain + tone_offset).clamp(0.0, 1.0)
        mse = (((decoded - target) ** 2) * mask).sum() / (3 * pixels)
        loss = bits / pixels + lam * 255.0**2 * mse
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if progress:
            progress()
    return refined.detach()
