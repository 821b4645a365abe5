"""Training of the learned-ISP comparators (CameraNet, CAS-Net and its ISP-Net) on rcam's own training data.

The data and patches are rcam's (rcam.training.train.load_dataset and sample_batch: synthetic degraded DNG -> clean-look
target render, optionally with fresh defects per patch); each system's module says what its losses are and
in which phases it trains. A run lives in one folder: `last.pt` (network, optimiser, step, wall time; written
every `checkpoint_every` steps and on Ctrl-C) and `log.jsonl`; running the same config again resumes.
`export_comparator` turns a checkpoint into weights/NAME.safetensors with a manifest entry.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from rcam.codec import zoo
from rcam.comparators import learned_isp
from rcam.comparators.cameranet import CameraNetTraining
from rcam.comparators.casnet import DEFAULT_QUALITIES, ArtifactNetTraining, IspNetTraining
from rcam.comparators.networks import parameter_count
from rcam.errors import RcamError
from rcam.measure.metrics import psnr
from rcam.training.train import StopRequest, load_dataset, read_config, record_validation, resolve_device, sample_batch

# sample_batch makes each frame's thumbnail for rcam's global prior; the comparators do not use it.
_UNUSED_THUMBNAIL = 8
# The `comparator` values of the configs this module trains (`rcam train-comparator` dispatches on it).
COMPARATORS = tuple(learned_isp.SYSTEMS)


@dataclass(frozen=True)
class ComparatorConfig:
    """Everything a comparator training run depends on; stored in the run folder and the checkpoint."""

    comparator: str  # the network trained: "cameranet", "casnet-artifacts" or "casnet-isp" (learned_isp.SYSTEMS)
    dataset: str  # index.jsonl written by `rcam synth`
    run_dir: str
    name: str = ""  # the weights' name when exported (default: the system's cascade name)
    architecture: dict = field(default_factory=dict)  # fields of the system's config class (widths)
    phases: dict = field(default_factory=dict)  # steps per training phase, e.g. {"independent": 3000, "joint": 1000}
    batch_size: int = 8
    patch: int = 64  # packed pixels (a 128×128 sensor crop)
    learning_rate: float = 1e-4  # Adam; × the phase's scale, cosine-decayed to a tenth over each phase
    loss_weights: dict = field(default_factory=dict)  # CameraNet: joint_lambda; ISP-Net: isp, comp
    qualities: list = field(default_factory=lambda: list(DEFAULT_QUALITIES))  # JPEG qualities CAS-Net sees
    artifact_net: str = "casnet-artifacts"  # casnet-isp: the frozen CAS-Net (manifest name, .safetensors or last.pt)
    fresh_defects: bool = True  # new defects on the clean twins per patch, as rcam-small trained (rcam.training.train)
    clean_fraction: float = 0.0  # share of patches from the defect-free twins
    limit: int | None = None  # use only the first N pairs of the dataset
    checkpoint_every: int = 250
    log_every: int = 50
    val_every: int = 0  # steps between validations (ISPs only; 0: never)
    val_pairs: str = ""  # index.jsonl of pairs scored at validation: PSNR of the 8-bit render against the target
    val_limit: int | None = None
    threads: int = 1
    seed: int = 0
    device: str = "auto"

    @staticmethod
    def load(path: Path) -> "ComparatorConfig":
        """Read a JSON config file."""
        return read_config(ComparatorConfig, path, "comparator training config")

    @property
    def export_name(self) -> str:
        """Name of the exported weights: `name`, else the cascade name of the ISP or the system name."""
        cascade_names = {system: name for name, system in learned_isp.ISP_SYSTEMS.items()}
        return self.name or cascade_names.get(self.comparator, self.comparator)

    def phase_plan(self, phases: tuple[str, ...]) -> list[tuple[str, int]]:
        """(phase, steps) in the system's order; RcamError when the config names other phases."""
        unknown = set(self.phases) - set(phases)
        if unknown or not self.phases:
            raise RcamError(f"{self.comparator} trains in phases {', '.join(phases)}; the config gives {dict(self.phases)}")
        plan = [(phase, int(self.phases.get(phase, 0))) for phase in phases]
        if any(steps < 0 for _, steps in plan) or sum(steps for _, steps in plan) < 1:
            raise RcamError(f"phase steps must be non-negative with at least one step in all; got {dict(self.phases)}")
        return plan


