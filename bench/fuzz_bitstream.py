"""Fuzz the .rcb decoder: every damaged or forged bitstream must fail with RcamError, in bounded time and memory.

    nice -n 19 env OMP_NUM_THREADS=1 .venv/bin/python bench/fuzz_bitstream.py [--seed 1] [--random 20000] [--headers 20000] ...

A real .rcb is encoded with a tiny random model (as in tests/conftest.py, no shipped weights needed), then
rcam.codec.container.read and rcam.codec.engine.decode_bytes are fed with:

  random bytes            random byte strings, half of them behind a valid signature and version
  truncated               the valid file cut at every offset (or every --truncate-step-th)
  header bit flips        every single-bit flip of the header (up to and including its CRC)
  stream bit flips        random single-bit flips in the streams
  garbage streams+CRC     random streams with correct lengths and checksums (may decode: a legal image)
  mutated streams+CRC     the real streams with a few random bytes changed, checksums recomputed (may decode)
  random header fields    headers with random field values and a correct CRC (may decode if consistent)

Each case runs under a wall-clock limit (a Python-level timer: it cannot interrupt a hang inside C code,
which would show as the whole run hanging). Peak RSS is per kind where Linux lets us reset it
(/proc/self/clear_refs), else the process's peak so far. Exit status 1 if any case raised something other
than RcamError, timed out, or decoded although it should not have (truncation, bit flips: the checksums
must catch every one).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import BLACK_LEVEL, WHITE_LEVEL, save_tiny_model, smooth_mosaic  # noqa: E402

from rcam.codec import container
from rcam.codec import engine as codec  # noqa: E402
from rcam.codec.zoo import load_codec  # noqa: E402
from rcam.errors import RcamError  # noqa: E402
from rcam.training.dng import write_bayer_dng  # noqa: E402

MAGIC = b"\x89RCB\r\n\x1a\n"
# Kinds where a decoded image is a legal outcome: the forged data passes every checksum.
MAY_DECODE = {"garbage streams+CRC", "mutated streams+CRC", "random header fields"}


class CaseTimeout(BaseException):
    """Raised by the timer when one case runs past its limit (BaseException: rcam code must not swallow it)."""


def _on_alarm(signum, frame):
    raise CaseTimeout


def header_size(header: container.Header) -> int:
    """Bytes from the start of the file to the end of the header CRC (docs/FORMAT.md)."""
    return 14 + 1 + len(header.model_name) + 53 + 8 * len(header.stream_lengths) + 4


def pack(fields: dict, entries: list[tuple[int, int]], streams: bytes) -> bytes:
    """A file laid out as docs/FORMAT.md says, with any field values and a correct header CRC."""
    name = fields["name"]
    body = bytes([len(name) & 0xFF]) + name + fields["digest"]
    body += struct.pack("<f", fields["lam"])
    body += struct.pack("<II", fields["sensor_height"], fields["sensor_width"])
    body += bytes([fields["pad_top"], fields["pad_left"], fields["flip"]])
    body += struct.pack("<II", fields["output_height"], fields["output_width"])
    body += struct.pack("<HHHHH", fields["tile_height"], fields["tile_width"], fields["overlap"], fields["tile_rows"], fields["tile_cols"])
    body += struct.pack("<I", fields["stream_count"])
    body += b"".join(struct.pack("<II", length, crc) for length, crc in entries)
    head = MAGIC + struct.pack("<HI", 1, len(body)) + body
    return head + struct.pack("<I", zlib.crc32(head)) + streams


def header_fields(header: container.Header) -> dict:
    """The valid header's values under the names `pack` uses."""
    fields = {f.name: getattr(header, f.name) for f in dataclasses.fields(header)}
    fields["name"] = header.model_name.encode("ascii")
    fields["digest"] = header.weights_digest
    fields["stream_count"] = len(header.stream_lengths)
    return fields


# Integer header fields and their widths in bits (for extreme values).
FIELD_WIDTHS = {
    "sensor_height": 32, "sensor_width": 32, "output_height": 32, "output_width": 32, "stream_count": 32,
    "pad_top": 8, "pad_left": 8, "flip": 8,
    "tile_height": 16, "tile_width": 16, "overlap": 16, "tile_rows": 16, "tile_cols": 16,
}  # fmt: skip


