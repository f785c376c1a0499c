"""Several runs' curves on one figure: validation PSNR and measured bits per image against epoch.

    python scripts/overlay.py outputs/*_metrics.jsonl [--out=outputs/overlay.png]

Each file is a run's {run}_metrics.jsonl (train.py writes one per run); the legend names each run
by its file name.
"""
import os

from discrete_ae.errors import DataError, cli
from discrete_ae.files import read_jsonl
from discrete_ae.overrides import parse_paths_and_options
from discrete_ae.plots import plot_overlay

SUFFIX = "_metrics.jsonl"


def run_name(path):
    name = os.path.basename(path)
    return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name


def main(argv):
    paths, opts = parse_paths_and_options(argv, dict(out="outputs/overlay.png"),
                                          "usage: python scripts/overlay.py RUN_metrics.jsonl [...] [--out=PNG]")
    runs = {}
    for path in paths:
        try:
            rows = read_jsonl(path)
        except ValueError:
            raise DataError(f"{path} is not a metrics file (a line is not JSON): pass outputs/RUN_metrics.jsonl") from None
        if not os.path.isfile(path) or not rows or not all("val_psnr" in r and "val_bits" in r for r in rows):
            raise DataError(f"{path} holds no epochs of train.py's metrics: pass outputs/RUN_metrics.jsonl")
        runs[run_name(path)] = rows
    plot_overlay(opts["out"], runs)
    print(f"wrote {opts['out']} ({len(runs)} runs)")


if __name__ == "__main__":
    cli(main, __doc__)
