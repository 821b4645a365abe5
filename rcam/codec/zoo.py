"""Shipped checkpoints: safetensors weights in weights/ plus weights/manifest.json, loaded offline.

A checkpoint file holds the model's tensors, the integer z probability tables under "coding.z_table" (so
every machine codes z with identical integers), and the model config as safetensors metadata.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rcam.codec.entropy import LatentCoder, latent_coder, z_tables
from rcam.codec.models import LAMBDA_RANGE, ModelConfig, RealCamNet
from rcam.errors import RcamError

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"
DEFAULT_MODEL = "rcam-small"
Z_TABLE_KEY = "coding.z_table"
METADATA_KEY = "rcam"  # safetensors metadata: JSON {"config": ModelConfig fields, "total_steps": int or null}
PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class Codec:
    """A loaded model ready to code: the network, its fixed-point entropy coder and its identity."""

    name: str
    digest: bytes  # first 16 bytes of the weights file's SHA-256, written into every .rcb
    model: RealCamNet
    coder: LatentCoder
    device: torch.device
    # What the analysis and synthesis transforms compute in: "float32", or "bfloat16" (autocast, channels-last
    # weights) where the CPU has native bfloat16 (AMX, AVX-512 BF16). The hyper path and the entropy
    # parameters are float32 / fixed point either way, so the bitstream's meaning never depends on it.
    precision: str = "float32"
    # Whether the transforms run in channels-last (NHWC) layout, weights and inputs: on the CPU oneDNN's
    # convolutions take it natively, in bfloat16 and in float32 (bench/bench_runtimes.py on a CPU without
    # AVX2: analysis 2.5x, synthesis 1.4x faster than NCHW in float32).
    channels_last: bool = False


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 convolutions natively (a CPU with AMX tiles or AVX-512 BF16)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bfloat16" on a CPU with native bfloat16, else "float32"; RcamError for a bfloat16 it cannot run fast."""
    if precision not in PRECISIONS:
        raise RcamError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    if precision == "bfloat16" and not native_bfloat16(device):
        raise RcamError(f"--precision bfloat16 needs a CPU with AMX or AVX-512 BF16 (this {device.type} has neither): use float32")
    return precision


def file_digest(path: Path) -> bytes:
    """SHA-256 of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.digest()


def save_checkpoint(
    model: RealCamNet, path: Path, half: bool = False, total_steps: int | None = None, family: str | None = None
) -> Path:  # fmt: skip
    """Write weights + z tables + config (+ training steps) as safetensors (fp16 tensors when `half`).

    `family` marks weights of another network coded the same way (a comparator, e.g. "rawtobit"); its class
    must be built from its config alone, as RealCamNet is."""
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    if half:
        state = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    # The tables come from the weights as they will be loaded, so fp16 rounding is included.
    reloaded = type(model)(model.config)
    reloaded.load_state_dict(as_float32(state), strict=True)
    state[Z_TABLE_KEY] = torch.from_numpy(z_tables(reloaded.entropy_bottleneck))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # One metadata key: safetensors writes several in a random order (safetensors issue #584), and exporting
    # the same weights again must give the same file digest, or .rcb files made with them stop decoding.
    info = {"config": model.config.to_dict(), "total_steps": total_steps} | ({"family": family} if family else {})
    save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})
    tmp.replace(path)
    return path


def read_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict:
    """weights/manifest.json as a dict (empty when absent)."""
    manifest = Path(weights_dir) / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.exists() else {"models": {}}


def resolve_weights(name_or_path: str | None, weights_dir: Path = WEIGHTS_DIR, section: str = "models") -> tuple[str, Path]:
    """A model name from the manifest, or a path to a .safetensors file -> (model name, file path).

    section: the manifest's part to look in ("models": rcam's; "comparators": the seed systems' networks).
    """
    name_or_path = name_or_path or DEFAULT_MODEL
    candidate = Path(name_or_path)
    if candidate.suffix == ".safetensors":
        if not candidate.is_file():
            raise RcamError(f"{candidate}: weights file not found")
        return candidate.stem, candidate
    models = read_manifest(weights_dir).get(section, {})
    if name_or_path not in models:
        known = ", ".join(sorted(models)) or "none"
        raise RcamError(f"model '{name_or_path}' is not in {weights_dir}/manifest.json (known: {known})")
    entry = models[name_or_path]
    path = Path(weights_dir) / entry["file"]
    if not path.is_file():
        raise RcamError(f"{path}: weights file for model '{name_or_path}' is missing")
    if "sha256" in entry and file_digest(path).hex() != entry["sha256"]:
        raise RcamError(f"{path}: digest does not match weights/manifest.json (corrupt or replaced file)")
    return name_or_path, path


def codec_from_model(model: RealCamNet, name: str = "in-training", device: str | torch.device = "cpu") -> Codec:
    """Wrap a model in memory (e.g. during training) as a Codec; its digest is zero (not a shipped file)."""
    coder = latent_coder(model, z_tables(model.entropy_bottleneck))
    return Codec(name=name, digest=bytes(16), model=model, coder=coder, device=torch.device(device))


def open_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .safetensors file -> (all its tensors as stored, its metadata); unreadable files raise RcamError."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise RcamError(f"{path}: not a valid rcam weights file ({error})") from None
    return tensors, metadata


def _file_info(path: Path, metadata: dict[str, str]) -> tuple[ModelConfig, int | None]:
    """A weights file's metadata -> (model config, training steps or None); older files kept them as two keys."""
    try:
        if METADATA_KEY in metadata:
            info = json.loads(metadata[METADATA_KEY])
        else:
            info = {"config": json.loads(metadata["config"]), "total_steps": metadata.get("total_steps")}
        if info.get("family", "rcam") != "rcam":
            raise RcamError(f"{path}: weights of the {info['family']} comparator, not an rcam model (rcam eval --baselines measures it)")
        steps = info.get("total_steps")
        return ModelConfig(**info["config"]), None if steps is None else int(steps)
    except (KeyError, TypeError, ValueError, AttributeError) as error:  # JSONDecodeError is a ValueError
        raise RcamError(f"{path}: not a valid rcam weights file (no usable model config: {error})") from None


