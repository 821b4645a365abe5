"""BD-PSNR of one `rcam eval` run's rcam curve against every codec curve of another run on the same images.

For comparing a model measured earlier with comparators measured later (the cascades' curves do not depend on
the rcam model, so the other run's curves are the same ones a new run would draw):

    .venv/bin/python bench/bd_against.py out/eval_S8/results.json out/eval_S9_all/results.json
"""

import argparse
import json

from rcam.errors import RcamError
from rcam.measure.bjontegaard import bd_psnr, bd_rate


def curve(results: dict, codec: str) -> tuple[list[float], list[float]]:
    """(bpp, PSNR) of one codec's averaged curve."""
    points = results["curves"][codec]
    return [point["bpp"] for point in points], [point["psnr"] for point in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rcam_run", help="results.json whose rcam curve is measured")
    parser.add_argument("codec_run", help="results.json whose codec curves are the anchors")
    args = parser.parse_args()
    with open(args.rcam_run) as file:
        tested = json.load(file)
    with open(args.codec_run) as file:
        anchors = json.load(file)
    if [image["input_sha256"] for image in tested["images"]] != [image["input_sha256"] for image in anchors["images"]]:
        raise SystemExit("the two runs measured different images")
    rates, psnrs = curve(tested, "rcam")
    print(f"{'anchor':<18} {'BD-PSNR dB':>10} {'BD-rate %':>10}")
    for codec in anchors["curves"]:
        if codec == "rcam":
            continue
        anchor_rates, anchor_psnrs = curve(anchors, codec)
        try:
            rate = f"{bd_rate(anchor_rates, anchor_psnrs, rates, psnrs):+.1f}"
        except RcamError:  # the curves do not overlap in PSNR
            rate = "n/a"
        print(f"{codec:<18} {bd_psnr(anchor_rates, anchor_psnrs, rates, psnrs):>+10.2f} {rate:>10}")


if __name__ == "__main__":
    main()
