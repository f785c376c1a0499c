"""The context priors' network for the coder, in integers: the same tables on every machine.

A coding table that differs by one bit between encoder and decoder makes the decoder read garbage
(Balle, Johnston, Minnen, "Integer Networks for Data Compression with Latent-Variable Models", ICLR
2019, section 1). Floating-point matrix products sum in an order that depends on the CPU's vector
width, the BLAS kernel, the thread count and the batch size; integer sums do not. So the coder runs
the context network on integers held exactly in float64:

    inputs      round(x 2^INPUT_BITS), x clipped to +-INPUT_CLIP
    weights     round(w 2^WEIGHT_BITS); biases on the grid of the products they are added to
    products    integer matrix products, every partial sum below 2^53 (checked when the weights are
                quantized), so exact in any order: any vector width, any batch, the whole grid in
                one call or one position at a time give the same integers
    SiLU        from the exact sums by a table built with `exp1` below (+, *, floor and a table of
                powers of two only, each correctly rounded by IEEE 754), then rounded to ACT_BITS:
                the same bits on any IEEE-754 machine

The tables (softmax, mixture CDF) use the same `exp1` and a fixed-order sum (`halve`). Quantizing to
these grids moves the network's outputs by about 1e-4 of their range (docs/codec.md measures the
rate it costs).

The arithmetic is compiled by numba (one call per decoding step where numpy took about a hundred:
docs/codec.md, "Speed"), without fastmath: every operation is rounded as written, no fused
multiply-add and no reordering; the integer products alone go through the BLAS that numba calls
for np.dot (SciPy's), in whatever order and with whatever fused multiply-adds it likes: their sums
are exact integers. So the compiled code gives the bits its source gives under the Python
interpreter: tested with NUMBA_DISABLE_JIT=1 and with code compiled for a generic x86-64
(tests/test_portability.py). Compiled on first use and cached beside this file (numba's cache),
once per machine (README.md says how long).
The network's rows and the tables' values are independent of each other, so each call splits them
among numba's threads (numba.prange; as many as torch's intra-op threads, `threads()`): any split
gives the same bits (tested).
"""
import math
from decimal import Context, Decimal

import numpy as np
import torch

from discrete_ae.errors import ConfigError

try:
    import numba
except ImportError:  # a context prior codes only through the compiled kernels
    raise ConfigError("coding with a context prior needs numba: pip install -r requirements.txt") from None

INPUT_BITS = 12  # the network's inputs on a grid of 2^-12
INPUT_CLIP = 2.0 ** 8  # |input| at most this (a DDCL value beyond it is an escape's context)
WEIGHT_BITS = 16  # weights on a grid of 2^-16
ACT_BITS = 12  # hidden activations on a grid of 2^-12
ACT_CLIP = 2.0 ** 10  # |activation| at most this
EXACT = 2.0 ** 53  # float64 holds every integer below this exactly

# exp(x) = 2^(k / 256) exp(r), r = x - k ln2 / 256 in [-ln2 / 512, ln2 / 512] (Tang, "Table-driven
# implementation of the exponential function in IEEE floating-point arithmetic", ACM TOMS 1989):
# ln2 / 256 split so that k LN2_HI is exact, 2^(j / 256) from decimal arithmetic (libmpdec: the same
# digits everywhere, where math.log may differ by an ulp between C libraries), then a Taylor
# polynomial of degree 4 in r
EXP_STEPS = 256
_LN2_STEP = Context(prec=40).ln(Decimal(2)) / EXP_STEPS
LN2_HI = math.floor(float(_LN2_STEP) * 2.0 ** 43) / 2.0 ** 43  # 35 significant bits: k LN2_HI exact for |k| < 2^18
LN2_LO = float(_LN2_STEP - Decimal(LN2_HI))
STEPS_PER_LN2 = float(1 / _LN2_STEP)
EXP_TABLE = np.array([float(Context(prec=40).power(Decimal(2), Decimal(j) / EXP_STEPS)) for j in range(EXP_STEPS)])
T0, T1, T2, T3, T4 = (1.0 / math.factorial(n) for n in range(5))  # the Taylor coefficients
EXP_LO, EXP_HI = -700.0, 700.0  # the argument's range: 2^k stays a normal float64
TWO_POWERS_FROM = -1011  # 2^k for k in EXP_LO / ln2 .. EXP_HI / ln2, all normal: scaling by one is ldexp's exact result
TWO_POWERS = np.ldexp(1.0, np.arange(TWO_POWERS_FROM, 1012))


