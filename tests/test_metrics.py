"""Distortion and rate: PSNR conventions, priors, entropy and a real range-coded bitstream."""
import math

import pytest
import torch

from metrics import (ESCAPE_BITS, PSNR_CAP_DB, codebook_stats, cross_entropy_bits, entropy_code, fit_prior,
                     psnr_per_image, ssim_per_image)
from quantizers import DDCL_Bottleneck


def test_psnr_of_identical_images_is_capped():
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(psnr_per_image(x, x), torch.full((3,), PSNR_CAP_DB))


def test_psnr_is_per_image_on_8bit_values():
    x = torch.zeros(2, 3, 32, 32)
    y = x.clone()
    y[0] += 10 / 255  # MSE (10/255)^2 -> PSNR 20 log10(25.5)
    y[1] += 0.4 / 255  # rounds back to 0: identical at 8 bits
    psnr = psnr_per_image(y, x)
    assert psnr[0].item() == pytest.approx(20 * math.log10(25.5), abs=1e-3)
    assert psnr[1].item() == PSNR_CAP_DB


def test_ssim_is_one_for_identical_and_lower_for_noise():
    x = torch.rand(2, 3, 32, 32)
    assert ssim_per_image(x, x) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert (ssim_per_image((x + 0.2 * torch.randn_like(x)).clamp(0, 1), x) < 0.9).all()


def test_codebook_stats():
    stats = codebook_stats(torch.tensor([0, 1, 2, 3] * 10), 8)
    assert stats["codebook_usage"] == 50.0 and stats["perplexity"] == pytest.approx(4.0)


def gaussian_ints(n, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.round(torch.randn(n, 3, 16, generator=gen) * scale).long()


def test_entropy_coded_round_trip_is_exact_with_escapes():
    train, val = gaussian_ints(200, 4.0, 0), gaussian_ints(100, 4.0, 1)
    val[0, 0, 0] = 500  # far outside the training range: goes through the escape code
    val[1, 2, 5] = -700
    priors = fit_prior(train)
    bits, exact = entropy_code(priors, val)
    assert exact
    assert bits > 0 and cross_entropy_bits(priors, val) > 2 * ESCAPE_BITS / 100


def test_bitstream_is_within_a_few_percent_of_the_entropy():
    train, val = gaussian_ints(3000, 3.0, 0), gaussian_ints(3000, 3.0, 1)
    priors = fit_prior(train)
    coded, exact = entropy_code(priors, val)
    ideal = cross_entropy_bits(priors, val)
    assert exact and ideal <= coded <= 1.02 * ideal


def test_closed_alphabet_prior_covers_unseen_codes():
    priors = fit_prior(torch.zeros(10, 1, 16, dtype=torch.long), alphabet_size=1000)
    bits, exact = entropy_code(priors, torch.full((2, 1, 16), 999))
    assert exact and bits > 0
    with pytest.raises(ValueError, match="outside the closed alphabet"):
        cross_entropy_bits(priors, torch.full((1, 1, 16), 1000))


def test_ddcl_entropy_of_a_gaussian_latent_matches_the_analytic_value():
    """z ~ N(0, sigma^2), dithered step delta: m = round((z+u)/delta) has P(m=k) = P(z+u in bin k),
    and z+u has density (Gaussian * uniform). Its exact entropy is computed by integration."""
    sigma, delta = 1.0, 0.25
    q = DDCL_Bottleneck(latent_dim=1, delta=delta, comm_weight=0.0).eval()
    gen = torch.Generator().manual_seed(0)
    m_train = q(torch.randn(20000, 1, 4, 4, generator=gen) * sigma, seed=1).indices.reshape(20000, 1, 16)
    m_val = q(torch.randn(20000, 1, 4, 4, generator=gen) * sigma, seed=2).indices.reshape(20000, 1, 16)
    measured = cross_entropy_bits(fit_prior(m_train), m_val) / 16

    normal = torch.distributions.Normal(0.0, sigma)
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000 * delta - delta / 2  # midpoint rule over u
    k = torch.arange(-40, 41, dtype=torch.float64)[:, None]
    p = (normal.cdf((k + 0.5) * delta - u) - normal.cdf((k - 0.5) * delta - u)).mean(1)
    analytic = -(p[p > 0] * torch.log2(p[p > 0])).sum().item()
    assert measured == pytest.approx(analytic, abs=0.01)
    # and the high-resolution approximation h(z + u) - log2(delta) agrees to within 0.02 bits
    assert analytic == pytest.approx(0.5 * math.log2(2 * math.pi * math.e * (sigma ** 2 + delta ** 2 / 12)) - math.log2(delta), abs=0.02)


def test_ddcl_entropy_of_a_uniform_latent_matches_log2_of_its_bins():
    """z uniform over [0, L*delta): m is uniform over L+1 values at the edges, ~log2(L) bits."""
    delta, L = 0.1, 64
    q = DDCL_Bottleneck(latent_dim=1, delta=delta, comm_weight=0.0).eval()
    gen = torch.Generator().manual_seed(0)
    z = lambda: torch.rand(20000, 1, 4, 4, generator=gen) * L * delta
    m_train, m_val = (q(z(), seed=s).indices.reshape(20000, 1, 16) for s in (1, 2))
    # exact: z+u is a trapezoid; interior bins get 1/L, the two edge bins 1/(2L) each
    analytic = (L - 1) / L * math.log2(L) + 2 * (1 / (2 * L)) * math.log2(2 * L)
    assert cross_entropy_bits(fit_prior(m_train), m_val) / 16 == pytest.approx(analytic, abs=0.01)
