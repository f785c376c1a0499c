"""One bottleneck's curve under two prior families of scripts/compare.py, against itself: what a
prior family costs or saves against another, at the same settings, seeds and epochs.

    python scripts/compare_priors.py RESULTS/wallpapers/learned/comparison.json \
        RESULTS/wallpapers/context/comparison.json [--out=costs.json]

For every bottleneck in both files and every seed in both, the BD-rate and BD-PSNR of the first
file's curve against the second's (each point its best checkpoint: range-coded bits per held-out
image against PSNR), then the mean over those seeds with its 95% interval; a markdown table, and
with --out the same numbers as JSON. docs/codec.md's table of the context layouts tried (checkerboard
and anchor rows against the raster context) comes from this script.
"""
import json

from compare import bd_per_seed, fmt_interval

from discrete_ae.errors import DataError, cli
from discrete_ae.files import save_json
from discrete_ae.overrides import parse_paths_and_options

DEFAULTS = dict(out="")


def read_comparison(path):
    """A comparison.json of scripts/compare.py -> its dict, or one DataError line."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DataError(f"no file at {path!r}: pass RESULTS/SET/PRIOR/comparison.json of scripts/compare.py") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a JSON file ({type(err).__name__}): pass a comparison.json of scripts/compare.py") from None
    if not isinstance(data, dict) or not isinstance(data.get("best"), dict) or "prior" not in data:
        raise DataError(f"{path} has no 'best' curves and 'prior': not a comparison.json of scripts/compare.py")
    return data


def costs(a, b):
    """{bottleneck: {"seeds": the seeds both ran, "bd_rate", "bd_psnr" (compare.bd_per_seed)}} of
    comparison a's curves against b's."""
    out = {}
    for method in sorted(set(a["best"]) & set(b["best"])):
        ours, theirs = a["best"][method]["points"], b["best"][method]["points"]
        seeds = sorted(set().union(*(p["seeds"] for p in ours)) & set().union(*(p["seeds"] for p in theirs)))
        out[method] = {"seeds": seeds, **bd_per_seed(ours, theirs, seeds)}
    if not out:
        raise DataError(f"the two files share no bottleneck ({sorted(a['best'])} and {sorted(b['best'])})")
    return out


def cell(stat, unit, digits):
    return fmt_interval(stat, unit, digits) if stat["overlap"] else "no overlap"


def table(result, a, b):
    lines = [f"{a['prior']} against {b['prior']} ({a.get('set', '?')}, {a.get('epochs', '?')} epochs; 95% intervals over seeds)",
             "| bottleneck | seeds | BD-rate | BD-PSNR |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {len(r['bd_rate']['seeds'])} | {cell(r['bd_rate'], '%', 1)} | {cell(r['bd_psnr'], ' dB', 3)} |"
              for m, r in result.items()]
    return "\n".join(lines)


def main(argv):
    paths, opts = parse_paths_and_options(argv, DEFAULTS, "usage: python scripts/compare_priors.py A.json B.json "
                                          "[--out=FILE.json] (see --help)")
    if len(paths) != 2:
        raise DataError(f"pass two comparison.json files (the layout to price, then the reference); got {len(paths)}")
    a, b = (read_comparison(p) for p in paths)
    result = costs(a, b)
    print(table(result, a, b))
    if opts["out"]:
        save_json(opts["out"], {"a": paths[0], "b": paths[1], "a_prior": a["prior"], "b_prior": b["prior"],
                                "set": a.get("set"), "epochs": a.get("epochs"), "costs": result})


if __name__ == "__main__":
    cli(main, __doc__)
