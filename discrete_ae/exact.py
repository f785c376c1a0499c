"""The context priors' network for the coder, in integers: the same tables on every machine.

A coding table that differs by one bit between encoder and decoder makes the decoder read garbage
(Balle, Johnston, Minnen, "Integer Networks for Data Compression with Latent-Variable Models", ICLR
2019, section 1). Floating-point matrix products sum in an order that depends on the CPU's vector
width, the BLAS kernel, the thread count and the batch size; integer sums do not. So the coder runs
the context network on integers held exactly in float64 numpy arrays:

    inputs      round(x 2^INPUT_BITS), x clipped to +-INPUT_CLIP
    weights     round(w 2^WEIGHT_BITS); biases on the grid of the products they are added to
    products    integer matrix products, every partial sum below 2^53 (checked when the weights are
                quantized), so exact in any order: any BLAS, any thread count, any batch, the whole
                grid in one call or one position at a time give the same integers
    SiLU        from the exact sums by a table built with `exp` below (+, *, floor and ldexp only,
                each correctly rounded by IEEE 754), then rounded to ACT_BITS: the same bits on any
                IEEE-754 machine

The tables (softmax, mixture CDF) use the same `exp` and a fixed-order `tree_sum`. Quantizing to
these grids moves the network's outputs by about 1e-4 of their range (docs/codec.md measures the
rate it costs).
"""
import math
from decimal import Context, Decimal

import numpy as np

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
TAYLOR = tuple(1.0 / math.factorial(n) for n in range(5))
EXP_RANGE = (-700.0, 700.0)  # 2^k stays a normal float64


def exp(x):
    """e^x of a float64 array through +, *, floor, a table and ldexp only: the same bits on any
    IEEE-754 machine (np.exp and torch.exp pick a vector kernel per CPU); within a few ulp of e^x."""
    x = np.asarray(x, dtype=np.float64)
    shape, x = x.shape, np.maximum(x.reshape(-1), EXP_RANGE[0])  # clipped (maximum, minimum: np.clip's wrapper costs more)
    np.minimum(x, EXP_RANGE[1], out=x)
    k = x * STEPS_PER_LN2
    k += 0.5
    np.floor(k, out=k)
    r = k * LN2_HI
    np.subtract(x, r, out=r)
    r -= k * LN2_LO
    p = r * TAYLOR[4]
    p += TAYLOR[3]
    for c in TAYLOR[2::-1]:
        p *= r
        p += c
    k = k.astype(np.int64)
    p *= EXP_TABLE[k & (EXP_STEPS - 1)]
    k >>= EXP_STEPS.bit_length() - 1
    return np.ldexp(p, k.astype(np.int32)).reshape(shape)


# SiLU by linear interpolation in a table of SILU_STEP spacing on [-SILU_END, SILU_END] (x beyond:
# x or 0, off by under 2e-6): within 2e-5 of SiLU, a tenth of the 2^-12 grid its outputs are rounded to
SILU_END, SILU_STEP = 16.0, 2.0 ** -6
_SILU_X = np.arange(-SILU_END, SILU_END + SILU_STEP, SILU_STEP)
SILU_TABLE = _SILU_X / (1.0 + exp(-_SILU_X))
SILU_SLOPE = np.append(np.diff(SILU_TABLE), 0.0)


def silu(x):
    """SiLU of a float64 array through a table (the same bits everywhere). In table steps from
    -SILU_END, computed in place: scaling by a power of two is exact, so the clip may come after it."""
    t = x * (1.0 / SILU_STEP)
    np.maximum(t, -SILU_END / SILU_STEP, out=t)
    np.minimum(t, SILU_END / SILU_STEP, out=t)
    t += SILU_END / SILU_STEP
    i = t.astype(np.int64)  # t >= 0: truncation is floor
    t -= i
    t *= SILU_SLOPE[i]
    t += SILU_TABLE[i]
    return np.where(x > SILU_END, x, t)


def tree_sum(x):
    """x (..., n) -> (...,) summed in a fixed order: halves added, as if zeros were padded to a power
    of two (an entry paired with a padded zero is kept as it is: x + 0 is x)."""
    n = x.shape[-1]
    half = 1 << max(0, n - 1).bit_length() >> 1
    if half and n > half:  # the first halving pairs entry i with i + half where that exists
        first = x[..., :half].copy()
        first[..., :n - half] += x[..., half:]
        x = first
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def normalised(probs, floor):
    """Each row clamped to `floor` and divided by its tree_sum (float64, last axis)."""
    probs = np.maximum(probs, floor)
    return probs / tree_sum(probs)[..., None]


