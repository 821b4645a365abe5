"""Many inputs: --jobs worker processes (same bytes and pixels as one process), --recursive with a mirrored
output tree, --skip-existing resuming a batch, the closing summary, and failures among good files."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import imagecodecs
import numpy as np
import pytest
from conftest import RCAM, error_lines, interruptible, part_files, script_env, text_file

from rcam.codec import container

SUMMARY = re.compile(
    r"rcam: (\d+) files: (\d+) (encoded|decoded), (\d+) skipped \(output exists\), (\d+) failed; (\d+) bytes in, (\d+) bytes out"
)


def summary_of(out: str) -> dict[str, int]:
    """The summary line's numbers."""
    (match,) = [m for m in map(SUMMARY.match, out.splitlines()) if m]
    files, done, _, skipped, failed, bytes_in, bytes_out = match.groups()
    return {"files": int(files), "done": int(done), "skipped": int(skipped), "failed": int(failed), "in": int(bytes_in), "out": int(bytes_out)}


@pytest.fixture
def shoot(tmp_path, make_dng):
    """A folder of four small DNGs with different CFAs and orientations."""
    folder = tmp_path / "shoot"
    folder.mkdir()
    for number, (cfa, orientation) in enumerate([("RGGB", 1), ("BGGR", 6), ("GRBG", 3), ("GBRG", 8)]):
        make_dng(f"frame{number}.dng", 48, 64, cfa=cfa, orientation=orientation, seed=number, folder=folder)
    return folder


