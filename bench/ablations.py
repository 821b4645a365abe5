"""Ablations of RealCamNet's claims on our data: train each variant with the same budget, compare on protocol S.

Variants (configs/ablation_*.json): without CADR, CADR with relative (per-tile) coordinates, without the
global prior. Each is trained (or resumed) with `rcam train`, exported under its own name, evaluated with
`rcam eval --protocol S` on the val photos, and compared with the full model by BD-PSNR (averaged curves).

    .venv/bin/python bench/ablations.py [--photos ../shared/data/photos/val/McMaster] [--skip-train]
        [--steps N --threads T --limit K] [--table-only]

--steps gives every variant, the full model included, the same smaller budget in runs/ablation-N/ (so a
short comparison never mixes with the shipped model's run); without it the configs' own budget is used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rcam.errors import RcamError
from rcam.measure.bjontegaard import bd_metric, bd_rate

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"full": "configs/small.json", "no_cadr": "configs/ablation_no_cadr.json",
            "relative_coords": "configs/ablation_relative_coords.json", "no_global_prior": "configs/ablation_no_global_prior.json"}  # fmt: skip
LAMBDAS = "0.005,0.01,0.025,0.1"


def run(*argv: str) -> None:
    """Run an rcam command from the repository root, failing loudly."""
    subprocess.run([str(Path(sys.executable).parent / "rcam"), *argv], cwd=ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=str(ROOT.parent / "shared/data/photos/val/McMaster"))
    parser.add_argument("--skip-train", action="store_true", help="Use the runs' existing checkpoints.")
    parser.add_argument("--out-dir", default="out/ablations")
    parser.add_argument("--steps", type=int, default=None, help="Same reduced budget for every variant.")
    parser.add_argument("--threads", type=int, default=2, help="Torch threads for training and eval.")
    parser.add_argument("--limit", type=int, default=None, help="Evaluate on the first N photos only.")
    parser.add_argument("--table-only", action="store_true", help="Print the table from the existing results.json files.")
    args = parser.parse_args()

    curves = {}
    for name, config_path in VARIANTS.items():
        out = f"{args.out_dir}/{name}"
        if args.table_only:
            curves[name] = json.loads((ROOT / out / "results.json").read_text())["curves"]["rcam"]
            continue
        config = json.loads((ROOT / config_path).read_text())
        config["threads"] = args.threads
        if args.steps:
            config.update(steps=args.steps, run_dir=f"runs/ablation-{args.steps}/{name}", val_every=0)
        (ROOT / out).mkdir(parents=True, exist_ok=True)
        (ROOT / out / "train.json").write_text(json.dumps(config, indent=2))
        if not args.skip_train:
            run("train", f"{out}/train.json")
        # Ablation weights stay out of the shipped weights/ and its manifest.
        run("export", f"{config['run_dir']}/last.pt", "--name", f"ablation-{name}", "--weights-dir", out)
        model = f"{out}/ablation-{name}.safetensors"
        limit = ["--limit", str(args.limit)] if args.limit else []
        run("eval", args.photos, "--protocol", "S", "--lambdas", LAMBDAS, "--baselines", "jpeg", "--no-speed",
            "--model", model, "--out-dir", out, "--threads", str(args.threads), *limit)  # fmt: skip
        curves[name] = json.loads((ROOT / out / "results.json").read_text())["curves"]["rcam"]

    print_table(curves)


def _bd_or_reason(function, *args) -> tuple[float | None, str]:
    try:
        return function(*args), ""
    except RcamError as error:
        return None, str(error)


def print_table(curves: dict[str, list[dict]]) -> None:
    """BD-PSNR and BD-rate of each variant against the full model; each is reported where it is defined.

    BD-PSNR needs the curves to overlap in rate, BD-rate needs them to overlap in PSNR: a variant that is
    worse everywhere by more than the curve's PSNR span still has a BD-PSNR.
    """
    full = curves["full"]
    print(f"{'variant':18s} {'BD-PSNR vs full (dB)':>22s} {'BD-rate vs full (%)':>21s}")
    for name, curve in curves.items():
        if name == "full":
            continue
        args_ = ([p["bpp"] for p in full], [p["psnr"] for p in full], [p["bpp"] for p in curve], [p["psnr"] for p in curve])
        delta, delta_reason = _bd_or_reason(bd_metric, *args_)
        rate, rate_reason = _bd_or_reason(bd_rate, *args_)
        reasons = "; ".join(reason for reason in (delta_reason, rate_reason) if reason)
        delta_text = "-" if delta is None else f"{delta:.3f}"
        rate_text = "-" if rate is None else f"{rate:.2f}"
        print(f"{name:18s} {delta_text:>22s} {rate_text:>21s}" + (f"  ({reasons})" if reasons else ""))

if __name__ == "__main__":
    main()