def random_value(rng: random.Random, valid: int, bits: int) -> int:
    """The valid value, a small change of it, a boundary, or anything the field can hold."""
    top = (1 << bits) - 1
    choice = rng.randrange(6)
    if choice == 0:
        return valid
    if choice == 1:
        return min(max(valid + rng.choice([-32, -2, -1, 1, 2, 32]), 0), top)
    if choice == 2:
        return rng.choice([0, 1, 2, top, top - 1, top // 2])
    if choice == 3:
        return rng.choice([32, 64, 96, 128, 4096, 4128, 65535]) & top
    return rng.randrange(top + 1)


def random_header_case(rng: random.Random, header: container.Header, streams: list[bytes]) -> bytes:
    """Random values in 1 to 5 header fields (and sometimes the stream table), correct CRC."""
    fields = header_fields(header)
    for name in rng.sample(sorted(FIELD_WIDTHS) + ["lam", "name", "digest"], rng.randint(1, 5)):
        if name == "lam":
            fields[name] = rng.choice([0.0, -0.01, 1.0, 1e-30, 1e30, float("nan"), float("inf"), rng.uniform(0, 1)])
        elif name == "name":
            fields[name] = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 4, 64, 65, 255])))
        elif name == "digest":
            fields[name] = rng.randbytes(16)
        else:
            fields[name] = random_value(rng, fields[name], FIELD_WIDTHS[name])
    entries = [(len(s), zlib.crc32(s)) for s in streams]
    count = fields["stream_count"]
    if count != len(entries):
        # Make the table as long as the declared count says (bounded), with random lengths.
        entries = [(rng.choice([0, 4, 64, 1 << 31]), rng.getrandbits(32)) for _ in range(min(count, 300))]
    return pack(fields, entries, b"".join(streams))


def forge(header: container.Header, streams: list[bytes]) -> bytes:
    """A well-formed file around any streams (lengths and checksums recomputed)."""
    return container.write(dataclasses.replace(header, stream_lengths=(), stream_crcs=()), streams)


