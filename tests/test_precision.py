"""The transforms' precision (rcam.codec.zoo.Codec.precision): float32 everywhere, bfloat16 where the CPU has it.

bfloat16 must stay a speed knob: the same file, decoded either way, within a fraction of a level; the bytes'
meaning (hyper path, entropy parameters) never depends on it; and a machine without native bfloat16 never
silently runs the slow emulation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import bayer_dng_of_size

from rcam.codec import zoo
from rcam.codec.engine import decode_bytes, encode_file
from rcam.codec.output import quantize
from rcam.errors import RcamError

NATIVE = zoo.native_bfloat16(torch.device("cpu"))
PRECISIONS_HERE = ["float32"] + (["bfloat16"] if NATIVE else [])


def test_precision_names_and_hardware_are_checked(tiny_model_path, monkeypatch):
    with pytest.raises(RcamError, match="use one of auto, float32, bfloat16"):
        zoo.load_codec(tiny_model_path, precision="half")
    monkeypatch.setattr(zoo, "native_bfloat16", lambda device: False)
    assert zoo.load_codec(tiny_model_path).precision == "float32"  # auto
    with pytest.raises(RcamError, match="AMX or AVX-512 BF16"):
        zoo.load_codec(tiny_model_path, precision="bfloat16")
    monkeypatch.setattr(zoo, "native_bfloat16", lambda device: True)
    assert zoo.load_codec(tiny_model_path).precision == "bfloat16"
    assert zoo.load_codec(tiny_model_path, precision="float32").precision == "float32"


@pytest.mark.parametrize("precision", PRECISIONS_HERE)
def test_either_precision_decodes_the_same_file_within_a_level(precision, tmp_path):
    path = bayer_dng_of_size(tmp_path / "frame.dng", 300, 400, seed=7)
    exact = zoo.load_codec(precision="float32")
    codec = zoo.load_codec(precision=precision)
    assert codec.precision == precision
    data = encode_file(codec, path, 0.01, look="faithful").data
    ours = quantize(decode_bytes(codec, data), 8).astype(np.int16)
    theirs = quantize(decode_bytes(exact, data), 8).astype(np.int16)  # a float32 machine decoding our file
    difference = ours - theirs
    assert np.sqrt(np.mean(difference.astype(np.float64) ** 2)) < 0.5
    assert np.abs(difference).max() <= 8
    assert np.ptp(ours) > 50  # a real picture, not a flat frame any precision gets right
    # The bfloat16 analysis rounds a few latents the other way; the rate stays where it was.
    encoded_exact = encode_file(exact, path, 0.01, look="faithful").data
    assert abs(len(encoded_exact) - len(data)) <= 0.02 * len(data)
