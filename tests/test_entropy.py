"""Rates (discrete_ae/priors.py): fitted priors, ideal code lengths, one range-coded stream, learned priors
and the per-image byte strings."""
import math

import numpy as np
import pytest
import torch

from conftest import randomised
from discrete_ae import coding, priors
from discrete_ae.coding import ESCAPE_BITS
from discrete_ae.priors import fit_prior
from quantizers import DDCL_Bottleneck


def tables_of(priors, count=16):
    return [p.table(count) for p in priors]


def cross_entropy_bits(priors, values):
    return float(coding.ideal_bits(values.numpy(), tables_of(priors, values.shape[-1])).mean())


def entropy_code(priors, values):
    return coding.stream_bits(values.numpy(), tables_of(priors, values.shape[-1]))


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
    m_train = q(torch.randn(20000, 1, 4, 4, generator=gen) * sigma, seed=list(range(20000))).indices.reshape(20000, 1, 16)
    m_val = q(torch.randn(20000, 1, 4, 4, generator=gen) * sigma, seed=list(range(20000, 40000))).indices.reshape(20000, 1, 16)
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
    m_train, m_val = (q(z(), seed=list(range(s, s + 20000))).indices.reshape(20000, 1, 16) for s in (0, 20000))
    # exact: z+u is a trapezoid; interior bins get 1/L, the two edge bins 1/(2L) each
    analytic = (L - 1) / L * math.log2(L) + 2 * (1 / (2 * L)) * math.log2(2 * L)
    assert cross_entropy_bits(fit_prior(m_train), m_val) / 16 == pytest.approx(analytic, abs=0.01)


# ----------------------------------------------------------------------------- learned priors

def test_categorical_prior_bits_and_their_two_gradients():
    """Value: -log2 p(symbol). The encoder's gradient is the slope between neighbouring symbols;
    the prior's gradient is the cross-entropy's (the symbols held fixed)."""
    prior = priors.CategoricalPrior([4, 3])
    with torch.no_grad():
        prior.logits.copy_(torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 5.0, 9.0]]))
    symbols = torch.tensor([[[1.0, 3.0], [0.0, 2.0]]], requires_grad=True)  # (B=1, S=2, P=2)
    enc, pri = prior.bits(symbols)
    logp = prior.log2_probs().detach()
    expected = -torch.stack([logp[0, [1, 3]], logp[1, [0, 2]]])[None]
    assert torch.allclose(enc, expected) and torch.allclose(pri, expected)
    enc.sum().backward()
    slope_mid = (logp[0, 0] - logp[0, 2]) / 2  # central difference at symbol 1 of stream 0
    slope_end = logp[1, 1] - logp[1, 2]  # one-sided at the last symbol of stream 1 (size 3)
    assert symbols.grad[0, 0, 0].item() == pytest.approx(slope_mid.item(), rel=1e-5)
    assert symbols.grad[0, 1, 1].item() == pytest.approx(slope_end.item(), rel=1e-5)
    assert prior.logits.grad is None  # the encoder's bits do not train the prior
    pri.sum().backward()
    assert prior.logits.grad is not None and prior.logits.grad[1, 3] == 0  # masked entry beyond size 3


def fitted_mixture(z, delta, steps=100):
    """A LogisticMixturePrior trained by its own loss on z + uniform noise (as in training)."""
    torch.manual_seed(0)
    prior = priors.LogisticMixturePrior(z.shape[1])
    opt = torch.optim.Adam(prior.parameters(), lr=0.05)
    for _ in range(steps):
        _, bits = prior.bits(z + (torch.rand_like(z) - 0.5) * delta, delta)
        opt.zero_grad()
        bits.mean().backward()
        opt.step()
    return prior


def test_ddcl_learned_bits_in_training_match_the_range_coded_dithered_integers():
    """The uniform-noise proxy the loss pays equals, in expectation, the bits of coding
    m = round((z + u)/delta) under P(m | u) (Agustsson & Theis 2020): measured within 2%."""
    delta = 0.1
    gen = torch.Generator().manual_seed(1)
    n = 1000
    z = torch.cat([torch.randn(n, 1, 16, generator=gen) * 0.4,
                   torch.distributions.Laplace(0.2, 0.1).sample((n, 1, 16))], 1)  # (N, C=2, P=16)
    prior = fitted_mixture(z, delta)
    with torch.no_grad():
        train_bits = prior.bits(z + (torch.rand(z.shape, generator=gen) - 0.5) * delta, delta)[0].sum((1, 2)).mean().item()
    q = DDCL_Bottleneck(latent_dim=2, delta=delta, comm_weight=0.0, entropy_model="learned").eval()
    q.prior = prior
    m = q(z.reshape(n, 2, 4, 4), seed=list(range(n))).indices  # dithered integers, (N, 2, 4, 4)
    tables = q.coding_tables(n, 16, seed=list(range(n)))
    values = q.coding_values(m).numpy()
    coded, exact = coding.stream_bits(values, tables)
    ideal = coding.ideal_bits(values, tables).mean()
    assert exact
    assert coded == pytest.approx(train_bits, rel=0.02)
    assert ideal <= coded <= 1.01 * ideal


