"""The learned-ISP comparators' networks as files and as renderers: build, save, load offline, render a RAW.

Weights are safetensors files in weights/ with an entry in the "comparators" section of weights/manifest.json
(rcam's own models are in "models"). A file's metadata names its system and architecture, so it loads
without any other information. A learned ISP renders a RAW file to the reference render's geometry (size
and orientation), the image `rcam eval`'s learned-ISP cascades then compress with a standard codec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rcam.codec import zoo
from rcam.comparators.cameranet import CameraNet, CameraNetConfig
from rcam.comparators.casnet import ArtifactNet, ArtifactNetConfig, IspNet, IspNetConfig
from rcam.errors import RcamError
from rcam.codec.output import quantize
from rcam.codec.rawio import apply_flip, network_input_and_white, read_raw
from rcam.codec.tiling import blend_weights, crop_tile, plan_tiles

MANIFEST_SECTION = "comparators"
METADATA_KEY = "rcam-comparator"  # safetensors metadata: JSON {"system", "config", "total_steps"}

# system name -> (architecture config class, network class)
SYSTEMS: dict[str, tuple[type, type[nn.Module]]] = {
    "cameranet": (CameraNetConfig, CameraNet),
    "casnet-artifacts": (ArtifactNetConfig, ArtifactNet),
    "casnet-isp": (IspNetConfig, IspNet),
}
# The systems that are ISPs (RAW -> sRGB, with a `render` method); the cascades name them by these names.
ISP_SYSTEMS = {"cameranet": "cameranet", "casnet": "casnet-isp"}
# How a user makes the weights of each cascade's ISP (the error for missing weights says it).
TRAINING_HINT = {
    "cameranet": "rcam train-comparator configs/cameranet.json, then rcam export-comparator runs/cameranet/last.pt",
    "casnet": "rcam train-comparator configs/casnet-artifacts.json and configs/casnet-isp.json, exporting each with "
    "rcam export-comparator",
}

# Frames are rendered in tiles of this many packed pixels (blended across their overlaps, as rcam's decoder
# does), so a 24 MP file does not need its whole feature pyramid in memory. The U-Nets' global paths then see
# one tile each; the protocol S images fit in one tile.
RENDER_TILE = 1024
RENDER_OVERLAP = 64


def build_model(system: str, architecture: dict | None = None) -> nn.Module:
    """A fresh network of `system` with `architecture` fields overriding its config's defaults."""
    if system not in SYSTEMS:
        raise RcamError(f"unknown comparator system {system!r}; choose from {', '.join(SYSTEMS)}")
    config_class, model_class = SYSTEMS[system]
    try:
        config = config_class(**(architecture or {}))
    except TypeError as error:
        raise RcamError(f"{system}: bad architecture fields {architecture} ({error})") from None
    return model_class(config)


def system_of(model: nn.Module) -> str:
    """The system name of a network built by build_model."""
    for system, (_, model_class) in SYSTEMS.items():
        if type(model) is model_class:
            return system
    raise RcamError(f"{type(model).__name__} is not a comparator network")


def save_weights(model: nn.Module, path: Path, half: bool = False, total_steps: int | None = None) -> Path:
    """Write a comparator network's tensors (fp16 when `half`) with its system and architecture as metadata."""
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if half:
        state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    info = {"system": system_of(model), "config": model.config.to_dict(), "total_steps": total_steps}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # One metadata key (sorted JSON): the same weights give the same file, so its digest is stable.
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
    tmp.replace(path)
    return path


