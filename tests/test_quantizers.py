"""Every bottleneck returns the same named result; FSQ and DDCL behave as their papers say; the
library's other bottlenecks are wired the way their modules need."""
import math

import pytest
import torch

from models import SubPixelConvTranspose2d, build_model, model_args_from_config
from quantizers import QUANTIZERS, DDCL_Bottleneck, FSQWrapper, QuantizerOutput, build_quantizer

FITTED = dict(entropy_model="fitted", rate_weight=0.0)


def test_fsq_indices_in_range_and_decode_exactly():
    q = FSQWrapper([8, 6, 6, 5]).eval()
    z = torch.randn(16, 4, 4, 4) * 3
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.indices.shape == (16, 4, 4) and out.indices.dtype == torch.int64
    assert 0 <= int(out.indices.min()) and int(out.indices.max()) < 1440
    assert torch.equal(q.decode_indices(out.indices), out.z_q)
    assert torch.allclose(out.bits, torch.full((16,), 16 * math.log2(1440)))


def test_fsq_fixed_length_rate_is_16_log2_prod_levels():
    for levels in ([8, 6, 6, 5], [8, 5, 5, 5], [7, 5, 5, 5, 5]):
        q = FSQWrapper(levels)
        indices = q(torch.randn(3, len(levels), 4, 4))[1]
        assert q.fixed_length_bits(indices.reshape(3, 1, -1)) == pytest.approx(16 * math.log2(math.prod(levels)))


def test_fsq_rejects_out_of_range_indices():
    with pytest.raises(ValueError, match=r"indices outside \[0, 1440\)"):
        FSQWrapper([8, 6, 6, 5]).decode_indices(torch.full((1, 4, 4), 1440))


def test_ddcl_training_adds_uniform_noise_with_identity_gradient():
    torch.manual_seed(0)
    q = DDCL_Bottleneck(latent_dim=4, delta=0.2, comm_weight=1e-2).train()
    z = torch.randn(64, 4, 4, 4, requires_grad=True)
    out = q(z)
    noise = (out.z_q - z).detach()
    assert noise.abs().max() <= 0.1 + 1e-6
    assert noise.std().item() == pytest.approx(0.2 / math.sqrt(12), rel=0.05)
    out.z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # no rounding in the graph
    expected = 1e-2 * torch.log2(2 * z.detach().abs() / 0.2 + 1).mean()
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ddcl_eval_error_is_uniform_and_independent_of_z():
    """Subtractive dither (Schuchman): z_hat - z ~ U(-delta/2, delta/2), whatever z is."""
    delta = 0.25
    q = DDCL_Bottleneck(latent_dim=4, delta=delta, comm_weight=1e-3).eval()
    z = torch.linspace(-3, 3, 4096 * 64).reshape(4096, 4, 4, 4)  # deterministic, covers many bins
    z = z[torch.randperm(4096, generator=torch.Generator().manual_seed(0))]
    out = q(z, seed=list(range(len(z))))  # a dither per image, as evaluate.py draws them
    err = (out.z_q - z).flatten()
    assert err.abs().max() <= delta / 2 + 1e-6
    # uniform: 10 equal bins each hold ~10% of the errors
    hist = torch.histc(err, bins=10, min=-delta / 2, max=delta / 2) / err.numel()
    assert torch.all((hist - 0.1).abs() < 0.01), hist
    # independent of z: the error's mean and variance do not change across the z range, and
    # its correlation with z and with z's position inside a quantization bin is ~0
    zf = z.flatten()
    for part in torch.chunk(torch.argsort(zf), 8):
        assert abs(err[part].mean().item()) < 0.01 * delta
        assert err[part].var().item() == pytest.approx(delta ** 2 / 12, rel=0.05)
    frac = torch.remainder(zf / delta, 1.0)
    for other in (zf, frac):
        assert abs(torch.corrcoef(torch.stack([err, other]))[0, 1].item()) < 0.01