def test_learned_tables_hold_no_zero_and_escape_far_values():
    prior = priors.LogisticMixturePrior(1)
    tables = prior.tables(torch.zeros(2, 1, 16), 0.1)
    (table,) = tables
    assert table.open and table.probs.shape[:2] == (2, 16) and (table.probs > 0).all()
    assert np.allclose(table.probs.sum(-1), 1.0)
    values = np.zeros((2, 1, 16), dtype=np.int64)
    values[0, 0, 3] = 20000  # far outside the support: escaped, still exact
    bits, exact = coding.stream_bits(values, tables)
    assert exact and coding.ideal_bits(values, tables)[0] > ESCAPE_BITS


def test_the_learned_prior_trains_at_its_own_learning_rate():
    from conftest import resolve
    from discrete_ae.optim import PRIOR_LR_SCALE, build_optimizer
    from models import build_model, model_args_from_config

    config = resolve(["--quantizer=ddcl", "--entropy_model=learned"])
    model = build_model(model_args_from_config(config))
    optimizer = build_optimizer(model, config)
    main, filters, prior = optimizer.param_groups  # Adam, Muon (the hidden filters), Adam
    assert prior["lr"] == pytest.approx(PRIOR_LR_SCALE * main["lr"])
    assert {id(p) for p in prior["params"]} == {id(p) for p in model.quantizer.prior.parameters()}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_the_context_prior_sees_only_the_values_sent_before_each_position():
    """Raster order: position g's mixture is a function of positions < g alone, bit for bit."""
    torch.manual_seed(0)
    prior = priors.ContextMixturePrior(2, (4, 4)).double()
    z = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    base = prior.params(z)
    for g in (0, 5, 15):
        later = z.clone().flatten(2)
        later[:, :, g:] = torch.randn_like(later[:, :, g:])
        moved = prior.params(later.view_as(z))
        assert all(torch.equal(a[:, :, g], b[:, :, g]) for a, b in zip(base, moved))
    left = z.clone()
    left[:, :, 1, 1] += 1.0  # position 5 is the left neighbour of position 6
    assert not torch.equal(prior.params(left)[0][:, :, 6], base[0][:, :, 6])


@pytest.mark.parametrize("kind", ["mixture", "categorical"])
def test_context_tables_are_the_same_bits_in_any_batch(kind):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if kind == "mixture":  # DDCL: signed integers, tables conditioned on the dither
        prior = priors.ContextMixturePrior(4, (4, 4))
        u = (torch.rand(37, 4, 16) - 0.5) / 15
        values = rng.integers(-10, 10, (37, 16, 4))

        def tables(rows):
            return prior.tables(u[rows], 1 / 15)
    else:  # FSQ: levels of [8, 6, 6, 5]
        prior = priors.ContextCategoricalPrior([8, 6, 6, 5], (4, 4))
        values = rng.integers(0, 5, (37, 16, 4))

        def tables(rows):
            return prior.tables(16)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, 0.3)
    batch = coding.materialise(tables(slice(None)), values)
    for i in (0, 5, 36):
        alone = coding.materialise(tables(slice(i, i + 1)), values[i:i + 1])
        assert all(np.array_equal(a.probs[i], b.probs[0]) for a, b in zip(batch, alone))
    bits, exact = coding.stream_bits(values, tables(slice(None)))  # the stream decodes position by position
    assert exact and bits > 0


