"""Pictures a run or an evaluation writes: the per-epoch grid, training curves, the RD plot.

Every file is written atomically (utils.atomic_write); images are in [0, 1]."""
import torch

from utils import atomic_write, save_figure

GRID_PADDING = 2  # pixels between tiles, before upscaling
CAPTION_PX = 22  # height of the caption strip under a grid, in output pixels


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def save_grid(path, originals, recons, scale=4, caption="", nrow=4):
    """Grid PNG: originals on the top rows, their reconstructions below (both (B, 3, H, W) in
    [0, 1]), upscaled `scale` times with nearest-neighbour (pixels stay pixels), `caption` below."""
    from torchvision.utils import make_grid

    grid = make_grid(torch.cat([originals, recons]).float().cpu().clamp(0, 1), nrow=nrow, padding=GRID_PADDING)
    pixels = to_uint8_hwc(grid).repeat(scale, axis=0).repeat(scale, axis=1)  # (H*scale, W*scale, 3)
    image = with_caption(pixels, caption)
    atomic_write(path, lambda f: image.save(f, format="png", compress_level=1))  # fast; the grid is small anyway


def plot_curves(path, rows):
    """Losses, PSNR and bits per image against epoch, from the rows of {run}_metrics.jsonl."""
    plt = pyplot()
    epochs_ = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs_, [r["train_loss"] for r in rows], label="train loss")
    axes[0].plot(epochs_, [r["val_loss"] for r in rows], label="val loss")
    axes[0].plot(epochs_, [r["val_mse"] for r in rows], label="val MSE")
    axes[0].set_yscale("log")
    axes[1].plot(epochs_, [r["val_psnr"] for r in rows], label="val PSNR (dB)")
    axes[2].plot(epochs_, [r["val_bits"] for r in rows], label=f"bits/image ({rows[-1]['val_rate_source']})")
    axes[2].plot(epochs_, [r["val_bits_estimate"] for r in rows], "--", label="quantizer's estimate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(path, fig)
    plt.close(fig)


def plot_rate_distortion(path, rows):
    """PSNR against measured bits per image, one line per curve (quantizer, and "_learned" or
    "_context" when it was trained with such a prior), each point labelled with its run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in sorted({r.get("curve", r["quantizer"]) for r in rows}):
        pts = sorted((r for r in rows if r.get("curve", r["quantizer"]) == name), key=lambda r: r["bits"])
        sources = "/".join(sorted({r["rate_source"] for r in pts}))
        ax.plot([r["bits"] for r in pts], [r["psnr"] for r in pts], marker="o", label=f"{name} ({sources})")
        for r in pts:
            ax.annotate(r["run"], (r["bits"], r["psnr"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")  # "none" sends 32-bit floats: an order of magnitude beyond the codes
    ax.set_xlabel("bits per image (log scale; legend: how the rate was obtained)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Rate-distortion on the validation split")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(path, fig)
    plt.close(fig)


def plot_samples(path, originals, columns, row_labels):
    """Rows: validation images; columns: the originals, then one per run (row, reconstructions),
    titled with the run, its measured bits per image and PSNR, and each tile with its own PSNR."""
    from metrics import psnr_per_image

    plt = pyplot()
    n_rows, n_cols = len(originals), 1 + len(columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.5 * n_cols, 1.5 * n_rows + 0.6), squeeze=False)
    tiles = [("original", originals, None)] + [
        (f"{r['run']}\n{r['bits']:.0f} bits, {r['psnr']:.2f} dB", recon, psnr_per_image(recon, originals))
        for r, recon in columns]
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
    plt.close(fig)