def as_float32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 weights (shipped files may be half precision) -> float32; integer tensors unchanged."""
    return {key: value.float() if value.is_floating_point() else value for key, value in tensors.items()}


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """A .safetensors weights file -> (float32 model tensors without the coding tables, training steps behind them)."""
    path = Path(path)
    tensors, metadata = open_weights(path)
    tensors.pop(Z_TABLE_KEY, None)
    _, steps = _file_info(path, metadata)
    if steps is None:  # files exported before the steps were stored: the manifest entry with the same digest
        digest = file_digest(path).hex()
        for entry in read_manifest(path.parent).get("models", {}).values():
            if entry.get("sha256") == digest:
                training = entry.get("training", {})
                steps = training.get("total_steps", training.get("steps"))
    return as_float32(tensors), int(steps or 0)


def load_codec(
    name_or_path: str | None = None, device: str | torch.device = "cpu", weights_dir: Path = WEIGHTS_DIR, precision: str = "auto"
) -> Codec:  # fmt: skip
    """Load a shipped model (by manifest name) or a .safetensors file into a ready-to-use Codec (`precision`:
    PRECISIONS, see Codec.precision)."""
    name, path = resolve_weights(name_or_path, weights_dir)
    tensors, metadata = open_weights(path)
    config, _ = _file_info(path, metadata)
    z_table = tensors.pop(Z_TABLE_KEY, None)
    model = RealCamNet(config)
    try:
        model.load_state_dict(as_float32(tensors))
    except RuntimeError as error:
        raise RcamError(f"{path}: weights do not fit model config '{config.name}' ({str(error).splitlines()[0]})") from None
    model.eval()
    if z_table is None:
        z_table = torch.from_numpy(z_tables(model.entropy_bottleneck))
    coder = latent_coder(model, z_table.numpy())
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    model = model.to(device)
    channels_last = device.type == "cpu" or precision == "bfloat16"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Codec(
        name=name, digest=file_digest(path)[:16], model=model, coder=coder, device=device, precision=precision, channels_last=channels_last
    )


def write_manifest_entry(
    name: str, fields: dict, weights_dir: Path = WEIGHTS_DIR, replace: bool = False, section: str = "models"
) -> Path:  # fmt: skip
    """Create, update or (`replace`) rewrite one model's entry in weights/manifest.json (atomically); returns its path."""
    manifest = read_manifest(weights_dir)
    models = manifest.setdefault(section, {})
    models[name] = dict(fields) if replace else models.get(name, {}) | fields
    path = Path(weights_dir) / "manifest.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def checkpoint_weights(state: dict) -> dict:
    """The weights a training checkpoint stands for: its moving average when the run kept one, else the model."""
    return state.get("average", state["model"])


def export_checkpoint(checkpoint: Path, name: str = DEFAULT_MODEL, weights_dir: Path = WEIGHTS_DIR, half: bool = False) -> Path:
    """Training checkpoint (last.pt) -> weights/NAME.safetensors plus its manifest entry (digest, config, training)."""
    checkpoint = Path(checkpoint)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        config = ModelConfig(**state["model_config"])
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as error:
        # A file that is not a torch checkpoint at all (e.g. the JSON config) fails to unpickle.
        raise RcamError(f"{checkpoint}: not an rcam training checkpoint ({str(error).splitlines()[0]})") from None
    model = RealCamNet(config)
    model.load_state_dict(checkpoint_weights(state))
    steps = int(state["step"])
    earlier = int(state.get("earlier_steps", 0))  # fine-tuned runs: the steps of the weights they started from
    path = save_checkpoint(model, Path(weights_dir) / f"{name}.safetensors", half=half, total_steps=steps + earlier)
    run_config = checkpoint.parent / "config.json"
    training = {"steps": steps, "earlier_steps": earlier, "total_steps": steps + earlier, "checkpoint": str(checkpoint)}
    if run_config.exists():
        training["config"] = json.loads(run_config.read_text())
    # A new file replaces the whole entry: figures measured for the previous weights do not carry over.
    write_manifest_entry(
        name,
        {"file": path.name, "sha256": file_digest(path).hex(), "config": config.to_dict(), "lambda_range": list(LAMBDA_RANGE), "training": training},
        weights_dir,
        replace=True,
    )
    return path