def load_weights(path: Path) -> tuple[nn.Module, dict]:
    """A comparator weights file -> (the network in eval mode, float32; its metadata {system, config, total_steps})."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            info = json.loads((handle.metadata() or {})[METADATA_KEY])
        model = build_model(info["system"], info["config"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
        raise RcamError(f"{path}: not a comparator weights file ({error})") from None
    try:
        model.load_state_dict({key: value.float() for key, value in tensors.items()})
    except RuntimeError as error:
        raise RcamError(f"{path}: weights do not fit their {info['system']} config ({str(error).splitlines()[0]})") from None
    return model.eval(), info


def resolve(name_or_path: str, weights_dir: Path | None = None) -> tuple[str, Path]:
    """A comparator name from weights/manifest.json ("comparators") or a .safetensors path -> (name, file)."""
    weights_dir = Path(weights_dir) if weights_dir is not None else zoo.WEIGHTS_DIR
    if not name_or_path.endswith(".safetensors"):
        known = zoo.read_manifest(weights_dir).get(MANIFEST_SECTION, {})
        if name_or_path not in known:
            hint = TRAINING_HINT.get(name_or_path)
            raise RcamError(
                f"no weights for comparator '{name_or_path}' in {weights_dir}/manifest.json"
                + (f": make them with `{hint}`" if hint else f" (known: {', '.join(sorted(known)) or 'none'})")
            )
    return zoo.resolve_weights(name_or_path, weights_dir, section=MANIFEST_SECTION)


def render_planes(isp: nn.Module, planes: torch.Tensor, tile: int = RENDER_TILE, overlap: int = RENDER_OVERLAP) -> torch.Tensor:
    """Network-input planes of a whole frame (4, Hp, Wp) -> the ISP's sRGB (3, 2Hp, 2Wp) in [0, 1], tile by tile."""
    _, height, width = planes.shape
    device = next(isp.parameters()).device
    if height <= tile and width <= tile:
        with torch.no_grad():
            return isp.render(planes[None].to(device))[0].float().cpu()
    tiles = plan_tiles(height, width, tile, overlap)
    extent = (tiles[-1].top + tiles[-1].height, tiles[-1].left + tiles[-1].width)
    canvas = torch.zeros(3, 2 * extent[0], 2 * extent[1])
    weight_sum = torch.zeros(2 * extent[0], 2 * extent[1])
    with torch.no_grad():
        for part in tiles:
            weights = blend_weights(part, extent, overlap, scale=2)
            image = isp.render(crop_tile(planes, part)[None].to(device))[0].float().cpu()
            rows = slice(2 * part.top, 2 * (part.top + part.height))
            cols = slice(2 * part.left, 2 * (part.left + part.width))
            canvas[:, rows, cols] += image * weights
            weight_sum[rows, cols] += weights
    return (canvas / weight_sum.clamp_min(1e-12))[:, : 2 * height, : 2 * width]


def render_raw(isp: nn.Module, path: Path) -> np.ndarray:
    """A RAW file through a learned ISP: (H, W, 3) uint8 sRGB with the reference render's size and orientation."""
    image = read_raw(path)
    planes, _white = network_input_and_white(image)  # the input training used (rcam.training.train.load_pair)
    srgb = render_planes(isp, torch.from_numpy(planes))
    visible = srgb[:, image.pad_top : image.pad_top + image.height, image.pad_left : image.pad_left + image.width]
    return apply_flip(quantize(visible.permute(1, 2, 0).numpy(), 8), image.flip)


@dataclass
class LearnedIsp:
    """A loaded learned ISP: its name, weights digest and network; `render(path)` develops a RAW file."""

    name: str
    digest: str  # sha256 hex of the weights file
    system: str
    model: nn.Module
    total_steps: int | None

    def render(self, path: Path) -> np.ndarray:
        """(H, W, 3) uint8 sRGB of a RAW file, the reference render's geometry."""
        return render_raw(self.model, Path(path))


def load_learned_isp(name: str, device: str | torch.device = "cpu", weights_dir: Path | None = None) -> LearnedIsp:
    """The ISP a cascade names ("cameranet", "casnet"), or a .safetensors file of one, loaded offline."""
    resolved_name, path = resolve(name, weights_dir)
    model, info = load_weights(path)
    if not hasattr(model, "render"):
        raise RcamError(f"{path}: a {info['system']} network is not an ISP (it does not render RAW files)")
    return LearnedIsp(resolved_name, zoo.file_digest(path).hex(), info["system"], model.to(device), info.get("total_steps"))