def test_jobs_give_the_same_bytes_and_pixels(run, tmp_path, shoot, tiny_model_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    model = ["--model", tiny_model_path, "--threads", "1"]
    assert run("encode", shoot, "--out-dir", one, *model)[0] == 0
    status, out, err = run("encode", shoot, "--out-dir", two, "--jobs", "2", *model)
    assert status == 0, err
    names = sorted(p.name for p in one.glob("*.rcb"))
    assert names == [f"frame{n}.rcb" for n in range(4)] == sorted(p.name for p in two.glob("*.rcb"))
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    numbers = summary_of(out)
    assert numbers == {
        "files": 4, "done": 4, "skipped": 0, "failed": 0,
        "in": sum(p.stat().st_size for p in shoot.iterdir()), "out": sum((two / n).stat().st_size for n in names),
    }  # fmt: skip
    pixels = sum(48 * 64 for _ in names)
    assert f"{8 * numbers['out'] / pixels:.4f} bpp" in out
    # Decoding with two workers: the same pixels as in this process.
    assert run("decode", one, "--out-dir", one, *model)[0] == 0
    status, out, err = run("decode", one, "--out-dir", two, "--jobs", "2", *model)
    assert status == 0, err
    for number in range(4):
        first = imagecodecs.png_decode((one / f"frame{number}.png").read_bytes())
        second = imagecodecs.png_decode((two / f"frame{number}.png").read_bytes())
        assert first.shape[2] == 3 and np.array_equal(first, second), number
    numbers = summary_of(out)
    assert (numbers["done"], numbers["in"]) == (4, sum((one / n).stat().st_size for n in names))
    assert numbers["out"] == sum((two / f"frame{n}.png").stat().st_size for n in range(4))


def test_a_bad_file_among_good_ones_with_jobs(run, tmp_path, shoot, tiny_model_path):
    bad = text_file(shoot)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, out, err = run("encode", shoot, "--out-dir", out_dir, "--jobs", "2", "--model", tiny_model_path, "--threads", "1")
    assert status == 2
    assert "Traceback" not in err
    assert sorted(p.name for p in out_dir.iterdir()) == [f"frame{n}.rcb" for n in range(4)]
    assert len(error_lines(err)) == 1 and str(bad) in error_lines(err)[0]
    assert str(bad) in err[err.index("1 of 5 inputs failed") :]
    assert summary_of(out)["done"] == 4 and summary_of(out)["failed"] == 1
    assert len([line for line in out.splitlines() if " -> " in line]) == 4


def test_recursive_mirrors_the_tree(run, tmp_path, make_dng, tiny_model_path):
    tree = tmp_path / "tree"
    (tree / "day1" / "raw").mkdir(parents=True)
    (tree / "day2").mkdir()
    sources = [
        make_dng("top.dng", 48, 64, folder=tree),
        make_dng("a.dng", 48, 64, folder=tree / "day1", seed=1),
        make_dng("b.dng", 48, 64, folder=tree / "day1" / "raw", seed=2),
        make_dng("c.dng", 48, 64, folder=tree / "day2", seed=3),
    ]
    (tree / "day2" / "notes.txt").write_text("not an input")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model = ["--model", tiny_model_path, "--threads", "1", "-q"]
    # Without --recursive only the folder's own files, as before.
    status, out, _ = run("encode", tree, "--out-dir", out_dir, *model)
    assert (status, out) == (0, "")
    assert sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*")) == ["top.rcb"]
    status, _, err = run("encode", tree, "--out-dir", out_dir, "--recursive", "--skip-existing", *model)
    assert status == 0, err
    made = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.rcb"))
    assert made == ["day1/a.rcb", "day1/raw/b.rcb", "day2/c.rcb", "top.rcb"]
    for source in sources:
        target = out_dir / source.relative_to(tree).with_suffix(".rcb")
        assert container.read(target.read_bytes())[0].output_height in (48, 64)
    # Decoding the mirrored tree mirrors it again; without --out-dir each output lands beside its input.
    status, _, err = run("decode", out_dir, "--recursive", *model)
    assert status == 0, err
    assert sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.png")) == [m.replace(".rcb", ".png") for m in made]
    # A tree with no inputs at all is one usage error.
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    status, _, err = run("encode", tmp_path / "empty", "--recursive", *model)
    assert status == 2 and "folder tree holds no" in err


def test_skip_existing_resumes(run, tmp_path, shoot, tiny_model_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    command = ["encode", shoot, "--out-dir", out_dir, "--model", tiny_model_path, "--threads", "1", "--skip-existing"]
    status, out, _ = run(*command)
    assert status == 0 and summary_of(out)["done"] == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    status, out, err = run(*command)
    assert (status, err) == (0, "")
    assert summary_of(out) == {"files": 4, "done": 0, "skipped": 4, "failed": 0, "in": 0, "out": 0}
    assert " -> " not in out  # nothing was done, so no per-file line
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == stamps
    # An output lost (or never finished: Ctrl-C leaves none) is made again; the others are left alone.
    (out_dir / "frame2.rcb").unlink()
    status, out, _ = run(*command)
    numbers = summary_of(out)
    assert status == 0 and (numbers["done"], numbers["skipped"]) == (1, 3)
    assert numbers["in"] == (shoot / "frame2.dng").stat().st_size and numbers["out"] == (out_dir / "frame2.rcb").stat().st_size
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir() if p.name != "frame2.rcb"} == {
        name: stamp for name, stamp in stamps.items() if name != "frame2.rcb"
    }
    # Without --skip-existing an existing output is still an error, and the two flags contradict each other.
    status, _, err = run(*command[:-1])
    assert status == 2 and "4 of 4 inputs failed" in err and "already exists" in err
    status, _, err = run(*command, "--force")
    assert status == 2 and "--skip-existing" in err and "--force" in err


def test_two_inputs_with_one_output_are_refused(run, tmp_path, make_dng, tiny_model_path):
    first = make_dng("scene.dng", 48, 64)
    second = make_dng("scene.DNG", 48, 64, seed=1)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    status, _, err = run("encode", first, second, "--out-dir", out_dir, "--model", tiny_model_path, "--threads", "1")
    assert status == 2
    (line,) = error_lines(err)
    assert str(second) in line and f"also the output of {first}" in line
    assert container.read((out_dir / "scene.rcb").read_bytes())  # the first input's output, whole


def test_ctrl_c_with_workers_leaves_no_partial_output(tmp_path, shoot, tiny_model_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    many = [shoot / f"frame{n % 4}.dng" for n in range(4)]
    for copy in range(4, 40):  # enough files that the batch is still running when interrupted
        (shoot / f"frame{copy}.dng").write_bytes(many[copy % 4].read_bytes())
    process = subprocess.Popen(
        [str(RCAM), "encode", shoot, "--out-dir", out_dir, "--jobs", "2", "--threads", "1", "--model", tiny_model_path],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(), preexec_fn=interruptible,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(out_dir.glob("*.rcb")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # to the parent alone: it must pass the interrupt on to its workers
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "interrupted" in err
    assert part_files(out_dir) == []
    done = list(out_dir.glob("*.rcb"))
    assert 0 < len(done) < 40
    # The summary says how far it got. A worker interrupted between renaming its output into place and
    # replying leaves a file the summary cannot count: at most one per worker.
    numbers = summary_of(out)
    assert len(done) - 2 <= numbers["done"] <= len(done)
    assert numbers["out"] <= sum(p.stat().st_size for p in done)
    assert out.rstrip().endswith("; interrupted")
    for path in done:
        container.read(path.read_bytes())  # every output there is whole
