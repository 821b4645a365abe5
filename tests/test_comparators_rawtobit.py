"""RAWtoBit as a comparator (rcam.comparators.rawtobit): the networks, the distillation, the three training stages,
export and loading, real .rcb files coded bit-exactly through rcam's entropy coder, and `rcam eval --baselines rawtobit`.

Everything runs at tiny widths on the tiny synthetic dataset of conftest.py.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcam.codec import container
from rcam.comparators import rawtobit
from rcam.demo import sample_scene
from rcam.errors import RcamError
from rcam.measure.evaluate import EndToEndCodec, format_table, run_eval
from rcam.codec.zoo import load_codec, read_manifest

TINY = {
    "encoder_channels": 8, "latent_channels": 8, "hyper_channels": 8, "decoder_channels": [8, 8, 8], "attention_blocks": 1,
    "attention_reduction": 2, "teacher_latent_channels": 12, "teacher_decoder_channels": 8, "isp_encoder_channels": 8,
}  # fmt: skip
TINY_CONFIG = replace(rawtobit.CONFIGS["small"], name="tiny", **(TINY | {"decoder_channels": (8, 8, 8)}))
# At initialisation the latents quantise to 0 everywhere; a larger gain gives the coder real symbols (conftest.GAIN_BOOST).
GAIN_BOOST = 30.0


def _boosted_rbn(seed: int = 0) -> rawtobit.RBN:
    torch.manual_seed(seed)
    model = rawtobit.RBN(TINY_CONFIG)
    with torch.no_grad():
        model.gains.log_gain += math.log(GAIN_BOOST)
        model.gains.log_inverse_gain -= math.log(GAIN_BOOST)
    return model.eval()


def _stage_config(stage: str, dataset: Path, run_dir: Path, **changes) -> rawtobit.RawToBitTrainConfig:
    values = dict(
        stage=stage, dataset=str(dataset), run_dir=str(run_dir), model_overrides=TINY, steps=2, batch_size=2, patch=32,
        checkpoint_every=1, log_every=1, kd_decay_steps=2.0,
    )  # fmt: skip
    return rawtobit.RawToBitTrainConfig(**(values | changes))


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in torch.load(checkpoint, weights_only=True)["model"].items() if v.is_floating_point()}


# ---------------------------------------------------------------------------------------------- networks


def test_the_networks_pair_up_where_the_paper_distils_and_have_the_codec_geometry():
    rbn = rawtobit.build("rbn", TINY_CONFIG)
    compression_teacher = rawtobit.build("compression_teacher", TINY_CONFIG)
    isp_teacher = rawtobit.build("isp_teacher", TINY_CONFIG)
    x, lam = torch.rand(2, 4, 32, 64), torch.tensor([0.005, 0.05])
    output = rbn(x, lam)
    assert output["rgb"].shape == (2, 3, 64, 128)
    assert rbn.analysis(x).shape == (2, 8, 4, 8)  # y at 1/8 of the packed tile, as rcam.codec.engine expects
    assert rbn.hyper_analysis(rbn.analysis(x)).shape == (2, 8, 1, 2)  # z at 1/32
    teacher = compression_teacher(x, lam)
    assert teacher["planes"].shape == x.shape
    # Every distilled pair has the same spatial size (channel counts may differ: K is the teacher's own).
    for student, target in zip(output["encoder_features"], teacher["encoder_features"], strict=True):
        assert student.shape[-2:] == target.shape[-2:]
    for student, target in zip(output["decoder_features"], isp_teacher(output["rgb"].detach())["decoder_features"], strict=True):
        assert student.shape == target.shape
    # The teacher's latent is K wide, the RBN's M.
    assert compression_teacher.encoder(x)[0].shape[1] == 12 and rbn.encoder(x)[0].shape[1] == 8
    # The paper's scale builds (not run here).
    paper = rawtobit.build("rbn", "paper")
    assert paper.encoder.convs[1].out_channels == 256 and paper.config.latent_channels == 192


def test_attention_maps_keep_the_sign_and_the_distillation_weight_decays():
    features = torch.randn(3, 5, 4, 6)
    # The paper's map is the plain channel sum: a feature map and its negative differ (|.| would make them equal).
    assert torch.allclose(rawtobit.attention_map(-features), -rawtobit.attention_map(features))
    assert rawtobit.attention_loss([features], [-features]) > 0.1
    assert float(rawtobit.attention_loss([features], [features * 3.0])) == pytest.approx(0.0, abs=1e-10)
    norms = rawtobit.attention_map(features).norm(dim=1)
    assert torch.allclose(norms, torch.ones(3))
    assert rawtobit.distillation_weight(1e6, 0, 100) == 1e6
    assert rawtobit.distillation_weight(1e6, 100, 100) == pytest.approx(1e6 / math.e)
    assert rawtobit.distillation_weight(1e6, 400, 100) < 1e6 * 1e-6
    assert rawtobit.distillation_weight(1e6, 10, 0) == 0.0


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained_stages(dataset, tmp_path_factory):
    """All three stages trained a few steps on the tiny dataset: {stage: checkpoint}, plus each stage's log."""
    root = tmp_path_factory.mktemp("rawtobit_runs")
    checkpoints, moved = {}, {}
    for stage in rawtobit.STAGES:
        teachers = (
            {"isp_teacher": str(checkpoints["isp_teacher"]), "compression_teacher": str(checkpoints["compression_teacher"])}
            if stage == "rbn" else {}
        )  # fmt: skip
        config = _stage_config(stage, dataset, root / stage, **teachers)
        first = rawtobit.train_stage(config)
        before = _weights(first)
        # Running the same config with more steps resumes from last.pt.
        checkpoints[stage] = rawtobit.train_stage(replace(config, steps=4))
        after = _weights(checkpoints[stage])
        moved[stage] = [name for name in before if not torch.equal(before[name], after[name])]
    return checkpoints, moved


