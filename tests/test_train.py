"""Training resumes from its checkpoint, exports to loadable weights, and the demo job runs end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import imagecodecs
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES as TINY
from PIL import Image
from safetensors.torch import save_file

from rcam.codec.engine import decode_bytes, encode_file
from rcam.codec.models import CONFIGS, build_model
from rcam.codec.output import quantize
from rcam.codec.rawio import network_input, read_raw, reference_render
from rcam.codec.tiling import thumbnail
from rcam.codec.zoo import (
    checkpoint_weights,
    codec_from_model,
    export_checkpoint,
    file_digest,
    load_codec,
    read_manifest,
    read_weights,
    save_checkpoint,
    write_manifest_entry,
)
from rcam.demo import run_demo
from rcam.errors import RcamError
from rcam.measure.metrics import psnr
from rcam.training.synth import DefectParams
from rcam.training.train import (
    TrainConfig,
    fresh_crop,
    load_dataset,
    load_starting_weights,
    periodic_error,
    rd_loss,
    sample_batch,
    train,
    validation_cost,
)


def test_training_resumes_and_exports(dataset, tmp_path):
    config = TrainConfig(
        dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=TINY, steps=3, batch_size=2,
        patch=32, checkpoint_every=2, log_every=1, threads=1, val_every=5, val_pairs=str(dataset),
    )  # fmt: skip
    images = load_dataset(dataset, TINY["thumbnail"])
    assert len(images) == 2
    checkpoint = train(config, images)
    first = torch.load(checkpoint, weights_only=True)
    assert first["step"] == 3
    # Running the same config with more steps continues from step 3, not from scratch.
    train(replace(config, steps=5), images)
    second = torch.load(checkpoint, weights_only=True)
    assert second["step"] == 5
    changed = any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"] if first["model"][k].is_floating_point())
    assert changed
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    training_records = [r for r in log if "val" not in r]
    assert [r["step"] for r in training_records] == [1, 2, 3, 4, 5]
    assert all(np.isfinite(r["loss"]) and r["bpp"] > 0 for r in training_records)
    # Validation ran once, at step 5, with the real codec on both val pairs.
    (validation,) = [r for r in log if "val" in r]
    assert validation["step"] == 5 and validation["val"]["val_pairs"]["images"] == 2
    # The logged figures are the real codec's on the step-5 weights (last.pt), recomputed here from the files.
    model = build_model(config.model_config())
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    step_five = codec_from_model(model.eval())
    bpps, psnrs = [], []
    for entry in map(json.loads, dataset.read_text().splitlines()):
        raw, target = dataset.parent / entry["degraded"], np.asarray(Image.open(dataset.parent / entry["target"]).convert("RGB"))
        data = encode_file(step_five, raw, config.val_lambda).data
        bpps.append(8 * len(data) / (target.shape[0] * target.shape[1]))
        psnrs.append(psnr(quantize(decode_bytes(step_five, data), 8), target))
    assert validation["val"]["val_pairs"]["bpp"] == pytest.approx(np.mean(bpps))
    assert validation["val"]["val_pairs"]["psnr"] == pytest.approx(np.mean(psnrs))
    assert validation["best"] and validation["val_cost"] == pytest.approx(validation_cost(validation["val"], config.val_lambda))
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["step"] == 5

    weights_dir = tmp_path / "weights"
    path = export_checkpoint(checkpoint, "tiny", weights_dir)
    entry = read_manifest(weights_dir)["models"]["tiny"]
    assert entry["sha256"] == file_digest(path).hex()
    assert entry["training"]["steps"] == 5 and entry["config"]["channels"] == 16
    codec = load_codec("tiny", weights_dir=weights_dir)
    raw = dataset.parent / json.loads(dataset.read_text().splitlines()[0])["degraded"]
    decoded = decode_bytes(codec, encode_file(codec, raw, 0.01).data)
    assert decoded.shape[2] == 3 and np.isfinite(decoded).all()

    # A replaced weights file no longer matches the manifest: refused with a clear error.
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(RcamError, match="digest does not match"):
        load_codec("tiny", weights_dir=weights_dir)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(RcamError, match="not in"):
        load_codec("no-such-model", weights_dir=tmp_path)


def test_periodic_error_measures_a_lattice_pattern_and_little_of_random_error():
    generator = torch.Generator().manual_seed(0)
    height = width = 128
    noise = 0.05 * torch.randn(2, 3, height, width, generator=generator)
    # A 4-pixel checker of amplitude 0.02 on top of the noise and a constant offset (the offset is not periodic).
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    checker = 0.02 * torch.where(((rows // 2) + (cols // 2)) % 2 == 0, 1.0, -1.0)
    noise_only = periodic_error(noise + 0.1, [4])
    with_pattern = periodic_error(noise + 0.1 + checker, [4])
    # The pattern's power is 0.02² = 4e-4; the noise leaves about 0.05² · 16 / 128² = 2.4e-6.
    assert torch.all(noise_only < 1e-5)
    assert torch.allclose(with_pattern, torch.full((2,), 4e-4), rtol=0.1)
    # A 4-pixel checker averages out at the 2-pixel period and is whole again at 8 (it repeats there too).
    assert torch.all(periodic_error(checker.expand(2, 3, -1, -1), [2]) < 1e-12)
    assert torch.allclose(periodic_error(checker.expand(2, 3, -1, -1), [8]), torch.full((2,), 4e-4))
    with pytest.raises(RcamError, match="does not divide"):
        periodic_error(noise, [3])


def test_rd_loss_charges_the_periodic_error_only_when_weighted():
    target = torch.zeros(2, 3, 16, 16)
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    output = {"rgb": (0.01 * ((rows + cols) % 2 * 2 - 1)).expand(2, 3, -1, -1), "likelihoods": {"y": torch.ones(2, 4)}}
    lam = torch.full((2,), 0.01)
    plain = rd_loss(output, target, lam)
    weighted = rd_loss(output, target, lam, periodic_weight=10.0, periods=[2])
    assert "periodic255" not in plain and float(weighted["periodic255"]) == pytest.approx(0.01**2 * 255**2, rel=1e-4)
    # Every bit of this error is periodic: the term adds 10 times the image term.
    assert float(weighted["loss"]) == pytest.approx(11 * float(plain["loss"]), rel=1e-4)


def test_validation_cost_prefers_fewer_bits_and_less_error():
    base = {"val_pairs": {"bpp": 0.5, "psnr": 25.0, "images": 18}, "val_raw": {"bpp": 0.4, "psnr": 30.0, "images": 2}}
    sharper = base | {"val_raw": {"bpp": 0.4, "psnr": 31.0, "images": 2}}
    cheaper = base | {"val_pairs": {"bpp": 0.45, "psnr": 25.0, "images": 18}}
    assert validation_cost(sharper, 0.01) < validation_cost(base, 0.01)
    assert validation_cost(cheaper, 0.01) < validation_cost(base, 0.01)
    # bpp + λ·255²·10^(-PSNR/10), averaged over the two sets.
    expected = (0.5 + 0.01 * 255**2 * 10**-2.5 + 0.4 + 0.01 * 255**2 * 10**-3.0) / 2
    assert validation_cost(base, 0.01) == pytest.approx(expected)


def test_best_checkpoint_is_kept_across_worse_validations_and_resumes(dataset, tmp_path, monkeypatch):
    psnr_by_step = {2: 20.0, 4: 18.0, 6: 19.0, 8: 24.0}  # step 4 and 6 are worse than step 2, step 8 best
    monkeypatch.setattr("rcam.training.train.validate", lambda model, config: {"val_pairs": {"bpp": 0.5, "psnr": psnr_by_step[seen.pop(0)], "images": 2}})
    seen = [2, 4]
    config = TrainConfig(
        dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=TINY, steps=4, batch_size=2,
        patch=32, checkpoint_every=2, log_every=1, threads=1, val_every=2, val_pairs=str(dataset),
    )  # fmt: skip
    images = load_dataset(dataset, TINY["thumbnail"])
    train(config, images)
    best = tmp_path / "run" / "best.pt"
    assert torch.load(best, weights_only=True)["step"] == 2
    seen.extend([6, 8])
    train(replace(config, steps=6), images)  # resumed: step 6 is still worse than the best from before the resume
    assert torch.load(best, weights_only=True)["step"] == 2
    train(replace(config, steps=8), images)
    assert torch.load(best, weights_only=True)["step"] == 8
    marks = [(r["step"], r["best"]) for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "val" in r]
    assert marks == [(2, True), (4, False), (6, False), (8, True)]


def test_validation_without_val_data_is_refused_before_training(dataset, tmp_path):
    config = TrainConfig(dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=TINY, steps=2, val_every=1,
                         val_pairs=str(tmp_path / "missing.jsonl"), val_raw=str(tmp_path / "no-dir"))  # fmt: skip
    with pytest.raises(RcamError, match="neither val_pairs nor val_raw"):
        train(config, load_dataset(dataset, TINY["thumbnail"]))
    assert not (tmp_path / "run" / "last.pt").exists()


def test_weights_files_that_are_not_rcam_weights_are_clear_errors(tmp_path):
    not_safetensors = tmp_path / "garbage.safetensors"
    not_safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(RcamError, match="not a valid rcam weights file"):
        load_codec(str(not_safetensors))
    with pytest.raises(RcamError, match="not a valid rcam weights file"):
        read_weights(not_safetensors)
    # A valid safetensors file without rcam's config metadata (e.g. some other project's weights).
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(RcamError, match="no usable model config"):
        load_codec(str(foreign))


def test_demo_reports_bpp_and_psnr(tiny_codec, tmp_path):
    result = run_demo(tiny_codec, tmp_path)
    data = (tmp_path / "sample_degraded.rcb").read_bytes()
    assert result["bytes"] == len(data)
    # The figures are those of the files it wrote: the PNG against the reference render of its input.
    decoded = imagecodecs.png_decode((tmp_path / "sample_degraded.png").read_bytes())
    reference = reference_render(result["input"])
    assert result["size"] == f"{reference.shape[1]}x{reference.shape[0]}" and decoded.shape == reference.shape
    assert result["bpp"] == pytest.approx(8 * len(data) / (reference.shape[0] * reference.shape[1]))
    assert result["psnr"] == pytest.approx(psnr(decoded, reference))
    target = np.asarray(Image.open(tmp_path / "sample_target.png").convert("RGB"))
    assert result["psnr_clean"] == pytest.approx(psnr(decoded, target))


def test_clean_fraction_draws_patches_from_the_clean_twin(dataset):
    images = load_dataset(dataset, TINY["thumbnail"], with_clean=True)
    image = images[0]
    assert image.clean_planes.shape == image.planes.shape
    # The degraded RAW carries vignetting, shading and noise: its input differs from the clean twin's.
    assert not torch.equal(image.clean_planes, image.planes)
    whole = image.planes.shape[1]  # patch as tall as the image: offsets along rows are fixed at 0
    for fraction, source in ((0.0, image.planes), (1.0, image.clean_planes)):
        batch = sample_batch(images[:1], 3, whole, True, np.random.default_rng(0), clean_fraction=fraction)
        width = batch["x"].shape[-1]
        # Each patch must be a crop of the expected source, wherever along the columns it was taken.
        for patch in batch["x"]:
            crops = [source[:, :, left : left + width].float() for left in range(source.shape[2] - width + 1)]
            assert any(torch.equal(patch, crop) for crop in crops)
    with pytest.raises(RcamError, match="clean twins"):
        sample_batch(load_dataset(dataset, TINY["thumbnail"])[:1], 2, 16, True, np.random.default_rng(0), clean_fraction=1.0)


def test_fresh_defects_reproduce_the_synthesised_degradation_and_vary_per_patch(dataset, tmp_path):
    images = load_dataset(dataset, TINY["thumbnail"], fresh_defects=True)
    frame = images[0].clean_frame
    assert images[0].planes is None and frame is not None
    entry = json.loads(dataset.read_text().splitlines()[0])
    degraded = torch.from_numpy(network_input(read_raw(dataset.parent / entry["degraded"])))
    clean = torch.from_numpy(network_input(read_raw(dataset.parent / entry["clean"])))
    _, height, width = degraded.shape
    rng = np.random.default_rng(0)
    # Without defects: the clean twin's network input (a tiny frame is sampled at stride 1), to float16 storage.
    x, thumb, _ = fresh_crop(frame, 0, 0, max(height, width), TINY["thumbnail"], None, rng)
    assert torch.allclose(x, clean, atol=2e-3) and torch.allclose(thumb, thumbnail(clean, TINY["thumbnail"]), atol=2e-3)
    # With the pair's own defects: the degraded DNG's input up to the noise draw, far closer than the clean twin.
    x, thumb, _ = fresh_crop(frame, 0, 0, max(height, width), TINY["thumbnail"], DefectParams(**entry["defects"]), rng)
    block_means = lambda planes: torch.nn.functional.avg_pool2d(planes[None], 8)[0]  # noise averages out
    degraded_thumb = block_means(thumbnail(degraded, TINY["thumbnail"]))
    clean_thumb = block_means(thumbnail(clean, TINY["thumbnail"]))
    assert (block_means(thumb) - degraded_thumb).abs().mean() < 0.3 * (clean_thumb - degraded_thumb).abs().mean()
    assert (block_means(x) - block_means(degraded)).abs().mean() < 0.3 * (block_means(clean) - block_means(degraded)).abs().mean()
    # A batch draws new defects for every patch: the same crop twice gives two inputs. A patch as large as
    # the frame can only be taken at (0, 0), so both patches are the same crop.
    whole = max(height, width)
    batch = sample_batch([images[0]], 2, whole, True, np.random.default_rng(1), thumbnail_size=TINY["thumbnail"])
    assert torch.equal(batch["coords"][0], batch["coords"][1])
    assert not torch.equal(batch["x"][0], batch["x"][1])
    assert not torch.equal(batch["thumbnail"][0], batch["thumbnail"][1])
    with pytest.raises(RcamError, match="thumbnail size"):
        sample_batch(images, 1, 16, True, np.random.default_rng(0))
    # And training runs on it.
    config = TrainConfig(
        dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=TINY, steps=2, batch_size=2, patch=32,
        threads=1, val_every=0, fresh_defects=True, clean_fraction=0.5,
    )  # fmt: skip
    assert torch.load(train(config), weights_only=True)["step"] == 2


def test_fine_tuning_counts_the_steps_of_its_starting_weights(dataset, tmp_path):
    images = load_dataset(dataset, TINY["thumbnail"])
    common = dict(dataset=str(dataset), model_overrides=TINY, batch_size=2, patch=32, threads=1, val_every=0)
    first = train(TrainConfig(run_dir=str(tmp_path / "first"), steps=3, **common), images)
    second = train(TrainConfig(run_dir=str(tmp_path / "second"), steps=2, init_from=str(first), **common), images)
    path = export_checkpoint(second, "tuned", tmp_path / "weights")
    training = read_manifest(path.parent)["models"]["tuned"]["training"]
    assert (training["steps"], training["earlier_steps"], training["total_steps"]) == (2, 3, 5)


def test_fine_tuning_from_shipped_weights_without_the_prior_inputs(tmp_path):
    # Weights made before CADR saw the global prior (the shipped rcam-small v1 is such a file).
    older = build_model(replace(CONFIGS["small"], cadr_prior=False, **TINY))
    path = save_checkpoint(older, tmp_path / "older.safetensors", total_steps=7)
    newer = build_model(replace(CONFIGS["small"], **TINY))
    steps, lacking = load_starting_weights(newer, path)
    assert steps == 7
    assert lacking and all(key.startswith(("cadr.prior_modulation.", "global_prior.layout_head.")) for key in lacking)
    generator = torch.Generator().manual_seed(0)
    x, coords, thumb = torch.rand(2, 4, 32, 32, generator=generator), torch.rand(2, 2, 32, 32, generator=generator), torch.rand(2, 4, 32, 32, generator=generator)
    with torch.no_grad():
        # The new inputs start at zero: the fine-tuned model starts out exactly as the weights it came from.
        assert torch.allclose(newer.analysis(x, coords, thumb), older.analysis(x, coords, thumb), atol=1e-6)
    # Weights of another shape or with keys the model lacks are refused, not half-loaded.
    wider = save_checkpoint(build_model(replace(CONFIGS["small"], **(TINY | {"channels": 24}))), tmp_path / "wider.safetensors")
    with pytest.raises(RcamError, match="do not fit"):
        load_starting_weights(build_model(replace(CONFIGS["small"], **TINY)), wider)
    no_cadr = save_checkpoint(build_model(replace(CONFIGS["small"], cadr=False, **TINY)), tmp_path / "no_cadr.safetensors")
    with pytest.raises(RcamError, match="do not fit"):
        load_starting_weights(build_model(replace(CONFIGS["small"], **TINY)), no_cadr)


def test_steps_of_older_weights_come_from_the_manifest(tmp_path):
    model = build_model(replace(CONFIGS["small"], cadr_prior=False, **TINY))
    path = save_checkpoint(model, tmp_path / "v1.safetensors")  # no steps in the file itself
    write_manifest_entry("v1", {"file": path.name, "sha256": file_digest(path).hex(), "training": {"steps": 12000}}, tmp_path)
    tensors, steps = read_weights(path)
    assert steps == 12000 and "coding.z_table" not in tensors


def test_saving_the_same_weights_again_gives_the_same_bytes(tmp_path):
    # safetensors writes several metadata keys in a random order; the digest in .rcb files must not move.
    model = build_model(replace(CONFIGS["small"], **TINY))
    files = [save_checkpoint(model, tmp_path / f"w{i}.safetensors", total_steps=42).read_bytes() for i in range(8)]
    assert all(data == files[0] for data in files)
    tensors, steps = read_weights(tmp_path / "w0.safetensors")
    assert steps == 42 and load_codec(str(tmp_path / "w0.safetensors")).model.config == model.config


def test_weights_files_with_the_older_two_key_metadata_still_load(tmp_path):
    model = build_model(replace(CONFIGS["small"], **TINY))
    tensors, _ = read_weights(save_checkpoint(model, tmp_path / "new.safetensors"))
    older = tmp_path / "older.safetensors"
    save_file(tensors, str(older), metadata={"config": json.dumps(model.config.to_dict()), "total_steps": "9"})
    assert read_weights(older)[1] == 9 and load_codec(str(older)).model.config == model.config


def test_export_drops_figures_measured_for_earlier_weights(dataset, tmp_path):
    images = load_dataset(dataset, TINY["thumbnail"])
    common = dict(dataset=str(dataset), model_overrides=TINY, batch_size=2, patch=32, threads=1, val_every=0)
    checkpoint = train(TrainConfig(run_dir=str(tmp_path / "run"), steps=1, **common), images)
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()
    write_manifest_entry("tiny", {"file": "old.safetensors", "evaluation": {"psnr": 99.0}}, weights_dir)
    write_manifest_entry("other", {"file": "other.safetensors"}, weights_dir)
    export_checkpoint(checkpoint, "tiny", weights_dir)
    models = read_manifest(weights_dir)["models"]
    assert "evaluation" not in models["tiny"] and models["tiny"]["file"] == "tiny.safetensors"
    assert models["other"] == {"file": "other.safetensors"}  # other entries are left alone
    # Updating (not replacing) keeps what the entry had.
    write_manifest_entry("tiny", {"evaluation": {"psnr": 30.0}}, weights_dir)
    assert read_manifest(weights_dir)["models"]["tiny"]["file"] == "tiny.safetensors"


def test_moving_average_of_weights_is_validated_kept_across_resumes_and_exported(dataset, tmp_path, monkeypatch):
    validated = []
    monkeypatch.setattr(
        "rcam.training.train.validate",
        lambda model, config: validated.append({k: v.clone() for k, v in model.state_dict().items()}) or {"val_pairs": {"bpp": 0.5, "psnr": 20.0, "images": 2}},
    )
    config = TrainConfig(
        dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=TINY, steps=1, batch_size=2,
        patch=32, checkpoint_every=1, log_every=1, threads=1, val_every=2, val_pairs=str(dataset), ema_decay=0.25,
    )  # fmt: skip
    images = load_dataset(dataset, TINY["thumbnail"])
    first = torch.load(train(config, images), weights_only=True)
    # The average starts as a copy of the first weights.
    assert first["average_updates"] == 1
    assert all(torch.equal(first["average"][k], first["model"][k]) for k in first["model"])
    second = torch.load(train(replace(config, steps=2), images), weights_only=True)  # resumed
    assert second["average_updates"] == 2
    floats = [k for k in second["model"] if second["model"][k].is_floating_point() and not torch.equal(first["model"][k], second["model"][k])]
    assert floats  # the weights moved, so the average is a real mix of the two steps
    for key in floats:
        expected = 0.25 * first["average"][key] + 0.75 * second["model"][key]
        torch.testing.assert_close(second["average"][key], expected)
    # Validation scored the average, and best.pt keeps exactly what was scored.
    (scored,) = validated
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert all(torch.equal(scored[k], second["average"][k]) and torch.equal(checkpoint_weights(best)[k], scored[k]) for k in floats)
    # Exporting the last checkpoint ships the average, not the last step's weights.
    tensors, _ = read_weights(export_checkpoint(tmp_path / "run" / "last.pt", "tiny", tmp_path / "weights"))
    assert all(torch.equal(tensors[k], second["average"][k]) for k in floats)
    with pytest.raises(RcamError, match="ema_decay"):
        train(replace(config, ema_decay=1.0, run_dir=str(tmp_path / "other")), images)
    assert not (tmp_path / "other").exists()


def test_a_skeleton_model_fine_tunes_from_end_to_end_weights_with_both_looks(dataset, tmp_path):
    # The stage-8 recipe in small: start from weights whose decoder ends in an RGB tail, leave the tail out,
    # train both looks (faithful patches read the degraded DNG and target its own render) with the plane loss.
    end_to_end = save_checkpoint(build_model(replace(CONFIGS["small"], **TINY)), tmp_path / "e2e.safetensors", total_steps=4)
    config = TrainConfig(
        dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=TINY | {"skeleton": True}, steps=2, batch_size=4,
        patch=32, threads=1, val_every=0, init_from=str(end_to_end), init_exclude=["tail."], faithful_fraction=0.5,
        clean_fraction=0.3, plane_weight=1.0, seed=3,
    )  # fmt: skip
    images = load_dataset(dataset, TINY["thumbnail"], with_clean=True, faithful=True)
    assert all(image.faithful_target is not None and image.faithful_target.shape == image.target.shape for image in images)
    # The degraded file's own render differs from the clean twin's: the looks have different targets.
    assert not torch.equal(images[0].faithful_target, images[0].target)
    batch = sample_batch(images, 64, 32, True, np.random.default_rng(0), 0.3, TINY["thumbnail"], 0.5)
    assert 10 < int(batch["look"].sum()) < 54 and batch["cam_to_srgb"].shape == (64, 3, 3) and bool((batch["white"] > 0).all())
    checkpoint = train(config, images)
    state = torch.load(checkpoint, weights_only=True)
    assert state["step"] == 2 and "plane_head.weight" in state["model"] and "tail.weight" not in state["model"]
    # The correction head started at zero and has moved.
    assert float(state["model"]["correction.weight"].abs().sum()) > 0
    codec = load_codec(export_checkpoint(checkpoint, "tiny-skeleton", tmp_path / "weights"))
    raw = dataset.parent / json.loads(dataset.read_text().splitlines()[0])["degraded"]
    for look in ("clean", "faithful"):
        decoded = decode_bytes(codec, encode_file(codec, raw, 0.01, look=look).data)
        assert decoded.shape[2] == 3 and np.isfinite(decoded).all()


def test_fresh_defects_and_vignetting_examples_never_draw_the_held_out_families(dataset, monkeypatch):
    from rcam.training import train as train_module
    from rcam.training.synth import HELD_OUT_FAMILIES

    assert TrainConfig(dataset="d", run_dir="r").held_out_families == list(HELD_OUT_FAMILIES)
    images = load_dataset(dataset, TINY["thumbnail"], fresh_defects=True)
    drawn = []
    real_sample_defects = train_module.sample_defects

    def recording(*args, **kwargs):
        drawn.append(real_sample_defects(*args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(train_module, "sample_defects", recording)
    sample_batch(images, 40, 16, True, np.random.default_rng(0), thumbnail_size=TINY["thumbnail"])
    # Falloff-free examples have no falloff whatever the law drawn (log gain 0), noise and shading kept.
    _, log_gains = train_module.vignetting_examples([image.clean_frame for image in images], 30, TINY["thumbnail"],
                                                    np.random.default_rng(1), clean_fraction=1.0)  # fmt: skip
    assert torch.all(log_gains == 0)
    assert len(drawn) == 70 and {d.vignette_law for d in drawn} == {"rational", "cos4"}
    assert all(d.column_banding == 0 and not set(HELD_OUT_FAMILIES) & set(d.families) for d in drawn)
    # With nothing held out (a config's held_out_families = []), they do occur.
    drawn.clear()
    sample_batch(images, 40, 16, True, np.random.default_rng(0), thumbnail_size=TINY["thumbnail"], held_out=())
    assert any(d.vignette_law == "poly" for d in drawn) and any(d.column_banding > 0 for d in drawn)


def test_an_end_to_end_model_with_one_tail_per_look_starts_both_looks_from_single_look_weights(tmp_path):
    # The skeleton ablation (issue 17): the end-to-end decoder, trained on the skeleton model's data and budget.
    single = build_model(replace(CONFIGS["small"], **TINY))
    path = save_checkpoint(single, tmp_path / "single.safetensors", total_steps=5)
    per_look = build_model(replace(CONFIGS["small"], look_tails=True, **TINY))
    assert per_look.config.looks == ("clean", "faithful")
    steps, lacking = load_starting_weights(per_look, path)
    assert steps == 5 and lacking == []
    y_hat = torch.rand(2, TINY["latent_channels"], 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = single.synthesis(y_hat)
        for look in (0, 1):
            assert torch.equal(per_look.synthesis(y_hat, look=torch.full((2,), look)), expected)
        # The looks are separate outputs: changing one group leaves the other look's image as it was.
        per_look.tail.weight[12:] += 0.1
        assert torch.equal(per_look.synthesis(y_hat, look=torch.zeros(2, dtype=torch.long)), expected)
        assert not torch.equal(per_look.synthesis(y_hat, look=torch.ones(2, dtype=torch.long)), expected)


def test_flat_fraction_takes_patches_where_the_target_is_flattest(dataset):
    images = load_dataset(dataset, CONFIGS["small"].thumbnail, with_clean=True)
    rng = np.random.default_rng(0)

    def mean_spread(flat_fraction: float) -> float:
        batch = sample_batch(images, 16, 32, True, rng, thumbnail_size=CONFIGS["small"].thumbnail, flat_fraction=flat_fraction)
        return float(batch["target"].var(dim=(1, 2, 3)).mean())

    # The flattest of 8 places varies less than a random place, on average over many patches.
    assert mean_spread(1.0) < 0.7 * mean_spread(0.0)


def test_patches_come_only_from_frames_that_hold_a_whole_one(dataset):
    images = load_dataset(dataset, TINY["thumbnail"])
    small = replace(images[0], target=images[0].target[:, :32, :32], planes=images[0].planes[:, :16, :16])
    # A patch of 24 packed pixels: the 16 x 16 frame cannot give one, so every patch comes whole from the others.
    batch = sample_batch([small] + images, 16, 24, True, np.random.default_rng(0))
    assert batch["x"].shape == (16, 4, 24, 24) and batch["target"].shape == (16, 3, 48, 48)
    # With only frames too small, each gives what it has (a tiny set of one size still trains).
    alone = sample_batch([small], 2, 24, True, np.random.default_rng(0))
    assert alone["x"].shape == (2, 4, 16, 16)


def test_a_context_model_new_to_the_starting_weights_is_pretrained_for_rate_and_codes_files(dataset, tmp_path):
    from conftest import save_tiny_model

    from rcam.training.train import context_rate, frozen_latents, sample_lambdas

    start = save_tiny_model(tmp_path / "start.safetensors")  # boosted gains: real symbols to code
    overrides = TINY | {"context_slices": 4, "context_width": 8}
    config = TrainConfig(
        dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=overrides, steps=0, batch_size=2, patch=32,
        threads=1, val_every=0, init_from=str(start), context_pretrain_steps=60, context_batch=4, context_examples=32,
        context_learning_rate=3e-3, log_every=10,
    )  # fmt: skip
    images = load_dataset(dataset, TINY["thumbnail"])
    fresh = build_model(replace(CONFIGS["small"], **overrides))
    steps, lacking = load_starting_weights(fresh, start)
    assert lacking and all(key.startswith("channel_context.") for key in lacking)
    checkpoint = train(config, images)
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["context_pretrain_step"] for r in records if "context_pretrain_step" in r] == [10, 20, 30, 40, 50, 60]
    trained = build_model(replace(CONFIGS["small"], **overrides))
    trained.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    # On patches it never saw (another seed), the pre-trained context codes the starting encoder's latents in fewer bits.
    batch = sample_batch(images, 16, 32, True, np.random.default_rng(99), 0.0, TINY["thumbnail"])
    lam = sample_lambdas(16, 0.0025, 0.1, np.random.default_rng(99))
    y = frozen_latents(fresh, batch)
    assert torch.equal(y, frozen_latents(trained, batch))  # pre-training left the encoder alone

    def rate(model) -> float:
        torch.manual_seed(0)  # the same additive noise for both
        with torch.no_grad():
            return float(context_rate(model, y, lam))

    assert rate(trained) < 0.97 * rate(fresh)
    hyper = ("hyper_analysis.", "hyper_synthesis.", "entropy_bottleneck.")
    same = lambda a, b: all(torch.equal(value, b.state_dict()[name]) for name, value in a.state_dict().items() if name.startswith(hyper))  # noqa: E731
    assert same(trained, fresh)  # by default only the context model moves
    with_hyper = train(replace(config, run_dir=str(tmp_path / "hyper"), context_pretrain_steps=10, context_pretrain_hyper=True), images)
    moved = build_model(replace(CONFIGS["small"], **overrides))
    moved.load_state_dict(torch.load(with_hyper, weights_only=True)["model"])
    assert not same(moved, fresh)
    codec = load_codec(export_checkpoint(checkpoint, "tiny-context", tmp_path / "weights"))
    assert codec.coder.context is not None and len(codec.coder.context.nets) == 4
    raw = dataset.parent / json.loads(dataset.read_text().splitlines()[0])["degraded"]
    encoded = encode_file(codec, raw, 0.01)
    decoded = decode_bytes(codec, encoded.data)
    assert decoded.shape[2] == 3 and np.isfinite(decoded).all()
    # A checkerboard context added to those weights is pre-trained in turn (only its networks were lacking),
    # and files code and decode through it.
    spatial_overrides = overrides | {"context_spatial": 8}
    _, lacking = load_starting_weights(build_model(replace(CONFIGS["small"], **spatial_overrides)), checkpoint)
    assert lacking and all(key.startswith("channel_context.spatial_nets.") for key in lacking)
    spatial = train(replace(config, run_dir=str(tmp_path / "spatial"), init_from=str(checkpoint), model_overrides=spatial_overrides), images)
    spatial_codec = load_codec(export_checkpoint(spatial, "tiny-spatial", tmp_path / "weights"))
    assert spatial_codec.coder.context.spatial
    assert any(net[-1].weight.abs().sum() > 0 for net in spatial_codec.model.channel_context.spatial_nets)
    spatial_encoded = encode_file(spatial_codec, raw, 0.01)
    assert np.isfinite(decode_bytes(spatial_codec, spatial_encoded.data)).all()
