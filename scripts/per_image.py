r"""Why the answer moves with the data: FSQ and DDCL image by image, against what each image holds.

    python scripts/per_image.py wallpapers=/tmp/photos skimage=/tmp/patches --runs=compare --prior=learned \
        [--fsq=8-5-5-5] [--ddcl=rw1e-2] [--out=docs/results/per_image]

For each data set (NAME=DIR, as scripts/compare.py), takes compare.py's runs of FSQ and DDCL at one
matched operating point under one prior family (OUT/{set}_{prior}/checkpoints/, every seed found)
and scores every held-out crop: its PSNR and its ideal code length under each model's prior,
averaged over the seeds. DDCL's gain on an image at equal bits is its PSNR difference to FSQ minus
FSQ's curve slope (dB per bit, from compare.py's results of that set) times its bit difference.
Content is measured by each crop's own lossless PNG size, in bits per pixel.

Writes OUT/per_image.json (every image's numbers, the binned gains, the correlations) and
OUT/per_image.png: the content distribution of each set, and DDCL's equal-bits gain by content
quintile (pooled over the sets) with 95% intervals, one line per set.
"""
import glob
import io
import json
import os

import numpy as np
import torch

from discrete_ae.bjontegaard import interval
from discrete_ae.data import load_dataset
from discrete_ae.errors import DataError, cli
from discrete_ae.files import save_json
from discrete_ae.overrides import parse_paths_and_options
from discrete_ae.plots import pyplot, save_figure
from evaluate import evaluate
from utils import load_checkpoint

DEFAULTS = dict(runs="compare", prior="learned", fsq="8-5-5-5", ddcl="rw1e-2", out="docs/results/per_image",
                results="docs/results")
USAGE = "usage: python scripts/per_image.py NAME=DIR [NAME=DIR ...] --runs=OUT --prior=learned (see --help)"
BINS = 5  # content quantiles, pooled over the sets


def png_bpp(images_u8):
    """(N,) each crop's lossless PNG size (zlib level 9) in bits per pixel: how much it holds."""
    from PIL import Image

    out = []
    for img in images_u8.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="PNG", compress_level=9)
        out.append(8 * len(buffer.getvalue()) / (img.shape[0] * img.shape[1]))
    return np.array(out)


def scores(paths, val_u8, train_u8):
    """Per-image PSNR and ideal bits, averaged over the checkpoints (seeds) in `paths`."""
    psnr, bits = [], []
    for path in paths:
        model, _ = load_checkpoint(path)
        per = evaluate(model, val_u8, train_u8, entropy_coding=False, per_image=True)["per_image"]
        if per["bits"] is None:
            raise DataError(f"{path}: no measured rate per image (a bottleneck without integers?)")
        psnr.append(per["psnr"])
        bits.append(per["bits"])
    return np.mean(psnr, 0), np.mean(bits, 0)


def fsq_slope(results, set_name, prior, label):
    """dB per bit of FSQ's mean curve around `label`, from compare.py's comparison.json."""
    path = os.path.join(results, set_name, prior, "comparison.json")
    if not os.path.isfile(path):
        raise DataError(f"no {path}: run scripts/compare.py for {set_name} under the {prior} prior first")
    with open(path) as f:
        pts = json.load(f)["best"]["fsq"]["points"]
    i = [p["label"] for p in pts].index(label)
    a, b = pts[max(i - 1, 0)], pts[min(i + 1, len(pts) - 1)]
    return (b["psnr"]["mean"] - a["psnr"]["mean"]) / (b["bits"]["mean"] - a["bits"]["mean"])


def checkpoints(opts, set_name, method, label):
    pattern = os.path.join(opts["runs"], f"{set_name}_{opts['prior']}", "checkpoints", f"{method}_{label}_s*_vae_best.pt")
    found = sorted(glob.glob(pattern))
    if not found:
        raise DataError(f"no checkpoint matches {pattern}: train it with scripts/compare.py")
    return found


def binned(content, gain, edges):
    rows = []
    which = np.clip(np.searchsorted(edges, content, side="right") - 1, 0, len(edges) - 2)  # [lo, hi), the last closed
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        inside = which == k
        mean, low, high = interval(gain[inside].tolist())
        rows.append({"content_bpp": [float(lo), float(hi)], "images": int(inside.sum()), "gain_db": mean,
                     "interval": None if low is None else [low, high]})
    return rows


