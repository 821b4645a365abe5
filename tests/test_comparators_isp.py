"""The learned-ISP comparators (CameraNet, CAS-Net and its ISP-Net): build, train a few steps on tiny data,
export and load offline, render DNGs, and take part in `rcam eval` as ISP+CODEC cascades."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rcam.codec import zoo
from rcam.comparators import baselines
from rcam.comparators import learned_isp
from rcam.comparators.casnet import ArtifactNet, ArtifactNetConfig, IspNet, IspNetConfig, IspNetTraining, real_jpeg
from rcam.comparators.isp_training import ComparatorConfig, export_comparator, train_comparator
from rcam.comparators.networks import bilinear_demosaic, parameter_count
from rcam.demo import sample_scene
from rcam.errors import RcamError
from rcam.measure.evaluate import run_eval
from rcam.codec.rawio import reference_render

from conftest import error_lines

# Tiny widths: a few thousand parameters each, a step in tens of milliseconds.
TINY = {
    "cameranet": {"restore_widths": [4, 6, 8, 8, 8], "enhance_widths": [4, 4, 6, 6, 6]},
    "casnet-artifacts": {"widths": [4, 6, 8, 8]},
    "casnet-isp": {"widths": [4, 6, 8, 8]},
}
PHASES = {"cameranet": {"independent": 2, "joint": 1}, "casnet-artifacts": {"artifacts": 3}, "casnet-isp": {"agnostic": 1, "aware": 2}}


@pytest.fixture(scope="module")
def artifact_net_file(tmp_path_factory):
    """A tiny untrained CAS-Net saved as weights (what casnet-isp training takes as its frozen artifact net)."""
    torch.manual_seed(3)
    return learned_isp.save_weights(ArtifactNet(ArtifactNetConfig(widths=(4, 6, 8, 8))), tmp_path_factory.mktemp("cas") / "cas.safetensors")


def tiny_config(system, dataset, run_dir, artifact_net_file, **changes) -> ComparatorConfig:
    settings = {
        "comparator": system, "dataset": str(dataset), "run_dir": str(run_dir), "architecture": TINY[system], "phases": PHASES[system],
        "batch_size": 2, "patch": 32, "log_every": 1, "checkpoint_every": 1, "qualities": [40, 90],
        "artifact_net": str(artifact_net_file), "learning_rate": 1e-3,
    }  # fmt: skip
    return ComparatorConfig(**(settings | changes))


@pytest.fixture(scope="module")
def trained(dataset, artifact_net_file, tmp_path_factory):
    """Each system trained for its tiny plan: system -> (config, checkpoint path, initial state)."""
    runs = {}
    for system in TINY:
        config = tiny_config(system, dataset, tmp_path_factory.mktemp(system), artifact_net_file)
        torch.manual_seed(0)
        initial = {k: v.clone() for k, v in learned_isp.build_model(system, config.architecture).state_dict().items()}
        torch.manual_seed(0)  # train_comparator builds its network first: the same initial weights
        runs[system] = (config, train_comparator(config), initial)
    return runs


@pytest.mark.parametrize("system", sorted(TINY))
def test_each_system_trains_its_phases_and_the_weights_move(trained, system):
    config, checkpoint, initial = trained[system]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["step"] == sum(PHASES[system].values()) and state["system"] == system
    records = [json.loads(line) for line in (checkpoint.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, state["step"] + 1))
    assert [r["phase"] for r in records] == [phase for phase, steps in PHASES[system].items() for _ in range(steps)]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    moved = [name for name, value in state["model"].items() if value.is_floating_point() and not torch.equal(value, initial[name])]
    assert len(moved) > len(initial) // 2, moved


def test_training_resumes_from_its_checkpoint(dataset, artifact_net_file, tmp_path):
    config = tiny_config("cameranet", dataset, tmp_path / "run", artifact_net_file, fresh_defects=False)
    checkpoint = train_comparator(config, stop_at=2)
    first = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert first["step"] == 2 and first["seconds"] > 0
    train_comparator(config)  # the rest of the plan: one joint step
    second = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert second["step"] == 3 and second["seconds"] > first["seconds"]
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["phase"] == "joint"
    with pytest.raises(RcamError, match="another system or architecture"):
        train_comparator(tiny_config("casnet-isp", dataset, tmp_path / "run", artifact_net_file))


def test_validation_keeps_the_best_checkpoint_across_a_resume(dataset, artifact_net_file, tmp_path):
    config = tiny_config("cameranet", dataset, tmp_path / "run", artifact_net_file, val_every=1, val_pairs=str(dataset), val_limit=1)
    train_comparator(config, stop_at=2)
    train_comparator(config)
    validations = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "val" in r]
    assert [r["step"] for r in validations] == [1, 2, 3]
    best_record = max(validations, key=lambda r: r["val"]["psnr"])
    best = torch.load(tmp_path / "run" / "best.pt", map_location="cpu", weights_only=True)
    assert best["step"] == best_record["step"] and best["best_val_psnr"] == best_record["val"]["psnr"]
    scores = [r["val"]["psnr"] for r in validations]
    assert [r["best"] for r in validations] == [score > max(scores[:i], default=-math.inf) for i, score in enumerate(scores)]


def test_isp_net_learns_through_the_frozen_artifact_net():
    """Compression-aware phase: with only the compression loss, the ISP gets gradients through CAS-Net, which stays fixed."""
    torch.manual_seed(0)
    artifact_net = ArtifactNet(ArtifactNetConfig(widths=(4, 6, 8, 8)))
    before = {k: v.clone() for k, v in artifact_net.state_dict().items()}
    isp = IspNet(IspNetConfig(widths=(4, 6, 8, 8)))
    training = IspNetTraining(isp, {"isp": 0.0, "comp": 1.0}, artifact_net)
    batch = {"x": torch.rand(2, 4, 16, 16), "target": torch.rand(2, 3, 32, 32)}
    optimizer = torch.optim.Adam(training.trainable("aware"), lr=1e-2)
    terms = training.losses(batch, "aware", np.random.default_rng(0))
    terms["loss"].backward()
    assert terms["loss"] == terms["comp"] > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in isp.unet.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in artifact_net.parameters())
    optimizer.step()
    assert all(torch.equal(value, before[k]) for k, value in artifact_net.state_dict().items())


def test_artifact_net_targets_are_real_jpeg_at_the_drawn_quality():
    clean = torch.from_numpy(sample_scene(32, 48, seed=4)).permute(2, 0, 1)[None].float() / 255
    low, high = real_jpeg(clean, torch.tensor([10.0])), real_jpeg(clean, torch.tensor([95.0]))
    expected = baselines.encode_decode("jpeg", sample_scene(32, 48, seed=4), 10).decoded
    assert torch.equal(low[0], torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
    assert (low - clean).abs().mean() > 2 * (high - clean).abs().mean()
    # CAS-Net starts as the identity and takes the quality as an input: once its last layer is not zero,
    # the same image at two qualities gives two outputs.
    net = ArtifactNet(ArtifactNetConfig(widths=(4, 6, 8, 8)))
    assert torch.equal(net(clean, torch.tensor([10.0])), clean)
    torch.nn.init.normal_(net.unet.head.weight, std=0.1)
    assert not torch.equal(net(clean, torch.tensor([10.0])), net(clean, torch.tensor([95.0])))


def test_bilinear_demosaic_keeps_samples_and_interpolates_flat_colour():
    packed = torch.rand(1, 4, 6, 8)
    rgb = bilinear_demosaic(packed)
    assert rgb.shape == (1, 3, 12, 16)
    assert torch.allclose(rgb[0, 0, 0::2, 0::2], packed[0, 0]) and torch.allclose(rgb[0, 2, 1::2, 1::2], packed[0, 3])
    assert torch.allclose(rgb[0, 1, 0::2, 1::2], packed[0, 1]) and torch.allclose(rgb[0, 1, 1::2, 0::2], packed[0, 2])
    flat = bilinear_demosaic(torch.tensor([0.2, 0.5, 0.5, 0.7]).view(1, 4, 1, 1).expand(1, 4, 5, 5))
    assert torch.allclose(flat, torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1).expand_as(flat))


@pytest.mark.parametrize("system, name", [("cameranet", "cameranet"), ("casnet-isp", "casnet")])
def test_export_load_offline_and_render_a_dng(trained, system, name, tmp_path, make_dng):
    _, checkpoint, _ = trained[system]
    path = export_comparator(checkpoint, weights_dir=tmp_path)
    assert path == tmp_path / f"{name}.safetensors"
    entry = json.loads((tmp_path / "manifest.json").read_text())["comparators"][name]
    assert entry["sha256"] == zoo.file_digest(path).hex() and entry["system"] == system
    assert entry["training"]["steps"] == sum(PHASES[system].values()) and entry["training"]["phases"] == PHASES[system]
    isp = learned_isp.load_learned_isp(name, weights_dir=tmp_path)
    assert isp.digest == entry["sha256"] and parameter_count(isp.model) == entry["parameters"]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(value, state[key]) for key, value in isp.model.state_dict().items())

    dng = make_dng("rotated.dng", 70, 90, cfa="GBRG", orientation=6)
    image = isp.render(dng)
    assert image.dtype == np.uint8 and image.shape == reference_render(dng).shape == (90, 70, 3)
    # fp16 weights load too and render nearly the same image.
    half = learned_isp.load_learned_isp(str(export_comparator(checkpoint, "half", tmp_path, half=True)))
    assert np.abs(half.render(dng).astype(int) - image.astype(int)).mean() < 1.0


def test_tiled_render_blends_to_the_whole_frame_render():
    torch.manual_seed(0)
    isp = IspNet(IspNetConfig(widths=(4, 6, 8, 8))).eval()
    planes = torch.rand(4, 40, 150) * 0.5 + 0.25
    whole = learned_isp.render_planes(isp, planes)
    tiled = learned_isp.render_planes(isp, planes, tile=64, overlap=32)
    assert tiled.shape == whole.shape == (3, 80, 300)
    assert (tiled - whole).abs().mean() < 0.01


def test_missing_or_wrong_weights_are_clear_errors(tmp_path, artifact_net_file):
    with pytest.raises(RcamError, match="no weights for comparator 'cameranet'.*rcam train-comparator configs/cameranet.json"):
        learned_isp.load_learned_isp("cameranet", weights_dir=tmp_path)
    with pytest.raises(RcamError, match="not an ISP"):
        learned_isp.load_learned_isp(str(artifact_net_file))
    (tmp_path / "junk.safetensors").write_bytes(b"not weights")
    with pytest.raises(RcamError, match="not a comparator weights file"):
        learned_isp.load_learned_isp(str(tmp_path / "junk.safetensors"))


def test_cascade_names():
    cascade = baselines.get_baseline("CameraNet+JXL")
    assert (cascade.name, cascade.isp, cascade.label) == ("cameranet+jpegxl", "cameranet", "CameraNet + JPEG XL")
    assert cascade.qualities == baselines.BASELINES["jpegxl"].qualities and cascade.settings["isp"] == "cameranet"
    assert baselines.get_baseline("jxl").name == "jpegxl" and baselines.get_baseline("jpeg").isp is None
    for bad in ("rawtherapee+jpeg", "cameranet+gif", "cameranet+"):
        with pytest.raises(RcamError, match="unknown baseline"):
            baselines.get_baseline(bad)
    assert set(baselines.LEARNED_ISPS) == set(learned_isp.ISP_SYSTEMS) == set(learned_isp.TRAINING_HINT)
    names = baselines.baseline_names()
    assert {"cameranet+jpeg", "cameranet+webp", "cameranet+jpegxl", "cameranet+avif", "casnet+jpeg", "casnet+avif"} <= set(names)


def test_eval_help_lists_every_baseline(run):
    status, out, _ = run("eval", "--help")
    text = " ".join(out.split())
    assert status == 0
    for name in baselines.baseline_names():
        assert f"{name}," in text or f"{name} " in text, name


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval_photos")
    Image.fromarray(sample_scene(64, 96, seed=5)).save(folder / "a.png")
    Image.fromarray(sample_scene(72, 80, seed=6)).save(folder / "b.png")
    return folder


def test_eval_cli_with_learned_isp_cascades(trained, photos, tiny_model_path, tmp_path, monkeypatch, run):
    for system in ("cameranet", "casnet-isp"):
        export_comparator(trained[system][1], weights_dir=tmp_path / "weights")
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path / "weights")  # where the learned ISPs are looked up
    out = tmp_path / "out"
    status, stdout, stderr = run(
        "eval", photos, "--protocol", "S", "--lambdas", "0.01", "--baselines", "jpeg,cameranet+jpeg,casnet+jxl",
        "--no-speed", "--model", tiny_model_path, "--device", "cpu", "--out-dir", out,
    )  # fmt: skip
    assert status == 0, stderr
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["baselines"] == ["jpeg", "cameranet+jpeg", "casnet+jpegxl"]
    assert set(results["setup"]["learned_isps"]) == {"cameranet", "casnet"}
    for name in ("cameranet+jpeg", "casnet+jpegxl"):
        rows = [row for row in results["points"] if row["codec"] == name]
        assert len(rows) == 2 * len(baselines.get_baseline(name).qualities)
        assert all(row["bpp"] > 0 and math.isfinite(row["psnr"]) for row in rows)
        assert name in results["curves"] and name in results["bd"]["averaged"]
        assert name in stdout
        assert name in (out / "points.csv").read_text() and name in (out / "bd.csv").read_text()
    # The learned ISP's render is what the codec compresses, not LibRaw's: other sizes at the same quality.
    jpeg = {(r["image"], r["param"]): r["num_bytes"] for r in results["points"] if r["codec"] == "jpeg"}
    cascade = {(r["image"], r["param"]): r["num_bytes"] for r in results["points"] if r["codec"] == "cameranet+jpeg"}
    assert jpeg.keys() == cascade.keys() and jpeg != cascade
    assert (out / "rd.png").stat().st_size > 1000


def test_eval_without_learned_isp_weights_fails_early(photos, tmp_path, monkeypatch, run):
    monkeypatch.setattr(zoo, "WEIGHTS_DIR", tmp_path)
    status, _, stderr = run("eval", photos, "--protocol", "S", "--baselines", "jpeg,casnet+webp", "--no-speed", "--out-dir", tmp_path / "out")
    assert status == 2
    (line,) = error_lines(stderr)
    assert "casnet" in line and "train-comparator" in line
    assert not (tmp_path / "out").exists()


def test_run_eval_needs_the_named_isp(photos, tmp_path):
    with pytest.raises(RcamError, match="needs the learned ISP 'cameranet'"):
        run_eval(photos, "S", [0.01], ["cameranet+jpeg"], tmp_path / "out", lambda path, lam: (0, None), progress=False, speed=False)


def test_cli_trains_and_exports_a_comparator(dataset, artifact_net_file, tmp_path, run):
    config = tiny_config("casnet-artifacts", dataset, tmp_path / "run", artifact_net_file, fresh_defects=False)
    config_file = tmp_path / "casnet-artifacts.json"
    config_file.write_text(json.dumps(config.__dict__))
    status, out, err = run("train-comparator", config_file, "--steps", "2")
    assert status == 0, err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2
    status, out, err = run("train-comparator", config_file)
    assert status == 0, err
    status, out, err = run("export-comparator", tmp_path / "run" / "last.pt", "--weights-dir", tmp_path / "weights")
    assert status == 0, err
    assert (tmp_path / "weights" / "casnet-artifacts.safetensors").is_file()
    assert "casnet-artifacts" in json.loads((tmp_path / "weights" / "manifest.json").read_text())["comparators"]


def test_config_errors(dataset, artifact_net_file, tmp_path):
    with pytest.raises(RcamError, match="trains in phases independent, joint"):
        train_comparator(tiny_config("cameranet", dataset, tmp_path / "a", artifact_net_file, phases={"agnostic": 2}))
    with pytest.raises(RcamError, match="unknown comparator"):
        train_comparator(tiny_config("cameranet", dataset, tmp_path / "b", artifact_net_file, comparator="pynet"))
    with pytest.raises(RcamError, match="qualities"):
        train_comparator(tiny_config("casnet-artifacts", dataset, tmp_path / "c", artifact_net_file, qualities=[90, 40]))
    with pytest.raises(RcamError, match="must be a casnet-artifacts network"):
        isp_weights = learned_isp.save_weights(IspNet(IspNetConfig(widths=(4, 6, 8, 8))), tmp_path / "isp.safetensors")
        train_comparator(tiny_config("casnet-isp", dataset, tmp_path / "d", artifact_net_file, artifact_net=str(isp_weights)))
    (tmp_path / "bad.json").write_text('{"comparator": "cameranet", "stage": "rbn"}')
    with pytest.raises(RcamError, match="not a valid comparator training config"):
        ComparatorConfig.load(tmp_path / "bad.json")