def test_each_stage_trains_with_finite_losses_resumes_and_moves_its_weights(trained_stages):
    checkpoints, moved = trained_stages
    for stage, checkpoint in checkpoints.items():
        state = torch.load(checkpoint, weights_only=True)
        assert state["stage"] == stage and state["step"] == 4
        records = [json.loads(line) for line in (checkpoint.parent / "log.jsonl").read_text().splitlines()]
        assert [record["step"] for record in records] == [1, 2, 3, 4]  # resumed at 3, not restarted
        assert all(math.isfinite(record["loss"]) and record["s_per_step"] > 0 for record in records)
        assert len(moved[stage]) > 0, f"{stage}: no weight changed between step 2 and 4"
    rbn_log = [json.loads(line) for line in (checkpoints["rbn"].parent / "log.jsonl").read_text().splitlines()]
    # The distillation terms are measured (and weighted into the loss while α has not decayed).
    assert all(record["at_encoder"] > 0 and record["at_decoder"] > 0 for record in rbn_log)
    assert rbn_log[0]["loss"] > rbn_log[0]["rd"]


def test_the_rbn_stage_refuses_missing_or_mismatched_teachers(dataset, trained_stages, tmp_path):
    checkpoints, _ = trained_stages
    with pytest.raises(RcamError, match="isp_teacher and compression_teacher"):
        rawtobit.train_stage(_stage_config("rbn", dataset, tmp_path / "a"))
    swapped = {"isp_teacher": str(checkpoints["compression_teacher"]), "compression_teacher": str(checkpoints["compression_teacher"])}
    with pytest.raises(RcamError, match="expected the isp_teacher"):
        rawtobit.train_stage(_stage_config("rbn", dataset, tmp_path / "b", **swapped))
    wider = TINY | {"latent_channels": 16}
    teachers = {"isp_teacher": str(checkpoints["isp_teacher"]), "compression_teacher": str(checkpoints["compression_teacher"])}
    with pytest.raises(RcamError, match="latent_channels"):
        rawtobit.train_stage(_stage_config("rbn", dataset, tmp_path / "c", model_overrides=wider, **teachers))


def test_cli_trains_a_stage_from_a_config_and_refuses_other_comparators(run, dataset, tmp_path):
    config = tmp_path / "isp.json"
    values = asdict(_stage_config("isp_teacher", dataset, tmp_path / "run"))
    config.write_text(json.dumps(values))
    status, out, err = run("train-comparator", config, "--steps", "1")
    assert status == 0, err
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 1
    config.write_text(json.dumps(values | {"comparator": "cameranet-typo"}))
    status, _, err = run("train-comparator", config)
    assert status == 2 and "unknown comparator" in err


# ----------------------------------------------------------------------------------- export and coding