def test_ddcl_eval_is_truly_discrete_and_decodable_from_seed():
    q = DDCL_Bottleneck(latent_dim=4, delta=1 / 15, comm_weight=1e-3).eval()
    z = torch.randn(8, 4, 4, 4)
    out = q(z, seed=123)
    assert out.indices.dtype == torch.int64
    assert torch.equal(out.indices.float(), torch.round((z + q.dither(z.shape[1:], 123, z.device)) / q.delta))
    assert torch.equal(q.decode_indices(out.indices, seed=123), out.z_q)
    assert not torch.equal(q.decode_indices(out.indices, seed=124), out.z_q)
    assert torch.equal(q(z, seed=123).z_q, out.z_q)  # the same seed gives the same dither


def test_ddcl_surrogate_upper_bounds_mid_tread_code_on_average():
    """E[log2(2|m|+1)] <= log2(2|z|/delta + 1) (Jensen, mid-tread): the notes' argument, checked."""
    q = DDCL_Bottleneck(latent_dim=1, delta=1.0, comm_weight=0.0).eval()
    for value in (0.0, 0.3, 1.7, 5.2):
        z = torch.full((20000, 1, 1, 1), value)
        m = q(z, seed=list(range(len(z)))).indices.float()  # averaged over the dither: one per image
        assert torch.log2(2 * m.abs() + 1).mean().item() <= math.log2(2 * value + 1) + 1e-3


def model_of(name, **knobs):
    from conftest import resolve

    config = resolve([f"--quantizer={name}", "--channels=[8,8,16]", "--codebook_size=64", "--fsq_levels=[5,4,4]",
                      *(f"--{k}={v}" for k, v in knobs.items())])
    return build_model(model_args_from_config(config))


@pytest.mark.parametrize("name", QUANTIZERS)
def test_every_quantizer_plugs_into_the_model(name):
    model = model_of(name)
    x = torch.rand(5, 3, 32, 32)
    out = model(x)
    c = model.decoder.net[0].in_channels
    assert out.recon.shape == x.shape and 0 <= out.recon.min() and out.recon.max() <= 1
    assert out.z_q.shape == (5, c, 4, 4) and out.bits.shape == (5,) and out.aux_loss.dim() == 0
    (out.recon.square().mean() + out.aux_loss).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())  # the gradient reaches the encoder
    model.eval()
    indices = model.encode(x, seed=3)  # the bottleneck's indices() alone, without the rate
    forward = model.quantizer(model.encoder(x), seed=3).indices
    assert (indices is None and forward is None) or torch.equal(indices, forward)
    if model.quantizer.num_streams:
        assert torch.allclose(model.decode(indices, seed=3), model(x, seed=3).recon, atol=1e-6)
    else:
        assert indices is None


@pytest.mark.parametrize("name", ["vq", "lfq", "fsp", "simvq", "rfsq"])
def test_library_bottlenecks_read_the_channel_axis_and_decode_their_indices(name):
    """Flipping the latent grid flips the codes: channels are dim 1, never confused with the width
    (FSP, SimVQ and ResidualFSQ default to channel-last and would read a (B, 4, 4, 4) latent wrongly)."""
    torch.manual_seed(0)
    q = model_of(name).quantizer.eval()
    z = torch.randn(6, q.in_channels, 4, 4)
    out = q(z)
    shape = (6, 4, 4) if q.num_streams == 1 else (6, q.num_streams, 4, 4)
    assert out.indices.shape == shape and 0 <= out.indices.min() and out.indices.max() < q.codebook_size
    assert torch.equal(q(z.flip(3)).indices, out.indices.flip(-1))
    assert torch.allclose(q.decode_indices(out.indices), out.z_q, atol=1e-6)
    assert q.fixed_length_bits(out.indices) == pytest.approx(16 * q.num_streams * math.log2(q.codebook_size))


def test_residual_fsq_sends_one_code_per_stage_and_each_stage_refines():
    q = model_of("rfsq", num_quantizers=3).quantizer.eval()
    z = torch.randn(64, 3, 4, 4) * 0.5
    out = q(z)
    assert out.indices.shape == (64, 3, 4, 4) and q.num_streams == 3
    first_only = q.decode_indices(torch.cat([out.indices[:, :1], torch.full_like(out.indices[:, 1:], 0)], 1))
    assert (out.z_q - z).square().mean() < (first_only - z).square().mean()


