"""Pure metric functions: distortion (PSNR, SSIM) and rate (priors, entropy, a real bitstream).

Conventions follow CompressAI (InterDigitalInc/CompressAI): images in [0, 1] are rounded to 8 bits
before PSNR, PSNR is computed per image and averaged, rates are bits per image and
bpp = bits / (32 * 32).

Rate is measured on integer indices shaped (N, S, P): N images, S independent streams (one per
latent channel for DDCL, one for FSQ/VQ codes), P positions per stream (4 x 4 = 16). Each stream
has its own factorized prior p(symbol), fitted on the training split and scored on held-out data.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch

PIXELS_PER_IMAGE = 32 * 32
PSNR_CAP_DB = 100.0  # PSNR of an exact 8-bit reproduction (MSE 0) is reported as this cap
PRIOR_PSEUDOCOUNT = 0.5  # Krichevsky-Trofimov add-1/2: no symbol of the support gets probability 0
ESCAPE_BITS = 16  # a value outside an open alphabet's fitted support is sent raw in 16 bits


def quantize_8bit(x):
    return torch.round(x.clamp(0, 1) * 255.0) / 255.0


def psnr_per_image(x, y):
    """(B, 3, H, W) pairs in [0, 1] -> (B,) PSNR in dB after 8-bit rounding, capped at PSNR_CAP_DB."""
    mse = (quantize_8bit(x) - quantize_8bit(y)).float().square().flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp_min(1e-30))).clamp(max=PSNR_CAP_DB)


def ssim_per_image(x, y):
    """(B,) SSIM of images in [0, 1] (torchmetrics, Gaussian window 11, sigma 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    # channels-last inputs make its depthwise 11x11 convolutions 2.5x faster on CPU, same values
    x, y = (t.float().contiguous(memory_format=torch.channels_last) for t in (x, y))
    return structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")


def codebook_stats(indices, codebook_size):
    """Codebook usage (% of codes seen) and perplexity (2^entropy of the code histogram)."""
    hist = torch.bincount(indices.flatten(), minlength=codebook_size).double()
    p = hist[hist > 0] / hist.sum()
    return {"codebook_usage": 100.0 * (hist > 0).sum().item() / codebook_size,
            "perplexity": math.exp(-(p * p.log()).sum().item())}


@dataclass
class StreamPrior:
    """p over the integers lo .. lo + len(probs) - 2, and an escape symbol last (probability 0
    when the alphabet is closed, as for FSQ/VQ codes)."""
    lo: int
    probs: np.ndarray

    @property
    def escape(self):
        return len(self.probs) - 1


def fit_prior(indices, alphabet_size=None):
    """One StreamPrior per stream from training indices (N, S, P).

    alphabet_size: K for a closed alphabet [0, K); None for unbounded integers (DDCL), whose
    support is the training range plus an escape symbol for values outside it."""
    indices = indices.cpu().long()
    priors = []
    for s in range(indices.shape[1]):
        values = indices[:, s].flatten()
        if alphabet_size is None:
            lo, hi = int(values.min()), int(values.max())
            escape_count = PRIOR_PSEUDOCOUNT
        else:
            lo, hi, escape_count = 0, alphabet_size - 1, 0.0
        counts = torch.bincount(values - lo, minlength=hi - lo + 1).double().numpy() + PRIOR_PSEUDOCOUNT
        counts = np.append(counts, escape_count)
        priors.append(StreamPrior(lo, counts / counts.sum()))
    return priors


def _symbols(prior, values):
    """Map integer values to symbol ids; out-of-support values become the escape symbol."""
    ids = values - prior.lo
    outside = (ids < 0) | (ids >= prior.escape)
    if outside.any() and prior.probs[prior.escape] == 0:
        raise ValueError(f"index outside the closed alphabet [0, {prior.escape})")
    if outside.any() and np.abs(values[outside]).max() >= 2 ** (ESCAPE_BITS - 1):
        raise ValueError(f"index too large for the {ESCAPE_BITS}-bit escape code")
    return np.where(outside, prior.escape, ids).astype(np.int32), values[outside]


def cross_entropy_bits(priors, indices):
    """Mean bits per image of `indices` (N, S, P) under `priors`: the ideal code length."""
    indices = indices.cpu().long().numpy()
    total = 0.0
    for s, prior in enumerate(priors):
        symbols, escaped = _symbols(prior, indices[:, s].ravel())
        total += -np.log2(prior.probs[symbols]).sum() + ESCAPE_BITS * len(escaped)
    return float(total) / indices.shape[0]


def entropy_code(priors, indices):
    """Encode `indices` (N, S, P) with constriction's range coder under `priors`, decode them back.

    Returns (bits per image of the real bitstream, whether decoding reproduced every index). The
    whole split is one stream: a per-image stream would add up to 32 bits of word padding each."""
    import constriction

    indices = indices.cpu().long().numpy()
    escape_model = constriction.stream.model.Uniform(2 ** ESCAPE_BITS)
    offset = 2 ** (ESCAPE_BITS - 1)
    models, encoder = [], constriction.stream.queue.RangeEncoder()
    for s, prior in enumerate(priors):
        symbols, escaped = _symbols(prior, indices[:, s].ravel())
        nonzero = np.flatnonzero(prior.probs > 0)
        # constriction cannot model a zero-probability symbol: drop them and remap the ids
        model = constriction.stream.model.Categorical(prior.probs[nonzero], perfect=False)
        remap = np.searchsorted(nonzero, symbols).astype(np.int32)
        encoder.encode(remap, model)
        if len(escaped):
            encoder.encode((escaped + offset).astype(np.int32), escape_model)
        models.append((model, nonzero, symbols.size))
    compressed = encoder.get_compressed()
    decoder = constriction.stream.queue.RangeDecoder(compressed)
    ok = True
    for s, (prior, (model, nonzero, count)) in enumerate(zip(priors, models)):
        symbols = nonzero[decoder.decode(model, count)]
        n_escaped = int((symbols == prior.escape).sum())
        values = symbols + prior.lo
        if n_escaped:
            values[symbols == prior.escape] = decoder.decode(escape_model, n_escaped).astype(np.int64) - offset
        ok &= bool(np.array_equal(values, indices[:, s].ravel()))
    return compressed.size * 32.0 / indices.shape[0], ok
