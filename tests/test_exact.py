"""discrete_ae/exact.py: the context network on integers (the same tables on every machine), and
the coder paths it made fast (one pass for the encoder, one call for escape-free groups)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, randomised
from discrete_ae import coding, exact, priors
from discrete_ae.priors import ContextCategoricalPrior, ContextCodePrior, ContextMixturePrior, coding_order


def test_exp_is_within_a_few_ulp_and_clipped():
    x = np.random.default_rng(0).uniform(-700, 700, 20_003)
    got = np.vectorize(exact.exp1)(x)
    assert np.max(np.abs(got - np.exp(x)) / np.spacing(np.exp(x))) <= 4
    assert [exact.exp1(-1e6), exact.exp1(1e6)] == [exact.exp1(-700.0), exact.exp1(700.0)]  # clipped


def test_silu_table_is_within_its_stated_error():
    x = np.linspace(-30, 30, 200_001)
    assert np.max(np.abs(np.vectorize(exact.silu1)(x) - x / (1 + np.exp(-x)))) < 2e-5


def test_halve_adds_in_a_fixed_order_for_any_length():
    def padded(x):  # the order it promises: zeros padded to a power of two, halves added
        x = np.concatenate([x, np.zeros(x.shape[:-1] + ((1 << (x.shape[-1] - 1).bit_length()) - x.shape[-1],))], -1)
        while x.shape[-1] > 1:
            x = x[..., :x.shape[-1] // 2] + x[..., x.shape[-1] // 2:]
        return x[..., 0]

    for n in (1, 2, 3, 5, 8, 13, 47, 48):
        x = np.random.default_rng(n).random((12, n)) * 10.0 ** np.random.default_rng(n).integers(-8, 8, (12, n))
        buf = np.zeros((exact.pow2(n), len(x)))
        buf[:n] = x.T
        exact.halve(buf)
        assert np.array_equal(buf[0], padded(x)) and np.allclose(buf[0], x.sum(-1), rtol=1e-14, atol=0)


@pytest.mark.parametrize("make", [lambda: ContextCategoricalPrior([8, 5, 5], (4, 4)),
                                  lambda: ContextMixturePrior(3, (4, 4)),
                                  lambda: ContextCodePrior(2, 16, (4, 4))])
def test_the_integer_network_is_the_float_network_to_1e3_of_its_range_and_one_position_is_every_position(make):
    prior = randomised(make(), std=0.5)
    net = prior.exact()
    x = np.random.default_rng(1).uniform(-1, 1, (5, prior.channels, 4, 4))
    if isinstance(prior, ContextCodePrior):
        heads, reference = prior.streams, None
    else:
        heads = 1
        reference = prior.features(torch.from_numpy(x), detach=True).flatten(2).transpose(1, 2).numpy()  # (B, P, out)
    every = [net(x, h, np.arange(16)) for h in range(heads)]
    for h in range(heads):
        for p in (0, 5, 15):
            assert np.array_equal(net(x, h, [p])[:, 0], every[h][:, p])  # exact, not close
    if reference is not None:
        assert np.max(np.abs(every[0] - reference)) < 1e-3 * np.max(np.abs(reference))


def test_weights_too_large_to_sum_exactly_are_refused_in_one_line():
    prior = ContextCategoricalPrior([8, 5, 5], (4, 4))
    with torch.no_grad():
        prior.hidden.weight.fill_(1e12)
    with pytest.raises(ValueError, match="hidden layer has weights too large to run exactly"):
        prior.exact()


def test_ddcl_windowed_tables_send_a_value_far_from_the_prediction_through_the_escape():
    prior = randomised(ContextMixturePrior(3, (4, 4)), std=0.5)
    delta = 1 / 15
    u = torch.rand(1, 3, 16, generator=torch.Generator().manual_seed(0)).double() * delta - delta / 2
    values = np.random.default_rng(2).integers(-5, 6, (4, 16, 3))
    values[1, 7, 2] = 1000  # far outside any window: escaped
    tables = prior.tables(u, delta)
    sent = coding.materialise(tables, values)
    assert any(np.ndim(t.lo) for t in sent) and sent[7].lo[1, 2] < 1000 - sent[7].probs.shape[-1]
    strings = coding.compress(values, sent, b"k")
    assert np.array_equal(coding.decompress(strings, tables, b"k"), values)  # read with the decoder's tables
    bits, back = coding.stream_bits(values, tables)
    assert back and bits > 16  # the escape's 16 raw bits are in the stream


def test_escape_free_groups_in_one_call_are_the_same_bytes_as_group_by_group():
    rng = np.random.default_rng(3)
    probs = rng.random((6, 4, 2, 5)) + 0.1
    probs /= probs.sum(-1, keepdims=True)
    tables = [coding.Table(-2, probs[:, g], g % 2 == 1, 2) for g in range(4)]  # open and closed groups
    values = rng.integers(-2, 2, (6, 4, 2))  # no escape needed
    one_call = coding.encode_batch(values, tables)
    coder = coding._Coder(tables, 6)
    assert coder.block_ids(values) is not None
    coder.block = None  # group by group
    import constriction

    encoder = constriction.stream.queue.RangeEncoder()
    coder.encode(encoder, values)
    assert one_call == coding._shortest_payload(coder, encoder.get_compressed(), values)
    assert np.array_equal(coding.decode_batch(one_call, tables, 6)[0], values)


def test_the_cut_is_the_shortest_that_decodes_the_byte_at_a_time_search_finds():
    import constriction

    def decodes(coder, payload, values):
        return coding._decodes_to(coder, payload, values, coder.block_ids(values))

    def one_byte_at_a_time(coder, words, values):  # the search before CUT_GUESS
        payload = words.astype(">u4").tobytes().rstrip(b"\0")
        while payload:
            shorter = payload[:-1]
            rounded = (int.from_bytes(shorter, "big") + 1).to_bytes(len(shorter), "big") if shorter and shorter != b"\xff" * len(shorter) else None
            found = next((c for c in (shorter, rounded) if c is not None and decodes(coder, c, values)), None)
            if found is None:
                return payload
            payload = found
        return payload

    rng = np.random.default_rng(5)
    drops = set()
    for case in range(40):
        batch, k = int(rng.integers(1, 4)), int(rng.integers(2, 9))
        probs = rng.dirichlet(np.full(k, 0.3), (batch, 16)) * 0.98 + 0.02 / k  # peaked: short messages
        tables = [coding.Table(0, probs, False, 16)]
        values = np.stack([[rng.choice(k, p=p) for p in row] for row in probs])[:, None]
        coder = coding._Coder(tables, batch)
        encoder = constriction.stream.queue.RangeEncoder()
        coder.encode(encoder, values)
        words = encoder.get_compressed()
        cut = coding._shortest_payload(coder, words, values)
        assert decodes(coder, cut, values) and cut == one_byte_at_a_time(coder, words, values)
        drops.add(len(words.astype(">u4").tobytes().rstrip(b"\0")) - len(cut))
    assert {0, 1, 3} <= drops  # below, at and above the guess of 2 bytes


@pytest.mark.parametrize("grid,heads", [((4, 4), 1), ((4, 4), 2), ((3, 5), 1), ((1, 4), 3), ((4, 1), 1)])
def test_the_coding_order_sends_every_value_the_mask_reads_in_an_earlier_step(grid, heads):
    order, steps = coding_order(grid, heads)
    h, w = grid
    assert sorted(order.tolist()) == list(range(h * w * heads)) and sum(steps) == len(order)
    step_of = np.empty(len(order), dtype=int)
    step_of[order] = np.repeat(np.arange(len(steps)), steps)
    for g in range(len(order)):
        (r, c), head = divmod(g // heads, w), g % heads
        reads = [(r - 1, c - 1), (r - 1, c), (r - 1, c + 1), (r, c - 1)]  # the 3x3 mask's taps
        earlier = [(rr * w + cc) * heads + k for rr, cc in reads if 0 <= rr < h and 0 <= cc < w for k in range(heads)]
        earlier += [(g // heads) * heads + k for k in range(head)]  # the streams before it at its own position
        assert all(step_of[e] < step_of[g] for e in earlier)
    assert len(steps) == (2 * h + w - 2 if w > 1 else h) * heads  # anti-diagonals, not positions
    assert all(len({g % heads for g in order[a:a + n]}) == 1 for a, n in zip(np.cumsum((0,) + steps), steps))


@pytest.mark.parametrize("name", ["fsq", "ddcl", "codes"])
def test_a_steps_tables_are_the_one_pass_tables_whatever_the_unsent_values_hold(name):
    rng = np.random.default_rng(4)
    if name == "fsq":
        prior, values = randomised(ContextCategoricalPrior([8, 5, 5], (4, 4)), std=0.5), rng.integers(0, 5, (3, 16, 3))
        tables = prior.tables(16)
    elif name == "ddcl":
        prior, values = randomised(ContextMixturePrior(3, (4, 4)), std=0.5), rng.integers(-5, 6, (3, 16, 3))
        tables = prior.tables(torch.rand(3, 3, 16, generator=torch.Generator().manual_seed(0)).double() / 15 - 1 / 30, 1 / 15)
    else:
        prior, values = randomised(ContextCodePrior(2, 16, (4, 4)), std=0.5), rng.integers(0, 16, (3, 32, 1))
        tables = prior.tables(16)
    one_pass = coding.materialise(tables, values)
    for start, stop in coding.step_ranges(tables):
        garbage = values.copy()
        garbage[:, start:] = rng.integers(0, 5, garbage[:, start:].shape)  # what a decoder has not read yet
        for got, want in zip(tables.make(start, stop, garbage[:, :start]), one_pass[start:stop]):
            assert np.array_equal(got.probs, want.probs) and np.array_equal(got.lo, want.lo)


def test_the_geometric_mixture_cdf_is_the_float64_cdf_to_1e12():
    rng = np.random.default_rng(5)
    shape = (50, 3)
    loc, log_scale = rng.normal(0, 1, shape + (3,)), rng.normal(-2, 1.5, shape + (3,))
    x = rng.normal(0, 1, shape)
    log_scale[0, 0, 1], loc[0, 0, 1] = -12.0, x[0, 0] + 1e-3  # a needle in the window: the progression over- and underflows
    loc[1, 0, 0] = 200.0  # far above its window: exps one by one
    logits = rng.normal(0, 1, shape + (3,))
    w = np.exp(logits - logits.max(-1, keepdims=True))
    delta, below, above = 1 / 15, 23, 24
    def values_last(a):  # (..., K) -> (K, values)
        return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)

    got = exact.mixture_cdf(x.ravel(), delta, below, above, values_last(loc), values_last(log_scale), values_last(w),
                            w.sum(-1).ravel()).T.reshape(shape + (-1,))
    edges = torch.from_numpy(x[..., None] + np.arange(-below, above + 1) * delta)
    want = priors.mixture_cdf(edges, *(torch.from_numpy(a) for a in (loc, log_scale, logits))).numpy()
    assert np.max(np.abs(got - want)) < 1e-12


def test_ddcl_tables_are_a_distribution_around_the_predicted_mean_with_the_rest_in_the_escape():
    rng = np.random.default_rng(6)
    out = rng.normal(0, 1, (4, 5, 3, 2, 3))  # (B, n, loc / log scale / logits, C, K)
    u = rng.uniform(-0.5, 0.5, (4, 2, 16)) / 15  # (B, C, P)
    positions = np.array([0, 3, 5, 9, 15])
    probs, lo = exact.mixture_rows(out, u, positions, 1 / 15, 23, 60, 0.0, 1e-9)  # position-major
    assert probs.shape == (5, 4, 2, 48) and np.allclose(probs.sum(-1), 1, atol=1e-12) and (probs >= 1e-9 / 1.1).all()
    w = np.exp(out[:, :, 2] - out[:, :, 2].max(-1, keepdims=True))
    mean = (w * out[:, :, 0]).sum(-1) / w.sum(-1)  # (B, n, C)
    u_at = u[:, :, positions].transpose(0, 2, 1)  # (B, n, C)
    assert np.array_equal(lo.transpose(1, 0, 2) + 23, np.clip(np.round((mean + u_at) * 15), -60, 60).astype(np.int64))
    one = exact.mixture_rows(out[1:2, 2:4], u[1:2], positions[2:4], 1 / 15, 23, 60, 0.0, 1e-9)[0]
    assert np.array_equal(one, probs[2:4, 1:2])  # an image's positions alone
    shared = exact.mixture_rows(out, u[:1], positions, 1 / 15, 23, 60, 0.0, 1e-9)  # one dither for every image
    tiled = exact.mixture_rows(out, np.repeat(u[:1], 4, 0), positions, 1 / 15, 23, 60, 0.0, 1e-9)
    assert all(np.array_equal(a, b) for a, b in zip(shared, tiled))


def test_the_kernels_split_among_any_number_of_threads_give_the_same_bits():
    rng = np.random.default_rng(7)
    out = rng.normal(0, 1, (9, 10, 3, 4, 3))  # 360 values: parts of 1 to 12 ragged ones
    u, positions = rng.uniform(-0.5, 0.5, (9, 4, 16)) / 15, np.arange(3, 13)
    logits = rng.normal(0, 3, (90 * 4, 8))
    valid = np.arange(8) < np.array([[8], [5], [5], [3]])
    prior = randomised(ContextMixturePrior(4, (4, 4)), std=0.5)
    net, x = prior.exact(), rng.uniform(-1, 1, (30, 4, 16))
    network = (x, net._taps[:7], net._channel, net._tap, net.k1t[0], net.b1[0][:7], net.k2t, net.b2, net.k3t, net.b3)

    def each(threads):
        return (*exact._mixture_rows(out, u, positions, 1 / 15, 23, 60, 0.0, 1e-9, threads),
                exact._softmax_rows(logits, valid, 1e-9, threads), exact._network(*network, threads))

    one = each(1)
    for threads in (2, 3, 12):
        assert all(np.array_equal(a, b) for a, b in zip(each(threads), one))
    assert np.array_equal(exact.mixture_rows(out, u, positions, 1 / 15, 23, 60, 0.0, 1e-9)[0].reshape(360, -1), one[0])


def test_the_kernels_take_as_many_threads_as_torch_was_given():
    import numba

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert exact.threads() == 1 and numba.get_num_threads() == 1
        exact.mixture_rows(np.zeros((40, 2, 3, 4, 3)), np.zeros((1, 4, 16)), [6, 9], 1 / 15, 23, 60, 0.0, 1e-9)
        assert torch.get_num_threads() == 1  # a coding call leaves the process's thread count as it was
        torch.set_num_threads(64)
        assert exact.threads() == min(64, numba.config.NUMBA_NUM_THREADS) == numba.get_num_threads()
    finally:
        torch.set_num_threads(before)
        exact.threads()


WIDE_NETWORK = """
import numpy as np, torch
from discrete_ae.priors import ContextCodePrior
torch.manual_seed(0)
prior = ContextCodePrior(1, 1024, (4, 4))  # 1,024 outputs: an LFQ codebook
with torch.no_grad():
    for p in prior.parameters():
        p.normal_(0, 0.5)