def generate(kind: str, args, rng: random.Random, data: bytes, header: container.Header, streams: list[bytes]):
    """Yield the cases of one kind."""
    if kind == "random bytes":
        for number in range(args.random):
            blob = rng.randbytes(rng.randrange(args.random_max_size))
            if number % 2:
                blob = MAGIC + struct.pack("<HI", 1, rng.choice([0, 60, 61, 100, len(blob), rng.getrandbits(32)])) + blob
            yield blob
    elif kind == "truncated":
        for length in range(0, len(data), args.truncate_step):
            yield data[:length]
    elif kind == "header bit flips":
        for bit in range(8 * header_size(header)):
            damaged = bytearray(data)
            damaged[bit // 8] ^= 1 << (bit % 8)
            yield bytes(damaged)
    elif kind == "stream bit flips":
        start = header_size(header)
        for _ in range(args.stream_flips):
            bit = rng.randrange(8 * start, 8 * len(data))
            damaged = bytearray(data)
            damaged[bit // 8] ^= 1 << (bit % 8)
            yield bytes(damaged)
    elif kind == "garbage streams+CRC":
        for _ in range(args.garbage):
            lengths = [rng.choice([0, 4, 8, len(s), 4 * rng.randrange(1 + 3 * len(s) // 4), rng.randrange(3 * len(s) + 1)]) for s in streams]
            yield forge(header, [rng.randbytes(n) for n in lengths])
    elif kind == "mutated streams+CRC":
        for _ in range(args.garbage):
            mutated = []
            for stream in streams:
                changed = bytearray(stream)
                for _ in range(rng.randint(1, 4)):
                    changed[rng.randrange(len(changed))] = rng.randrange(256)
                mutated.append(bytes(changed))
            yield forge(header, mutated)
    elif kind == "random header fields":
        for _ in range(args.headers):
            yield random_header_case(rng, header, streams)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib(resettable: bool) -> float:
    """Peak RSS since the last reset (VmHWM), or the process's peak (ru_maxrss) where resets are unavailable."""
    if resettable:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def message_pattern(message: str) -> str:
    """An error message with its numbers replaced, so that messages of one cause count together."""
    return re.sub(r"\d+", "N", message)[:110]


def run_case(tiny, blob: bytes, limit: float) -> tuple[str, str]:
    """-> (outcome, detail): outcome is "error", "ok", "other" or "timeout"."""
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        try:
            container.read(blob)
        except RcamError:
            pass
        image = codec.decode_bytes(tiny, blob)
    except RcamError as error:
        return "error", message_pattern(str(error))
    except CaseTimeout:
        return "timeout", "timed out"
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # noqa: BLE001 - the point is to find these (pyo3 panics are BaseExceptions too)
        return "other", f"{type(error).__name__}: {error}"[:120]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    header, _ = container.read(blob)
    shape = (header.output_height, header.output_width, 3)
    if image.shape != shape or not np.all(np.isfinite(image)) or image.min() < 0 or image.max() > 1:
        return "other", f"decoded image has shape {image.shape} (header says {shape}) or values outside [0, 1]"
    return "ok", f"decoded {shape[1]}x{shape[0]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--random", type=int, default=20000, help="random byte strings")
    parser.add_argument("--random-max-size", type=int, default=4096, help="longest random byte string")
    parser.add_argument("--truncate-step", type=int, default=1, help="truncate at every N-th offset")
    parser.add_argument("--stream-flips", type=int, default=20000, help="random single-bit flips in the streams")
    parser.add_argument("--garbage", type=int, default=2000, help="garbage and mutated stream sets (each kind)")
    parser.add_argument("--headers", type=int, default=20000, help="headers with random field values")
    parser.add_argument("--size", type=int, nargs=2, default=(130, 198), metavar=("H", "W"), help="sensor size of the valid file")
    parser.add_argument("--tile", type=int, default=64, help="tile side of the valid file (packed pixels)")
    parser.add_argument("--time-limit", type=float, default=20.0, help="seconds allowed per case")
    args = parser.parse_args()

    rng = random.Random(args.seed)
    signal.signal(signal.SIGALRM, _on_alarm)
    with tempfile.TemporaryDirectory() as folder:
        tiny = load_codec(save_tiny_model(Path(folder) / "tiny.safetensors", seed=args.seed))
        raw = write_bayer_dng(
            Path(folder) / "fuzz.dng", smooth_mosaic(*args.size, seed=args.seed), cfa="BGGR",
            black_level=BLACK_LEVEL, white_level=WHITE_LEVEL, orientation=6,
        )  # fmt: skip
        data = codec.encode_file(tiny, raw, 0.01, tile=args.tile, overlap=32).data
    header, streams = container.read(data)
    print(
        f"valid file: {len(data)} bytes, {header.sensor_width}x{header.sensor_height} sensor, "
        f"{len(streams)} streams, header {header_size(header)} bytes; seed {args.seed}, limit {args.time_limit:g} s per case"
    )
    resettable = reset_peak_rss()
    print(f"RSS before fuzzing: {peak_rss_mib(resettable):.0f} MiB ({'per-kind peak' if resettable else 'process peak'} below)\n")

    kinds = ["random bytes", "truncated", "header bit flips", "stream bit flips", "garbage streams+CRC", "mutated streams+CRC", "random header fields"]
    rows, failures = [], 0
    for kind in kinds:
        reset_peak_rss()
        outcomes, details = Counter(), {"error": Counter(), "ok": Counter(), "other": Counter(), "timeout": Counter()}
        started = time.perf_counter()
        for blob in generate(kind, args, rng, data, header, streams):
            outcome, detail = run_case(tiny, blob, args.time_limit)
            outcomes[outcome] += 1
            details[outcome][detail] += 1
        bad_ok = outcomes["ok"] if kind not in MAY_DECODE else 0
        failures += outcomes["other"] + outcomes["timeout"] + bad_ok
        rows.append((kind, outcomes, details, peak_rss_mib(resettable), time.perf_counter() - started, bad_ok))

    print(f"{'kind':22s} {'cases':>7s} {'RcamError':>9s} {'decoded':>8s} {'other':>6s} {'timeout':>7s} {'max RSS MiB':>11s} {'seconds':>8s}")
    for kind, outcomes, _, rss, seconds, bad_ok in rows:
        decoded = f"{outcomes['ok']}{' (!)' if bad_ok else ''}"
        print(
            f"{kind:22s} {sum(outcomes.values()):7d} {outcomes['error']:9d} {decoded:>8s} {outcomes['other']:6d} "
            f"{outcomes['timeout']:7d} {rss:11.0f} {seconds:8.1f}"
        )
    print("\nmost common outcomes per kind:")
    for kind, outcomes, details, *_ in rows:
        print(f"  {kind}")
        for outcome in ("other", "timeout", "ok", "error"):
            for detail, count in details[outcome].most_common(4 if outcome == "error" else 3):
                print(f"    {count:6d}  {outcome:7s} {detail}")
    print(f"\n{'FAIL' if failures else 'OK'}: {failures} cases raised something other than RcamError, timed out, or decoded undetected damage")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
