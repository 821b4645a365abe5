"""The `rcam eval` engine: measure rcam against the cascades on a set of images (SPEC §8).

Protocol R: real RAW files; reference = reference render of the same file; rcam and the cascades both
start from that file.
Protocol S: photos; each becomes a synthetic degraded DNG with a clean twin (rcam.training.synth.make_pair);
reference = render of the clean twin; rcam encodes the degraded DNG and the cascades compress the
reference render of the degraded DNG (what a user does today).

The rcam codec is injected as a callable, codec(raw_path, lam) -> (num_bytes, decoded (H,W,3) uint8),
so this module does not depend on the model. Learned-ISP cascades (baselines named ISP+CODEC, see
rcam.comparators.baselines) compress the render of an injected isp_renders[ISP](raw_path) -> (H,W,3) uint8 instead of
LibRaw's, rendering each image once per ISP. Whole-command speed is measured through an optional
command_timer(raw_path, lam) -> (encode_seconds, decode_seconds) or a dict that may also carry each
command's peak memory; make_command_timer builds one that runs `rcam encode` / `rcam decode`.

LPIPS is not reported: its network weights cannot be downloaded on the project's machines.
"""

import csv
import hashlib
import io
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
from tqdm import tqdm

from rcam.codec.rawio import reference_render
from rcam.codec.zoo import file_digest
from rcam.comparators import baselines as baselines_module
from rcam.errors import RcamError
from rcam.measure.bjontegaard import bd_metric, bd_rate
from rcam.measure.metrics import all_metrics, bits_per_pixel
from rcam.training import synth

Codec = Callable[[Path, float], tuple[int, np.ndarray]]
# command_timer(raw_path, lam) -> (encode_s, decode_s), or a dict with encode_s, decode_s and optionally
# encode_peak_mib, decode_peak_mib (peak resident memory of each command).
CommandTimer = Callable[[Path, float], tuple[float, float] | dict[str, float]]
Render = Callable[[Path], np.ndarray]
MakePair = Callable[[Path, Path, np.random.Generator, str], tuple[Path, Path, Path]]

PROTOCOLS = ("R", "S")
METRICS = ("psnr", "ms_ssim_db", "ciede2000")
METRIC_LABELS = {"psnr": "PSNR (dB)", "ms_ssim_db": "MS-SSIM (dB)", "ciede2000": "CIEDE2000 ΔE"}
HIGHER_IS_BETTER = {"psnr": True, "ms_ssim_db": True, "ciede2000": False}

RAW_SUFFIXES = frozenset(
    ".dng .cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .orf .rw2 .raf .pef .srw .rwl .3fr .iiq .erf .kdc .mrw .x3f "
    ".raw".split()
)
PHOTO_SUFFIXES = frozenset(".png .jpg .jpeg .tif .tiff .bmp .webp".split())

# ru_maxrss is in KiB on Linux, bytes on macOS.
_MAXRSS_TO_MIB = 1.0 / (1024.0 * 1024.0) if sys.platform == "darwin" else 1.0 / 1024.0

# Bump when the metric definitions change, so cached baseline results are recomputed.
METRICS_VERSION = 1

NOTES = (
    "LPIPS is not reported: its network weights cannot be downloaded on this machine.",
    "BD-rate and BD-metric compare rcam (test) with each baseline (anchor), piecewise cubic (PCHIP) "
    "interpolation over the overlapping range; negative BD-rate = rcam needs fewer bits. "
    "For CIEDE2000 lower is better, so a negative BD-ΔE favours rcam.",
    "bpp = 8 × whole compressed file bytes / output pixels.",
)


@dataclass(frozen=True)
class EndToEndCodec:
    """A RAW-to-bitstream comparator (e.g. RAWtoBit) measured as rcam is: codec(raw_path, param) on the same RAW
    file, its bpp from its whole file; param at each of rcam's λ, or at each of `params` (named `param_name` in
    tables) for a codec with its own sweep. `note` goes into the run's notes."""

    name: str
    label: str
    codec: Codec
    note: str = ""
    params: tuple[float, ...] | None = None
    param_name: str = "λ"


@dataclass
class _Item:
    """One image of the set, prepared for measuring."""

    name: str
    source: Path  # the file listed in the inputs
    codec_input: Path  # RAW file rcam encodes
    cascade_input: Path  # RAW file whose reference render the cascades compress
    reference: np.ndarray  # (H,W,3) uint8 target
    cascade_image: np.ndarray  # (H,W,3) uint8 image the baselines compress


