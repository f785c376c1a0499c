"""The context prior for every bottleneck that sends integers: causal (a code sees only the codes
sent before it), the same bits in any batch, and trained, evaluated and round-tripped through
compress/decompress and codec.py's files for fsq, ddcl, vq, simvq, lfq, fsp and rfsq."""
import numpy as np
import pytest
import torch

from conftest import randomised
from discrete_ae import coding, priors
from discrete_ae.codec_file import SEED, decode_photo, decoder_threads, encode_photo, from_blocks, to_blocks
from discrete_ae.data import load_dataset
from evaluate import evaluate
from utils import load_checkpoint

DISCRETE = ("fsq", "ddcl", "vq", "simvq", "lfq", "fsp", "rfsq")



def test_a_code_sees_the_earlier_positions_and_the_earlier_stages_at_its_own_position_only():
    prior = randomised(priors.ContextCodePrior(2, 27, (4, 4)))  # residual FSQ: 2 stages of 27 codes
    codes = torch.randint(0, 27, (3, 2, 16))
    base = prior.logits(codes, torch.float64)
    for p in (0, 5, 15):
        later = codes.clone()
        later[:, :, p + 1:] = torch.randint(0, 27, later[:, :, p + 1:].shape)
        later[:, 1, p] = (codes[:, 1, p] + 1) % 27  # the position's own last stage
        moved = prior.logits(later, torch.float64)
        assert torch.equal(moved[:, :, p], base[:, :, p])  # neither stage sees its own or later codes
    first_stage = codes.clone()
    first_stage[:, 0, 6] = (codes[:, 0, 6] + 1) % 27
    moved = prior.logits(first_stage, torch.float64)
    assert torch.equal(moved[:, 0, 6], base[:, 0, 6]) and not torch.equal(moved[:, 1, 6], base[:, 1, 6])
    assert not torch.equal(moved[:, :, 7], base[:, :, 7])  # position 6 is position 7's left neighbour


def test_code_context_tables_are_the_same_bits_in_any_batch_and_decode_back():
    prior = randomised(priors.ContextCodePrior(2, 64, (4, 4)))
    values = np.random.default_rng(0).integers(0, 64, (21, 32, 1))  # (B, positions x stages, 1)
    batch = coding.materialise(prior.tables(16), values)
    for i in (0, 7, 20):
        alone = coding.materialise(prior.tables(16), values[i:i + 1])
        assert all(np.array_equal(a.probs[i], b.probs[0]) for a, b in zip(batch, alone))
    bits, exact = coding.stream_bits(values, prior.tables(16))
    assert exact and bits > 0


def test_the_code_context_prior_learns_what_the_earlier_codes_say():
    """Codes that repeat the upper-left neighbour's cost far fewer bits once the prior is trained."""
    torch.manual_seed(0)
    prior = priors.ContextCodePrior(1, 32, (4, 4))
    first = torch.randint(0, 32, (256, 1, 1))
    codes = first.expand(256, 1, 16).clone()  # every position repeats the first code
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        prior.bits(codes)[1].mean().backward()
        opt.step()
    bits = prior.bits(codes)[1].detach()
    assert bits[:, :, 0].mean() > 4.0  # the first code has no context: about log2(32) = 5 bits
    assert bits[:, :, 1:].mean() < 0.5


def small_settings(quantizer):
    return {"codebook_size": 64, "fsq_levels": [5, 4, 4]} if quantizer != "ddcl" else {}


@pytest.mark.parametrize("quantizer", DISCRETE)
def test_the_context_prior_trains_evaluates_and_round_trips_for_every_bottleneck(run_train, tmp_path, quantizer):
    config, metrics = run_train(quantizer=quantizer, entropy_model="context", **small_settings(quantizer))
    assert metrics["rate_source"] == "bitstream" and metrics["roundtrip_exact"]
    model, _ = load_checkpoint(str(tmp_path / "checkpoints" / f"{quantizer}_vae_best.pt"))
    assert model.quantizer.entropy_model == "context" and model.quantizer.prior.sequential
    _, val_u8 = load_dataset(config["dataset"], config["data_dir"])
    again = evaluate(model, val_u8)
    assert again["bits"] == pytest.approx(metrics["bits"], rel=1e-6)
    x = val_u8[:6].float() / 255
    assert torch.equal(model.decompress(model.compress(x, seed=5), seed=5), model.decode(model.encode(x, seed=5), seed=5))
    rgb = (torch.rand(45, 70, 3) * 255).to(torch.uint8).numpy()  # codec.py: a photo of whole and partial blocks
    blocks, grid = to_blocks(rgb, "cpu")
    with decoder_threads():
        expected = from_blocks(model.decode(model.encode(blocks, seed=SEED), seed=SEED), grid, 45, 70)
    assert np.array_equal(decode_photo(model, encode_photo(model, rgb)), expected)
