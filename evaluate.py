"""Evaluate checkpoints at measured rates and compare them.

    python evaluate.py checkpoints/*_best.pt [--data_dir=DIR] [--device=auto] [--output_dir=outputs]
                       [--prior_images=0] [--save_prior=False]

For each checkpoint, on its dataset's validation split: MSE, PSNR and SSIM of [0, 1] images, and
the rate in bits per image four ways: a fixed-length code, the ideal code length under the prior
(fitted on the training split, or the learned one), one range-coded stream over the split that is
decoded back (`bits_coded`), and the mean length of one byte string per image, header included
(`bits_per_image_coded`); beside the bottleneck's own estimate (for DDCL its surrogate).

Prints one table and, for every two curves (a bottleneck and its prior), BD-rate and BD-PSNR over
the range both cover, or why there is none. Writes OUTPUT_DIR/rate_distortion.json (CompressAI's
results layout), one rate_distortion_CURVE.json per curve, rate_distortion.png and
rate_distortion_samples.png.

Options: --data_dir is the data folder (default data/, as train.py; a checkpoint never chooses it); --prior_images limits the
training images that fit the rate prior (0 = all); --save_prior=True stores the fitted prior in
each checkpoint (atomically, holding its run's lock), so `model.compress` works on it alone.

`evaluate(model, images)` is the one evaluation loop: train.py calls it every epoch.
"""
import os
import sys

import numpy as np
import torch

from discrete_ae import coding
from discrete_ae.bjontegaard import bd_pair
from discrete_ae.data import DEFAULT_DATA_DIR, head, load_dataset, to_float_images
from discrete_ae.device import pick_device, unwrap
from discrete_ae.errors import ConfigError, cli
from discrete_ae.files import save_json
from discrete_ae.geometry import LATENT_POSITIONS, PIXELS_PER_IMAGE
from discrete_ae.metrics import codebook_stats, psnr_per_image, ssim_per_image
from discrete_ae.overrides import parse_paths_and_options
from discrete_ae.plots import plot_rate_distortion, plot_samples
from discrete_ae.priors import fit_prior
from discrete_ae.runs import RunLock, check_run_name, curve_name, run_label
from utils import load_checkpoint, read_checkpoint, save_checkpoint

EVAL_BATCH_SIZE = 500


@torch.inference_mode()
def model_outputs(model, images, batch_size=EVAL_BATCH_SIZE):
    """Yield (x, output) over uint8 `images` (N, 3, 32, 32) in order, in eval mode.

    Image n uses dither seed n (DDCL): every image has its own dither, which a receiver
    regenerates from the image's number."""
    device = next(model.parameters()).device
    for start in range(0, len(images), batch_size):
        x = to_float_images(images[start:start + batch_size].to(device, non_blocking=True))
        yield x, model(x, seed=image_numbers(start, len(x)))


def image_numbers(start, count):
    return list(range(start, start + count))


def collect_indices(model, images, batch_size=EVAL_BATCH_SIZE):
    """(N, G, P) integers the coder sends for `images` (quantizer.coding_values), on the CPU."""
    q = unwrap(model).quantizer
    return torch.cat([q.coding_values(out.indices).cpu() for _, out in model_outputs(model, images, batch_size)])


def fit_rate_prior(model, train_images, batch_size=EVAL_BATCH_SIZE, store=True):
    """Fit the histogram prior of a fitted-prior model on uint8 `train_images`; with `store`, keep it
    in the model (its state_dict keeps it), so that `model.compress` can use it."""
    model = unwrap(model)
    q = model.quantizer
    if q.prior is not None:
        raise ConfigError(f"this model has a learned prior (entropy_model={q.entropy_model!r}); it needs no fitted one")
    was_training = model.training
    model.eval()  # the integers evaluation sends: DDCL's dithered ones, VQ without codebook updates
    fitted = fit_prior(collect_indices(model, train_images, batch_size), q.codebook_size)
    model.train(was_training)
    if store:
        q.fitted_prior = fitted
    return fitted


