"""Priors: the probabilities the coder (discrete_ae/coding.py) gives each transmitted integer.

Three kinds (train.py's `entropy_model`):

  fitted   `fit_prior`: a histogram of the training split's integers per stream, Krichevsky-Trofimov
           add-1/2 counts, fitted by evaluate.py after (or during) training and stored in the
           bottleneck's state_dict, so a loaded checkpoint compresses on its own.
  learned  `CategoricalPrior` (FSQ: one per channel over its levels; the other codebooks: one over
           the codes) and `LogisticMixturePrior` (DDCL: a density per channel), trained with the
           autoencoder so that the loss pays for the bits the coder later writes (Balle, Laparra,
           Simoncelli, "End-to-end Optimized Image Compression", ICLR 2017, section 2).
  context  `ContextMixturePrior` (DDCL) and `ContextCategoricalPrior` (FSQ): the same, their
           parameters predicted for each value from the values sent before it (in `coding_order`)
           (Minnen, Balle, Toderici, "Joint Autoregressive and Hierarchical Priors for Learned
           Image Compression", NeurIPS 2018, section 2, without the hyperprior).

A logistic mixture's CDF has two implementations, one per numeric need: `_bin_probability` for
training (float32, differentiable, accurate in the tails) and `mixture_cdf` for coding tables
(float64, through exp alone, components summed in a fixed order, so a table is the same bits in
any batch). The context priors' coding tables come from their network run on integers
(discrete_ae/exact.py), so that they are the same bits on every machine.
"""
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from discrete_ae.coding import ESCAPE_OFFSET, SequentialTables, Table
from discrete_ae.errors import CheckpointError

PRIOR_PSEUDOCOUNT = 0.5  # Krichevsky-Trofimov add-1/2: no symbol of the support gets probability 0
LIKELIHOOD_BOUND = 1e-9  # no bin is given less probability (CompressAI's bound): <= ~30 bits a value
TAIL_MASS = 1e-9  # a learned density's support for coding leaves out this much probability
MAX_SUPPORT = 4096  # values per coding table at most; the rest goes through the escape
MAX_ALPHABET = 2**24  # codes a bottleneck may have at most (FSQ's prod(levels); models.check_bounds)
DITHER_LEVELS = 256  # DDCL's coding tables condition on the dither rounded to this many cells per bin
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- fitted priors

@dataclass
class StreamPrior:
    """p over the integers lo .. lo + len(probs) - 2, and an escape symbol last (probability 0
    when the alphabet is closed, as for FSQ/VQ codes)."""
    lo: int
    probs: np.ndarray

    @property
    def escape(self):
        return len(self.probs) - 1

    def table(self, count):
        """The coder's table for `count` symbols per image (a closed alphabet drops the escape)."""
        is_open = bool(self.probs[self.escape] > 0)
        probs = self.probs if is_open else self.probs[:-1] / self.probs[:-1].sum()
        return Table(self.lo, probs[None, None], is_open, count)


def _densest_window(stream, width):
    """(lo, hi) of the `width` consecutive integers that hold the most of `stream` (1-D int64)."""
    values, counts = torch.unique(stream, return_counts=True)  # sorted
    if int(values[-1] - values[0]) < width:
        return int(values[0]), int(values[-1])
    total = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    ends = torch.searchsorted(values, values + width, right=False)  # first value beyond each window
    best = int((total[ends] - total[:-1]).argmax())
    return int(values[best]), int(values[best]) + width - 1


def fit_prior(values, alphabet_size=None):
    """One StreamPrior per stream from training values (N, S, P).

    alphabet_size: K for a closed alphabet [0, K); None for unbounded integers (DDCL), whose
    support is the training range, at most MAX_SUPPORT - 1 values wide (the densest such window: a
    diverged latent cannot ask for a table of billions of entries), plus an escape symbol for
    values outside it, counted."""
    values = values.cpu().long()
    priors = []
    for s in range(values.shape[1]):
        stream = values[:, s].flatten()
        if alphabet_size is None:
            lo, hi = _densest_window(stream, MAX_SUPPORT - 1)
            inside = (stream >= lo) & (stream <= hi)
            escape_count = PRIOR_PSEUDOCOUNT + float((~inside).sum())
            stream = stream[inside]
        else:
            lo, hi, escape_count = 0, alphabet_size - 1, 0.0
        counts = torch.bincount(stream - lo, minlength=hi - lo + 1).double().numpy() + PRIOR_PSEUDOCOUNT
        counts = np.append(counts, escape_count)
        priors.append(StreamPrior(lo, counts / counts.sum()))
    return priors