@pytest.fixture(scope="module")
def exported(trained_stages, tmp_path_factory):
    """The trained RBN exported as weights_dir/rawtobit-small.safetensors with its manifest entry."""
    checkpoints, _ = trained_stages
    weights_dir = tmp_path_factory.mktemp("weights")
    return rawtobit.export_rbn(checkpoints["rbn"], "rawtobit-small", weights_dir)


def test_export_records_every_stage_and_loads_offline_as_a_rawtobit_codec(exported):
    entry = read_manifest(exported.parent)["models"]["rawtobit-small"]
    assert entry["family"] == "rawtobit" and entry["training"]["total_steps"] == 12
    assert set(entry["training"]["stages"]) == set(rawtobit.STAGES)
    assert entry["parameters"] == sum(p.numel() for p in rawtobit.RBN(TINY_CONFIG).parameters())
    codec = rawtobit.load_rawtobit("rawtobit-small", weights_dir=exported.parent)
    assert codec.name == "rawtobit-small" and isinstance(codec.model, rawtobit.RBN)
    # rcam's own loader refuses it with a message that says what it is.
    with pytest.raises(RcamError, match="rawtobit comparator"):
        load_codec(exported)


def test_a_file_decodes_the_same_with_another_load_of_the_same_weights(exported, make_dng):
    encoder = rawtobit.load_rawtobit(str(exported))
    decoder = rawtobit.load_rawtobit("rawtobit-small", weights_dir=exported.parent)
    data = rawtobit.encode_file(encoder, make_dng("scene.dng", 64, 96, seed=3), 0.01).data
    assert container.read(data)[0].model_name == "rawtobit-small"
    assert np.array_equal(rawtobit.decode_bytes(decoder, data), rawtobit.decode_bytes(encoder, data))


def test_missing_weights_and_the_faithful_look_are_clear_errors(tmp_path, tiny_model_path):
    with pytest.raises(RcamError, match="train-comparator"):
        rawtobit.load_rawtobit("rawtobit-small", weights_dir=tmp_path)
    with pytest.raises(RcamError, match="not RAWtoBit weights"):
        rawtobit.load_rawtobit(str(tiny_model_path))
    with pytest.raises(RcamError, match="clean look only"):
        rawtobit.evaluation_comparator("cpu", "faithful")


def test_a_rawtobit_file_round_trips_bit_exactly(make_dng):
    codec = rawtobit.codec_from_rbn(_boosted_rbn(), "rawtobit-tiny")
    raw = make_dng("scene.dng", 90, 132, cfa="GRBG", orientation=6)
    encoded = rawtobit.encode_file(codec, raw, 0.02)
    assert any(np.any(latents.y_symbols != 0) for latents in encoded.latents)  # real symbols, not an all-zero latent
    header, streams = container.read(encoded.data)
    assert header.model_name == "rawtobit-tiny" and header.look == "clean"
    assert (header.output_height, header.output_width) == (132, 90)  # orientation 6: rotated
    # The same file again gives the same bytes; decoding twice, and on two threads, the same pixels.
    assert rawtobit.encode_file(codec, raw, 0.02).data == encoded.data
    first = rawtobit.decode_bytes(codec, encoded.data)
    assert first.shape == (132, 90, 3) and first.dtype == np.float32
    torch.set_num_threads(2)
    try:
        again = rawtobit.decode_bytes(codec, encoded.data)
    finally:
        torch.set_num_threads(1)
    assert np.array_equal(first, again)
    # The decoder sees exactly the latents the encoder coded.
    from rcam.codec.engine import decode_latents

    for coded, decoded in zip(encoded.latents, decode_latents(codec, header, streams), strict=True):
        assert torch.equal(coded.y_hat, decoded.y_hat)
    # More λ, more bits.
    assert len(rawtobit.encode_file(codec, raw, 0.1).data) > len(rawtobit.encode_file(codec, raw, 0.0025).data)