@pytest.mark.parametrize("kind", ["mixture", "categorical"])
def test_checking_strings_against_the_receivers_tables_agrees_with_decompressing_each(kind):
    """evaluate's round-trip check: one decode call per string under the tables read from the stream
    says the same as decompress, which reads each string group by group under its own tables."""
    rng = np.random.default_rng(4)
    if kind == "mixture":  # DDCL, one value far outside its window: an escape
        prior = randomised(priors.ContextMixturePrior(3, (4, 4)), std=0.5)
        u = torch.rand(6, 3, 16, generator=torch.Generator().manual_seed(0)).double() / 15 - 1 / 30
        values = rng.integers(-5, 6, (6, 16, 3))
        values[2, 9, 1] = 1000

        def tables(rows):
            return prior.tables(u[rows], 1 / 15)
    else:  # FSQ levels [8, 5, 5]
        prior = randomised(priors.ContextCategoricalPrior([8, 5, 5], (4, 4)), std=0.5)
        values = rng.integers(0, 5, (6, 16, 3))

        def tables(rows):
            return prior.tables(16)
    strings = coding.compress(values, tables(slice(None)), b"k")
    stream = coding.Stream()
    stream.add(values, tables(slice(None)))
    from_stream, read = coding.read_batch(stream.decoder(), tables(slice(None)), len(values))
    assert np.array_equal(from_stream, values)
    damaged = list(strings)
    damaged[1] = strings[1][:-2]  # truncated
    damaged[3] = strings[3][:5] + bytes([strings[3][5] ^ 0x10]) + strings[3][6:]  # one bit flipped
    damaged[4] = bytes([0x00]) + strings[4][1:]  # not this repo's magic
    checked = coding.strings_read_back(damaged, read, b"k", values)
    for i, s in enumerate(damaged):
        try:
            alone = np.array_equal(coding.decompress([s], tables(slice(i, i + 1)), b"k")[0], values[i])
        except coding.BitstreamError:
            alone = False
        assert checked[i] == alone, i
    assert checked[[0, 2, 5]].all() and not checked[[1, 3, 4]].any()
    assert not coding.strings_read_back(strings, read, b"other key", values).any()


def test_context_categorical_bits_reach_the_symbol_and_its_context():
    """FSQ's context prior: the value is -log2 p(level | earlier levels); the encoder's gradient
    reaches the level itself (slope to its neighbours) and the earlier levels it is predicted from,
    never the prior; the prior's bits train the prior only."""
    torch.manual_seed(0)
    prior = priors.ContextCategoricalPrior([5, 3], (2, 2))
    symbols = torch.tensor([[[1.0, 4.0, 2.0, 0.0], [0.0, 2.0, 1.0, 1.0]]], requires_grad=True)  # (1, C=2, P=4)
    enc, pri = prior.bits(symbols)
    logp = torch.log_softmax(prior.logits(symbols.detach()), -1) / math.log(2)  # (1, 2, 4, 5)
    expected = -logp.gather(-1, symbols.detach().long().unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(enc, expected) and torch.allclose(pri, expected)
    assert torch.isinf(logp[0, 1, :, 3:]).all()  # levels beyond channel 1's three never occur
    enc[0, :, 3].sum().backward()  # the last position's bits
    assert symbols.grad[0, :, 0].abs().sum() > 0  # its context (position 0 is its upper-left neighbour)
    assert symbols.grad[0, 0, 3] != 0  # and its own level
    assert all(p.grad is None for p in prior.parameters())
    pri.sum().backward()
    assert prior.out.weight.grad is not None


def test_context_bits_in_training_match_the_coded_integers_and_pay_on_correlated_latents():
    """On latents whose values share an offset per image and channel, the context prior learns it
    from the neighbours: its training bits match the range-coded dithered integers (within 3%),
    and they are well below what the per-channel mixture codes."""
    delta, n = 0.1, 600
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, 2, 1, generator=gen) * 0.5 + torch.randn(n, 2, 16, generator=gen) * 0.05  # (N, 2, 16)
    torch.manual_seed(0)
    prior = priors.ContextMixturePrior(2, (4, 4))
    opt = torch.optim.Adam(prior.parameters(), lr=0.01)
    for _ in range(100):
        _, bits = prior.bits(z + (torch.rand_like(z) - 0.5) * delta, delta)
        opt.zero_grad()
        bits.mean().backward()
        opt.step()
    with torch.no_grad():
        train_bits = prior.bits(z + (torch.rand(z.shape, generator=gen) - 0.5) * delta, delta)[0].sum((1, 2)).mean().item()

    def coded(q):
        m = q(z.reshape(n, 2, 4, 4), seed=list(range(n))).indices
        bits, exact = coding.stream_bits(q.coding_values(m).numpy(), q.coding_tables(n, 16, seed=list(range(n))))
        assert exact
        return bits

    q = DDCL_Bottleneck(latent_dim=2, delta=delta, comm_weight=0.0, entropy_model="context").eval()
    q.prior = prior
    factorized = DDCL_Bottleneck(latent_dim=2, delta=delta, comm_weight=0.0, entropy_model="learned").eval()
    factorized.prior = fitted_mixture(z, delta)
    context_bits = coded(q)
    assert context_bits == pytest.approx(train_bits, rel=0.03)
    assert context_bits < 0.7 * coded(factorized)


def test_the_context_networks_silu_keeps_a_finite_gradient_far_below_zero():
    """A context prior trained 30 epochs drove a hidden unit below -88, where exp(-x) is inf in
    float32 and the backward pass gave NaN: the run stopped (docs/comparison.md)."""
    x = torch.tensor([-1000.0, -90.0, -40.0, -3.0, 0.0, 5.0], requires_grad=True)
    y = priors._silu(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.allclose(y, torch.nn.functional.silu(x.detach()), atol=1e-6)