def load_network(reference: str, weights_dir: Path | None = None) -> tuple[nn.Module, str]:
    """A comparator network from a manifest name, a .safetensors file or a training checkpoint (.pt) -> (network, source)."""
    if reference.endswith(".pt"):
        try:
            state = torch.load(reference, map_location="cpu", weights_only=True)
            model = learned_isp.build_model(state["system"], state["architecture"])
            model.load_state_dict(state["model"])
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError, EOFError) as error:
            raise RcamError(f"{reference}: not a comparator training checkpoint ({str(error).splitlines()[0]})") from None
        return model.eval(), f"{reference} (step {state['step']})"
    _, path = learned_isp.resolve(reference, weights_dir)
    model, _ = learned_isp.load_weights(path)
    return model, f"{path} (sha256 {zoo.file_digest(path).hex()})"


def make_training(config: ComparatorConfig, model: nn.Module, device: torch.device, weights_dir: Path | None = None):
    """The system's training object (phases, lr_scales, losses) for a fresh or resumed network."""
    qualities = tuple(int(q) for q in config.qualities)
    if len(qualities) != 2 or not 1 <= qualities[0] <= qualities[1] <= 100:
        raise RcamError(f"qualities must be [low, high] within 1-100; got {config.qualities}")
    if config.comparator == "cameranet":
        return CameraNetTraining(model, config.loss_weights), {}
    if config.comparator == "casnet-artifacts":
        return ArtifactNetTraining(model, config.loss_weights, qualities), {}
    if config.comparator == "casnet-isp":
        artifact_net, source = load_network(config.artifact_net, weights_dir)
        if learned_isp.system_of(artifact_net) != "casnet-artifacts":
            raise RcamError(f"{config.artifact_net}: the artifact net must be a casnet-artifacts network")
        return IspNetTraining(model, config.loss_weights, artifact_net.to(device), qualities), {"artifact_net": source}
    raise RcamError(f"unknown comparator {config.comparator!r}; choose from {', '.join(learned_isp.SYSTEMS)}")


def learning_rate(config: ComparatorConfig, scale: float, progress: float) -> float:
    """Adam's rate at `progress` (0-1) through a phase: learning_rate × scale, cosine down to a tenth of it."""
    return config.learning_rate * scale * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def validate(model: nn.Module, config: ComparatorConfig) -> dict:
    """Mean PSNR (dB) of the ISP's 8-bit renders of the val pairs' degraded DNGs against their targets."""
    index = Path(config.val_pairs)
    if not index.is_file():
        raise RcamError(f"val_pairs {index}: no such index")
    entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()][: config.val_limit]
    was_training = model.training
    model.eval()
    scores = [
        psnr(learned_isp.render_raw(model, index.parent / entry["degraded"]), np.asarray(Image.open(index.parent / entry["target"]).convert("RGB")))
        for entry in entries
    ]  # fmt: skip
    model.train(was_training)
    return {"psnr": float(np.mean(scores)), "images": len(scores)}


def train_comparator(
    config: ComparatorConfig, images: list | None = None, weights_dir: Path | None = None, stop_at: int | None = None
) -> Path:  # fmt: skip
    """Run (or resume) a comparator's training; returns the path of the last checkpoint.

    With validation on, run_dir/best.pt keeps the checkpoint of the best validation PSNR so far (later steps
    can be worse: CameraNet's first run scored 21.39 dB at step 1600 and 20.76 at 3400).

    images: preloaded training pairs (rcam.training.train.load_dataset), else the config's dataset is read. stop_at:
    stop (and save) after this many steps in all, leaving the rest of the phases for a resume. weights_dir:
    where a manifest name in `artifact_net` is looked up (default weights/).
    """
    torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    model = learned_isp.build_model(config.comparator, config.architecture).to(device)
    training, sources = make_training(config, model, device, weights_dir)
    plan = config.phase_plan(training.phases)
    total_steps = sum(steps for _, steps in plan)
    end = min(total_steps, stop_at) if stop_at else total_steps
    is_isp = hasattr(model, "render")
    if config.val_every and not is_isp:
        raise RcamError(f"{config.comparator} is not an ISP: set val_every to 0")
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    checkpoint_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    step, seconds, best_psnr = 0, 0.0, -math.inf
    rng = np.random.default_rng(config.seed)
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state.get("system") != config.comparator or state.get("architecture") != model.config.to_dict():
            raise RcamError(f"{checkpoint_path}: a checkpoint of another system or architecture; use a new run_dir")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, seconds = int(state["step"]), float(state.get("seconds", 0.0))
        best_psnr = float(state.get("best_val_psnr", -math.inf))
        rng = np.random.default_rng([config.seed, step])  # a fresh stream per resume, reproducible
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    if images is None:
        images = load_dataset(
            Path(config.dataset), _UNUSED_THUMBNAIL, limit=config.limit, with_clean=config.clean_fraction > 0 and not config.fresh_defects,
            fresh_defects=config.fresh_defects,
        )  # fmt: skip

    def save(path: Path = checkpoint_path) -> None:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "seconds": seconds,
            "system": config.comparator, "architecture": model.config.to_dict(), "config": asdict(config),
            "phases": dict(plan), "sources": sources, "best_val_psnr": best_psnr,
        }  # fmt: skip
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    stop = StopRequest()  # Ctrl-C or SIGTERM: finish the step, save, stop
    model.train()
    sums: dict[str, float] = {}
    progress = tqdm(total=total_steps, initial=step, desc=f"training {config.comparator}", unit="step")
    try:
        with (run_dir / "log.jsonl").open("a") as log:
            while step < end and not stop.requested:
                started = time.perf_counter()
                phase, phase_start, phase_steps = _phase_at(plan, step)
                rate = learning_rate(config, training.lr_scales[phase], (step - phase_start) / phase_steps)
                for group in optimizer.param_groups:
                    group["lr"] = rate
                batch = sample_batch(
                    images, config.batch_size, config.patch, True, rng, config.clean_fraction, _UNUSED_THUMBNAIL
                )  # fmt: skip
                batch = {"x": batch["x"].to(device), "target": batch["target"].to(device)}
                terms = training.losses(batch, phase, rng)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                step += 1
                seconds += time.perf_counter() - started
                progress.update(1)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach())
                if step % config.log_every == 0 or step == end:
                    count = step % config.log_every or config.log_every
                    record = {key: value / count for key, value in sums.items()}
                    record.update(step=step, phase=phase, lr=rate, seconds=round(seconds, 1), s_per_step=round(seconds / step, 4))
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    progress.set_postfix(phase=phase, loss=f"{record['loss']:.4f}")
                    sums = {}
                if step % config.checkpoint_every == 0:
                    save()
                if config.val_every and config.val_pairs and step % config.val_every == 0:
                    scores = validate(model, config)
                    improved = scores["psnr"] > best_psnr
                    if improved:
                        best_psnr = scores["psnr"]
                        save(best_path)
                    record_validation(log, progress, step, scores, improved)
    finally:
        save()
        progress.close()
        stop.restore()
    return checkpoint_path