def plot(path, result, edges):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, entry in result["sets"].items():
        content = np.array(entry["content_bpp"])
        left.hist(content, bins=40, density=True, histtype="step", label=f"{name} ({len(content)} crops)")
        rows = [r for r in entry["binned"] if r["gain_db"] is not None]  # a set may hold no crop of a quintile
        centres = [(r["content_bpp"][0] + r["content_bpp"][1]) / 2 for r in rows]
        gains = [r["gain_db"] for r in rows]
        err = [[g - (r["interval"] or [g, g])[0] for g, r in zip(gains, rows)],
               [(r["interval"] or [g, g])[1] - g for g, r in zip(gains, rows)]]
        right.errorbar(centres, gains, yerr=err, marker="o", capsize=3, label=f"{name}: mean {entry['mean_gain_db']:+.2f} dB")
    for x in edges[1:-1]:
        left.axvline(x, color="0.8", lw=0.8)
    left.set(xlabel="content: the crop's own PNG size (bits per pixel)", ylabel="density",
             title="What the held-out crops hold")
    right.axhline(0, color="0.5", lw=0.8)
    right.set(xlabel="content quintile (PNG bits per pixel, pooled over the sets)",
              ylabel="DDCL - FSQ at equal bits (dB)",
              title=f"Per image, {result['prior']} prior: DDCL {result['ddcl']} vs FSQ {result['fsq']}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(path, fig)


def main(argv):
    paths, opts = parse_paths_and_options(argv, DEFAULTS, USAGE)
    sets = {}
    for text in paths:
        name, _, folder = text.partition("=")
        if not folder:
            raise DataError(f"{text!r}: write NAME=DIR (the set's name in compare.py's runs, then its folder)")
        sets[name] = folder
    result = {"prior": opts["prior"], "fsq": opts["fsq"], "ddcl": opts["ddcl"], "bins": BINS, "sets": {}}
    for name, folder in sets.items():
        train_u8, val_u8 = load_dataset("folder", folder)
        torch.manual_seed(0)
        fsq = checkpoints(opts, name, "fsq", opts["fsq"])
        ddcl = checkpoints(opts, name, "ddcl", opts["ddcl"])
        f_psnr, f_bits = scores(fsq, val_u8, train_u8)
        d_psnr, d_bits = scores(ddcl, val_u8, train_u8)
        slope = fsq_slope(opts["results"], name, opts["prior"], opts["fsq"])
        gain = (d_psnr - f_psnr) - slope * (d_bits - f_bits)
        content = png_bpp(val_u8)
        result["sets"][name] = {
            "seeds": {"fsq": len(fsq), "ddcl": len(ddcl)}, "fsq_slope_db_per_bit": slope,
            "mean_gain_db": float(gain.mean()), "share_ddcl_ahead": float((gain > 0).mean()),
            "corr_gain_content": float(np.corrcoef(gain, content)[0, 1]),
            "mean_content_bpp": float(content.mean()), "content_bpp": content.tolist(), "gain_db": gain.tolist(),
            "fsq": {"psnr": f_psnr.tolist(), "bits": f_bits.tolist()}, "ddcl": {"psnr": d_psnr.tolist(), "bits": d_bits.tolist()}}
    pooled = np.concatenate([e["content_bpp"] for e in result["sets"].values()])
    edges = np.quantile(pooled, np.linspace(0, 1, BINS + 1))
    for entry in result["sets"].values():
        entry["binned"] = binned(np.array(entry["content_bpp"]), np.array(entry["gain_db"]), edges)
    result["edges_content_bpp"] = edges.tolist()
    os.makedirs(opts["out"], exist_ok=True)
    save_json(os.path.join(opts["out"], "per_image.json"), result)
    plot(os.path.join(opts["out"], "per_image.png"), result, edges)
    for name, e in result["sets"].items():
        bins = ", ".join("-" if r["gain_db"] is None else f"{r['gain_db']:+.2f}" for r in e["binned"])
        print(f"{name}: DDCL {e['mean_gain_db']:+.2f} dB at equal bits on average, ahead on {100 * e['share_ddcl_ahead']:.0f}% "
              f"of {len(e['gain_db'])} crops; by content quintile {bins} dB; correlation with content "
              f"{e['corr_gain_content']:+.2f}; mean content {e['mean_content_bpp']:.2f} PNG bpp")
    print(f"wrote {opts['out']}/per_image.json and per_image.png")


if __name__ == "__main__":
    cli(main, __doc__)