def priors_to_state(priors):
    """Fitted priors as plain tensors and ints (a state_dict entry loadable with weights_only)."""
    return [{"lo": p.lo, "probs": torch.from_numpy(p.probs)} for p in priors or []]


def priors_from_state(state):
    """The fitted priors a checkpoint stores, checked: a crafted table (a huge offset, an empty, 2-D,
    negative or NaN one, or one larger than MAX_SUPPORT) is one CheckpointError line, not a coder
    that allocates or divides by it."""
    if not isinstance(state, (list, tuple)):
        raise CheckpointError("the stored fitted prior is not a list of tables: not a checkpoint this repo wrote")
    priors = []
    for i, p in enumerate(state):
        lo, probs = (p.get("lo"), p.get("probs")) if isinstance(p, dict) else (None, None)
        ok = (isinstance(lo, int) and not isinstance(lo, bool) and abs(lo) < ESCAPE_OFFSET and isinstance(probs, torch.Tensor)
              and probs.dim() == 1 and 2 <= len(probs) <= max(MAX_SUPPORT, MAX_ALPHABET) + 1 and probs.is_floating_point()
              and bool(torch.isfinite(probs).all()) and bool((probs >= 0).all()) and float(probs[:-1].sum()) > 0)
        if not ok:
            raise CheckpointError(f"the stored fitted prior's table {i} is not one this repo writes (an offset within "
                                  f"+-{ESCAPE_OFFSET}, 2 to {MAX_ALPHABET + 1:,} finite probabilities >= 0)")
        priors.append(StreamPrior(lo, probs.double().numpy()))
    return priors or None


# ----------------------------------------------------------------------------- learned priors

def _normalised(probs):
    """Clamp every entry to LIKELIHOOD_BOUND and renormalise the last axis (float64 numpy)."""
    probs = np.maximum(probs, LIKELIHOOD_BOUND)
    return probs / probs.sum(-1, keepdims=True)


def _symbol_bits(logp, symbols, sizes):
    """logp (..., S, P or 1, K) log2 probabilities over each stream's alphabet, symbols (B, S, P)
    exact integers as floats -> (-log2 p(symbol), the slope of -log2 p between the symbol's
    neighbours: a central difference, one-sided at the ends), each (B, S, P)."""
    k = symbols.detach().round().long()
    logp = logp.expand(*k.shape, logp.shape[-1])
    lo, hi = (k - 1).clamp(min=0), torch.minimum(k + 1, (sizes - 1)[:, None].expand_as(k))

    def pick(i):
        return logp.gather(-1, i.unsqueeze(-1)).squeeze(-1)

    return -pick(k), (pick(lo) - pick(hi)) / (hi - lo).clamp(min=1)


def _straight_through(slope, symbols):
    """0 in value; the gradient `slope` with respect to `symbols` (held fixed itself)."""
    return slope.detach() * (symbols - symbols.detach())


class CategoricalPrior(nn.Module):
    """Learned p(symbol) for S streams with alphabets of `sizes[s]` symbols, shared by all positions
    (FSQ: one stream per latent channel over its levels; VQ: one stream over the codebook).

    Logits (S, max(sizes)); entries beyond a stream's size are masked to -inf."""

    def __init__(self, sizes):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(len(sizes), max(sizes)))
        self.register_buffer("sizes", torch.tensor(sizes), persistent=False)
        self.register_buffer("mask", torch.where(torch.arange(max(sizes)) < self.sizes[:, None], 0.0, -math.inf),
                             persistent=False)

    def log2_probs(self):
        return F.log_softmax(self.logits + self.mask, dim=-1) / LN2  # (S, K)

    def bits(self, symbols):
        """symbols (B, S, P): float values that are exact integers, optionally carrying a
        straight-through gradient -> (bits for the encoder, bits for the prior), each (B, S, P).

        Both have the value -log2 p(symbol). The encoder's gradient is the slope of -log2 p between
        the neighbouring symbols (a central difference; one-sided at the ends), so it feels which
        neighbour is cheaper; the prior's gradient is the cross-entropy, with the symbols fixed."""
        exact, slope = _symbol_bits(self.log2_probs()[:, None, :], symbols, self.sizes)  # logp (S, 1, K)
        return exact.detach() + _straight_through(slope, symbols), exact

    def tables(self, count):
        """One shared Table per stream for `count` symbols per image."""
        probs = self.log2_probs().detach().double().cpu().mul(LN2).exp().numpy()
        return [Table(0, _normalised(probs[s, :int(size)])[None, None], False, count)
                for s, size in enumerate(self.sizes.tolist())]