def train_from_config(path: Path, steps: int | None = None, device: str | None = None) -> tuple[Path, bool]:
    """`rcam train-comparator CONFIG` for a learned ISP: train (or resume), stopping after `steps` in all if given.

    Returns (checkpoint, whether it got as far as asked: False after Ctrl-C)."""
    config = ComparatorConfig.load(path)
    if device:
        config = replace(config, device=device)
    checkpoint = train_comparator(config, stop_at=steps)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    total = sum(state["phases"].values())
    return checkpoint, int(state["step"]) >= min(steps or total, total)


def is_checkpoint(path: Path) -> bool:
    """Whether a file is a training checkpoint of this module (a learned ISP's or CAS-Net's last.pt)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError):
        return False
    return isinstance(state, dict) and state.get("system") in learned_isp.SYSTEMS and "architecture" in state


def _phase_at(plan: list[tuple[str, int]], step: int) -> tuple[str, int, int]:
    """(phase, its first step, its length) of a 0-based step in the plan."""
    start = 0
    for phase, steps in plan:
        if step < start + steps:
            return phase, start, steps
        start += steps
    raise RcamError(f"step {step} is past the plan {plan}")


def export_comparator(checkpoint: Path, name: str | None = None, weights_dir: Path | None = None, half: bool = False) -> Path:
    """Training checkpoint (last.pt) -> weights_dir/NAME.safetensors plus its entry in the manifest's "comparators"."""
    checkpoint = Path(checkpoint)
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        config = ComparatorConfig(**state["config"])
        model = learned_isp.build_model(state["system"], state["architecture"])
        model.load_state_dict(state["model"])
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError, EOFError) as error:
        raise RcamError(f"{checkpoint}: not a comparator training checkpoint ({str(error).splitlines()[0]})") from None
    weights_dir = Path(weights_dir) if weights_dir is not None else zoo.WEIGHTS_DIR
    name = name or config.export_name
    step = int(state["step"])
    path = learned_isp.save_weights(model, weights_dir / f"{name}.safetensors", half=half, total_steps=step)
    training = {
        "steps": step, "phases": state["phases"], "wall_seconds": round(float(state["seconds"]), 1),
        "s_per_step": round(float(state["seconds"]) / max(step, 1), 4), "checkpoint": str(checkpoint),
        "config": state["config"], **state.get("sources", {}),
    }  # fmt: skip
    entry = {
        "file": path.name, "sha256": zoo.file_digest(path).hex(), "system": state["system"],
        "architecture": state["architecture"], "parameters": parameter_count(model), "training": training,
    }  # fmt: skip
    zoo.write_manifest_entry(name, entry, weights_dir, replace=True, section=learned_isp.MANIFEST_SECTION)
    return path
