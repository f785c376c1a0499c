"""Evaluate checkpoints at measured rates and compare them.

    python evaluate.py checkpoints/*_best.pt [--data_dir=DIR] [--device=auto] [--output_dir=outputs] [--prior_images=0]

--data_dir overrides the data folder stored in the checkpoints; --prior_images limits the training
images that fit the rate prior (0 = the whole training split).

For each checkpoint, on its dataset's validation split: MSE, PSNR and SSIM on [0, 1] images, and
the rate in bits per image three ways (fixed-length code, empirical entropy under a prior fitted on
the training split, an actual range-coded bitstream that is decoded back to check it), beside the
quantizer's own estimate (for DDCL the log2(2|z|/delta + 1) surrogate). Prints one table, writes
outputs/rate_distortion.json (CompressAI's results layout) and outputs/rate_distortion.png.

`evaluate(model, images)` is the one evaluation loop: train.py calls it every epoch.
"""
import os
import sys

import torch

from metrics import (PIXELS_PER_IMAGE, codebook_stats, cross_entropy_bits, entropy_code, fit_prior,
                     psnr_per_image, ssim_per_image)
from quantizers import UserError
from utils import (ConfigError, load_checkpoint, load_dataset, parse_overrides, pick_device,
                   save_figure, save_json, to_float_images, unwrap)

EVAL_BATCH_SIZE = 500


@torch.inference_mode()
def model_outputs(model, images, batch_size=EVAL_BATCH_SIZE):
    """Yield (x, output) over uint8 `images` (N, 3, 32, 32) in order, in eval mode.

    Batch b uses DDCL dither seed b, so a receiver regenerates the dither from its batch number."""
    device = next(model.parameters()).device
    for b, start in enumerate(range(0, len(images), batch_size)):
        x = to_float_images(images[start:start + batch_size].to(device, non_blocking=True))
        yield x, model(x, seed=b)


def stream_indices(quantizer, indices):
    """(B, ...) indices -> (B, S, P): S independent streams (quantizer.num_streams) of P symbols."""
    return indices.reshape(indices.shape[0], quantizer.num_streams, -1)


def collect_indices(model, images, batch_size=EVAL_BATCH_SIZE):
    q = unwrap(model).quantizer
    return torch.cat([stream_indices(q, out.indices) for _, out in model_outputs(model, images, batch_size)]).cpu()


def evaluate(model, images, train_images=None, batch_size=EVAL_BATCH_SIZE, entropy_coding=True):
    """Metrics of `model` on uint8 `images` (N, 3, 32, 32) -> dict of floats.

    With `train_images`, the rate prior is fitted on them and the validation indices are scored
    (bits_entropy) and range-coded (bits_coded). `bits` is the best measured rate available:
    bitstream, else entropy, else fixed-length, else the quantizer's estimate (`rate_source`).
    Sums stay on the device until the end: one read-back per evaluation, not per batch."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    q = model.quantizer
    device = next(model.parameters()).device
    sums = torch.zeros(5, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)  # MPS has no fp64
    indices = []
    for x, out in model_outputs(model, images, batch_size):
        recon = out.recon.float()
        sums += torch.stack([(recon - x).square().flatten(1).mean(1).sum(), psnr_per_image(recon, x).sum(),
                             ssim_per_image(recon, x).sum(), out.aux_loss.float() * x.shape[0],
                             out.bits.sum()]).to(sums.dtype)
        if out.indices is not None:
            indices.append(stream_indices(q, out.indices))
    n = len(images)
    metrics = dict(zip(("mse", "psnr", "ssim", "aux_loss", "bits_estimate"), (sums / n).tolist()))
    metrics["loss"] = metrics["mse"] + metrics["aux_loss"]
    metrics.update(rate_metrics(model, indices, train_images, batch_size, entropy_coding))
    metrics["bits"], metrics["rate_source"] = next(
        (metrics[k], src) for k, src in (("bits_coded", "bitstream"), ("bits_entropy", "entropy"),
                                         ("bits_fixed", "fixed-length"), ("bits_estimate", q.rate_label))
        if metrics.get(k) is not None)
    metrics["bpp"] = metrics["bits"] / PIXELS_PER_IMAGE
    metrics["images"] = n
    model.train(was_training)
    return metrics


def rate_metrics(model, indices, train_images, batch_size, entropy_coding):
    """Fixed-length, entropy and bitstream rates (bits per image) of the collected indices."""
    q = model.quantizer
    if not indices:
        return {}
    indices = torch.cat(indices).cpu()  # (N, S, P)
    out = {"bits_fixed": float(q.fixed_length_bits(indices))}
    if q.codebook_size is not None:
        out.update(codebook_stats(indices, q.codebook_size))
    if train_images is not None and len(train_images):
        priors = fit_prior(collect_indices(model, train_images, batch_size), q.codebook_size)
        out["bits_entropy"] = cross_entropy_bits(priors, indices)
        if entropy_coding:
            out["bits_coded"], out["roundtrip_exact"] = entropy_code(priors, indices)
    return out


# ----------------------------------------------------------------------------- comparison CLI

CLI_DEFAULTS = dict(data_dir="", device="auto", output_dir="outputs", prior_images=0)
TABLE = (("run", "{}"), ("quantizer", "{}"), ("settings", "{}"), ("bits_fixed", "{:.1f}"),
         ("bits_entropy", "{:.1f}"), ("bits_coded", "{:.1f}"), ("bits_estimate", "{:.1f}"), ("bpp", "{:.4f}"),
         ("psnr", "{:.2f}"), ("ssim", "{:.4f}"), ("codebook_usage", "{:.1f}"), ("perplexity", "{:.1f}"))


def format_table(rows):
    cells = [[name for name, _ in TABLE]] + [
        ["-" if r.get(k) is None else fmt.format(r[k]) for k, fmt in TABLE] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)


def compressai_results(rows):
    """CompressAI's results layout; extra aligned lists say which run each point is."""
    return {
        "name": "quantized-autoencoder",
        "description": "evaluate.py: PSNR on 8-bit-rounded [0, 1] images averaged per image, SSIM (torchmetrics), "
                       "bpp = measured bits per image / 1024 (rate_source says how it was measured)",
        "results": {
            "psnr-rgb": [r["psnr"] for r in rows], "ssim-rgb": [r["ssim"] for r in rows],
            "bpp": [r["bpp"] for r in rows], "bits": [r["bits"] for r in rows],
            "rate_source": [r["rate_source"] for r in rows], "mse": [r["mse"] for r in rows],
            "quantizer": [r["quantizer"] for r in rows], "settings": [r["settings"] for r in rows],
            "checkpoint": [r["checkpoint"] for r in rows],
        },
    }


