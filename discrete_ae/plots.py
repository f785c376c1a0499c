"""Pictures a run or an evaluation writes: the per-epoch grid, training curves, RD plots and the
samples sheet. Every file is written atomically (files.atomic_write); images are in [0, 1]."""
import sys

import numpy as np
import torch

from discrete_ae.errors import UserError
from discrete_ae.files import atomic_write

GRID_PADDING = 2  # pixels between tiles, before upscaling
CAPTION_PX = 22  # height of the caption strip under a grid, in output pixels
LABEL_PX = 26  # width of the strip naming the grid's rows
CODED_SOURCES = ("bitstream", "entropy", "fixed-length")  # rates that are code lengths


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(path, fig):
    plt = pyplot()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def to_uint8_hwc(images):
    """(B, 3, H, W) or (3, H, W) floats in [0, 1] -> uint8 numpy, channels last."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def with_caption(pixels, caption):
    """uint8 (H, W, 3) -> a PIL image with `caption` in a strip below it."""
    from PIL import Image, ImageDraw, ImageFont

    h, w, _ = pixels.shape
    canvas = Image.new("RGB", (w, h + CAPTION_PX), "white")
    canvas.paste(Image.fromarray(pixels), (0, 0))
    font = ImageFont.load_default(size=CAPTION_PX * 2 // 3)
    ImageDraw.Draw(canvas).text((4, h + CAPTION_PX // 6), caption, fill="black", font=font)
    return canvas


def check_torchvision():
    """Stop with one line when torchvision is missing or was built for another torch: pip can pair
    a torchvision with a torch it does not run beside, and then every grid fails."""
    try:
        import torchvision

        torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)  # a compiled operator: fails on a mismatched pair
    except ImportError:
        raise UserError("torchvision is not installed: pip install torchvision (from the index your torch came from)") from None
    except (RuntimeError, AttributeError) as err:
        version = getattr(sys.modules.get("torchvision"), "__version__", "?")
        raise UserError(f"torchvision {version} does not work with torch {torch.__version__} "
                        f"({str(err).strip().splitlines()[0][:80]}): install a matched pair from one index, e.g. "
                        "pip install torch==2.14.1 torchvision==0.29.1") from None


def save_grid(path, originals, recons, scale=4, caption="", nrow=4):
    """Grid PNG: originals on the top rows, their reconstructions below (both (B, 3, H, W) in
    [0, 1]), upscaled `scale` times with nearest-neighbour (pixels stay pixels); the rows named in a
    strip on the left, each reconstruction's PSNR on it, `caption` below."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    from discrete_ae.metrics import psnr_per_image

    grid = make_grid(torch.cat([originals, recons]).float().cpu().clamp(0, 1), nrow=nrow, padding=GRID_PADDING)
    pixels = to_uint8_hwc(grid).repeat(scale, axis=0).repeat(scale, axis=1)  # (H*scale, W*scale, 3)
    h, w, _ = pixels.shape
    canvas = Image.new("RGB", (w + LABEL_PX, h), "white")
    canvas.paste(Image.fromarray(pixels), (LABEL_PX, 0))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=CAPTION_PX * 2 // 3)
    rows_each = -(-len(originals) // nrow)  # rows of originals, then as many of reconstructions
    for k, label in enumerate(("original", "reconstruction")):
        top, bottom = k * h // 2, (k + 1) * h // 2
        strip = Image.new("RGB", (bottom - top, LABEL_PX), "white")
        pen = ImageDraw.Draw(strip)
        pen.text(((bottom - top - pen.textlength(label, font=font)) / 2, LABEL_PX // 6), label, fill="black", font=font)
        canvas.paste(strip.rotate(90, expand=True), (0, top))
    tile = (originals.shape[-1] + GRID_PADDING) * scale  # one image and its padding, upscaled
    for i, value in enumerate(psnr_per_image(recons.float().cpu(), originals.float().cpu()).tolist()):
        x = LABEL_PX + (i % nrow) * tile + GRID_PADDING * scale
        y = (rows_each + i // nrow + 1) * tile - CAPTION_PX
        draw.text((x + 2, y), f"{value:.1f} dB", fill="white", font=font, stroke_width=2, stroke_fill="black")
    image = with_caption(np.asarray(canvas), caption)
    atomic_write(path, lambda f: image.save(f, format="png", compress_level=1))


def plot_curves(path, rows, title):
    """Loss, PSNR and bits per image against epoch, from the rows of {run}_metrics.jsonl."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    plt = pyplot()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    axes[0].plot(epochs, [r["train_loss"] for r in rows], label="train loss")
    same = all(abs(r["val_loss"] - r["val_mse"]) <= 1e-3 * abs(r["val_mse"]) for r in rows)
    if same:  # no rate or auxiliary term: one line, said so, not two drawn on top of each other
        axes[0].plot(epochs, [r["val_mse"] for r in rows], label="validation MSE (= its loss: no rate term)")
    else:
        axes[0].plot(epochs, [r["val_loss"] for r in rows], label="validation loss (MSE + rate term)")
        axes[0].plot(epochs, [r["val_mse"] for r in rows], "--", label="validation MSE")
    axes[0].set(yscale="log", ylabel="loss (log scale)", title="Loss")
    axes[0].yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # labels inside one decade too
    axes[0].yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axes[0].yaxis.set_minor_formatter(NullFormatter())
    axes[1].plot(epochs, [r["val_psnr"] for r in rows], marker=".")
    axes[1].set(ylabel="PSNR (dB)", title="Validation PSNR")
    measured = f"measured ({rows[-1]['val_rate_source']})"
    if all(abs(r["val_bits_estimate"] - r["val_bits"]) <= 0.005 * abs(r["val_bits"]) for r in rows):
        axes[2].plot(epochs, [r["val_bits"] for r in rows], marker=".", label=measured + " = the bottleneck's estimate")
    else:
        axes[2].plot(epochs, [r["val_bits"] for r in rows], marker=".", label=measured)
        axes[2].plot(epochs, [r["val_bits_estimate"] for r in rows], "--", label="the bottleneck's estimate")
    axes[2].set(ylabel="bits per image", title="Rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}: training curves")
    save_figure(path, fig)


def plot_overlay(path, runs):
    """Validation PSNR and measured bits per image against epoch for several runs, one line per run:
    runs {name: rows of its {run}_metrics.jsonl}."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, rows in runs.items():
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["val_psnr"] for r in rows], marker=".", label=name)
        axes[1].plot(epochs, [r["val_bits"] for r in rows], marker=".", label=name)
    axes[0].set(ylabel="validation PSNR (dB)", title="Quality")
    axes[1].set(ylabel="measured bits per image", title="Rate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(path, fig)
    return fig


def _references(ax, refs):
    """Bottlenecks whose rate is no code length (none: 32-bit floats; vae: a KL) as labelled
    horizontal lines, so they do not stretch the axis of the coded rates."""
    for i, (label, psnr) in enumerate(sorted(refs, key=lambda r: -r[1])):  # the upper label above, the next below
        ax.axhline(psnr, color="grey", linestyle=":" if i % 2 else "--", linewidth=1)
        ax.annotate(label, (0.01 if i % 2 == 0 else 0.99, psnr), xycoords=("axes fraction", "data"), fontsize=7,
                    color="dimgrey", xytext=(0, 2 if i % 2 == 0 else -9), textcoords="offset points",
                    ha="left" if i % 2 == 0 else "right")


def plot_rate_distortion(path, rows):
    """PSNR against measured bits per image: one line per curve (a bottleneck with its prior);
    bottlenecks without a code length as reference lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.6))
    curves, refs = {}, []
    for r in sorted(rows, key=lambda r: r["bits"]):
        if r["rate_source"] in CODED_SOURCES:
            curves.setdefault(r.get("curve", r["quantizer"]), []).append(r)
        else:
            refs.append((f"{r['run']}: {r['psnr']:.2f} dB ({r['bits']:.0f} bits, {r['rate_source']}: not a code length)",
                         r["psnr"]))
    for name, pts in curves.items():
        ax.plot([r["bits"] for r in pts], [r["psnr"] for r in pts], marker="o", label=f"{name} ({pts[0]['rate_source']})")
    _references(ax, refs)
    ax.set(xlabel="bits per image (measured)", ylabel="PSNR (dB)", title="Rate-distortion on the validation split")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    save_figure(path, fig)


COLOURS = {"fsq": "tab:blue", "ddcl": "tab:orange", "vq": "tab:green", "simvq": "tab:red", "lfq": "tab:purple",
           "fsp": "tab:brown", "rfsq": "tab:pink", "none": "tab:gray", "vae": "tab:olive",
           "jpeg": "tab:cyan", "webp": "black", "avif": "gold"}  # one colour per bottleneck and codec, every figure
OUTLIER_DB = 2.0  # a curve entirely this far below the others gets its own panel, so it does not squeeze them


def colour(name):
    """The colour of a curve named after a bottleneck or codec ("ddcl", "ddcl_context, 50 epochs")."""
    base = name.split("_")[0].split(",")[0].split(" ")[0].lower()
    return COLOURS.get(base)


def plot_comparison(path, methods, references, title):
    """Each method's mean points with 95% intervals over seeds on both axes.
    methods: {name: [(bits, (lo, hi) or None, psnr, (lo, hi) or None)]}; references: [(label, psnr)].
    References are lines labelled in the right margin; curves far below the rest get a panel of
    their own under the main one, on the same bits axis."""
    plt = pyplot()
    tops = {name: max(p[2] for p in pts) for name, pts in methods.items()}
    lows = {name: min(p[2] for p in pts) for name, pts in methods.items()}
    floor = min((lows[n] for n in methods if tops[n] >= max(tops.values()) - 3 * OUTLIER_DB), default=0)
    apart = [n for n in methods if tops[n] < floor - OUTLIER_DB]
    main = [n for n in methods if n not in apart]
    rows = 2 if apart else 1
    fig, axes = plt.subplots(rows, 1, figsize=(8.5, 5.5 if apart else 4.8), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [4, 1][:rows]}, constrained_layout=True)
    for ax, names in zip(axes[:, 0], (main, apart)):
        for name in names:
            pts = methods[name]
            bits, psnr = [p[0] for p in pts], [p[2] for p in pts]
            xerr = [[b - (p[1][0] if p[1] else b) for b, p in zip(bits, pts)], [(p[1][1] if p[1] else b) - b for b, p in zip(bits, pts)]]
            yerr = [[y - (p[3][0] if p[3] else y) for y, p in zip(psnr, pts)], [(p[3][1] if p[3] else y) - y for y, p in zip(psnr, pts)]]
            ax.errorbar(bits, psnr, xerr=xerr, yerr=yerr, marker="o", markersize=4, capsize=2, label=name,
                        color=colour(name))
        ax.grid(alpha=0.3)
        ax.set_ylabel("PSNR (dB)")
        ax.legend(fontsize=8, ncol=2, loc="lower right")
    top = axes[0, 0]
    if references:
        low, high = top.get_ylim()
        top.set_ylim(low, max(high, max(p for _, p in references) + 0.15))
        for label, psnr in references:
            top.axhline(psnr, color=colour(label) or "grey", linestyle="--", linewidth=1)
            top.annotate(label, (1.01, psnr), xycoords=("axes fraction", "data"), fontsize=7, va="center",
                         color=colour(label) or "dimgrey", annotation_clip=False)
    top.set_title(title)
    axes[-1, 0].set_xlabel("range-coded bits per image (mean over seeds; bars: 95% interval)")
    save_figure(path, fig)
    return fig


def plot_samples(path, originals, columns, row_labels):
    """Rows: validation images; columns: the originals, then one per run (row, reconstructions)
    in the order given, titled with the run, its rate and PSNR; each tile carries its own PSNR."""
    from discrete_ae.metrics import psnr_per_image

    plt = pyplot()
    n_rows, n_cols = len(originals), 1 + len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.5 * n_cols, 1.5 * n_rows + 0.6), squeeze=False)

    def rate(r):
        return f"KL {r['bits']:.0f} bits" if r["rate_source"] == "KL" else f"{r['bits']:.0f} bits"

    tiles = [("original", originals, None)] + [
        (f"{r['run']}\n{rate(r)}, {r['psnr']:.2f} dB", recon, psnr_per_image(recon, originals)) for r, recon in columns]
    for col, (title, images, psnr) in enumerate(tiles):
        pixels = to_uint8_hwc(images)
        axes[0, col].set_title(title, fontsize=7)
        for row in range(n_rows):
            ax = axes[row, col]
            ax.imshow(pixels[row], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if psnr is not None:
                ax.set_xlabel(f"{psnr[row]:.1f} dB", fontsize=6, labelpad=1)
            if col == 0:
                ax.set_ylabel(row_labels[row], fontsize=6)
    fig.tight_layout()
    save_figure(path, fig)
