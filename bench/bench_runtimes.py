"""Benchmark: the analysis and synthesis transforms of one tile under other CPU runtimes than plain torch.

Issue 19 asks which runtime makes the transforms faster on the CPU without giving up exactness where it
matters. The entropy parameters are not touched (the hyper path is integer, rcam.entropy); only the analysis
(packed tile -> y) and the synthesis (ŷ -> sRGB) are run here, on one real tile of a real DNG, each variant on
one intra-op thread as rcam runs every tile (rcam.codec.map_tiles). Variants:

  torch          the codec as it runs today (fp32, NCHW): the baseline
  channels_last  the same modules and inputs in torch.channels_last
  compile        torch.compile (inductor, CPU), compile time printed separately
  onnxruntime    ONNX Runtime (CPU EP, one intra-op thread, sequential) on the modules exported by
                 torch.onnx (TorchScript exporter); the skeleton's develop step (a 3x3 inverse, demosaic)
                 stays in torch, it is cheap and not exportable as it stands
  openvino       only when the openvino package is installed (it is not a dependency)

For each variant it prints the median over --repeats rounds (variants interleaved within a round, so a load
spike on this shared machine hits them alike) of ms per tile for analysis and synthesis, the speed-up over
torch, the largest absolute difference of y and of the sRGB output from torch's, how many 8-bit output values
differ from torch's, and whether the variant is deterministic: the same tile run again, and run while a second
tile runs on another thread, gives bit-identical floats.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/bench_runtimes.py [--tile 512] [--repeats 3] [--skip compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rcam.codec.engine import frame_development, look_tensor
from rcam.codec.rawio import network_input_and_white, read_raw
from rcam.codec.skeleton import band_limit_packed, develop_packed
from rcam.codec.tiling import Tile, coordinate_map, crop_tile, thumbnail
from rcam.codec.zoo import load_codec

RAW_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "raw"


class SynthesisNetwork(nn.Module):
    """The synthesis up to its heads: ŷ (1, M, h, w) -> (planes (1, 4, 8h, 8w), corrections (1, 12·looks, 8h, 8w))
    for a skeleton model, (tail output, tail output) otherwise: the exportable, expensive part."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        features = m.up1(y_hat)
        for block in m.decoder_stage1:
            features = block(features)
        features = m.up2(features)
        for block in m.decoder_stage2:
            features = block(features)
        features = m.up3(features)
        if m.config.skeleton:
            return m.plane_head(features), m.correction(features)
        tail = m.tail(features)
        return tail, tail


def finish_synthesis(model, heads: tuple[torch.Tensor, torch.Tensor], development, look: torch.Tensor) -> torch.Tensor:
    """SynthesisNetwork's heads -> sRGB (1, 3, 2h, 2w), as RealCamNet.synthesis_parts ends (in torch)."""
    planes, corrections = heads
    if not model.config.skeleton:
        return torch.nn.functional.pixel_shuffle(corrections, 2)
    groups = corrections.view(1, -1, 12, *corrections.shape[-2:])[:, int(look[0])]
    return torch.nn.functional.pixel_shuffle(develop_packed(planes, *development) + band_limit_packed(groups), 2)


class AnalysisNetwork(nn.Module):
    """model.analysis with the look as a tensor input (exportable)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, coords, thumb, look):
        return self.model.analysis(x, coords, thumb, look)


def real_tile(codec, tile: int):
    """One tile of the first real DNG: (x, coords, thumbnail, look, development) as rcam.codec feeds them."""
    dngs = sorted(RAW_DIR.glob("*.dng"))
    if not dngs:
        sys.exit(f"no DNG in {RAW_DIR}")
    image = read_raw(dngs[0])
    normalised, white = network_input_and_white(image)
    planes = torch.from_numpy(normalised)
    _, height, width = planes.shape
    where = Tile(0, 0, tile, tile)
    x = crop_tile(planes, where)[None]
    coords = coordinate_map(where, height, width, codec.model.config.coordinates == "absolute")[None]
    thumb = thumbnail(planes, codec.model.config.thumbnail)[None]
    development = frame_development(image, white).tensors(1)
    return x, coords, thumb, look_tensor("clean", 1, "cpu"), development


def torch_variant(model, channels_last: bool = False):
    """(analysis(inputs) -> y, synthesis_network(y_hat) -> heads) in torch."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    analysis, synthesis = AnalysisNetwork(model).eval(), SynthesisNetwork(model).eval()

    def prepare(t):
        return t.contiguous(memory_format=torch.channels_last) if channels_last and t.dim() == 4 else t

    def analyse(x, coords, thumb, look):
        with torch.inference_mode():
            return analysis(prepare(x), prepare(coords), prepare(thumb), look).contiguous()

    def synthesise(y_hat):
        with torch.inference_mode():
            return tuple(h.contiguous() for h in synthesis(prepare(y_hat)))

    return analyse, synthesise