net, x = prior.exact(), np.random.default_rng(9).uniform(-1, 1, (40, prior.channels, 4, 4))
torch.set_num_threads(2)  # two numba threads: a BLAS product that wakes its own threads inside them warns
two = net(x, 0, np.arange(16))
torch.set_num_threads(1)
assert np.array_equal(net(x, 0, np.arange(16)), two)
"""


def test_a_wide_network_keeps_each_blas_product_on_its_thread():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # OpenBLAS reads it too: as a user runs
    done = subprocess.run([sys.executable, "-c", WIDE_NETWORK], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "OpenBLAS" not in done.stderr, done.stderr[:300]


def test_affine_inputs_are_the_raster_of_the_values_sent_mapped_as_numpy_maps_them():
    rng = np.random.default_rng(8)
    order, _ = coding_order((4, 4))
    values = rng.integers(-40, 40, (3, 9, 4))  # 9 of 16 positions sent, in coding order
    raster = np.zeros((3, 16, 4), dtype=np.int64)
    raster[:, order[:9]] = values
    u = rng.uniform(-0.5, 0.5, (1, 4, 16)) / 15
    ddcl = exact.affine_inputs(values, np.argsort(order), np.full(4, 1 / 15), np.ones(4), np.ones(4), u)
    assert np.array_equal(ddcl, raster.transpose(0, 2, 1) * (1 / 15) - u)  # bit for bit
    scale = np.array([7.0, 4.0, 4.0, 2.0])
    fsq = exact.affine_inputs(values, np.argsort(order), np.ones(4), scale, np.full(4, 2.0), np.ones((1, 4, 16)))
    assert np.array_equal(fsq, raster.transpose(0, 2, 1) / scale[:, None] * 2 - 1)


def test_the_integer_network_is_built_once_and_again_after_a_weight_changes():
    prior = randomised(ContextCategoricalPrior([8, 5, 5], (4, 4)))
    net = prior.exact()
    assert prior.exact() is net
    loss = prior.logits(torch.rand(2, 3, 16) * 4).sum()
    loss.backward()
    torch.optim.SGD(prior.parameters(), lr=0.1).step()  # in place: the tensors are the same objects
    assert prior.exact() is not net
    rebuilt = prior.exact()
    prior.load_state_dict({k: v.clone() for k, v in prior.state_dict().items()})
    assert prior.exact() is not rebuilt


def test_a_missing_numba_is_one_line_saying_how_to_install_it(monkeypatch):
    import importlib.util

    from discrete_ae.errors import ConfigError

    monkeypatch.setitem(sys.modules, "numba", None)  # what `import numba` meets where it is not installed
    spec = importlib.util.spec_from_file_location("exact_without_numba", exact.__file__)
    with pytest.raises(ConfigError, match=r"^coding with a context prior needs numba: pip install -r requirements.txt$"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
