"""bpp and PSNR of rcam at several λ: real DNGs against their reference render, synthetic pairs against their target.

Real DNGs are encoded in the faithful look where the model has it (their reference keeps noise and falloff),
synthetic pairs in the clean look.

    .venv/bin/python bench/real_dngs.py [../shared/data/raw] [--lambdas 0.005,0.01,0.025] [--model rcam-small]
        [--pairs cache/synth_val/index.jsonl] [--no-raw] [--no-tone-fit] [--threads N]

--pairs adds synthetic pairs made by `rcam synth` (e.g. from the val photos): each degraded DNG is scored
against the render of its clean twin (protocol S's reference). Means per λ and set close the table.
--record writes the figures into the model's entry in weights/manifest.json (its "evaluation"; other figures
stored there for the same weights, e.g. the protocol BD tables, are kept). --no-tone-fit encodes without the
encoder's tone correction (rcam/codec/tone.py), to see what it brings.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rcam.codec.engine import decode_bytes, encode_file, tone_reference
from rcam.codec.output import quantize
from rcam.codec.rawio import reference_render
from rcam.codec.zoo import file_digest, load_codec, read_manifest, resolve_weights, write_manifest_entry
from rcam.measure.metrics import psnr


def items(args) -> list[tuple[str, Path, Path | None]]:
    """(set name, RAW path, target path or None for the file's own reference render)."""
    found = []
    if not args.no_raw:
        found += [("real", path, None) for path in sorted(Path(args.folder).glob("*.dng"))]
    if args.pairs:
        index = Path(args.pairs)
        for line in index.read_text().splitlines():
            entry = json.loads(line)
            found.append(("pairs", index.parent / entry["degraded"], index.parent / entry["target"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default=str(Path(__file__).resolve().parents[2] / "shared/data/raw"))
    parser.add_argument("--lambdas", default="0.005,0.01,0.025")
    parser.add_argument("--model", default="rcam-small")
    parser.add_argument("--pairs", default=None, help="index.jsonl of synthetic pairs to score as well")
    parser.add_argument("--no-raw", action="store_true", help="Skip the real DNG folder.")
    parser.add_argument("--record", action="store_true", help="Store the figures in weights/manifest.json.")
    parser.add_argument("--no-tone-fit", action="store_true", help="Encode without the tone correction.")
    parser.add_argument("--threads", type=int, default=None, help="Torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    codec = load_codec(args.model)
    print(f"model {codec.name} ({codec.digest.hex()[:12]})")
    print(f"{'file':45s} {'lambda':>7s} {'bytes':>8s} {'bpp':>7s} {'PSNR dB':>8s} {'enc s':>6s} {'dec s':>6s}")
    scores = defaultdict(list)
    per_file: dict[str, dict] = {}
    for set_name, path, target in items(args):
        # Once per file: the score's reference (real files: their own render) and the tone fit's.
        reference = np.asarray(Image.open(target).convert("RGB")) if target else reference_render(path)
        # Real files in the faithful look (their target is their own render) where the model has it, pairs clean.
        look = "faithful" if target is None and "faithful" in codec.model.config.looks else "clean"
        render = None if args.no_tone_fit else tone_reference(codec, path, look=look)
        for lam in (float(v) for v in args.lambdas.split(",")):
            start = time.perf_counter()
            encoded = encode_file(codec, path, lam, tone_fit=not args.no_tone_fit, reference=render, look=look)
            middle = time.perf_counter()
            decoded = quantize(decode_bytes(codec, encoded.data), 8)
            end = time.perf_counter()
            bpp = 8 * len(encoded.data) / (reference.shape[0] * reference.shape[1])
            quality = psnr(decoded, reference)
            scores[set_name, lam].append((bpp, quality))
            per_file.setdefault(path.name, {})[f"{lam:g}"] = [round(bpp, 4), round(quality, 2)]
            print(f"{path.name:45s} {lam:7.4f} {len(encoded.data):8d} {bpp:7.4f} {quality:8.2f} {middle - start:6.1f} {end - middle:6.1f}")
    print(f"\n{'set':8s} {'lambda':>7s} {'images':>6s} {'mean bpp':>9s} {'mean PSNR':>10s}")
    means: dict[str, dict] = {}
    for (set_name, lam), values in scores.items():
        bpps, psnrs = zip(*values)
        print(f"{set_name:8s} {lam:7.4f} {len(values):6d} {np.mean(bpps):9.4f} {np.mean(psnrs):10.2f}")
        means.setdefault(set_name, {})[f"{lam:g}"] = {"images": len(values), "bpp": round(float(np.mean(bpps)), 4), "psnr": round(float(np.mean(psnrs)), 2)}
    if args.record:
        record(args.model, per_file, means)


def record(model: str, per_file: dict, means: dict) -> None:
    """Store the measured figures as the model's manifest "evaluation" (only for a model named in the manifest)."""
    name, path = resolve_weights(model)
    entry = read_manifest().get("models", {}).get(name)
    if entry is None:
        raise SystemExit(f"--record: {model} is not a model in weights/manifest.json")
    command = "python bench/real_dngs.py " + shlex.join(sys.argv[1:])
    digest = file_digest(path).hex()
    evaluation = {"command": command, "weights_sha256": digest, "bpp_psnr_per_file": per_file, "means": means}
    earlier = entry.get("evaluation", {})
    if earlier.get("weights_sha256") == digest:  # figures measured otherwise for these same weights stay
        evaluation = earlier | evaluation
    print(f"recorded in {write_manifest_entry(name, {'evaluation': evaluation})}")


if __name__ == "__main__":
    main()
