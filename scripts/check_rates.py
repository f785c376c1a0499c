"""Check trained checkpoints' rates and bitstreams on their validation split.

    python scripts/check_rates.py CHECKPOINT [CHECKPOINT ...] [--data_dir=DIR] [--images=1000] [--seed=0] [--fuzz=0]

For each checkpoint of a bottleneck that sends integers, one line:
  - the one-stream rate (bits_coded) beside the ideal code length and the bottleneck's own estimate;
  - with a learned prior, the bits the training loss charges on the validation images, computed as
    in training (DDCL: fresh uniform noise instead of the dither), and their gap to the coded bits;
  - the mean per-image string length and its overhead over the one stream (header and padding);
  - whether model.decompress(model.compress(x)) equals model.decode(model.encode(x)) bit for bit on
    the first --images validation images;
  - with --histograms=True, for FSQ: the ideal bits per held-out image under a histogram fitted on
    the training split joint over the whole code (what the fitted prior does) and under one
    histogram per channel over its levels (what DDCL's fitted prior does), and their difference;
  - with --fuzz=N, N damaged strings (a random byte replaced, a bit flipped, or bytes cut off the
    end, one damage each, numpy seed 0): how many raise BitstreamError, decode to the image itself
    (a byte the decoder does not need), or decode to another image (the 16-bit checksum lets about
    1 in 65,536 through; docs/reliability.md).
docs/entropy_models.md's numbers come from this script.
"""
import os
import time

import numpy as np
import torch

from discrete_ae.data import DEFAULT_DATA_DIR, head, load_dataset, to_float_images
from discrete_ae.errors import cli
from discrete_ae.geometry import LATENT_POSITIONS
from discrete_ae.overrides import parse_paths_and_options
from evaluate import EVAL_BATCH_SIZE, evaluate
from utils import load_checkpoint

DEFAULTS = dict(data_dir="", images=1000, seed=0, fuzz=0, histograms=False)


@torch.no_grad()
def training_bits(model, images, batch_size=EVAL_BATCH_SIZE):
    """Mean bits per image the training loss charges on uint8 `images`: the quantizer in training
    mode where its training draws noise (DDCL); the others quantize in training as in evaluation,
    so they stay in evaluation mode (VQ's codebook is not touched)."""
    q = model.quantizer
    q.train(q.noise_in_training)
    try:
        bits = [model(to_float_images(images[i:i + batch_size])).bits for i in range(0, len(images), batch_size)]
    finally:
        q.eval()
    return torch.cat(bits).mean().item()


def check(path, opts):
    model, config = load_checkpoint(path)
    q = model.quantizer
    if not q.has_indices:
        return f"{path}: {config['quantizer']} sends no integers; nothing to check"
    train_u8, val_u8 = load_dataset(config["dataset"], opts["data_dir"] or DEFAULT_DATA_DIR)  # never from the file
    m = evaluate(model, val_u8, train_u8)
    line = (f"{os.path.basename(path)} ({q.settings()}): psnr {m['psnr']:.2f} dB | coded {m['bits_coded']:.1f} "
            f"ideal {m['bits_entropy']:.1f} estimate {m['bits_estimate']:.1f} bits/img")
    if q.prior is not None:
        charged = training_bits(model, val_u8)
        line += f" | training charges {charged:.1f} ({100 * (charged / m['bits_coded'] - 1):+.2f}% of coded)"
    line += (f" | per-image strings {m['bits_per_image_coded']:.1f} (+{m['bits_per_image_coded'] - m['bits_coded']:.1f})"
             f" | stream and strings decode back: {m['roundtrip_exact']}")
    x = to_float_images(head(val_u8, opts["images"]))
    t0 = time.perf_counter()
    strings = model.compress(x, seed=opts["seed"])
    t1 = time.perf_counter()
    back = model.decompress(strings, seed=opts["seed"])
    t2 = time.perf_counter()
    same = torch.equal(back, model.decode(model.encode(x, seed=opts["seed"]), seed=opts["seed"]))
    line += (f" | decompress(compress(x)) == decode(encode(x)) on {len(x)} images: {same}"
             f" (compress {t1 - t0:.2f} s, decompress {t2 - t1:.2f} s)")
    if opts["histograms"] and hasattr(q, "fsq"):
        joint, per_channel = fsq_histogram_bits(model, train_u8, val_u8)
        line += (f" | fitted histogram joint {joint:.1f}, per channel {per_channel:.1f} bits/img "
                 f"({100 * (per_channel / joint - 1):+.1f}%)")
    if opts["fuzz"]:
        caught, same_image, wrong = fuzz(model, strings, opts["seed"], opts["fuzz"])
        line += f" | {opts['fuzz']} damaged strings: {caught} refused, {same_image} decoded to their own image, {wrong} to another"
    return line


def fsq_histogram_bits(model, train_u8, val_u8):
    """FSQ's held-out ideal bits per image under a histogram fitted on the training split: (joint over
    the whole code, one per channel over its levels)."""
    from discrete_ae import coding
    from discrete_ae.priors import fit_prior
    from evaluate import model_outputs

    q = model.quantizer
    model.eval()

    def codes(images):  # (N, P) codes, as FSQ sends them
        return torch.cat([out.indices.cpu().reshape(len(out.indices), -1) for _, out in model_outputs(model, images)])

    def levels(c):  # (N, C, P) each channel's level
        return q.fsq.indices_to_level_indices(c).long().transpose(1, 2)

    train, val = codes(train_u8), codes(val_u8)
    joint = fit_prior(train[:, None], q.codebook_size)
    bits_joint = coding.ideal_bits(val[:, None].numpy(), [p.table(val.shape[1]) for p in joint]).mean()
    per = [fit_prior(levels(train)[:, c:c + 1], size)[0] for c, size in enumerate(q.levels)]
    bits_per = coding.ideal_bits(levels(val).numpy(), [p.table(val.shape[1]) for p in per]).mean()
    return float(bits_joint), float(bits_per)


def fuzz(model, strings, seed, count):
    """(refused, decoded to the same integers, decoded to other integers) over `count` damaged strings."""
    from discrete_ae import coding
    from discrete_ae.errors import BitstreamError

    q = model.quantizer
    positions = LATENT_POSITIONS
    keys = model.stream_keys(seed, 1)
    tables = q.coding_tables(1, positions, seed)
    rng = np.random.default_rng(0)
    wants = coding.decompress(strings, q.coding_tables(len(strings), positions, seed), keys * len(strings))
    caught = same = wrong = 0
    for n in range(count):
        i = int(rng.integers(len(strings)))
        damaged = bytearray(strings[i])
        kind = rng.integers(3)
        if kind == 0:
            damaged[rng.integers(len(damaged))] = int(rng.integers(256))
        elif kind == 1:
            damaged[rng.integers(len(damaged))] ^= 1 << int(rng.integers(8))
        else:
            del damaged[len(damaged) - int(rng.integers(1, len(damaged))):]
        try:
            got = coding.decompress([bytes(damaged)], tables, keys)
        except BitstreamError:
            caught += 1
            continue
        if np.array_equal(got[0], wants[i]):
            same += 1
        else:
            wrong += 1
    return caught, same, wrong


def main(argv):
    paths, opts = parse_paths_and_options(argv, DEFAULTS, "usage: python scripts/check_rates.py CHECKPOINT [...] "
                                          "[--data_dir=DIR] [--images=1000] [--seed=0] (see --help)")
    for path in paths:
        print(check(path, opts), flush=True)


if __name__ == "__main__":
    cli(main, __doc__)