def _bin_probability(x, delta, loc, log_scale, weight_logits):
    """P(value in [x - delta/2, x + delta/2]) under a mixture of logistics.

    x (B, C, P); loc, log_scale, weight_logits broadcastable to (B, C, P, K) (one mixture per
    channel: (C, 1, K); one per value: (B, C, P, K)) -> (B, C, P). Each component's difference of
    sigmoids is taken in the tail where it is accurate (CompressAI's sign trick): both arguments
    large and positive would otherwise cancel to 0 in floating point."""
    x = x.unsqueeze(-1)  # (B, C, P, 1)
    inv_scale = torch.exp(-log_scale)
    upper = (x + delta / 2 - loc) * inv_scale
    lower = (x - delta / 2 - loc) * inv_scale
    sign = torch.where(upper + lower > 0, -1.0, 1.0).to(x.dtype)
    per_component = (torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).abs()
    return (per_component * torch.softmax(weight_logits, -1)).sum(-1)


class LogisticMixturePrior(nn.Module):
    """Learned density of each DDCL latent channel: a mixture of `components` logistics, whose CDF
    is closed-form.

    Training sees z_tilde = z + u, u ~ U(-delta/2, delta/2); its density is the prior convolved
    with the noise, p(z_tilde) = F(z_tilde + delta/2) - F(z_tilde - delta/2) per unit delta (Balle
    et al. 2017, section 2: the uniform-noise proxy). Evaluation sends m = round((z + u)/delta)
    with the dither u known to both sides, and P(m | u) = F(m delta - u + delta/2) - F(m delta - u - delta/2)
    is the same expression at z_hat = m delta - u = z + (noise uniform and independent of z), so the
    bits the loss pays and the bits the coder writes agree in distribution (Agustsson & Theis,
    "Universally Quantized Neural Compression", NeurIPS 2020, section 3)."""

    INIT_SCALES = (0.05, 0.2, 1.0)  # components start at several widths around 0

    def __init__(self, channels, components=3):
        super().__init__()
        scales = torch.tensor(self.INIT_SCALES[:components] + (1.0,) * max(0, components - len(self.INIT_SCALES)))
        self.loc = nn.Parameter(torch.zeros(channels, components))
        self.log_scale = nn.Parameter(scales.log().repeat(channels, 1))
        self.weight_logits = nn.Parameter(torch.zeros(channels, components))

    def _params(self, detach=False):
        params = (self.loc, self.log_scale, self.weight_logits)
        return tuple(p.detach() for p in params) if detach else params

    def bits(self, x, delta):
        """x (B, C, P) noisy or dithered latent values -> (bits for the encoder, bits for the prior):
        -log2 of each value's delta-wide bin; the first has the prior's parameters held fixed, the
        second the values."""
        def cost(values, detach):
            p = _bin_probability(values.float(), delta, *(t[:, None, :] for t in self._params(detach)))  # (C, 1, K)
            return -torch.log2(p.clamp_min(LIKELIHOOD_BOUND))

        return cost(x, True), cost(x.detach(), False)

    @torch.no_grad()
    def support(self, delta):
        """(lo, hi) integer bins per channel holding all but TAIL_MASS of the density (bisection on
        the CDF), at most MAX_SUPPORT bins; values outside go through the escape."""
        params = tuple(p.detach().double().cpu() for p in self._params())
        loc, scale = params[0], params[1].exp()
        span = (loc.abs() + 40 * scale).max(1).values  # (C,), beyond the tails
        bounds = []
        for target in (TAIL_MASS / 2, 1 - TAIL_MASS / 2):
            a, b = -span.clone(), span.clone()
            for _ in range(64):
                mid = (a + b) / 2
                below = torch.stack([mixture_cdf(mid[c:c + 1], *(t[c] for t in params))[0] for c in range(len(mid))]) < target
                a, b = torch.where(below, mid, a), torch.where(below, b, mid)
            bounds.append(b)
        out = []
        for lo, hi in zip(*bounds):
            lo, hi = math.floor(lo / delta) - 1, math.ceil(hi / delta) + 1
            if hi - lo + 1 > MAX_SUPPORT - 1:
                centre = (lo + hi) // 2
                lo, hi = centre - (MAX_SUPPORT - 1) // 2, centre + (MAX_SUPPORT - 1) // 2 - 1
            lo, hi = max(lo, 1 - ESCAPE_OFFSET), min(hi, ESCAPE_OFFSET - 1)
            out.append((lo, hi))
        return out

    @torch.no_grad()
    def tables(self, dither, delta):
        """dither u (B, C, P) -> one Table per channel with P(m | u) for every image and position:
        (B, P, K_c + 1) rows over m = lo .. hi and an escape column with the tail mass.

        The rows condition on u rounded to the centre of one of DITHER_LEVELS cells per bin: both
        sides round the same u the same way, so decoding stays exact, the rows are computed once
        per cell instead of once per value, and the cost of the rounding is negligible (a cell is
        delta / 256 wide, against a density that changes over many deltas)."""
        u = dither.detach().double().cpu()
        cell = ((u / delta + 0.5) * DITHER_LEVELS).floor().clamp(0, DITHER_LEVELS - 1).long().numpy()  # (B, C, P)
        centres = ((torch.arange(DITHER_LEVELS, dtype=torch.float64) + 0.5) / DITHER_LEVELS - 0.5) * delta  # (L,)
        params = tuple(p.detach().double().cpu() for p in self._params())
        tables = []
        for c, (lo, hi) in enumerate(self.support(delta)):
            edges = (torch.arange(lo, hi + 2, dtype=torch.float64) - 0.5) * delta  # (K + 1,)
            # CDF of z at the bin edges of z_hat = m delta - u for each cell centre u and every m;
            # float64 keeps the differences accurate down to LIKELIHOOD_BOUND without the sign trick
            cdf = mixture_cdf(edges - centres[:, None], *(t[c] for t in params))  # (L, K + 1)
            p = cdf[:, 1:] - cdf[:, :-1]
            escape = (1.0 - p.sum(-1, keepdim=True)).clamp(min=0.0)
            rows = _normalised(torch.cat([p, escape], -1).numpy())  # (L, K + 1)
            tables.append(Table(lo, rows[cell[:, c]], True, u.shape[-1]))
        return tables