def test_fsp_perturbs_within_half_a_bin_in_training_and_sends_bin_centres_at_evaluation():
    torch.manual_seed(0)
    q = model_of("fsp").quantizer
    z = torch.randn(32, 3, 4, 4)
    centres = q.eval()(z).z_q
    noisy = q.train()(z).z_q
    assert not torch.equal(noisy, centres)  # the library's quantize_rate 0: every value perturbed
    half_bin = 0.5 / torch.tensor([5.0, 4.0, 4.0])[None, :, None, None] / 0.28867513459481287  # in the decoder's units
    assert ((noisy - centres).abs() <= 2 * half_bin + 1e-5).all()


def test_vq_uses_the_constants_it_documents():
    from discrete_ae.library_quantizers import VQ_COMMITMENT_WEIGHT, VQ_DEAD_CODE_THRESHOLD

    q = model_of("vq").quantizer
    assert q.vq.commitment_weight == VQ_COMMITMENT_WEIGHT and q.vq._codebook.threshold_ema_dead_code == VQ_DEAD_CODE_THRESHOLD


def test_vae_bits_are_the_kl_in_bits():
    q = build_quantizer(dict(quantizer="vae", latent_dim=2, vae_kl_weight=1.0, fsq_levels=[8], codebook_size=2, **FITTED)).eval()
    mu, logvar = torch.full((1, 2, 4, 4), 1.0), torch.zeros(1, 2, 4, 4)
    out = q(torch.cat([mu, logvar], 1))
    assert out.bits.item() == pytest.approx(32 * 0.5 / math.log(2))  # 32 values of KL = mu^2/2 nats
    assert torch.equal(out.z_q, mu)


def test_an_integer_seed_shares_the_dither_and_a_seed_per_image_gives_each_its_own():
    q = DDCL_Bottleneck(latent_dim=2, delta=0.1, comm_weight=0.0)
    shared, own = q.dither((2, 4, 4), 5, "cpu"), q.dither((2, 4, 4), [5, 6, 7], "cpu")
    assert shared.shape == (2, 4, 4) and own.shape == (3, 2, 4, 4)
    assert torch.equal(own[0], shared) and not torch.equal(own[1], own[0])


def test_the_decoder_in_channels_last_memory_is_the_plain_layers_to_float_rounding():
    from models import Decoder

    torch.manual_seed(0)
    for res_blocks in (0, 1):
        decoder = Decoder([8, 16, 32], 4, res_blocks)
        z = torch.randn(5, 4, 4, 4)
        with torch.no_grad():
            got, plain = decoder(z), torch.sigmoid(decoder.net(z))  # the Sequential alone: all in NCHW memory
        assert got.is_contiguous() and torch.allclose(got, plain, rtol=0, atol=1e-6)
        decoder(z).square().mean().backward()  # and it trains
        assert all(p.grad is not None for p in decoder.parameters())


def test_the_sub_pixel_layer_is_the_transposed_convolution_it_replaces():
    torch.manual_seed(0)
    plain = torch.nn.ConvTranspose2d(5, 3, 4, stride=2, padding=1).double()
    layer = SubPixelConvTranspose2d(5, 3).double()
    layer.load_state_dict(plain.state_dict())  # the same parameters: checkpoints load either way
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    got, want = layer(x), plain(x)
    assert got.shape == (2, 3, 12, 14) and torch.allclose(got, want, rtol=0, atol=1e-12)
    F = torch.nn.functional
    shuffled = F.pixel_shuffle(F.conv2d(x, *layer.convolution(x.dtype), padding=1), 2)
    assert torch.equal(got, shuffled)  # its shuffle is pixel_shuffle's, value for value
    (g_sub,) = torch.autograd.grad(got.square().sum(), layer.weight)
    (g_plain,) = torch.autograd.grad(want.square().sum(), plain.weight)
    assert torch.allclose(g_sub, g_plain, rtol=0, atol=1e-10)
    with torch.no_grad():  # kept between calls without autograd, and made again when a weight changes
        assert layer.convolution(torch.float64) is layer.convolution(torch.float64)
        plain.weight.mul_(2.0)
        layer.load_state_dict(plain.state_dict())
        assert torch.allclose(layer(x), plain(x), rtol=0, atol=1e-12)