def evaluate(model, images, train_images=None, batch_size=EVAL_BATCH_SIZE, entropy_coding=True, store_prior=False,
             per_image=False):
    """Metrics of `model` on uint8 `images` (N, 3, 32, 32) -> dict of floats.

    The validation indices are scored (bits_entropy), range-coded as one stream (bits_coded) and as
    one byte string per image (bits_per_image_coded) under the model's prior: the learned one, or
    for entropy_model="fitted" a prior fitted on `train_images` (without them: no measured rate).
    Scoring leaves the model as it was; `store_prior=True` keeps the fitted prior in it (train.py
    does, so a checkpoint compresses on its own). `bits` is the best measured rate available:
    bitstream, else entropy, else fixed-length, else the quantizer's estimate (`rate_source`).
    With `per_image`, also "per_image": {"psnr": [...], "bits": [...]}, each image's PSNR and ideal
    code length under the prior (scripts/per_image.py). Sums stay on the device until the end: one
    read-back per evaluation, not per batch."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    q = model.quantizer
    device = next(model.parameters()).device
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no fp64
    sums = dict.fromkeys(("mse", "psnr", "ssim", "aux_loss", "bits_estimate"), torch.zeros((), dtype=dtype, device=device))
    indices, psnrs = [], []  # the indices of each batch; with per_image, each image's PSNR
    for x, out in model_outputs(model, images, batch_size):
        recon = out.recon.float()
        psnr = psnr_per_image(recon, x)
        if per_image:
            psnrs.append(psnr)
        batch_sums = {"mse": (recon - x).square().flatten(1).mean(1).sum(), "psnr": psnr.sum(),
                      "ssim": ssim_per_image(recon, x).sum(), "aux_loss": out.aux_loss.float() * x.shape[0],
                      "bits_estimate": out.bits.sum()}
        sums = {k: sums[k] + v.to(dtype) for k, v in batch_sums.items()}
        if out.indices is not None:
            indices.append(out.indices.cpu())
    n = len(images)
    means = (torch.stack(list(sums.values())) / n).tolist()  # one read-back for all of them
    metrics = dict(zip(sums, means))
    metrics["loss"] = metrics["mse"] + metrics["aux_loss"]
    metrics.update(rate_metrics(model, indices, train_images, batch_size, entropy_coding, store_prior))
    ideal = metrics.pop("ideal_per_image", None)
    if per_image:
        metrics["per_image"] = {"psnr": torch.cat(psnrs).tolist(), "bits": None if ideal is None else ideal.tolist()}
    metrics["bits"], metrics["rate_source"] = next(
        (metrics[k], src) for k, src in (("bits_coded", "bitstream"), ("bits_entropy", "entropy"),
                                         ("bits_fixed", "fixed-length"), ("bits_estimate", q.rate_label))
        if metrics.get(k) is not None)
    metrics["bpp"] = metrics["bits"] / PIXELS_PER_IMAGE
    metrics["images"] = n
    model.train(was_training)
    return metrics


def rate_metrics(model, batches, train_images, batch_size, entropy_coding, store_prior=False):
    """Fixed-length, ideal, one-stream and per-image rates (bits per image) of the indices of each
    evaluation batch (image n was quantized with dither seed n)."""
    q = model.quantizer
    if not batches:
        return {}
    indices = torch.cat(batches)
    out = {"bits_fixed": float(q.fixed_length_bits(indices))}
    if q.codebook_size is not None:
        out.update(codebook_stats(indices, q.codebook_size))
    fitted = None
    if q.prior is None:
        if train_images is None or not len(train_images):
            return out
        fitted = fit_rate_prior(model, train_images, batch_size, store=store_prior)
    positions = LATENT_POSITIONS

    starts = np.cumsum([0] + [len(b) for b in batches])

    def tables(b, ind):  # DDCL's learned and context tables depend on each image's dither seed
        return q.coding_tables(len(ind), positions, image_numbers(int(starts[b]), len(ind)), fitted)

    stream, ideal, strings = coding.Stream(), [], []
    for b, ind in enumerate(batches):
        values, t = q.coding_values(ind).numpy(), tables(b, ind)
        sent = coding.materialise(t, values)  # a context model's tables, computed once from the values sent
        ideal.append(coding.ideal_bits(values, sent))
        if entropy_coding:
            stream.add(values, sent)
            strings.append(coding.compress(values, sent, b""))
    out["ideal_per_image"] = np.concatenate(ideal)
    out["bits_entropy"] = float(out["ideal_per_image"].mean())
    if entropy_coding:
        out["bits_coded"] = stream.bits_per_image()
        out["bits_per_image_coded"] = 8.0 * sum(len(s) for batch in strings for s in batch) / len(indices)
        # both the one stream and every per-image string decode back to the same integers, read as a
        # receiver would: a context model's tables from the values decoded so far (one pass for both)
        exact, receiver = True, stream.decoder()
        for b, ind in enumerate(batches):
            values = q.coding_values(ind).numpy()
            from_stream, read = coding.read_batch(receiver, tables(b, ind), len(values))
            exact &= bool(np.array_equal(from_stream, values) and coding.strings_read_back(strings[b], read, b"", values).all())
        out["roundtrip_exact"] = exact
    return out


# ----------------------------------------------------------------------------- comparison CLI

CLI_DEFAULTS = dict(data_dir="", device="auto", output_dir="outputs", prior_images=0, save_prior=False)
SAMPLE_FIXED = 4  # the samples sheet shows the first validation images...
SAMPLE_HARDEST = 4  # ...and those with the largest MSE averaged over the runs
TABLE = (("run", "run", "{}"), ("settings", "settings", "{}"),
         ("bits_fixed", "fixed", "{:.1f}"), ("bits_entropy", "ideal", "{:.1f}"), ("bits_coded", "coded", "{:.1f}"),
         ("bits_per_image_coded", "per-img", "{:.1f}"), ("bits_estimate", "est.", "{:.1f}"), ("bpp", "bpp", "{:.3f}"),
         ("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("codebook_usage", "use%", "{:.0f}"),
         ("perplexity", "perpl.", "{:.0f}"))
TABLE_KEY = ("bits per image: fixed = a fixed-length code, ideal = -log2 p under the prior, coded = one range-coded "
             "stream, per-img = one string per image, est. = the bottleneck's own estimate; use% = codes used")


def format_table(rows):
    cells = [[head for _, head, _ in TABLE]] + [
        ["-" if r.get(k) is None else fmt.format(r[k]) for k, _, fmt in TABLE] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE))]
    return "\n".join(" ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells) + "\n" + TABLE_KEY


def compressai_results(rows, name="quantized-autoencoder"):
    """CompressAI's results layout (`name`, `description`, `results` with `bpp`, `psnr-rgb`,
    `ssim-rgb`); extra aligned lists say which run each point is."""
    keys = {"psnr-rgb": "psnr", "ssim-rgb": "ssim", "bpp": "bpp", "bits": "bits", "rate_source": "rate_source",
            "mse": "mse", "quantizer": "quantizer", "entropy_model": "entropy_model", "settings": "settings",
            "checkpoint": "checkpoint"}
    return {"name": name,
            "description": "evaluate.py: PSNR on 8-bit-rounded [0, 1] images averaged per image, SSIM (Gaussian window 11, "
                           "as torchmetrics), bpp = measured bits per image / 1024 (rate_source says how it was measured)",
            "results": {out: [r[k] for r in rows] for out, k in keys.items()}}


def curves_of(rows):
    """{curve: rows ordered by rate}; a curve is a bottleneck with its prior ("ddcl", "ddcl_learned")."""
    curves = {}
    for r in sorted(rows, key=lambda r: r["bits"]):
        curves.setdefault(r["curve"], []).append(r)
    return dict(sorted(curves.items()))


def per_bottleneck_results(rows):
    """{curve: CompressAI results dict}, points ordered by rate, so CompressAI's plotting client
    (`python -m compressai.utils.plot -f FILE...`) draws each file as one named line."""
    return {name: compressai_results(pts, name) for name, pts in curves_of(rows).items()}


def comparison_lines(rows):
    """One line per two curves: BD-rate and BD-PSNR of the first against the second, or why not."""
    curves = {name: pts for name, pts in curves_of(rows).items() if pts[0]["rate_source"] in ("bitstream", "entropy")}
    lines, names = [], list(curves)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa, pb = curves[a], curves[b]
            span = f"{a} {pa[0]['bits']:.0f}-{pa[-1]['bits']:.0f} bits, {b} {pb[0]['bits']:.0f}-{pb[-1]['bits']:.0f} bits"
            if len(pa) < 2 or len(pb) < 2:
                lines.append(f"{a} vs {b}: no BD numbers, a curve needs 2 points or more ({span})")
                continue
            rate, psnr = bd_pair([(r["bits"], r["psnr"]) for r in pa], [(r["bits"], r["psnr"]) for r in pb])
            if psnr is None:
                lines.append(f"{a} vs {b}: the rates do not overlap ({span}): no equal-bits comparison")
            elif rate is None:
                lines.append(f"{a} vs {b}: BD-PSNR {psnr:+.2f} dB; the PSNR ranges do not overlap, so no BD-rate ({span})")
            else:
                lines.append(f"{a} vs {b}: BD-rate {rate:+.1f}% bits at equal PSNR, BD-PSNR {psnr:+.2f} dB at equal bits "
                             f"({span}; {len(pa)} + {len(pb)} points)")
    return lines


def per_image_mse(model, images):
    """(N,) MSE of every image, with the same batches (and dither seeds) as `evaluate`."""
    return torch.cat([(out.recon.float() - x).square().flatten(1).mean(1) for x, out in model_outputs(model, images)]).cpu()


@torch.inference_mode()
def reconstructions(model, images, picks, batch_size=EVAL_BATCH_SIZE):
    """(len(picks), 3, 32, 32) reconstructions of images[picks], each from its own evaluation batch
    with its own seed, so they are the exact images `evaluate` scored."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.empty(len(picks), *images.shape[1:])
    for b in sorted({i // batch_size for i in picks}):
        batch = to_float_images(images[b * batch_size:(b + 1) * batch_size].to(device))
        recon = model(batch, seed=image_numbers(b * batch_size, len(batch))).recon.float().cpu()
        for k, i in enumerate(picks):
            if i // batch_size == b:
                out[k] = recon[i - b * batch_size]
    return out


def sample_picks(errors):
    """Indices shown in the samples sheet: the first SAMPLE_FIXED, then the SAMPLE_HARDEST others
    with the largest mean MSE over the runs (errors: list of (N,) tensors)."""
    fixed = list(range(min(SAMPLE_FIXED, len(errors[0]))))
    mean = torch.stack(errors).mean(0)
    mean[fixed] = -1.0
    hardest = [int(i) for i in mean.argsort(descending=True)[:SAMPLE_HARDEST] if mean[i] >= 0]
    return fixed + hardest


def evaluate_checkpoint(path, opts, device, datasets):
    """(table row, (model, dataset key)) of one checkpoint on its validation split."""
    model, config = load_checkpoint(path, device)
    key = (config["dataset"], opts["data_dir"] or DEFAULT_DATA_DIR)  # a file never chooses where data is read or written
    if key not in datasets:
        datasets[key] = load_dataset(*key)
    train, val = datasets[key]
    metrics = evaluate(model, val.to(device), head(train, opts["prior_images"]).to(device), store_prior=opts["save_prior"])
    if metrics.get("roundtrip_exact") is False:
        raise RuntimeError(f"{path}: entropy-coded indices did not decode back exactly")
    if opts["save_prior"] and model.quantizer.fitted_prior is not None:
        name = check_run_name(run_label(config), f"the run name stored in {path}")  # a plain name: no ../
        lock = os.path.join(os.path.dirname(os.path.abspath(path)), f".{name}.lock")
        with RunLock(lock, f"{path}'s run"):  # never beside a run that is rewriting it
            save_checkpoint(path, {**read_checkpoint(path), "model": model.state_dict()})
        print(f"stored the fitted prior in {path}", file=sys.stderr)
    q = model.quantizer
    entropy_model = q.entropy_model if q.has_indices else "-"
    row = {"checkpoint": path, "run": run_label(config), "quantizer": config["quantizer"], "entropy_model": entropy_model,
           "curve": curve_name(config, q), "settings": q.settings(), "seed": config["seed"], **metrics}
    return row, (model, key)


def write_samples_sheet(path, rows, runs, datasets):
    """The same validation images reconstructed by every run (runs on the first run's dataset),
    columns ordered by measured rate."""
    key = runs[0][1]
    same = sorted([(row, model) for row, (model, k) in zip(rows, runs) if k == key], key=lambda rm: rm[0]["bits"])
    if len(same) < len(rows):
        print(f"warning: the samples sheet shows only the {len(same)} run(s) on {key[1]!r}", file=sys.stderr)
    val = datasets[key][1]
    picks = sample_picks([per_image_mse(model, val) for _, model in same])
    columns = [(row, reconstructions(model, val, picks)) for row, model in same]
    plot_samples(path, to_float_images(val[picks]), columns,
                 [f"val #{i}" + (" (hard)" if n >= SAMPLE_FIXED else "") for n, i in enumerate(picks)])


def main(argv):
    paths, opts = parse_paths_and_options(argv, CLI_DEFAULTS, "usage: python evaluate.py CHECKPOINT [CHECKPOINT ...] "
                                          "[--data_dir=DIR] [--device=auto] [--output_dir=outputs] (see --help)")
    device = pick_device(opts["device"])
    datasets, rows, runs = {}, [], []
    for path in paths:
        row, run = evaluate_checkpoint(path, opts, device, datasets)
        rows.append(row)
        runs.append(run)
        print(f"evaluated {path}", file=sys.stderr)
    out = opts["output_dir"]
    os.makedirs(out, exist_ok=True)
    print(format_table(rows))
    for line in comparison_lines(rows):
        print(line)
    save_json(os.path.join(out, "rate_distortion.json"), compressai_results(rows))
    for name, results in per_bottleneck_results(rows).items():  # e.g. rate_distortion_ddcl_learned.json
        save_json(os.path.join(out, f"rate_distortion_{name}.json"), results)
    plot_rate_distortion(os.path.join(out, "rate_distortion.png"), rows)
    write_samples_sheet(os.path.join(out, "rate_distortion_samples.png"), rows, runs, datasets)
    print(f"wrote {out}/rate_distortion.json (and one rate_distortion_CURVE.json per curve), rate_distortion.png "
          "and rate_distortion_samples.png")


if __name__ == "__main__":
    cli(main, __doc__)