# ----------------------------------------------------------------------------- context prior (DDCL)

CONTEXT_HIDDEN = 64  # features of the context network
LOG_SCALE_OFFSET = -2.0  # predicted scales start near exp(-2) ~ 0.14: a couple of DDCL bins wide
CONTEXT_SUPPORT = 4.0  # |z_hat| up to this is coded through the tables, larger values through the escape
CONTEXT_WINDOW = 1.5  # ...in a window of +-this around each value's predicted mean (docs/codec.md: its rate)
TABLE_VALUES = 16384  # the encoder builds the tables of this many network outputs at a time: arrays in cache
SILU_EXP_CAP = -40.0  # _silu's exp(-x) stays finite, and its square too (the backward pass), in float32


def _silu(x):
    """SiLU through exp alone. torch's sigmoid rounds a value differently in the vectorised body and
    in the tail of a tensor (measured on this CPU), exp does not: so a value's float64 coding table
    never depends on where the value sits in a batch, which sequential decoding relies on. The
    exponent is capped: below x = -88 exp(-x) is inf in float32 and the backward pass is inf / inf =
    NaN; at the cap SiLU is already 0 to within 1e-15 of x."""
    return x / (1.0 + torch.exp(-x.clamp(min=SILU_EXP_CAP)))


def mixture_cdf(x, loc, log_scale, weight_logits):
    """Mixture-of-logistics CDF at x (..., N) with parameters (..., K) -> (..., N), through exp
    alone (see _silu) and with the components summed in a fixed order."""
    w = torch.exp(weight_logits - weight_logits.max(-1, keepdim=True).values)
    total, cdf = 0.0, 0.0
    for k in range(w.shape[-1]):
        total = total + w[..., k, None]
        cdf = cdf + w[..., k, None] / (1.0 + torch.exp(-(x - loc[..., k, None]) * torch.exp(-log_scale[..., k, None])))
    return cdf / total


class AffineInputs(NamedTuple):
    """The context network's input from the integers sent, per channel c: ((v mul[c]) / div[c])
    scale[c] - offset[b, c, p] (exact.affine_inputs), offset (1 or B, C, P)."""
    mul: np.ndarray
    div: np.ndarray
    scale: np.ndarray
    offset: np.ndarray