def load_image(path: Path) -> np.ndarray:
    """Read a PNG/TIFF/JPEG file as (H,W,3) uint8 (16-bit files are rounded to 8 bits)."""
    try:
        img = np.asarray(imagecodecs.imread(str(path)))
    except Exception as error:  # imagecodecs raises many types for unreadable files
        raise RcamError(f"{path}: cannot read image ({error})") from None
    if img.dtype == np.uint16:
        img = np.round(img.astype(np.float64) / 257.0).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4):
        raise RcamError(f"{path}: expected an 8- or 16-bit RGB image, got {img.shape} {img.dtype}")
    return np.ascontiguousarray(img[:, :, :3])


def collect_inputs(inputs: Path, protocol: str) -> list[Path]:
    """The files a run measures: `inputs` itself, or the RAW (R) / photo (S) files under it, sorted."""
    inputs = Path(inputs)
    suffixes = RAW_SUFFIXES if protocol == "R" else PHOTO_SUFFIXES
    if inputs.is_file():
        return [inputs]
    if not inputs.is_dir():
        raise RcamError(f"{inputs}: no such file or folder")
    files = sorted(
        path
        for path in inputs.rglob("*")
        if path.is_file() and path.suffix.lower() in suffixes and not path.name.startswith(".")
    )
    if not files:
        kind = "RAW" if protocol == "R" else "photo"
        raise RcamError(f"{inputs}: no {kind} files ({', '.join(sorted(suffixes))}) found")
    return files


def _image_names(files: Sequence[Path], root: Path) -> list[str]:
    """Unique, readable names: path relative to the input folder without suffix, '/' -> '_'."""
    names = []
    for path in files:
        rel = path.relative_to(root) if root.is_dir() else Path(path.name)
        names.append(str(rel.with_suffix("")).replace(os.sep, "_"))
    return names


def _array_digest(img: np.ndarray) -> str:
    """sha256 hex digest of an array's shape, dtype and pixels."""
    digest = hashlib.sha256(f"{img.shape}{img.dtype}".encode())
    digest.update(np.ascontiguousarray(img).tobytes())
    return digest.hexdigest()


def _check_decoded(decoded: np.ndarray, reference: np.ndarray, name: str, lam: float) -> np.ndarray:
    """Raise RcamError unless the codec returned a uint8 image of the reference's size."""
    decoded = np.asarray(decoded)
    if decoded.dtype != np.uint8 or decoded.shape != reference.shape:
        raise RcamError(
            f"{name}: rcam at λ={lam:g} decoded to {decoded.shape} {decoded.dtype}, "
            f"the reference is {reference.shape} uint8"
        )
    return decoded


# ----------------------------------------------------------------------------------------------- cache