def compile_variant(model, inputs, y_hat):
    """torch.compile'd analysis and synthesis network; returns them and the seconds the first calls took."""
    analysis = torch.compile(AnalysisNetwork(model).eval(), dynamic=False)
    synthesis = torch.compile(SynthesisNetwork(model).eval(), dynamic=False)

    def analyse(*args):
        with torch.inference_mode():
            return analysis(*args)

    def synthesise(y):
        with torch.inference_mode():
            return synthesis(y)

    start = time.perf_counter()
    analyse(*inputs)
    synthesise(y_hat)
    return analyse, synthesise, time.perf_counter() - start


def export_onnx(module: nn.Module, inputs: tuple, names: list[str], outputs: list[str]) -> bytes:
    """The module as ONNX bytes (TorchScript exporter, opset 17, fixed shapes)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), inputs, buffer, input_names=names, output_names=outputs, opset_version=17, dynamo=False)
    return buffer.getvalue()


def onnx_variant(model, inputs, y_hat):
    """ONNX Runtime sessions (one intra-op thread each) for the analysis and the synthesis network; + export s."""
    import onnxruntime as ort

    start = time.perf_counter()
    analysis_bytes = export_onnx(AnalysisNetwork(model), inputs, ["x", "coords", "thumb", "look"], ["y"])
    synthesis_bytes = export_onnx(SynthesisNetwork(model), (y_hat,), ["y_hat"], ["planes", "corrections"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    analysis = ort.InferenceSession(analysis_bytes, options, providers=["CPUExecutionProvider"])
    synthesis = ort.InferenceSession(synthesis_bytes, options, providers=["CPUExecutionProvider"])
    setup = time.perf_counter() - start

    def analyse(x, coords, thumb, look):
        feed = {"x": x.numpy(), "coords": coords.numpy(), "thumb": thumb.numpy(), "look": look.numpy()}
        return torch.from_numpy(analysis.run(None, feed)[0])

    def synthesise(y):
        return tuple(torch.from_numpy(h) for h in synthesis.run(None, {"y_hat": y.numpy()}))

    return analyse, synthesise, setup, (analysis_bytes, synthesis_bytes)


def openvino_variant(onnx_models):
    """OpenVINO (CPU, one inference thread) on the same ONNX graphs; None without the package."""
    try:
        import openvino as ov
    except ImportError:
        return None
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    analysis = core.compile_model(core.read_model(io.BytesIO(onnx_models[0]).getvalue()), "CPU", config)
    synthesis = core.compile_model(core.read_model(io.BytesIO(onnx_models[1]).getvalue()), "CPU", config)

    def analyse(x, coords, thumb, look):
        return torch.from_numpy(np.array(analysis([x.numpy(), coords.numpy(), thumb.numpy(), look.numpy()])[0]))

    def synthesise(y):
        result = synthesis([y.numpy()])
        return tuple(torch.from_numpy(np.array(result[i])) for i in range(2))

    return analyse, synthesise


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--skip", nargs="*", default=[], choices=["channels_last", "compile", "onnxruntime", "openvino"])
    args = parser.parse_args()
    torch.set_num_threads(1)  # as every tile runs in rcam (map_tiles)

    codec = load_codec(args.model, "cpu")
    model = codec.model
    inputs = real_tile(codec, args.tile)
    development = inputs[4]
    inputs = inputs[:4]
    with torch.inference_mode():
        gain, inverse_gain = model.gains(torch.tensor([0.01]))
        y = model.analysis(*inputs) * gain
        _, latents = codec.coder.encode(y, model.hyper_analysis(y))
        y_hat = (latents.y_hat * inverse_gain).contiguous()

    variants = {"torch": torch_variant(model)}
    setup = {}
    if "channels_last" not in args.skip:
        import copy

        variants["channels_last"] = torch_variant(copy.deepcopy(model), channels_last=True)
    onnx_models = None
    if "onnxruntime" not in args.skip and not importlib.util.find_spec("onnxruntime"):
        print("onnxruntime is not installed (pip install 'rcam[bench]'): its variant is left out", file=sys.stderr)
        args.skip.append("onnxruntime")
    if "onnxruntime" not in args.skip:
        analyse, synthesise, setup["onnxruntime"], onnx_models = onnx_variant(model, inputs, y_hat)
        variants["onnxruntime"] = (analyse, synthesise)
    if "openvino" not in args.skip and onnx_models is not None:
        openvino = openvino_variant(onnx_models)
        if openvino is not None:
            variants["openvino"] = openvino
    if "compile" not in args.skip:
        try:
            analyse, synthesise, setup["compile"] = compile_variant(model, inputs, y_hat)
            variants["compile"] = (analyse, synthesise)
        except Exception as error:  # inductor needs a working C++ toolchain: report, do not stop the bench
            print(f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0]}")

    look = inputs[3]
    reference_y = variants["torch"][0](*inputs)
    reference_rgb = finish_synthesis(model, variants["torch"][1](y_hat), development, look)
    for analyse, synthesise in variants.values():  # warm-up: first-call allocation and weight packing
        analyse(*inputs)
        synthesise(y_hat)
    times = {name: {"analysis": [], "synthesis": []} for name in variants}
    outputs = {}
    for round_ in range(args.repeats):
        for name, (analyse, synthesise) in variants.items():
            y_out, seconds = timed(analyse, *inputs)
            times[name]["analysis"].append(seconds)
            heads, seconds = timed(synthesise, y_hat)
            times[name]["synthesis"].append(seconds)
            outputs[name] = (y_out, heads)
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr, flush=True)

    def deterministic(analyse, synthesise) -> bool:
        """Same floats again, and while another tile runs on a second thread (as map_tiles runs them)."""
        first_y, first_heads = analyse(*inputs), synthesise(y_hat)
        with ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            jobs = [pool.submit(analyse, *inputs), pool.submit(analyse, *inputs), pool.submit(synthesise, y_hat), pool.submit(synthesise, y_hat)]
            results = [job.result() for job in jobs]
        torch.set_num_threads(1)
        same = all(torch.equal(first_y, r) for r in results[:2])
        return same and all(all(torch.equal(a, b) for a, b in zip(first_heads, r)) for r in results[2:])

    base = {stage: statistics.median(times["torch"][stage]) for stage in ("analysis", "synthesis")}
    print(f"\ntile {args.tile} packed ({2 * args.tile}x{2 * args.tile} output), one intra-op thread, model {args.model}, median of {args.repeats}")
    print(f"{'variant':<14} {'analysis ms':>11} {'synth ms':>9} {'speed-up a/s':>13} {'max|Δy|':>9} {'max|Δrgb|':>10} {'8-bit Δ':>9} {'determ.':>8} {'setup s':>8}")
    for name, (analyse, synthesise) in variants.items():
        median = {stage: statistics.median(times[name][stage]) for stage in ("analysis", "synthesis")}
        y_out, heads = outputs[name]
        rgb = finish_synthesis(model, heads, development, look)
        with torch.inference_mode():
            dy = (y_out.float() - reference_y).abs().max().item()
            drgb = (rgb - reference_rgb).abs().max().item()
            differing = (torch.round(rgb.clamp(0, 1) * 255) != torch.round(reference_rgb.clamp(0, 1) * 255)).sum().item()
        print(
            f"{name:<14} {1e3 * median['analysis']:11.0f} {1e3 * median['synthesis']:9.0f} "
            f"{base['analysis'] / median['analysis']:6.2f}/{base['synthesis'] / median['synthesis']:<6.2f} "
            f"{dy:9.2e} {drgb:10.2e} {differing:9d} {'yes' if deterministic(analyse, synthesise) else 'NO':>8} "
            f"{setup.get(name, 0.0):8.1f}"
        )
    print(f"(8-bit Δ: output values of the {reference_rgb.numel()} that round to another 8-bit level than torch's)")


if __name__ == "__main__":
    main()
