"""Bjontegaard deltas between two rate-distortion curves, and intervals over seeds.

G. Bjontegaard, "Calculation of average PSNR differences between RD-curves", VCEG-M33, 2001:
BD-rate is the mean difference of log(rate) at equal PSNR over the PSNR range both curves cover,
reported as exp(mean) - 1 (the % of bits curve `a` spends more than `b`: negative saves bits);
BD-PSNR is the mean PSNR difference at equal log(rate) over the common rate range. Each curve is
first made monotone (PSNR never falls as the rate rises: pool-adjacent-violators, equal weights),
then interpolated piecewise-cubically with PCHIP, which keeps that monotonicity and, unlike the
original cubic fit, does not overshoot with 3-4 points. Curves whose ranges do not overlap get
None, never an extrapolated number.
"""
import math

import numpy as np

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def monotone(rates, psnrs):
    """Points sorted by rate with PSNR made non-decreasing (pool adjacent violators) -> (log rates,
    PSNRs) as float arrays; points pooled to one PSNR keep each rate."""
    order = np.argsort(rates)
    r, p = np.log(np.asarray(rates, dtype=float)[order]), np.asarray(psnrs, dtype=float)[order]
    blocks = []  # [mean, count]
    for value in p:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return r, np.concatenate([[m] * n for m, n in blocks])


def _mean_over(xa, ya, xb, yb):
    """Mean of interp_a - interp_b over the x range both cover (PCHIP through each), or None."""
    from scipy.interpolate import PchipInterpolator

    lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
    if len(xa) < 2 or len(xb) < 2 or not hi > lo:
        return None
    fa, fb = PchipInterpolator(xa, ya), PchipInterpolator(xb, yb)
    return float((fa.integrate(lo, hi) - fb.integrate(lo, hi)) / (hi - lo))


def _strict(x, y):
    """Keep the first point of each run of equal x, so x strictly increases (PCHIP needs it)."""
    keep = np.concatenate([[True], np.diff(x) > 0])
    return x[keep], y[keep]


def bd_psnr(rates_a, psnrs_a, rates_b, psnrs_b):
    """Mean PSNR of curve a minus curve b (dB) at equal rate over the common rate range, or None."""
    (ra, pa), (rb, pb) = monotone(rates_a, psnrs_a), monotone(rates_b, psnrs_b)
    return _mean_over(*_strict(ra, pa), *_strict(rb, pb))


def bd_rate(rates_a, psnrs_a, rates_b, psnrs_b):
    """Bits curve a spends over curve b at equal PSNR, in % (negative: a saves bits), or None.
    log(rate) as a function of PSNR, over the common PSNR range; where a curve is flat in PSNR,
    the lowest rate of the flat part stands for it."""
    (ra, pa), (rb, pb) = monotone(rates_a, psnrs_a), monotone(rates_b, psnrs_b)
    mean = _mean_over(*_strict(pa, ra), *_strict(pb, rb))
    return None if mean is None else 100.0 * (math.exp(mean) - 1.0)


def bd_pair(curve_a, curve_b):
    """(BD-rate %, BD-PSNR dB) of curve a against curve b, each a list of (rate, PSNR) points;
    None where they cannot be compared (fewer than 2 points, or no overlap)."""
    if len(curve_a) < 2 or len(curve_b) < 2:
        return None, None
    (rates_a, psnrs_a), (rates_b, psnrs_b) = zip(*curve_a), zip(*curve_b)
    return bd_rate(rates_a, psnrs_a, rates_b, psnrs_b), bd_psnr(rates_a, psnrs_a, rates_b, psnrs_b)


def interval(values):
    """(mean, low, high) of a 95% Student-t interval of the mean, over independent runs (seeds);
    one value gives (value, None, None)."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, None, None
    half = T_975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def verdict(low, high, better_when_negative):
    """How an interval reads: 'level' where it holds 0, else which side leads."""
    if low is None:
        return "one seed: no interval"
    if low <= 0 <= high:
        return "level"
    below = high < 0
    return "better" if below == better_when_negative else "worse"