class _CausalContext(nn.Module):
    """The context network of the context priors (Minnen, Balle, Toderici, NeurIPS 2018, section 2,
    here without a hyperprior): a 3x3 convolution over all channels masked to the row above and the
    value to the left (the neighbours already sent in raster order; the centre is masked, so the C
    values of one position are coded together and independently given the context), plus a learned
    bias per position of the grid (borders and centre differ), then two 1x1 convolutions with SiLU:

        x (B, C, H, W) -> masked 3x3 + position bias (B, 64, H, W) -> 1x1 (B, 64, H, W) -> 1x1 (B, out, H, W)

    Coding runs it on integers (discrete_ae/exact.py): the encoder computes every position in one
    pass, the decoder one anti-diagonal of positions at a time (`coding_order`), and both get the
    same bits on any machine (tested)."""

    sequential = True  # the coder's groups are positions (B, H*W, C), sent in `order`
    heads = 1  # first layers: one group per position (ContextCodePrior: one per stream)

    def __init__(self, channels, grid, out, hidden=CONTEXT_HIDDEN):
        super().__init__()
        self.channels, self.grid = channels, tuple(grid)
        self.context = nn.Conv2d(channels, hidden, 3, padding=1)
        self.position = nn.Parameter(torch.zeros(1, hidden, *self.grid))
        self.hidden = nn.Conv2d(hidden, hidden, 1)
        self.out = nn.Conv2d(hidden, out, 1)
        mask = torch.ones(1, 1, 3, 3)
        mask[..., 1, 1:] = 0  # the value itself and the one to its right
        mask[..., 2, :] = 0  # the row below
        self.register_buffer("mask", mask, persistent=False)

    def features(self, x, detach=False):
        """x (B, C, H, W) -> (B, out, H, W): each position's output from the positions before it,
        computed in x's dtype and on its device (the weights held fixed with `detach`)."""
        def w(t):
            return (t.detach() if detach else t).to(device=x.device, dtype=x.dtype)

        h = F.conv2d(x, w(self.context.weight) * w(self.mask), w(self.context.bias), padding=1) + w(self.position)
        h = F.conv2d(_silu(h), w(self.hidden.weight), w(self.hidden.bias))
        return F.conv2d(_silu(h), w(self.out.weight), w(self.out.bias))

    def _check(self, x):
        if tuple(x.shape[1:]) != (self.channels, math.prod(self.grid)):
            raise ValueError(f"context prior for {self.channels} channels on a {self.grid} grid got latents {tuple(x.shape)}")

    def _first_layers(self):
        """(heads, hidden, C, 3, 3) masked 3x3 weights and (heads, hidden, H, W) biases with the position
        bias, as float64 numpy: one head (ContextCodePrior: one per stream)."""
        weight = (self.context.weight * self.mask).detach().double()[None]
        bias = (self.context.bias[:, None, None] + self.position[0]).detach().double()[None]
        return weight, bias

    @torch.no_grad()
    def exact(self):
        """This network on integers (discrete_ae/exact.py), from the current weights: built once and
        kept until a parameter changes (torch counts every in-place write in a tensor's version)."""
        from discrete_ae import exact  # numba, imported only where a context prior codes

        key = tuple((id(p), p.data_ptr(), p._version) for p in self.parameters())
        if self.__dict__.get("_exact", (None,))[0] != key:
            first, bias = self._first_layers()

            def array(t):
                return t.detach().double().cpu().numpy()

            self.__dict__["_exact"] = (key, exact.ExactNetwork(
                array(first), array(bias), array(self.hidden.weight)[..., 0, 0], array(self.hidden.bias),
                array(self.out.weight)[..., 0, 0], array(self.out.bias)))
        return self.__dict__["_exact"][1]

    @property
    def order(self):
        """(G,) the raster group (position * heads + head) of each group in the order they are coded."""
        return coding_order(self.grid, self.heads)[0]

    def _tables(self, count, inputs, rows, is_open=False):
        """SequentialTables over the groups of `count` values in coding order (`coding_order`); raster
        group r is at position r // heads through first layer r % heads. inputs: AffineInputs (one
        group a position), or inputs(values (B, G, count) in raster order, zeros where not sent) ->
        the network's input (B, C, H, W) float64; rows(outputs (B, n, out), positions (n,)) ->
        (probabilities (B, n, count, K), the first values: an integer or (B, n, count)) of
        Tables(lo, probs, is_open). A position's output reads only the groups sent before it (the
        mask), so the values not yet sent may hold anything."""
        from discrete_ae import exact  # numba, imported only where a context prior codes

        net, heads = self.exact(), self.heads
        order, steps = coding_order(self.grid, heads)
        inverse = np.argsort(order)  # the coding index of each raster group

        def table(probs, lo, j):
            return Table(lo if np.ndim(lo) == 0 else lo[:, j], probs[:, j], is_open, count)

        def features(values):  # (B, g, count) of the first g groups coded -> the network's input (B, C, H, W)
            if isinstance(inputs, AffineInputs):
                return exact.affine_inputs(values, inverse, *inputs).reshape(len(values), -1, *self.grid)
            out = np.zeros((len(values), len(order), count), dtype=np.int64)  # in raster order
            out[:, order[:values.shape[1]]] = values
            return inputs(out)

        def make(start, stop, previous):  # the decoder: one step's positions, all through one head
            group = order[start:stop]
            p = group // heads
            probs, lo = rows(net(features(previous), group[0] % heads, p), p)
            return [table(probs, lo, j) for j in range(len(p))]

        def make_all(values):  # the encoder: the network at every position in one pass, the same integers
            positions = np.arange(len(order) // heads)
            x = features(values)
            tables = [None] * len(order)
            for h in range(heads):
                out = net(x, h, positions)  # (B, P, out)
                step = max(1, TABLE_VALUES // out[:, 0].size)
                for start in range(0, len(positions), step):
                    part = positions[start:start + step]
                    probs, lo = rows(out[:, part], part)
                    for j, p in enumerate(part):
                        tables[p * heads + h] = table(probs, lo, j)
            return [tables[g] for g in order]

        return SequentialTables(len(order), count, make, make_all, steps)


@functools.lru_cache(maxsize=None)  # a few Python loops: once per grid and head count
def coding_order(grid, heads=1):
    """(order (G,), steps): the raster group (position * heads + head) of each group in the order a
    context prior codes them, and the lengths of the runs whose tables one network call computes.
    Position (r, c) reads (r - 1, c - 1 .. c + 1) and (r, c - 1) (the mask), all on anti-diagonals
    2 r' + c' < 2 r + c: so the positions of one anti-diagonal are coded together, 2 H + W - 2 steps
    (H when W = 1) instead of H W (the wavefront order of PixelCNN-style masks), and at each
    position head by head (ContextCodePrior: stream s reads the streams before it there)."""
    h, w = grid
    positions = np.arange(h * w)
    diagonal = 2 * (positions // w) + positions % w
    order, steps = [], []
    for d in np.unique(diagonal):
        at = positions[diagonal == d]
        for head in range(heads):
            order += (at * heads + head).tolist()
            steps.append(len(at))
    return np.array(order), tuple(steps)


class ContextMixturePrior(_CausalContext):
    """Learned density of each DDCL latent value given the values sent before it: the mixture of
    LogisticMixturePrior, its parameters predicted per value by the context network:

        z_hat (B, C, H, W) -> _CausalContext (B, 3 C K, H, W) -> loc, log_scale, weight_logits (B, C, H*W, K)

    Training pays -log2 of the mass in the delta-wide bin around z + u, as LogisticMixturePrior does,
    with the context taken from the noisy z + u; evaluation codes m under P(m | u, earlier values),
    the context taken from the dequantized z_hat = m delta - u that the decoder has."""

    def __init__(self, channels, grid, components=3, hidden=CONTEXT_HIDDEN):
        super().__init__(channels, grid, 3 * channels * components, hidden)
        self.components = components

    def params(self, z_hat, detach=False):
        """z_hat (B, C, H, W) -> loc, log_scale, weight_logits, each (B, C, H*W, K): the mixture of
        each value from the values before it."""
        h = self.features(z_hat, detach)  # (B, 3 C K, H, W)
        h = h.reshape(len(z_hat), 3, self.channels, self.components, -1).permute(1, 0, 2, 4, 3)  # (3, B, C, P, K)
        return h[0], h[1] + LOG_SCALE_OFFSET, h[2]

    def bits(self, x, delta):
        """x (B, C, P) noisy or dithered latent values -> (bits for the encoder, bits for the prior),
        as LogisticMixturePrior.bits. The encoder's bits hold the network fixed but reach the encoder
        through both the coded value and its context."""
        self._check(x)

        def cost(values, detach):
            values = values.float()
            p = _bin_probability(values, delta, *self.params(values.reshape(len(values), self.channels, *self.grid), detach))
            return -torch.log2(p.clamp_min(LIKELIHOOD_BOUND))

        return cost(x, True), cost(x.detach(), False)

    def window(self, delta):
        """(half, bound): a table covers the integers centre - half .. centre + half around each
        value's predicted mean (|m delta - mean| <= CONTEXT_WINDOW), the centre within +-bound
        (|centre delta| <= CONTEXT_SUPPORT); at most MAX_SUPPORT - 1 integers."""
        return (min(math.ceil(CONTEXT_WINDOW / delta), (MAX_SUPPORT - 2) // 2),
                min(math.ceil(CONTEXT_SUPPORT / delta), ESCAPE_OFFSET // 2))

    def tables(self, dither, delta):
        """dither u (B, C, P) -> SequentialTables over the P positions in `coding_order`: the Table
        of position p holds P(m | u, values of the positions sent before p) for the C channels,
        (B, C, K + 1) rows over the K = 2 half + 1 integers around each value's predicted mean (a
        per-row `lo`) and an escape column with the mass outside."""
        from discrete_ae import exact  # numba, imported only where a context prior codes

        u = dither.detach().double().cpu().numpy()  # (B or 1, C, P)
        half, bound = self.window(delta)

        ones = np.ones(self.channels)
        inputs = AffineInputs(np.full(self.channels, float(delta)), ones, ones, u)  # the decoded z_hat = m delta - u
        def rows(out, positions):  # (B, n, 3 C K) -> (B, n, C, K + 1), (B, n, C): views of position-major tables
            b, n = out.shape[:2]
            out = np.ascontiguousarray(out).reshape(b, n, 3, self.channels, self.components)
            probs, lo = exact.mixture_rows(out, u, positions, delta, half, bound, LOG_SCALE_OFFSET, LIKELIHOOD_BOUND)
            return probs.transpose(1, 0, 2, 3), lo.transpose(1, 0, 2)

        return self._tables(self.channels, inputs, rows, True)


class ContextCategoricalPrior(_CausalContext):
    """Learned p(level | levels sent before it) for each FSQ channel: the context network's output
    is one logit per level and channel (entries beyond a channel's levels masked to -inf):

        levels scaled to [-1, 1] (B, C, H, W) -> _CausalContext (B, C L, H, W) -> log2 p (B, C, H*W, L)

    The encoder's bits have the value -log2 p(level | context); their gradient reaches the encoder
    through the level itself (the slope to its neighbours, as CategoricalPrior) and through the
    context (the levels are FSQ's straight-through codes)."""

    def __init__(self, sizes, grid, hidden=CONTEXT_HIDDEN):
        super().__init__(len(sizes), grid, len(sizes) * max(sizes), hidden)
        self.register_buffer("sizes", torch.tensor(sizes), persistent=False)
        self.register_buffer("valid", torch.arange(max(sizes)) < self.sizes[:, None], persistent=False)  # (C, L)

    def logits(self, symbols, detach=False):
        """symbols (B, C, P) levels -> (B, C, P, L) logits of each value from the values before it."""
        scale = (self.sizes - 1).clamp(min=1).to(symbols.dtype)[:, None]
        x = (symbols / scale * 2 - 1).reshape(len(symbols), self.channels, *self.grid)
        out = self.features(x, detach).reshape(len(symbols), self.channels, -1, symbols.shape[-1]).transpose(2, 3)
        return out.masked_fill(~self.valid[:, None, :], -math.inf)

    def bits(self, symbols):
        """symbols (B, C, P) levels as floats (straight-through) -> (bits for the encoder, bits for
        the prior), each (B, C, P), as CategoricalPrior.bits."""
        self._check(symbols)
        exact, slope = _symbol_bits(F.log_softmax(self.logits(symbols, detach=True), -1) / LN2, symbols, self.sizes)
        prior_bits, _ = _symbol_bits(F.log_softmax(self.logits(symbols.detach()), -1) / LN2, symbols, self.sizes)
        return exact + _straight_through(slope, symbols), prior_bits

    def tables(self, count):
        """SequentialTables over the `count` positions of the grid in `coding_order`: the Table of
        position p holds p(level | levels of the positions sent before p) for the C channels, (B, C,
        L) rows."""
        from discrete_ae import exact  # numba, imported only where a context prior codes

        sizes, valid = self.sizes.cpu().numpy(), self.valid.cpu().numpy()
        scale = np.maximum(sizes - 1, 1).astype(np.float64)

        ones = np.ones(self.channels)  # levels scaled to [-1, 1]: level / (L - 1) * 2 - 1
        inputs = AffineInputs(ones, scale, 2 * ones, np.ones((1, self.channels, math.prod(self.grid))))

        def rows(out, positions):  # (B, n, C L) -> (B, n, C, L), masked levels exp(-inf): the floor
            b, n = out.shape[:2]
            return exact.softmax_rows(out.reshape(b * n, self.channels, -1), valid, LIKELIHOOD_BOUND).reshape(b, n, self.channels, -1), 0

        return self._tables(self.channels, inputs, rows)


CODE_EMBEDDING = 8  # features of a code as the context network sees it


class ContextCodePrior(_CausalContext):
    """Learned p(code | the codes sent before it) for codebook bottlenecks (VQ, SimVQ, LFQ, FSP,
    residual FSQ): S streams of codes in [0, K) per position (residual FSQ: one per stage), sent
    position by position (in `coding_order`) and, at one position, stream by stream. A code enters the
    context as a learned embedding (codes have no order), and stream s at a position also sees the
    codes of streams < s there (a residual stage sees the stages before it), through a 1x1 term
    masked to those streams (as the 3x3 term is masked to earlier positions; Minnen et al. 2018):

        codes (B, S, H, W) -> embeddings (B, S E, H, W) -> masked 3x3 + position bias (B, 64, H, W)
            + per stream s, masked 1x1 of streams < s (B, S, 64, H, W) -> 1x1 -> 1x1 -> logits (B, S, K, H, W)

    The codes carry no gradient (a nearest-code choice), so the rate trains this prior and does
    not move the encoder, as CodebookBottleneck's learned prior."""

    def __init__(self, streams, codebook_size, grid, hidden=CONTEXT_HIDDEN, embed=CODE_EMBEDDING):
        super().__init__(streams * embed, grid, codebook_size, hidden)
        self.streams, self.codebook_size, self.embed_dim = streams, codebook_size, embed
        self.heads = streams
        self.embed = nn.Embedding(streams * codebook_size, embed)  # stream s's code k is row s K + k
        self.same = nn.Conv2d(streams * embed, streams * hidden, 1, bias=False)
        earlier = torch.arange(streams)[:, None] > torch.arange(streams)[None, :]  # (S out, S in): in < out
        mask = earlier.repeat_interleave(hidden, 0).repeat_interleave(embed, 1)  # (S hidden, S embed)
        self.register_buffer("same_mask", mask[..., None, None].float(), persistent=False)
        self.register_buffer("offsets", torch.arange(streams) * codebook_size, persistent=False)

    def logits(self, codes, dtype=torch.float32, detach=False):
        """codes (B, S, P) integers -> (B, S, P, K) logits of each code from the codes before it."""
        def w(t):
            return (t.detach() if detach else t).to(device=codes.device, dtype=dtype)

        b, h = len(codes), self.context.out_channels
        emb = F.embedding(codes.long() + self.offsets.to(codes.device)[:, None], w(self.embed.weight))  # (B, S, P, E)
        x = emb.permute(0, 1, 3, 2).reshape(b, self.channels, *self.grid)  # (B, S E, H, W)
        base = F.conv2d(x, w(self.context.weight) * w(self.mask), w(self.context.bias), padding=1) + w(self.position)
        same = F.conv2d(x, w(self.same.weight) * w(self.same_mask)).reshape(b, self.streams, h, *self.grid)
        z = (base[:, None] + same).reshape(b * self.streams, h, *self.grid)  # each stream its own pre-activation
        z = F.conv2d(_silu(z), w(self.hidden.weight), w(self.hidden.bias))
        out = F.conv2d(_silu(z), w(self.out.weight), w(self.out.bias))  # (B S, K, H, W)
        return out.reshape(b, self.streams, self.codebook_size, -1).transpose(2, 3)

    def bits(self, codes):
        """codes (B, S, P) -> (bits for the encoder, bits for the prior), each (B, S, P); the codes
        carry no gradient, so the encoder's bits are a constant the loss reports."""
        prior_bits = -F.log_softmax(self.logits(codes), -1).gather(-1, codes.long()[..., None])[..., 0] / LN2
        return prior_bits.detach(), prior_bits

    def tables(self, count):
        """SequentialTables over the `count` positions of the grid x S streams in `coding_order`, one
        code per group: raster group p S + s holds p(code of stream s at position p | the codes sent
        before it), (B, 1, K) rows."""
        from discrete_ae import exact  # numba, imported only where a context prior codes

        embed = self.embed.weight.detach().double().cpu().numpy()  # (S K, E)
        streams, k, e = self.streams, self.codebook_size, self.embed_dim
        every = np.ones((1, k), dtype=bool)  # every code is valid

        def inputs(values):  # (B, P S, 1) codes, group p S + s -> embeddings (B, S E, H, W)
            x = embed[values[..., 0].reshape(len(values), -1, streams) + np.arange(streams) * k]  # (B, P, S, E)
            return x.transpose(0, 2, 3, 1).reshape(len(values), streams * e, *self.grid)

        def rows(out, positions):  # (B, n, K) -> (B, n, 1, K)
            b, n = out.shape[:2]
            return exact.softmax_rows(out.reshape(b * n, 1, k), every, LIKELIHOOD_BOUND).reshape(b, n, 1, k), 0

        return self._tables(1, inputs, rows)

    def _first_layers(self):
        """Stream s's first layer: the masked 3x3 over every stream's earlier positions plus, at the
        centre tap, the masked 1x1 over streams < s at the same position."""
        weight, bias = super()._first_layers()  # (1, hidden, S E, 3, 3), (1, hidden, H, W)
        same = (self.same.weight * self.same_mask).detach().double()[..., 0, 0]  # (S hidden, S E)
        weight = weight.repeat(self.streams, 1, 1, 1, 1)
        weight[:, :, :, 1, 1] += same.reshape(self.streams, -1, same.shape[-1])
        return weight, bias.repeat(self.streams, 1, 1, 1)