def _jit(f):
    """numba-compiled, cached; fastmath off (the default): IEEE operations as written."""
    return numba.njit(cache=True, nogil=True, error_model="numpy")(f)


def _jit_parallel(f):
    """_jit, its numba.prange loops split among numba's threads (each thread's part the same bits as
    one thread's: the parts are independent rows)."""
    return numba.njit(cache=True, nogil=True, error_model="numpy", parallel=True)(f)


def threads():
    """The threads a kernel call splits its rows among: torch's intra-op count (what the process was
    given: torch.set_num_threads, OMP_NUM_THREADS), at most NUMBA_NUM_THREADS, set as numba's for
    this call. A process budgeted one thread (a test worker, one of compare.py's parallel runs) must
    not wake a second; and numba's OpenMP may be the very library torch's is (both libgomp.so.1):
    a parallel region of n threads leaves n as torch's count too, so the two are kept equal."""
    wanted = torch.get_num_threads()
    count = max(1, min(numba.config.NUMBA_NUM_THREADS, wanted))
    numba.set_num_threads(count)  # the first call starts numba's threads, which may set the shared count
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return count


@_jit
def _parts(count, least, threads):
    """How many parts `count` independent items are split into: one per thread of `threads`
    (threads(), read by the caller: a compiled call of numba's count could not be cached), each at
    least `least` items (one part below that)."""
    return max(1, min(threads, count // least))


@_jit
def exp1(x):
    """e^x of one float64 through +, *, floor and two tables only (2^(j/256), and the powers of two
    that ldexp would scale by): the same bits on any IEEE-754 machine (np.exp and torch.exp pick a
    vector kernel per CPU); within a few ulp of e^x."""
    x = min(max(x, EXP_LO), EXP_HI)
    k = np.floor(x * STEPS_PER_LN2 + 0.5)
    r = (x - k * LN2_HI) - k * LN2_LO
    p = ((((r * T4 + T3) * r + T2) * r + T1) * r) + T0
    i = np.int64(k)
    return p * EXP_TABLE[i & (EXP_STEPS - 1)] * TWO_POWERS[(i >> 8) - TWO_POWERS_FROM]


# SiLU by linear interpolation in a table of SILU_STEP spacing on [-SILU_END, SILU_END] (x beyond:
# x or 0, off by under 2e-6): within 2e-5 of SiLU, a tenth of the 2^-12 grid its outputs are rounded to
SILU_END, SILU_STEP = 16.0, 2.0 ** -6
_SILU_X = np.arange(-SILU_END, SILU_END + SILU_STEP, SILU_STEP)
SILU_TABLE = np.array([x / (1.0 + getattr(exp1, "py_func", exp1)(-x)) for x in _SILU_X])  # interpreted: no compile on import
SILU_SLOPE = np.append(np.diff(SILU_TABLE), 0.0)


@_jit
def silu1(x):
    """SiLU of one float64 through the table; in table steps from -SILU_END (scaling by a power of
    two is exact, so the clip may come after it)."""
    t = min(max(x * (1.0 / SILU_STEP), -SILU_END / SILU_STEP), SILU_END / SILU_STEP) + SILU_END / SILU_STEP
    i = int(t)  # t >= 0: truncation is floor
    t = (t - i) * SILU_SLOPE[i] + SILU_TABLE[i]
    return x if x > SILU_END else t


@_jit
def act1(acc, scale):
    """An exact sum on a grid of `scale` -> SiLU on the ACT_BITS grid, clipped to +ACT_CLIP (SiLU is
    above -0.28: no lower clip)."""
    return np.rint(min(silu1(acc * scale), ACT_CLIP) * 2.0 ** ACT_BITS)


@_jit
def halve(buf):
    """buf (2^k, n): each column summed into buf[0] in a fixed order, halves added until one row is
    left (rows past a column's values hold zeros)."""
    size = len(buf) // 2
    while size:
        for i in range(size):
            for v in range(buf.shape[1]):
                buf[i, v] = buf[i, v] + buf[i + size, v]
        size //= 2


@_jit
def normalised(buf, out):
    """buf (2^k, n): column v's K = out.shape[1] probabilities, already floored, then zeros -> out
    (n, K): each divided by its column's sum in halve's order (buf is summed in place)."""
    p = buf[:out.shape[1]].copy()
    halve(buf)
    for v in range(len(out)):
        for j in range(out.shape[1]):
            out[v, j] = p[j, v] / buf[0, v]


@_jit
def pow2(n):
    """The rows of a halve() buffer for n values: the least power of two >= n."""
    size = 1
    while size < n:
        size *= 2
    return size


SOFTMAX_ENTRIES_PER_THREAD = 512  # softmax_rows' entries (rows x their length) a thread takes at least


@_jit
def _softmax_part(flat, valid, floor, out, start, stop):
    """softmax_rows for the flat rows start .. stop - 1 (row v: channel v % C) into out."""
    channels, size, n = len(valid), flat.shape[1], stop - start
    top, buf = np.full(n, -np.inf), np.zeros((pow2(size), n))
    for j in range(size):
        for v in range(n):
            if valid[(start + v) % channels, j]:
                top[v] = max(top[v], flat[start + v, j])
    for j in range(size):
        for v in range(n):
            buf[j, v] = max(exp1((flat[start + v, j] if valid[(start + v) % channels, j] else -np.inf) - top[v]), floor)
    normalised(buf, out[start:stop])


def softmax_rows(logits, valid, floor):
    """logits (R, C, L), valid (C, L) -> (R, C, L): each row exp-normalised over its valid entries
    (an invalid one is exp(-inf), clipped like any exponent), floored, divided by its tree sum
    (halve's order). The loops run along the R C rows: vectorised; the rows are independent, split
    among threads they are the same bits."""
    rows, channels, size = logits.shape
    return _softmax_rows(np.ascontiguousarray(logits).reshape(rows * channels, size), valid, floor,
                         threads()).reshape(rows, channels, size)


@_jit_parallel
def _softmax_rows(flat, valid, floor, threads):
    n = len(flat)
    out = np.empty(flat.shape)
    parts = max(1, min(n, _parts(flat.size, SOFTMAX_ENTRIES_PER_THREAD, threads)))
    for k in numba.prange(parts):
        _softmax_part(flat, valid, floor, out, n * k // parts, n * (k + 1) // parts)
    return out


@_jit
def affine_inputs(values, inverse, mul, div, scale, offset):
    """values (B, g, C) int64, the first g groups sent (each a position's C values) in coding order,
    inverse (P,) the coding index of each raster position, mul, div, scale (C,), offset (1 or B, C,
    P) -> the network's input x (B, C, P) = ((v mul) / div) scale - offset, v = 0 at the positions
    not yet sent (the network's mask never reads them): one pass, where the numpy around it took
    a dozen calls a decoding step."""
    batch, sent, channels = values.shape
    x = np.empty((batch, channels, len(inverse)))
    for b in range(batch):
        for c in range(channels):
            for p in range(len(inverse)):
                v = values[b, inverse[p], c] if inverse[p] < sent else 0
                x[b, c, p] = ((v * mul[c]) / div[c]) * scale[c] - offset[b % len(offset), c, p]
    return x


NETWORK_BLOCK = 32  # rows per matrix product at most
BLAS_ONE_THREAD = 2 ** 18  # multiply-adds (m n k) up to which OpenBLAS runs a product on its calling thread
# (interface/gemm.c: 65536 x GEMM_MULTITHREAD_THRESHOLD 4); above, it wakes its own threads, which
# inside numba's OpenMP region oversubscribe the cores, spin after, and warn "Detect OpenMP Loop"


@_jit
def _network_rows(x, taps, channel, tap, k1t, b1, k2t, b2, k3t, b3, out, first_row, stop_row):
    """_network's rows first_row .. stop_row - 1 (row r: image r // n at position r % n) into out, a
    block of rows at a time through np.dot (the BLAS numba links: exact here, as any order), each
    product small enough to stay on this thread (BLAS_ONE_THREAD)."""
    n, hidden, outs, grid = len(taps), k1t.shape[1], k3t.shape[1], x.shape[2]
    first, second = 2.0 ** -(INPUT_BITS + WEIGHT_BITS), 2.0 ** -(ACT_BITS + WEIGHT_BITS)
    block = max(1, min(NETWORK_BLOCK, BLAS_ONE_THREAD // (hidden * max(hidden, outs, len(channel)))))
    windows = np.empty((block, len(channel)))
    for start in range(first_row, stop_row, block):
        m = min(block, stop_row - start)
        window = windows[:m]
        for r in range(m):
            b, i = (start + r) // n, (start + r) % n
            for q in range(len(channel)):
                at = taps[i, tap[q]]
                inside = min(max(x[b, channel[q], at], -INPUT_CLIP), INPUT_CLIP) if at < grid else 0.0
                window[r, q] = np.rint(inside * 2.0 ** INPUT_BITS)
        h = np.dot(window, k1t)  # (m, H): sums of integer products, each below 2^53
        for r in range(m):
            i = (start + r) % n
            for j in range(hidden):
                h[r, j] = act1(h[r, j] + b1[i, j], first)
        g = np.dot(h, k2t)
        for r in range(m):
            for j in range(hidden):
                g[r, j] = act1(g[r, j] + b2[j], second)
        o = np.dot(g, k3t)
        for r in range(m):
            for j in range(outs):
                out[start + r, j] = (o[r, j] + b3[j]) * second


NETWORK_ROWS_PER_THREAD = 16  # _network's rows a thread takes at least: below, a thread costs more than it saves


@_jit_parallel
def _network(x, taps, channel, tap, k1t, b1, k2t, b2, k3t, b3, threads):
    """x (B, Cin, P) inputs, taps (n, 9) the raster index of each 3x3 tap around n positions (P:
    beyond the grid, a zero), channel and tap (I,) the input and tap of each column the first layer
    reads (the taps its mask leaves), the weights transposed (inputs, outputs): k1t (I, H), k2t (H,
    H), k3t (H, O), biases b1 (n, H), b2 (H,), b3 (O,) -> (B n, O). Each window is quantized as it
    is gathered. Every partial sum is an integer below 2^53 (ExactNetwork checks), so exact in any
    order; the rows are independent, so split among threads they are the same bits."""
    rows = len(x) * len(taps)
    out = np.empty((rows, k3t.shape[1]))
    parts = _parts(rows, NETWORK_ROWS_PER_THREAD, threads)
    for k in numba.prange(parts):
        _network_rows(x, taps, channel, tap, k1t, b1, k2t, b2, k3t, b3, out, rows * k // parts, rows * (k + 1) // parts)
    return out


GEOMETRIC_LIMIT = 600.0  # mixture_cdf: |exponent| up to which a progression of exps starts from one


@_jit
def powers(r, out):
    """out (N, n)[j, v] = r[v]^j by doubling: each a product of at most 2 log2(N) IEEE-rounded
    multiplications (the same bits for any N > j); the inner loops run along the values."""
    step = np.empty(len(r))
    out[0] = 1.0
    done = 1
    while done < len(out):
        for v in range(len(r)):
            step[v] = out[done - 1, v] * r[v]
        for i in range(min(done, len(out) - done)):
            for v in range(len(r)):
                out[done + i, v] = out[i, v] * step[v]
        done += min(done, len(out) - done)


@_jit
def mixture_cdf(x, step, below, above, loc, log_scale, w, total):
    """The mixtures' CDF at the evenly spaced x + j step, j = -below .. above: x (n,) and the
    locations, log scales and weights (K, n) of n mixtures with their weights' sums (n,) -> (below +
    1 + above, n), the components summed in order. The same bits on any machine.

    A logistic's exp(-(x + j step - loc) / s) is exp(-(x - loc) / s) r^j with r = exp(-step / s): one
    exp1 per value and component and a geometric progression along the bins. Where the first
    factor's exponent reaches GEOMETRIC_LIMIT the exps are taken one by one (exp1 clips its
    argument); below it a power that over- or underflows leaves a CDF that is 0 or 1 to within e^-100
    either way. Every loop but the far values' runs along the values: vectorised."""
    comps, n = loc.shape
    bins = below + 1 + above
    cdf, e, pw = np.zeros((bins, n)), np.empty((bins, n)), np.empty((max(below, above) + 1, n))
    inv, first, r = np.empty(n), np.empty(n), np.empty(n)
    for k in range(comps):
        for v in range(n):
            inv[v] = exp1(-log_scale[k, v])  # 1 / s
            t = (x[v] - loc[k, v]) * inv[v]
            first[v] = exp1(-(0.0 if abs(t) >= GEOMETRIC_LIMIT else t))
            r[v] = exp1(step * inv[v])
        powers(r, pw)
        for j in range(1, below + 1):
            for v in range(n):
                e[below - j, v] = pw[j, v] * first[v]
        for v in range(n):
            r[v] = exp1(-step * inv[v])
        powers(r, pw)
        for j in range(above + 1):
            for v in range(n):
                e[below + j, v] = pw[j, v] * first[v]
        for v in range(n):
            if abs((x[v] - loc[k, v]) * inv[v]) >= GEOMETRIC_LIMIT:
                for j in range(-below, above + 1):
                    e[j + below, v] = exp1(-((x[v] + j * step) - loc[k, v]) * inv[v])
        for j in range(bins):
            for v in range(n):
                cdf[j, v] = cdf[j, v] + w[k, v] / (e[j, v] + 1.0)
    for j in range(bins):
        for v in range(n):
            cdf[j, v] = cdf[j, v] / total[v]
    return cdf


MIXTURE_CHUNK = 256  # mixture_rows' values at a time: the (bins, values) arrays stay in the cache


MIXTURE_VALUES_PER_THREAD = 32  # mixture_rows' values a thread takes at least


@_jit
def _mixture_part(out, u, positions, delta, half, bound, offset, floor, probs, lo, start, stop):
    """mixture_rows for the values start .. stop - 1 in position-major order (value v: position v //
    (B C), image v // C % B, channel v % C) into probs (n B C, 2 half + 2) and lo (n B C,)."""
    batch, channels, comps = out.shape[0], out.shape[3], out.shape[4]
    width, n = 2 * half + 1, stop - start
    x, total = np.empty(n), np.empty(n)
    w, loc, log_scale = np.empty((comps, n)), np.empty((comps, n)), np.empty((comps, n))
    for v in range(n):
        i, b, c = (start + v) // (batch * channels), (start + v) // channels % batch, (start + v) % channels
        dither = u[b % len(u), c, positions[i]]
        top = -np.inf
        for k in range(comps):
            top = max(top, out[b, i, 2, c, k])
        tot, mean = 0.0, 0.0
        for k in range(comps):
            w[k, v] = exp1(out[b, i, 2, c, k] - top)
            tot = tot + w[k, v]
        for k in range(comps):
            loc[k, v] = out[b, i, 0, c, k]
            mean = mean + w[k, v] * loc[k, v]
            log_scale[k, v] = out[b, i, 1, c, k] + offset
        centre = min(max(np.rint((mean / tot + dither) / delta), -bound), bound)
        x[v], total[v], lo[start + v] = (centre - 0.5) * delta - dither, tot, np.int64(centre) - half
    cdf = mixture_cdf(x, delta, half, half + 1, loc, log_scale, w, total)  # (width + 1, n)
    buf = np.zeros((pow2(width + 1), n))  # the bins, the escape, then zeros: summed by halve
    for j in range(width):
        for v in range(n):
            buf[j, v] = max(cdf[j + 1, v] - cdf[j, v], floor)
    for v in range(n):
        buf[width, v] = max(cdf[0, v] + (1.0 - cdf[width, v]), floor)
    normalised(buf, probs[start:stop])


def mixture_rows(out, u, positions, delta, half, bound, offset, floor):
    """DDCL's context tables: out (B, n, 3, C, K) the network's locations, log scales (before
    `offset`, priors.LOG_SCALE_OFFSET) and weight logits of each value's mixture at n positions, u
    (1 or B, C, P) the dither at every position of the grid, positions (n,) theirs -> (probs (n, B,
    C, 2 half + 2), lo (n, B, C)), position-major (each position's rows contiguous, as the coder
    reads them): the 2 half + 1 integers from lo = centre - half, the centre the integer nearest
    the mixture's mean (within +-bound), then the escape with the mass outside; each row floored and
    divided by its sum in halve's order. The values are independent: taken in parts of at most
    MIXTURE_CHUNK, split among threads, they are the same bits."""
    batch, n, _, channels, _ = out.shape
    positions = np.asarray(positions, dtype=np.int64)
    with np.errstate(over="ignore", under="ignore"):  # interpreted (NUMBA_DISABLE_JIT), a power past float64's range is meant
        probs, lo = _mixture_rows(out, u, positions, delta, half, bound, offset, floor, threads())
    return probs.reshape(n, batch, channels, 2 * half + 2), lo.reshape(n, batch, channels)


@_jit_parallel
def _mixture_rows(out, u, positions, delta, half, bound, offset, floor, threads):
    values = out.shape[0] * out.shape[1] * out.shape[3]
    probs, lo = np.empty((values, 2 * half + 2)), np.empty(values, np.int64)
    parts = max(-(-values // MIXTURE_CHUNK), _parts(values, MIXTURE_VALUES_PER_THREAD, threads))
    for k in numba.prange(parts):
        _mixture_part(out, u, positions, delta, half, bound, offset, floor, probs, lo, values * k // parts,
                      values * (k + 1) // parts)
    return probs, lo


def _integers(w, bits):
    return np.round(np.asarray(w, dtype=np.float64) * 2.0 ** bits)


class ExactNetwork:
    """A context network (discrete_ae/priors.py, _CausalContext) on integers: `heads` first layers
    (a masked 3x3 convolution with a bias per position; ContextCodePrior has one per stream), then
    two 1x1 layers with SiLU shared by the heads:

        x (B, Cin, H, W) -> 3x3 windows (B, n, I <= Cin 9: the taps the mask leaves), quantized
          -> head h: (B, n, hidden) -> (B, n, hidden) -> (B, n, out)

    first (heads, hidden, Cin, 3, 3) masked weights, first_bias (heads, hidden, H, W) with the
    position bias, hidden (hidden, hidden) and out (out, hidden) 1x1 weights with their biases."""

    def __init__(self, first, first_bias, hidden_w, hidden_b, out_w, out_b):
        heads, hidden, cin = first.shape[:3]
        self.grid = tuple(first_bias.shape[-2:])
        h, w = self.grid
        raster, tap = np.arange(h * w)[:, None], np.arange(9)
        rows, cols = raster // w + tap // 3 - 1, raster % w + tap % 3 - 1
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
        self._taps = np.where(inside, rows * w + cols, h * w)  # (P, 9) raster index of each tap, H W beyond the grid
        k1 = _integers(first.reshape(heads, hidden, cin * 9), WEIGHT_BITS)  # (heads, hidden, Cin 9)
        used = np.flatnonzero(np.abs(k1).sum((0, 1)))  # the columns of taps the masks leave: the rest add zeros
        self._channel, self._tap = used // 9, used % 9
        k1, k2, k3 = k1[:, :, used], _integers(hidden_w, WEIGHT_BITS), _integers(out_w, WEIGHT_BITS)  # (.., out, in)
        b1 = _integers(first_bias.reshape(heads, hidden, -1), INPUT_BITS + WEIGHT_BITS)
        self.b1 = np.ascontiguousarray(b1.transpose(0, 2, 1))  # (heads, P, hidden)
        self.b2, self.b3 = _integers(hidden_b, ACT_BITS + WEIGHT_BITS), _integers(out_b, ACT_BITS + WEIGHT_BITS)
        for name, k, b, x_max in (("first", k1, self.b1, INPUT_CLIP * 2 ** INPUT_BITS),
                                  ("hidden", k2, self.b2, ACT_CLIP * 2 ** ACT_BITS),
                                  ("out", k3, self.b3, ACT_CLIP * 2 ** ACT_BITS)):
            bound = x_max * np.abs(k).sum(-1).max() + np.abs(b).max()
            if not bound < EXACT:
                raise ValueError(f"the context network's {name} layer has weights too large to run exactly in "
                                 f"float64 (a sum could reach 2^{math.log2(bound):.0f}): not a trained context prior")
        # transposed (in, out), contiguous: the operands of the compiled network's matrix products
        self.k1t, self.k2t, self.k3t = (np.ascontiguousarray(np.swapaxes(k, -1, -2)) for k in (k1, k2, k3))

    def __call__(self, x, head, positions):
        """x (B, Cin, H, W) float64 inputs -> (B, n, out): the network at raster `positions` (n,)
        through first layer `head`, each 3x3 window quantized to the INPUT_BITS grid (zero beyond the
        grid: the first layer's padding)."""
        b, cin = x.shape[:2]
        positions = np.asarray(positions)
        out = _network(np.ascontiguousarray(x, dtype=np.float64).reshape(b, cin, -1), self._taps[positions], self._channel,
                       self._tap, self.k1t[head], self.b1[head][positions], self.k2t, self.b2, self.k3t, self.b3,
                       threads())
        return out.reshape(b, len(positions), -1)
