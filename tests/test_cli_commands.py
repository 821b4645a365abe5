"""CLI paths that other tests reach only through library functions: demo, synth, train (Ctrl-C included),
export, eval's argument errors, --device, --quality, --tile-batch, --threads; and every option the README names."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
import torch
from conftest import RCAM, TINY_OVERRIDES, check_one_error_line, script_env
from PIL import Image

from rcam import cli
from rcam.codec import container
from rcam.codec.rawio import reference_render
from rcam.codec.zoo import load_codec, read_manifest
from rcam.demo import sample_scene

README = Path(__file__).resolve().parents[1] / "README.md"


def command_options(name: str | None = None) -> set[str]:
    """Every option string (--x and --no-x forms) of one command, or of all commands."""
    commands = [cli.cli.commands[name]] if name else list(cli.cli.commands.values()) + [cli.cli]
    options = {opt for command in commands for param in command.params for opt in param.opts + param.secondary_opts}
    return options | set(cli.cli.context_settings["help_option_names"])  # every command has --help


def test_every_option_the_readme_names_exists():
    text = README.read_text()
    # Options of Dask's own commands (`dask worker ... --nthreads 1`) are not rcam's.
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", re.sub(r"dask (?:scheduler|worker)[^\n`]*", "", text)))
    assert named, "the README names no options?"
    assert sorted(named - command_options()) == []
    # The sentence that says which options work on which command.
    for clause in re.split(r"[;.]\s", " ".join(text.split())):
        for commands in (("encode", "decode"), ("encode",)):
            verb = "work on encode and decode" if len(commands) == 2 else "works on encode"
            if verb in clause:
                for option in re.findall(r"`(--[a-z-]+)", clause):
                    for command in commands:
                        assert option in command_options(command), (option, command, clause)


@pytest.fixture
def restore_threads():
    yield
    torch.set_num_threads(1)  # conftest's setting: --threads changes it for the whole process


def test_demo_command(run, tmp_path, tiny_model_path):
    status, out, err = run("demo", "--model", tiny_model_path, "--out-dir", tmp_path, "--lambda", "0.025")
    assert (status, err) == (0, "")
    lines = dict(line.split(None, 1) for line in out.splitlines() if line.strip() and not line.startswith("PSNR"))
    encoded = (tmp_path / "sample_degraded.rcb").read_bytes()
    assert lines["rcb"].startswith(f"{len(encoded)} bytes")
    assert container.read(encoded)[0].lam == pytest.approx(0.025)
    assert lines["decoded"] == str(tmp_path / "sample_degraded.png")
    assert len([line for line in out.splitlines() if line.startswith("PSNR")]) == 2  # against the render and the clean twin


def test_synth_command(run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(sample_scene(80, 120, seed=3)).save(photos / "a.png")
    status, out, err = run("synth", photos, "--out-dir", tmp_path / "set", "--variants", "2", "--max-side", "64")
    assert status == 0 and "error" not in err, err  # stderr holds its progress bar
    index = tmp_path / "set" / "index.jsonl"
    assert f"dataset index: {index}" in out
    entries = [json.loads(line) for line in index.read_text().splitlines()]
    assert len(entries) == 2
    for entry in entries:
        height, width = reference_render(index.parent / entry["degraded"]).shape[:2]
        assert max(height, width) <= 64 and (index.parent / entry["target"]).is_file()
    status, _, err = run("synth", tmp_path / "missing", "--out-dir", tmp_path / "set")
    assert status == 2 and "missing" in err and "Traceback" not in err


def write_config(tmp_path, dataset, **overrides) -> Path:
    settings = dict(dataset=str(dataset), run_dir=str(tmp_path / "run"), model_overrides=TINY_OVERRIDES, batch_size=2, patch=32, threads=1, val_every=0, log_every=1) | overrides
    path = tmp_path / "config.json"
    path.write_text(json.dumps(settings))
    return path


def test_train_and_export_commands(run, tmp_path, dataset):
    config = write_config(tmp_path, dataset, steps=2)
    status, out, err = run("train", config, "--steps", "3", "--device", "cpu")
    assert status == 0, err
    checkpoint = tmp_path / "run" / "last.pt"
    assert f"checkpoint: {checkpoint}" in out and torch.load(checkpoint, weights_only=True)["step"] == 3
    weights = tmp_path / "weights"
    status, out, err = run("export", checkpoint, "--name", "mine", "--weights-dir", weights, "--half")
    assert (status, err) == (0, "")
    assert f"weights: {weights / 'mine.safetensors'}" in out
    assert read_manifest(weights)["models"]["mine"]["training"]["steps"] == 3
    assert load_codec("mine", weights_dir=weights).model.config.channels == TINY_OVERRIDES["channels"]
    status, _, err = run("export", config, "--weights-dir", weights)  # a JSON file is no checkpoint
    assert status == 2 and "not an rcam training checkpoint" in err
    status, _, err = run("train", tmp_path / "weights" / "mine.safetensors")
    assert status == 2 and "not a valid training config" in err


def test_train_ctrl_c_saves_a_resumable_checkpoint(tmp_path, dataset):
    """The real console script: SIGINT during training finishes the step, saves last.pt and exits 130."""
    config = write_config(tmp_path, dataset, steps=100_000, checkpoint_every=100_000)
    log = tmp_path / "run" / "log.jsonl"
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen([str(RCAM), "train", str(config)], stdout=subprocess.PIPE, stderr=stderr, text=True, env=script_env())
        try:
            deadline = time.monotonic() + 120
            while not (log.exists() and log.read_text().count("\n") >= 2):
                assert process.poll() is None, (tmp_path / "stderr").read_text()
                assert time.monotonic() < deadline, "no training step logged within 120 s"
                time.sleep(0.05)
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    err = (tmp_path / "stderr").read_text()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == "rcam: interrupted" and "Traceback" not in err
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert 2 <= state["step"] < 100_000 and state["step"] == logged[-1]  # saved at the step it stopped on
    assert f"checkpoint: {tmp_path / 'run' / 'last.pt'}" in out
    # Resumable: a second run continues from that step.
    result = subprocess.run([str(RCAM), "train", str(config), "--steps", str(state["step"] + 1)], capture_output=True, text=True, env=script_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == state["step"] + 1


def test_eval_argument_errors(run, tmp_path, tiny_model_path):
    folder = tmp_path / "raws"
    folder.mkdir()
    status, _, err = run("eval", folder, "--lambdas", "0.01,abc", "--model", tiny_model_path, "--out-dir", tmp_path / "out")
    assert status == 2 and "--lambdas" in err and "Traceback" not in err
    status, _, err = run("eval", tmp_path / "missing", "--model", tiny_model_path)
    assert status == 2 and "missing" in err and "Traceback" not in err
    status, _, err = run("eval", folder, "--protocol", "X")
    assert status == 2 and "protocol" in err.lower()


def test_device_option(run, tmp_path, make_dng, tiny_model_path):
    source = make_dng()
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", tmp_path / "a.rcb", "--device", "cpu")
    assert (status, err) == (0, "")
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", tmp_path / "b.rcb", "--device", "cuda")
    if torch.cuda.is_available():
        assert (status, err) == (0, "")
    else:
        assert status == 2 and "no CUDA device" in err and not (tmp_path / "b.rcb").exists()
    status, _, err = run("decode", tmp_path / "a.rcb", "--model", tiny_model_path, "--device", "tpu")
    assert status == 2 and "--device" in err


def test_jpeg_quality_option(run, tmp_path, make_dng, tiny_model_path):
    source = make_dng("q.dng", 96, 128)
    encoded = tmp_path / "q.rcb"
    assert run("encode", source, "--model", tiny_model_path, "-o", encoded)[0] == 0
    sizes = {}
    for quality in (20, 95):
        target = tmp_path / f"q{quality}.jpg"
        status, _, err = run("decode", encoded, "--model", tiny_model_path, "-o", target, "--quality", quality)
        assert (status, err) == (0, "")
        sizes[quality] = target.stat().st_size
    assert sizes[20] < sizes[95]
    status, _, err = run("decode", encoded, "--model", tiny_model_path, "-o", tmp_path / "x.jpg", "--quality", "0")
    assert status == 2 and "--quality" in err and not (tmp_path / "x.jpg").exists()


def test_tile_batch_option(run, tmp_path, make_dng, tiny_model_path):
    source = make_dng("b.dng", 200, 260)
    outputs = {}
    for batch in (1, 3):
        target = tmp_path / f"b{batch}.rcb"
        status, _, err = run("encode", source, "--model", tiny_model_path, "-o", target, "--tile", "64", "--overlap", "32", "--tile-batch", batch)
        assert (status, err) == (0, "")
        outputs[batch] = container.read(target.read_bytes())[0]
    geometry = lambda header: (header.tile_rows, header.tile_cols, header.tile_height, header.output_height)  # noqa: E731
    assert geometry(outputs[1]) == geometry(outputs[3]) and outputs[3].tile_rows * outputs[3].tile_cols > 3
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", tmp_path / "x.rcb", "--tile-batch", "0")
    assert status == 2 and "--tile-batch" in err


def test_threads_above_one(run, tmp_path, make_dng, tiny_model_path, restore_threads):
    source = make_dng("t.dng", 130, 198)
    encoded = tmp_path / "t.rcb"
    status, _, err = run("encode", source, "--model", tiny_model_path, "-o", encoded, "--threads", "2", "--tile", "64", "--overlap", "32")
    assert (status, err) == (0, "")
    assert torch.get_num_threads() == 2
    images = {}
    for threads in (1, 2):
        target = tmp_path / f"t{threads}.png"
        status, _, err = run("decode", encoded, "--model", tiny_model_path, "-o", target, "--threads", threads)
        assert (status, err) == (0, "")
        assert torch.get_num_threads() == threads
        images[threads] = imagecodecs.png_decode(target.read_bytes())
    np.testing.assert_array_equal(images[1], images[2])  # README: the output never depends on the thread count
    status, _, err = run("decode", encoded, "--model", tiny_model_path, "--threads", "0")
    assert status == 2 and "--threads" in err
