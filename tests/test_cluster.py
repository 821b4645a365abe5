"""`rcam encode/decode --cluster`: a local Dask cluster started here (two worker processes, one thread each) gives
the same .rcb bytes and PNG bytes as one local process, mirrors the folder tree, resumes with --skip-existing and
reports a bad file without stopping the others; without the extra the option says what to install."""

from __future__ import annotations

import logging
import socket
import sys

import dask
import pytest
from distributed import LocalCluster

from conftest import error_lines, text_file
from test_batch import summary_of


@pytest.fixture(scope="module")
def scheduler():
    """The address of a LocalCluster with 2 worker processes of 1 thread each, for this module's tests."""
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=logging.ERROR) as cluster:
        yield cluster.scheduler_address


@pytest.fixture
def tree(tmp_path, make_dng):
    """shoot/ with two DNGs, shoot/day2/ with two more and a text file named .dng (the bad input)."""
    shoot = tmp_path / "shoot"
    (shoot / "day2").mkdir(parents=True)
    for number, (cfa, orientation) in enumerate([("RGGB", 1), ("BGGR", 6), ("GRBG", 3), ("GBRG", 8)]):
        make_dng(f"frame{number}.dng", 48, 64, cfa=cfa, orientation=orientation, seed=number, folder=shoot / ("day2" if number >= 2 else ""))
    text_file(shoot / "day2")
    return shoot


def coded_lines(out: str, folder: str) -> list[str]:
    """The per-file lines, with the output folder's name taken out (two runs write to two folders)."""
    return sorted(line.replace(f"{folder}/", "OUT/") for line in out.splitlines() if " -> " in line)


def test_cluster_gives_the_bytes_and_pixels_of_one_process(run, tmp_path, tree, tiny_model_path, scheduler, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative names: the lines must say them as given, though workers get them absolute
    model = ["--model", tiny_model_path, "--threads", "1"]
    (tmp_path / "local").mkdir()
    status, local_out, local_err = run("encode", "shoot", "-r", "--out-dir", "local", *model)
    assert status == 2 and len(error_lines(local_err)) == 1
    (tmp_path / "far").mkdir()
    status, out, err = run("encode", "shoot", "-r", "--out-dir", "far", "--cluster", scheduler, *model)
    assert status == 2
    assert "rcam: cluster tcp://" in err and "2 workers, 2 threads" in err
    (bad_line,) = error_lines(err)
    assert bad_line.startswith("rcam: error: shoot/day2/notes.dng: ") and "Traceback" not in err
    assert "1 of 5 inputs failed" in err
    outputs = sorted(str(p.relative_to(tmp_path / "far")) for p in (tmp_path / "far").rglob("*.rcb"))
    assert outputs == ["day2/frame2.rcb", "day2/frame3.rcb", "frame0.rcb", "frame1.rcb"]
    for name in outputs:
        assert (tmp_path / "far" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert coded_lines(out, "far") == coded_lines(local_out, "local") and len(coded_lines(out, "far")) == 4
    assert bad_line == error_lines(local_err)[0]
    numbers = summary_of(out)
    assert numbers == {
        "files": 5, "done": 4, "skipped": 0, "failed": 1,
        "in": sum(p.stat().st_size for p in tree.rglob("frame*.dng")), "out": sum((tmp_path / "far" / n).stat().st_size for n in outputs),
    }  # fmt: skip

    # Resuming: what exists is skipped, the bad file is still reported.
    status, out, err = run("encode", "shoot", "-r", "--out-dir", "far", "--cluster", scheduler, "--skip-existing", *model)
    assert status == 2 and summary_of(out) | {"in": 0} == {"files": 5, "done": 0, "skipped": 4, "failed": 1, "in": 0, "out": 0}

    # Decoding on the cluster: the PNGs of a local decode, byte for byte, in the mirrored tree.
    status, _, err = run("decode", "local", "-r", "--out-dir", "local", *model)
    assert status == 0, err
    status, out, err = run("decode", "far", "-r", "--out-dir", "far", "--cluster", scheduler, *model)
    assert status == 0, err
    assert summary_of(out)["done"] == 4
    for name in outputs:
        png = name.replace(".rcb", ".png")
        assert (tmp_path / "far" / png).read_bytes() == (tmp_path / "local" / png).read_bytes(), png


def test_cluster_usage_errors(run, tmp_path, tree, tiny_model_path, monkeypatch):
    model = ["--model", tiny_model_path, "--threads", "1"]
    status, _, err = run("encode", tree, "--cluster", "tcp://127.0.0.1:8786", "--jobs", "2", *model)
    assert status == 2 and "--jobs" in err and "--cluster" in err
    # No scheduler at the address: one line, no traceback, nothing written.
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        status, _, err = run("encode", tree, "--cluster", f"tcp://127.0.0.1:{port}", *model)
    assert status == 2 and f"--cluster tcp://127.0.0.1:{port}: no Dask scheduler answers there" in err and "Traceback" not in err
    assert list(tree.rglob("*.rcb")) == []
    # Without the extra installed (Dask made unimportable): the command says how to get it.
    monkeypatch.setitem(sys.modules, "distributed", None)
    monkeypatch.delitem(sys.modules, "rcam.codec.cluster", raising=False)
    status, _, err = run("encode", tree, "--cluster", "tcp://127.0.0.1:8786", *model)
    assert status == 2
    assert error_lines(err) == ["rcam: error: --cluster needs Dask distributed, an optional extra: pip install 'rcam[cluster]'"]