def plot_rate_distortion(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in sorted({r["quantizer"] for r in rows}):
        pts = sorted((r for r in rows if r["quantizer"] == name), key=lambda r: r["bits"])
        sources = "/".join(sorted({r["rate_source"] for r in pts}))
        ax.plot([r["bits"] for r in pts], [r["psnr"] for r in pts], marker="o", label=f"{name} ({sources})")
        for r in pts:
            ax.annotate(r["settings"], (r["bits"], r["psnr"]), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xscale("log")  # "none" sends 32-bit floats: an order of magnitude beyond the codes
    ax.set_xlabel("bits per image (log scale; legend: how the rate was obtained)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title("Rate-distortion on the validation split")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(path, fig)
    plt.close(fig)


def evaluate_checkpoint(path, opts, device, datasets):
    model, config = load_checkpoint(path, device)
    data_dir = opts["data_dir"] or config["data_dir"]
    key = (config["dataset"], data_dir)
    if key not in datasets:
        datasets[key] = load_dataset(*key)
    train, val = datasets[key]
    prior = train[:opts["prior_images"]] if opts["prior_images"] > 0 else train
    metrics = evaluate(model, val.to(device), prior.to(device), config.get("eval_batch_size", EVAL_BATCH_SIZE))
    if metrics.get("roundtrip_exact") is False:
        raise RuntimeError(f"{path}: entropy-coded indices did not decode back exactly")
    run = config.get("run_name") or config["quantizer"]
    return {"checkpoint": path, "run": run, "quantizer": config["quantizer"],
            "settings": model.quantizer.settings(), **metrics}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    paths = [a for a in argv if not a.startswith("--")]
    try:
        opts, _ = parse_overrides([a for a in argv if a.startswith("--")], CLI_DEFAULTS)
        if not paths:
            raise ConfigError("usage: python evaluate.py CHECKPOINT [CHECKPOINT ...] [--data_dir=DIR] [--device=auto] [--output_dir=outputs]")
        device = pick_device(opts["device"])
        datasets, rows = {}, []
        for path in paths:
            rows.append(evaluate_checkpoint(path, opts, device, datasets))
            print(f"evaluated {path}", file=sys.stderr)
        os.makedirs(opts["output_dir"], exist_ok=True)
        print(format_table(rows))
        save_json(os.path.join(opts["output_dir"], "rate_distortion.json"), compressai_results(rows))
        plot_rate_distortion(os.path.join(opts["output_dir"], "rate_distortion.png"), rows)
        print(f"wrote {opts['output_dir']}/rate_distortion.json and rate_distortion.png")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