def test_corrupt_truncated_or_foreign_rawtobit_files_are_errors_not_crashes(make_dng):
    codec = rawtobit.codec_from_rbn(_boosted_rbn(), "rawtobit-tiny")
    data = rawtobit.encode_file(codec, make_dng("scene.dng", 64, 96), 0.02).data
    flipped = bytearray(data)
    flipped[-5] ^= 0x40
    with pytest.raises(RcamError, match="checksum"):
        rawtobit.decode_bytes(codec, bytes(flipped))
    with pytest.raises(RcamError, match="truncated"):
        rawtobit.decode_bytes(codec, data[:-7])
    other = rawtobit.codec_from_rbn(_boosted_rbn(seed=1), "rawtobit-other")
    with pytest.raises(RcamError, match="made with model rawtobit-tiny"):
        rawtobit.decode_bytes(other, data)
    # A stream whose checksum was recomputed still cannot decode into garbage silently: the range decoder's
    # leftover-data check or the stream's length catches it.
    header, streams = container.read(data)
    tampered = container.write(header, [streams[0][:-4]])
    with pytest.raises(RcamError, match="stream 0 cannot be decoded"):
        rawtobit.decode_bytes(codec, tampered)


# ----------------------------------------------------------------------------------------------- eval


def test_run_eval_measures_rawtobit_like_rcam_in_every_output(exported, tiny_codec, tmp_path):
    from rcam.codec.engine import decode_bytes, encode_file
    from rcam.codec.output import quantize

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(sample_scene(64, 80, seed=4)).save(photos / "p0.png")
    codec = rawtobit.load_rawtobit("rawtobit-small", weights_dir=exported.parent)

    def rcam_codec(raw_path, lam):
        data = encode_file(tiny_codec, raw_path, lam, tone_fit=False).data
        return len(data), quantize(decode_bytes(tiny_codec, data), 8)

    comparator = EndToEndCodec("rawtobit", "RAWtoBit", rawtobit.eval_codec(codec), "rawtobit note")
    lambdas = [0.005, 0.01, 0.025, 0.1]
    results = run_eval(
        photos, "S", lambdas, ["jpeg"], tmp_path / "out", rcam_codec, qualities={"jpeg": [30, 60, 90]},
        progress=False, speed=False, end_to_end=[comparator],
    )  # fmt: skip
    rows = [row for row in results["points"] if row["codec"] == "rawtobit"]
    assert [row["param"] for row in rows] == lambdas
    # Its bytes are its real file's: encoding the same DNG again gives a file of exactly that size.
    degraded = Path(results["images"][0]["codec_input"])
    assert rows[1]["num_bytes"] == len(rawtobit.encode_file(codec, degraded, 0.01).data)
    assert len(results["curves"]["rawtobit"]) == 4
    assert set(results["bd"]["averaged"]) == {"jpeg", "rawtobit"}
    assert results["setup"]["baselines"] == ["jpeg", "rawtobit"] and "rawtobit note" in results["notes"]
    with open(tmp_path / "out" / "points.csv") as handle:
        assert sum(row["codec"] == "rawtobit" for row in csv.DictReader(handle)) == 4
    assert "rawtobit" in (tmp_path / "out" / "curves.csv").read_text()
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "rawtobit" in saved["curves"] and (tmp_path / "out" / "rd.png").stat().st_size > 0
    table = format_table(saved)
    assert any(line.startswith("rawtobit") and "λ=" in line for line in table.splitlines())


def test_cli_eval_with_rawtobit_uses_shipped_weights_and_lists_it(run, exported, tiny_model_path, tmp_path, monkeypatch):
    import rcam.codec.zoo

    status, out, _ = run("eval", "--help")
    assert status == 0 and "rawtobit" in out and all(name in out for name in ("jpeg", "webp", "jpegxl", "avif"))
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(sample_scene(64, 80, seed=5)).save(photos / "p0.png")
    monkeypatch.setattr(rcam.codec.zoo, "WEIGHTS_DIR", exported.parent)
    status, out, err = run(
        "eval", photos, "--protocol", "S", "--baselines", "jpeg,rawtobit", "--lambdas", "0.005,0.02", "--no-speed",
        "--model", tiny_model_path, "--out-dir", tmp_path / "out", "--device", "cpu",
    )  # fmt: skip
    assert status == 0, err
    assert any(line.startswith("rawtobit") for line in out.splitlines())
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["curves"]["rawtobit"]) == 2
    # The faithful look is refused for rawtobit before any work.
    status, _, err = run(
        "eval", photos, "--look", "faithful", "--baselines", "rawtobit", "--model", tiny_model_path, "--out-dir", tmp_path / "r"
    )  # fmt: skip
    assert status == 2 and "clean look only" in err and not (tmp_path / "r").exists()