def softmax(logits, floor):
    """exp-normalised rows of logits (-inf entries get probability 0 before the floor)."""
    return normalised(exp(logits - logits.max(-1, keepdims=True)), floor)


def _integers(w, bits):
    return np.round(np.asarray(w, dtype=np.float64) * 2.0 ** bits)


class ExactNetwork:
    """A context network (discrete_ae/priors.py, _CausalContext) on integers: `heads` first layers
    (a masked 3x3 convolution with a bias per position; ContextCodePrior has one per stream), then
    two 1x1 layers with SiLU shared by the heads:

        windows (B, n, Cin 9) of the quantized input -> head h: (B, n, hidden) -> (B, n, hidden) -> (B, n, out)

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
        self.k1 = _integers(first.reshape(heads, hidden, cin * 9), WEIGHT_BITS).transpose(0, 2, 1)  # (heads, Cin 9, hidden)
        self.b1 = _integers(first_bias.reshape(heads, hidden, -1), INPUT_BITS + WEIGHT_BITS).transpose(0, 2, 1)  # (heads, P, hidden)
        self.k2, self.b2 = _integers(hidden_w, WEIGHT_BITS).T, _integers(hidden_b, ACT_BITS + WEIGHT_BITS)
        self.k3, self.b3 = _integers(out_w, WEIGHT_BITS).T, _integers(out_b, ACT_BITS + WEIGHT_BITS)
        for name, k, b, x_max in (("first", self.k1, self.b1, INPUT_CLIP * 2 ** INPUT_BITS),
                                  ("hidden", self.k2, self.b2, ACT_CLIP * 2 ** ACT_BITS),
                                  ("out", self.k3, self.b3, ACT_CLIP * 2 ** ACT_BITS)):
            bound = x_max * np.abs(k).sum(-2).max() + np.abs(b).max()
            if not bound < EXACT:
                raise ValueError(f"the context network's {name} layer has weights too large to run exactly in "
                                 f"float64 (a sum could reach 2^{math.log2(bound):.0f}): not a trained context prior")

    @staticmethod
    def quantize(x):
        """Inputs (float64) -> the integers the network reads."""
        return _integers(np.minimum(np.maximum(x, -INPUT_CLIP), INPUT_CLIP), INPUT_BITS)

    def windows(self, xq, positions):
        """xq (B, Cin, H, W) quantized inputs -> (B, len(positions), Cin 9): the 3x3 window around each
        raster position, zero beyond the grid (the first layer's padding), gathered in one call."""
        b, cin = xq.shape[:2]
        flat = np.concatenate([xq.reshape(b, cin, -1), np.zeros((b, cin, 1))], -1)  # index H W reads a zero
        return flat[:, :, self._taps[positions]].transpose(0, 2, 1, 3).reshape(b, len(positions), cin * 9)

    @staticmethod
    def _act(acc, bits):
        """Exact sums on a grid of 2^-bits -> SiLU on the ACT_BITS grid, clipped to +ACT_CLIP (SiLU is
        above -0.28: no lower clip), in place."""
        t = silu(acc * 2.0 ** -bits)
        np.minimum(t, ACT_CLIP, out=t)
        t *= 2.0 ** ACT_BITS
        return np.round(t, out=t)

    def __call__(self, windows, head, positions):
        """windows (B, n, Cin 9) at raster `positions` (n,) through first layer `head` -> (B, n, out) floats."""
        # (B, n, .) @ (., .): a small product per image, which OpenBLAS runs on the calling thread; one
        # (B n, .) product is faster alone but wakes OpenBLAS's own threads, which then spin beside
        # torch's and slow the networks around it (2x on 2 cores, docs/codec.md)
        a = self._act(windows @ self.k1[head] + self.b1[head][positions], INPUT_BITS + WEIGHT_BITS)
        a = self._act(a @ self.k2 + self.b2, ACT_BITS + WEIGHT_BITS)
        return (a @ self.k3 + self.b3) * 2.0 ** -(ACT_BITS + WEIGHT_BITS)
