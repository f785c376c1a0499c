"""Distortion metrics: PSNR conventions, SSIM, codebook use."""
import math

import pytest
import torch

from discrete_ae.metrics import PSNR_CAP_DB, codebook_stats, psnr_per_image, ssim_per_image


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


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (2, 3, 24, 40)])
def test_ssim_equals_torchmetrics(shape):
    from torchmetrics.functional.image import structural_similarity_index_measure

    torch.manual_seed(0)
    x = torch.rand(shape)
    x[0] = torch.linspace(0, 1, shape[-1])  # a smooth image beside the noise
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    ours = ssim_per_image(y, x)
    reference = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none")
    assert ours.shape == (shape[0],)
    assert torch.allclose(ours, reference, atol=1e-5), (ours, reference)


def test_codebook_stats():
    stats = codebook_stats(torch.tensor([0, 1, 2, 3] * 10), 8)
    assert stats["codebook_usage"] == 50.0 and stats["perplexity"] == pytest.approx(4.0)