class BaselineCache:
    """Baseline results on disk, one JSON per (image content, baseline settings), so re-runs are cheap.

    The key hashes the input file's sha256, the compressed and reference images' pixels (so a changed
    render or synthesis invalidates it), the baseline's settings, the codec library versions and the
    metric definitions' version. Each file maps quality -> {num_bytes, bpp, metrics}.
    """

    def __init__(self, cache_dir: Path):
        self.dir = Path(cache_dir)

    def key(self, input_digest: str, cascade_image: np.ndarray, reference: np.ndarray, name: str) -> str:
        """Cache key of one image's results for baseline `name`."""
        baseline = baselines_module.get_baseline(name)
        material = {
            "input_sha256": input_digest,
            "cascade_image": _array_digest(cascade_image),
            "reference": _array_digest(reference),
            "baseline": baseline.name,
            "settings": baseline.settings,
            "libraries": baselines_module.library_versions(),
            "metrics_version": METRICS_VERSION,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def load(self, key: str) -> dict[str, dict]:
        """Cached points of a key as {quality string: point}; empty when absent or unreadable."""
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return {}

    def save(self, key: str, points: dict[str, dict]) -> None:
        """Store the points of a key (atomically, so a killed run leaves no broken file)."""
        _atomic_write_text(self._path(key), json.dumps(points, indent=1, sort_keys=True))


def _quality_key(quality: float) -> str:
    return f"{float(quality):g}"


# ------------------------------------------------------------------------------------------ measuring


def _prepare_items(
    files: Sequence[Path], names: Sequence[str], protocol: str, render: Render, make_pair: MakePair,
    out_dir: Path, seed: int,
):
    """Yield one _Item per input file (lazily: references are large)."""
    synth_dir = out_dir / "synth"
    for index, (path, name) in enumerate(zip(files, names)):
        if protocol == "R":
            reference = np.asarray(render(path))
            yield _Item(name, path, path, path, reference, reference)
        else:
            synth_dir.mkdir(parents=True, exist_ok=True)
            # One generator per image, seeded by (seed, index): an image's synthesis does not depend on
            # how many images were processed before it in this process.
            rng = np.random.default_rng([seed, index])
            degraded, _clean, target = make_pair(path, synth_dir, rng, name)
            reference = load_image(Path(target))
            cascade_image = np.asarray(render(Path(degraded)))
            if cascade_image.shape != reference.shape:
                raise RcamError(
                    f"{name}: the degraded render is {cascade_image.shape} but the clean target is {reference.shape}"
                )
            yield _Item(name, path, Path(degraded), Path(degraded), reference, cascade_image)


def _measure_rcam(item: _Item, lambdas: Sequence[float], codec: Codec, progress, name: str = "rcam") -> list[dict]:
    """rcam's (or the end-to-end comparator `name`'s) operating points on one image: bytes, bpp, metrics and
    in-process seconds per λ."""
    pixels = item.reference.shape[0] * item.reference.shape[1]
    rows = []
    for lam in lambdas:
        start = time.perf_counter()
        num_bytes, decoded = codec(item.codec_input, float(lam))
        seconds = time.perf_counter() - start
        decoded = _check_decoded(decoded, item.reference, item.name, lam)
        rows.append({
            "image": item.name, "codec": name, "param": float(lam), "num_bytes": int(num_bytes),
            "bpp": bits_per_pixel(int(num_bytes), pixels), **all_metrics(item.reference, decoded),
            "seconds": seconds,
        })
        progress.update(1)
    return rows


def _cascade_image(item: _Item, name: str, isp_renders: dict[str, Render], rendered: dict[str, np.ndarray]) -> np.ndarray:
    """The image baseline `name` compresses: LibRaw's render, or its learned ISP's render (made once per image)."""
    isp = baselines_module.get_baseline(name).isp
    if isp is None:
        return item.cascade_image
    if isp not in rendered:
        image = np.asarray(isp_renders[isp](item.cascade_input))
        if image.dtype != np.uint8 or image.shape != item.reference.shape:
            raise RcamError(f"{item.name}: the {isp} render is {image.shape} {image.dtype}, the reference is {item.reference.shape} uint8")
        rendered[isp] = image
    return rendered[isp]


def _measure_baseline(
    item: _Item, name: str, image: np.ndarray, qualities: Sequence[float], cache: BaselineCache, input_digest: str,
    numthreads: int | None,
) -> tuple[list[dict], int]:
    """One baseline's points on one image, compressing `image` (from the cache where possible); returns (rows, cache hits)."""
    key = cache.key(input_digest, image, item.reference, name)
    cached = cache.load(key)
    rows, hits, changed = [], 0, False
    for quality in sorted(qualities):
        qkey = _quality_key(quality)
        point = cached.get(qkey)
        if point is None:
            result = baselines_module.encode_decode(name, image, quality, numthreads)
            point = {"num_bytes": result.num_bytes, "bpp": result.bpp, **all_metrics(item.reference, result.decoded)}
            cached[qkey] = point
            changed = True
        else:
            hits += 1
        rows.append({"image": item.name, "codec": name, "param": float(quality), **point})
    if changed:
        cache.save(key, cached)
    return rows, hits


def _peak_rss_mib() -> dict[str, float]:
    """Peak resident memory so far of this process and of its largest waited-for child, MiB."""
    return {
        "self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _MAXRSS_TO_MIB,
        "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * _MAXRSS_TO_MIB,
    }


def _measure_speed(
    item: _Item, lam: float, render: Render, command_timer: CommandTimer | None, numthreads: int | None
) -> dict:
    """Whole-command rcam encode/decode seconds (if a timer is given) and the cascade's, for one image."""
    megapixels = item.reference.shape[0] * item.reference.shape[1] / 1e6
    row: dict = {"image": item.name, "lambda": float(lam), "megapixels": megapixels}
    if command_timer is not None:
        timing = command_timer(item.codec_input, float(lam))
        if not isinstance(timing, dict):
            encode_s, decode_s = timing
            timing = {"encode_s": encode_s, "decode_s": decode_s}
        row.update({key: float(value) for key, value in timing.items() if value is not None})
    cascade = baselines_module.time_cascade(item.cascade_input, render, numthreads=numthreads)
    row.update(cascade_render_s=cascade["render_s"], cascade_encode_s=cascade["encode_s"], cascade_s=cascade["total_s"])
    return row


def _high_water_mib(pid: int) -> float:
    """VmHWM (peak resident memory since exec) of a running process in MiB, 0 when unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def timed_command(argv: Sequence[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak resident memory MiB of that process). RcamError if it fails.

    The peak is the child's own VmHWM, polled while it runs: ru_maxrss of a forked child also counts the
    parent's memory at fork time, which made every command look as big as the evaluating process.
    """
    start = time.perf_counter()
    peak = 0.0
    with tempfile.TemporaryFile() as stderr_file:
        process = subprocess.Popen([str(arg) for arg in argv], stdout=subprocess.DEVNULL, stderr=stderr_file)
        while process.poll() is None:
            peak = max(peak, _high_water_mib(process.pid))
            time.sleep(0.005)
        seconds = time.perf_counter() - start
        stderr_file.seek(0)
        stderr_text = stderr_file.read().decode(errors="replace")
    if process.returncode != 0:
        tail = stderr_text.strip().splitlines()[-1:] or ["(no message)"]
        raise RcamError(f"command failed with status {process.returncode}: {' '.join(map(str, argv))}: {tail[0]}")
    return seconds, peak


def make_command_timer(rcam_argv: Sequence[str], extra_args: Sequence[str] = ()) -> CommandTimer:
    """A command_timer running `rcam encode RAW -o F.rcb --lambda λ` and `rcam decode F.rcb -o F.png`.

    rcam_argv is how to start rcam, e.g. ["rcam"] or [sys.executable, "-m", "rcam.cli"]; extra_args go to
    both commands (e.g. ["--device", "cpu"]). Files live in a temporary folder removed afterwards.
    """

    def command_timer(raw_path: Path, lam: float) -> dict[str, float]:
        with tempfile.TemporaryDirectory(prefix="rcam-eval-") as tmp:
            stream, image = Path(tmp) / "timed.rcb", Path(tmp) / "timed.png"
            encode_s, encode_mib = timed_command(
                [*rcam_argv, "encode", raw_path, "-o", stream, "--lambda", f"{lam:g}", *extra_args]
            )
            decode_s, decode_mib = timed_command([*rcam_argv, "decode", stream, "-o", image, *extra_args])
        return {
            "encode_s": encode_s, "decode_s": decode_s, "encode_peak_mib": encode_mib, "decode_peak_mib": decode_mib,
        }

    return command_timer


# ---------------------------------------------------------------------------------------- aggregation


def average_curves(points: Sequence[dict]) -> dict[str, list[dict]]:
    """Per codec, the mean bpp and metrics over images at each operating point, sorted by bpp."""
    groups: dict[str, dict[float, list[dict]]] = {}
    for row in points:
        groups.setdefault(row["codec"], {}).setdefault(row["param"], []).append(row)
    curves = {}
    for codec, by_param in groups.items():
        curve = []
        for param, rows in by_param.items():
            entry = {"param": param, "images": len(rows), "bpp": float(np.mean([r["bpp"] for r in rows]))}
            for metric in METRICS:
                entry[metric] = float(np.mean([r[metric] for r in rows]))
            curve.append(entry)
        curves[codec] = sorted(curve, key=lambda entry: (entry["bpp"], entry["param"]))
    return curves


def _bd_pair(anchor: Sequence[dict], test: Sequence[dict], metric: str) -> dict:
    """BD-rate (%) and BD-metric of test against anchor for one metric; errors kept as text."""
    result: dict = {"bd_rate_pct": None, "bd_metric": None}
    args = (
        [p["bpp"] for p in anchor], [p[metric] for p in anchor], [p["bpp"] for p in test], [p[metric] for p in test]
    )
    try:
        result["bd_rate_pct"] = bd_rate(*args)
    except RcamError as error:
        result["bd_rate_error"] = str(error)
    try:
        result["bd_metric"] = bd_metric(*args)
    except RcamError as error:
        result["bd_metric_error"] = str(error)
    return result


def bd_tables(points: Sequence[dict], curves: dict[str, list[dict]], baseline_names: Sequence[str]) -> dict:
    """BD-rate/BD-metric of rcam against each baseline, per metric: on the averaged curves and per image."""
    averaged = {
        name: {metric: _bd_pair(curves[name], curves["rcam"], metric) for metric in METRICS}
        for name in baseline_names
        if name in curves and "rcam" in curves
    }
    by_image: dict[str, dict[str, list[dict]]] = {}
    for row in points:
        by_image.setdefault(row["image"], {}).setdefault(row["codec"], []).append(row)
    per_image = {
        image: {name: {metric: _bd_pair(codecs[name], codecs["rcam"], metric) for metric in METRICS}
                for name in baseline_names if name in codecs and "rcam" in codecs}
        for image, codecs in by_image.items()
    }
    summary = {}
    for name in baseline_names:
        summary[name] = {}
        for metric in METRICS:
            rates = [per_image[i][name][metric]["bd_rate_pct"] for i in per_image if name in per_image[i]]
            deltas = [per_image[i][name][metric]["bd_metric"] for i in per_image if name in per_image[i]]
            rates = [value for value in rates if value is not None]
            deltas = [value for value in deltas if value is not None]
            summary[name][metric] = {
                "bd_rate_pct_mean": statistics.fmean(rates) if rates else None,
                "bd_rate_pct_median": statistics.median(rates) if rates else None,
                "bd_metric_mean": statistics.fmean(deltas) if deltas else None,
                "images": len(rates),
            }
    return {"averaged": averaged, "per_image": per_image, "per_image_summary": summary}


def _speed_summary(rows: Sequence[dict], points: Sequence[dict], lam: float) -> dict:
    """Seconds per megapixel over the set (total seconds / total megapixels) and peak memory."""
    summary: dict = {"lambda": lam, "images": len(rows), "cpu_count": os.cpu_count()}
    megapixels = sum(row["megapixels"] for row in rows)
    for field in ("encode_s", "decode_s", "cascade_s", "cascade_render_s", "cascade_encode_s"):
        values = [row[field] for row in rows if field in row]
        summary[f"{field}_per_mp"] = sum(values) / megapixels if values and megapixels else None
    # The injected codec's in-process encode + decode at the same λ (no process start, model loaded).
    inprocess = [row["seconds"] for row in points if row["codec"] == "rcam" and row["param"] == lam]
    summary["rcam_inprocess_s_per_mp"] = sum(inprocess) / megapixels if inprocess and megapixels else None
    for field in ("encode_peak_mib", "decode_peak_mib"):
        values = [row[field] for row in rows if field in row]
        summary[field] = max(values) if values else None
    # Fallbacks when the timer reports no per-command memory: the largest child process this run waited
    # for (which includes any fork of this process), and this process itself (in-process codec + metrics).
    peak = _peak_rss_mib()
    summary["peak_rss_self_mib"] = peak["self"]
    summary["peak_rss_children_mib"] = peak["children"]
    summary["per_image"] = list(rows)
    return summary


# ------------------------------------------------------------------------------------------- outputs


def _atomic_write_text(path: Path, text: str) -> None:
    """Write text to path through a temporary file and rename, so no partial file is left behind."""
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to path through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _json_safe(value):
    """Replace non-finite floats (inf PSNR of identical images) with strings JSON can carry."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _csv_text(rows: Sequence[dict], fields: Sequence[str]) -> str:
    """Rows as CSV text with the given columns."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _bd_rows(bd: dict) -> list[dict]:
    """Flatten the BD tables into CSV rows (scope 'averaged' or an image name)."""
    rows = []
    scopes = [("averaged", bd["averaged"])] + list(bd["per_image"].items())
    for scope, table in scopes:
        for baseline, metrics in table.items():
            for metric, values in metrics.items():
                rows.append({"scope": scope, "baseline": baseline, "metric": metric,
                             "bd_rate_pct": values["bd_rate_pct"], "bd_metric": values["bd_metric"]})
    return rows


def _codec_label(codec: str, labels: dict[str, str] | None = None) -> str:
    if codec == "rcam":
        return "rcam"
    return (labels or {}).get(codec) or baselines_module.get_baseline(codec).label


def _curve_style(codec: str, labels: dict[str, str] | None = None) -> dict:
    """rcam bold black; learned-ISP cascades dashed; LibRaw cascades and end-to-end comparators plain."""
    if codec == "rcam":
        return {"linewidth": 2.5, "marker": "o", "color": "black"}
    if codec not in (labels or {}) and baselines_module.get_baseline(codec).isp:
        return {"marker": ".", "linestyle": "--"}
    return {"marker": "."}


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str, labels: dict[str, str] | None = None) -> None:
    """RD plot PNG: PSNR, MS-SSIM dB and ΔE00 against bpp (log axis) for every codec's averaged curve
    (`labels`: legend names of codecs that are not cascades, e.g. the end-to-end comparators)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for axis, metric in zip(axes, METRICS):
        for codec, curve in curves.items():
            bpp = [point["bpp"] for point in curve]
            values = [point[metric] for point in curve]
            axis.plot(bpp, values, label=_codec_label(codec, labels), **_curve_style(codec, labels))
        axis.set_xscale("log")
        # Plain numbers at 1-2-5 steps: the default log ticks leave a 0.1-3 bpp range nearly unlabelled.
        axis.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _pos: f"{value:g}"))
        axis.xaxis.set_minor_formatter(ticker.NullFormatter())
        axis.set_xlabel("bits per pixel")
        axis.set_ylabel(METRIC_LABELS[metric] + ("" if HIGHER_IS_BETTER[metric] else ", lower is better"))
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    _atomic_write_bytes(path, buffer.getvalue())


def _fmt(value, spec: str = ".2f", width: int = 8) -> str:
    """A number for the table, '-' when missing."""
    if value is None:
        return "-".rjust(width)
    if isinstance(value, str):
        return value.rjust(width)
    return format(value, spec).rjust(width)


# Columns of the BD table: (header, metric, field, number format).
_BD_COLUMNS = (
    ("BDR-PSNR", "psnr", "bd_rate_pct", "+.1f"),
    ("BD-PSNR", "psnr", "bd_metric", "+.2f"),
    ("BDR-MSSSIM", "ms_ssim_db", "bd_rate_pct", "+.1f"),
    ("BD-MSSSIM", "ms_ssim_db", "bd_metric", "+.2f"),
    ("BDR-ΔE00", "ciede2000", "bd_rate_pct", "+.1f"),
    ("BD-ΔE00", "ciede2000", "bd_metric", "+.3f"),
)


def format_table(results: dict) -> str:
    """The run's readable summary: averaged curves, BD tables against each baseline, speed and notes.

    Works on run_eval's return value and on a results.json loaded back.
    """
    setup = results["setup"]
    lambdas = ", ".join(f"{lam:g}" for lam in setup["lambdas"])
    width = max([8, *map(len, results["curves"])])  # codec column: ISP+CODEC names are longer
    lines = [
        f"rcam eval: protocol {setup['protocol']}, {setup['images']} image(s), λ = {lambdas}, "
        f"baselines: {', '.join(setup['baselines']) or 'none'}",
        "",
        "Averaged curves (mean over images per operating point; PSNR and MS-SSIM in dB)",
        f"{'codec':<{width}} {'param':>9} {'bpp':>8} {'PSNR':>8} {'MS-SSIM':>8} {'ΔE00':>8}",
    ]
    for codec, curve in results["curves"].items():
        for point in curve:
            param_name = "λ" if codec == "rcam" else setup.get("end_to_end_params", {}).get(codec, "λ" if codec in setup.get("end_to_end", {}) else "q")
            param = f"{param_name}={point['param']:g}"
            lines.append(
                f"{codec:<{width}} {param:>9} {_fmt(point['bpp'], '.3f')} {_fmt(point['psnr'])} "
                f"{_fmt(point['ms_ssim_db'])} {_fmt(point['ciede2000'], '.3f')}"
            )

    bd = results["bd"]
    if bd["averaged"]:
        header = " ".join(f"{title:>11}" for title, *_ in _BD_COLUMNS)
        lines += [
            "",
            "rcam vs each baseline on the averaged curves. BDR = BD-rate %, negative = rcam saves bits;",
            "BD-PSNR / BD-MSSSIM in dB, positive = rcam better; BD-ΔE00 negative = rcam better.",
            f"{'baseline':<{width}} {header} {'BDR-PSNR median/img':>20}",
        ]
        for name, metrics in bd["averaged"].items():
            cells = " ".join(_fmt(metrics[metric][field], spec, 11) for _title, metric, field, spec in _BD_COLUMNS)
            median = bd["per_image_summary"][name]["psnr"]["bd_rate_pct_median"]
            lines.append(f"{name:<{width}} {cells} {_fmt(median, '+.1f', 20)}")
        missing = sorted({
            f"{name}/{metric}" for name, metrics in bd["averaged"].items() for metric, values in metrics.items()
            if values["bd_rate_pct"] is None or values["bd_metric"] is None
        })
        if missing:
            lines.append(f"('-' = not computable, see the bd errors in results.json: {', '.join(missing)})")

    speed = results.get("speed")
    if speed and speed.get("images"):
        def per_mp(field: str) -> str:
            return _fmt(speed[field], ".3f", 0)

        lines += [
            "",
            f"Speed at λ={speed['lambda']:g}, seconds per megapixel ({speed['cpu_count']} CPU cores):",
            f"  rcam whole commands: encode {per_mp('encode_s_per_mp')}, decode {per_mp('decode_s_per_mp')}; "
            f"in-process encode+decode {per_mp('rcam_inprocess_s_per_mp')}",
            f"  cascade: render + JPEG XL encode {per_mp('cascade_s_per_mp')} "
            f"(render {per_mp('cascade_render_s_per_mp')}, encode {per_mp('cascade_encode_s_per_mp')})",
            f"Peak memory (MiB): rcam encode {_fmt(speed['encode_peak_mib'], '.0f', 0)}, "
            f"decode {_fmt(speed['decode_peak_mib'], '.0f', 0)} (whole commands); "
            f"largest child process {speed['peak_rss_children_mib']:.0f}; "
            f"this process {speed['peak_rss_self_mib']:.0f}",
        ]
    lines += ["", "Notes:"] + [f"- {note}" for note in results["notes"]]
    if results.get("outputs"):
        lines.append("Files: " + ", ".join(str(path) for path in results["outputs"].values()))
    return "\n".join(lines)


def print_table(results: dict, file=None) -> None:
    """Print format_table(results) to file (default stdout)."""
    print(format_table(results), file=file or sys.stdout)


# ------------------------------------------------------------------------------------------------ run


def run_eval(
    inputs: Path,
    protocol: str,
    lambdas: Sequence[float],
    baselines: Sequence[str],
    out_dir: Path,
    codec: Codec,
    command_timer: CommandTimer | None = None,
    *,
    render: Render | None = None,
    make_pair: MakePair | None = None,
    qualities: dict[str, Sequence[float]] | None = None,
    cache_dir: Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    speed: bool = True,
    speed_lambda: float | None = None,
    numthreads: int | None = None,
    progress: bool = True,
    setup: dict | None = None,
    end_to_end: Sequence[EndToEndCodec] = (),
    isp_renders: dict[str, Render] | None = None,
) -> dict:
    """Measure rcam (at each λ) and the cascades (each baseline's quality sweep) on a set of images.

    inputs: a RAW file or folder (protocol "R") or a photo file or folder (protocol "S"), searched recursively.
    codec(raw_path, lam) -> (whole-file bytes, decoded (H,W,3) uint8); command_timer(raw_path, lam) ->
    (encode s, decode s) or a dict (see CommandTimer) for whole commands, run once per image at speed_lambda
    (default: the middle λ); the cascade (render + JPEG XL) is timed on the same images. isp_renders: the
    learned ISPs (name -> render(raw_path) -> (H,W,3) uint8) that ISP+CODEC baselines need.
    render: reference render (default rcam.codec.rawio.reference_render); make_pair: protocol S synthesis
    (default rcam.training.synth.make_pair). qualities overrides a baseline's sweep. Baseline results are cached
    under cache_dir (default out_dir/cache). Writes results.json, points.csv, curves.csv, bd.csv, speed.csv
    and rd.png to out_dir and returns the results dict (also what results.json holds).
    end_to_end: learned RAW-to-bitstream comparators, measured at each λ like rcam and compared like the baselines.
    """
    protocol = protocol.upper()
    if protocol not in PROTOCOLS:
        raise RcamError(f"unknown protocol {protocol!r}; use R (real RAW files) or S (synthetic from photos)")
    lambdas = sorted({float(lam) for lam in lambdas})
    if not lambdas:
        raise RcamError("give at least one λ")
    if any(not math.isfinite(lam) or lam <= 0 for lam in lambdas):
        raise RcamError(f"λ values must be positive numbers; got {lambdas}")
    # Canonical names, duplicates dropped, order kept.
    baseline_names = list(dict.fromkeys(baselines_module.get_baseline(name).name for name in baselines))
    end_to_end = list({comparator.name: comparator for comparator in end_to_end}.values())
    isp_renders = dict(isp_renders or {})
    for name in baseline_names:
        isp = baselines_module.get_baseline(name).isp
        if isp is not None and isp not in isp_renders:
            raise RcamError(f"baseline {name} needs the learned ISP '{isp}' to render the RAW files, and none was given")
    sweeps = {name: list(baselines_module.get_baseline(name).qualities) for name in baseline_names}
    for name, values in (qualities or {}).items():
        name = baselines_module.get_baseline(name).name
        if not values:
            raise RcamError(f"empty quality list for baseline {name}")
        sweeps[name] = sorted(float(value) for value in values)
    render = render or reference_render
    make_pair = make_pair or synth.make_pair
    out_dir = Path(out_dir)
    cache = BaselineCache(Path(cache_dir) if cache_dir is not None else out_dir / "cache")

    inputs = Path(inputs)
    files = collect_inputs(inputs, protocol)
    if limit is not None:
        if limit < 1:
            raise RcamError(f"the image limit must be at least 1; got {limit}")
        files = files[:limit]
    names = _image_names(files, inputs)
    # Speed is timed at one λ: the given one, else the middle of the list.
    speed_lambda = lambdas[len(lambdas) // 2] if speed_lambda is None else float(speed_lambda)
    out_dir.mkdir(parents=True, exist_ok=True)

    points: list[dict] = []
    images: list[dict] = []
    speed_rows: list[dict] = []
    cache_hits = 0
    steps_per_image = len(lambdas) + sum(len(comparator.params or lambdas) for comparator in end_to_end) + len(baseline_names) + (1 if speed else 0)
    with tqdm(total=len(files) * steps_per_image, desc="rcam eval", unit="step", disable=not progress) as bar:
        items = _prepare_items(files, names, protocol, render, make_pair, out_dir, seed)
        for item in items:
            bar.set_postfix_str(item.name)
            height, width = item.reference.shape[:2]
            input_digest = file_digest(item.cascade_input).hex()
            images.append({"image": item.name, "source": str(item.source), "codec_input": str(item.codec_input),
                           "width": width, "height": height, "input_sha256": input_digest})
            points += _measure_rcam(item, lambdas, codec, bar)
            for comparator in end_to_end:
                points += _measure_rcam(item, comparator.params or lambdas, comparator.codec, bar, comparator.name)
            isp_images: dict[str, np.ndarray] = {}
            for name in baseline_names:
                image = _cascade_image(item, name, isp_renders, isp_images)
                rows, hits = _measure_baseline(item, name, image, sweeps[name], cache, input_digest, numthreads)
                points += rows
                cache_hits += hits
                bar.update(1)
            if speed:
                speed_rows.append(_measure_speed(item, speed_lambda, render, command_timer, numthreads))
                bar.update(1)

    curves = average_curves(points)
    results = {
        "setup": {
            "protocol": protocol, "inputs": str(inputs), "images": len(images), "lambdas": lambdas,
            "baselines": baseline_names + [comparator.name for comparator in end_to_end], "qualities": sweeps,
            "end_to_end": {comparator.name: comparator.label for comparator in end_to_end},
            "end_to_end_params": {comparator.name: comparator.param_name for comparator in end_to_end},
            "baseline_settings": {name: baselines_module.get_baseline(name).settings for name in baseline_names},
            "libraries": baselines_module.library_versions(), "seed": seed, "metrics": list(METRICS),
            "bd_method": "pchip", "baseline_cache_hits": cache_hits, **(setup or {}),
        },
        "images": images,
        "points": points,
        "curves": curves,
        "bd": bd_tables(points, curves, baseline_names + [comparator.name for comparator in end_to_end]),
        "speed": _speed_summary(speed_rows, points, speed_lambda) if speed else None,
        "notes": list(NOTES) + ([] if command_timer or not speed else
                                ["Whole-command rcam encode/decode timing was not run (no command timer given)."])
        + [comparator.note for comparator in end_to_end if comparator.note],
    }
    results["outputs"] = _write_outputs(results, out_dir)
    return results


def _write_outputs(results: dict, out_dir: Path) -> dict[str, str]:
    """Write results.json, the CSV files and the RD plot; return their paths by kind."""
    paths = {
        "json": out_dir / "results.json", "points_csv": out_dir / "points.csv", "curves_csv": out_dir / "curves.csv",
        "bd_csv": out_dir / "bd.csv", "plot": out_dir / "rd.png",
    }
    point_fields = ["image", "codec", "param", "num_bytes", "bpp", *METRICS, "seconds"]
    _atomic_write_text(paths["points_csv"], _csv_text(results["points"], point_fields))
    curve_rows = [{"codec": codec, **point} for codec, curve in results["curves"].items() for point in curve]
    _atomic_write_text(paths["curves_csv"], _csv_text(curve_rows, ["codec", "param", "images", "bpp", *METRICS]))
    bd_fields = ["scope", "baseline", "metric", "bd_rate_pct", "bd_metric"]
    _atomic_write_text(paths["bd_csv"], _csv_text(_bd_rows(results["bd"]), bd_fields))
    if results["speed"] is not None:
        paths["speed_csv"] = out_dir / "speed.csv"
        speed_fields = ["image", "lambda", "megapixels", "encode_s", "decode_s", "encode_peak_mib", "decode_peak_mib",
                        "cascade_render_s", "cascade_encode_s", "cascade_s"]
        _atomic_write_text(paths["speed_csv"], _csv_text(results["speed"]["per_image"], speed_fields))
    setup = results["setup"]
    title = f"rcam vs cascades, protocol {setup['protocol']}, {setup['images']} image(s)"
    plot_curves(results["curves"], paths["plot"], title, setup.get("end_to_end"))
    outputs = {kind: str(path) for kind, path in paths.items()}
    # results.json last, so it lists every file and its presence means the run finished.
    text = json.dumps(_json_safe({**results, "outputs": outputs}), indent=1, ensure_ascii=False)
    _atomic_write_text(paths["json"], text)
    return outputs
