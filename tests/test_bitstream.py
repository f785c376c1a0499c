"""Per-image byte strings: model.compress / model.decompress for every bottleneck with indices,
under the fitted, the learned and (FSQ, DDCL) the context prior; exact round trips, strings that
decode alone and in any order, and one clear error for bad strings and bad images."""
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, resolve
from discrete_ae.coding import HEADER_BYTES
from discrete_ae.errors import BitstreamError, CheckpointError, ConfigError
from evaluate import evaluate, fit_rate_prior
from evaluate import main as evaluate_main
from models import build_model
from utils import load_checkpoint, read_checkpoint, save_checkpoint

ARGS = dict(latent_dim=4, channels=[8, 8, 16], res_blocks=0, fsq_levels=[8, 6, 6, 5], num_quantizers=2, codebook_size=64,
            ddcl_delta=1 / 15, ddcl_comm_weight=1e-3, vae_kl_weight=1e-3, rate_weight=0.01)
CODEBOOKS = ("fsq", "vq", "lfq", "fsp", "simvq", "rfsq")
LATENT_DIM = {"lfq": 6, "rfsq": 4, "fsp": 4, "fsq": 4}  # set by the levels or log2(codebook_size)


def images(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=gen), size=32, mode="bilinear")


def model_with_prior(quantizer, entropy_model):
    torch.manual_seed(0)
    model = build_model({**ARGS, "quantizer": quantizer, "entropy_model": entropy_model,
                         "latent_dim": LATENT_DIM.get(quantizer, 4)}).eval()
    if entropy_model == "fitted":
        fit_rate_prior(model, (images(64, seed=1) * 255).to(torch.uint8), batch_size=32)
    return model


@pytest.mark.parametrize("quantizer, entropy_model", [(q, e) for q in CODEBOOKS + ("ddcl",) for e in ("fitted", "learned")]
                         + [("fsq", "context"), ("ddcl", "context")])
def test_decompress_of_compress_equals_decode_of_encode(quantizer, entropy_model):
    model = model_with_prior(quantizer, entropy_model)
    x = images(40)
    strings = model.compress(x, seed=3)
    assert len(strings) == 40 and all(isinstance(s, bytes) and len(s) > HEADER_BYTES for s in strings)
    expected = model.decode(model.encode(x, seed=3), seed=3)
    assert torch.equal(model.decompress(strings, seed=3), expected)
    assert torch.equal(model.train().decompress(strings, seed=3), expected)  # decoding does not depend on the mode


@pytest.mark.parametrize("quantizer, entropy_model", [("ddcl", "fitted"), ("ddcl", "learned"), ("ddcl", "context"),
                                                     ("fsq", "context"), ("rfsq", "fitted")])
def test_strings_decode_alone_and_in_any_order(quantizer, entropy_model):
    """A string carries everything its image needs besides the model and the seed: DDCL's dither
    does not depend on the image's place in the batch, and a context prior's tables do not depend
    on the other images decoded with it."""
    model = model_with_prior(quantizer, entropy_model)
    x = images(12)
    strings = model.compress(x, seed=2)
    indices = model.encode(x, seed=2)
    expected = model.decode(indices, seed=2)
    assert torch.equal(model.decompress(strings, seed=2), expected)
    assert torch.equal(model.decompress(strings[::-1], seed=2), expected.flip(0))
    # the same integers; the decoder's float sums may depend on the batch size, so compare like with like
    assert torch.equal(model.decompress(strings[7:9], seed=2), model.decode(indices[7:9], seed=2))
    assert torch.equal(model.decompress([strings[11]], seed=2), model.decode(indices[11:], seed=2))


def test_decoded_indices_keep_the_layout_encode_gives():
    model = model_with_prior("ddcl", "context")
    q = model.quantizer
    indices = model.encode(images(3), seed=2)
    back = q.indices_from_values(q.coding_values(indices).contiguous(), (4, 4))  # as decoded: positions first
    assert torch.equal(back, indices) and back.is_contiguous()  # the decoder's float sums depend on the layout


def test_evaluate_reports_per_image_strings_beside_the_one_stream_rate():
    model = model_with_prior("ddcl", "learned")
    x_u8 = (images(50) * 255).to(torch.uint8)
    metrics = evaluate(model, x_u8, batch_size=25)
    assert metrics["roundtrip_exact"] and metrics["rate_source"] == "bitstream"
    lengths = [8 * len(s) for s in model.compress(x_u8.float() / 255, seed=list(range(50)))]  # image n: seed n
    assert metrics["bits_per_image_coded"] == pytest.approx(sum(lengths) / len(lengths))
    # per image: the 24-bit header and the coder's last partial byte on top of the ideal length
    assert metrics["bits_entropy"] < metrics["bits_per_image_coded"] < metrics["bits_entropy"] + 8 * HEADER_BYTES + 40
    assert metrics["bits_estimate"] == pytest.approx(metrics["bits_entropy"], rel=1e-3)


@pytest.fixture(scope="module")
def fsq_strings():
    model = model_with_prior("fsq", "learned")
    return model, model.compress(images(4), seed=0)


def flip(s, i):
    b = bytearray(s)
    b[i] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("mangle, message", [
    (lambda s: s[:2], "fewer than the 3-byte header: truncated"),
    (lambda s: b"", "fewer than the 3-byte header"),
    (lambda s: s[:-1], "fails its checksum"),
    (lambda s: flip(s, HEADER_BYTES), "fails its checksum"),
    (lambda s: flip(s, 1), "fails its checksum"),
    (lambda s: b"PK\x03\x04" + s, "does not start with this repo's magic"),
    (lambda s: bytes([s[0] + 1]) + s[1:], "format version 5; this code reads version 4"),
])
def test_bad_strings_raise_one_clear_error(fsq_strings, mangle, message):
    model, strings = fsq_strings
    bad = [strings[0], mangle(strings[1]), strings[2], strings[3]]
    with pytest.raises(BitstreamError, match=message) as err:
        model.decompress(bad)
    assert "string 1" in str(err.value)


def test_foreign_strings_and_a_wrong_seed_are_refused(fsq_strings):
    model, strings = fsq_strings
    other = model_with_prior("fsq", "learned")
    with torch.no_grad():
        other.decoder.net[0].bias.add_(0.1)  # another model: same prior, other weights
    with pytest.raises(BitstreamError, match="another model"):
        other.decompress(strings)
    ddcl = model_with_prior("ddcl", "learned")
    ddcl_strings = ddcl.compress(images(4), seed=1)
    with pytest.raises(BitstreamError, match="another seed"):
        ddcl.decompress(ddcl_strings, seed=2)
    with pytest.raises(BitstreamError, match="list of byte strings"):
        model.decompress(strings[0])


def test_single_bit_flips_are_caught_or_harmless(fsq_strings):
    """Every single-bit flip of these strings raises or (a bit the decoder does not need) gives the
    exact image. The general guarantee is weaker: a 16-bit check passes about 1 damaged string in
    65,536 (discrete_ae/coding.py, docs/reliability.md)."""
    model, strings = fsq_strings
    want = model.decompress(strings)[0]
    raised = 0
    for byte in range(len(strings[0])):
        for bit in range(8):
            b = bytearray(strings[0])
            b[byte] ^= 1 << bit
            try:
                got = model.decompress([bytes(b)] + strings[1:])[0]
            except BitstreamError:
                raised += 1
                continue
            assert torch.equal(got, want)
    assert raised >= 8 * len(strings[0]) - 8


def test_empty_batches_and_bad_image_shapes(fsq_strings):
    model, _ = fsq_strings
    assert model.compress(images(0)) == [] and model.decompress([]).shape == (0, 3, 32, 32)
    one = model.compress(images(1))
    assert torch.equal(model.decompress([bytearray(one[0])]), model.decode(model.encode(images(1))))
    with pytest.raises(ConfigError, match=r"compress takes float images \(B, 3, 32, 32\)"):
        model.compress(images(1)[0])
    with pytest.raises(ConfigError, match="compress takes float images"):
        model.compress((images(1) * 255).to(torch.uint8))


@pytest.mark.parametrize("quantizer", ["fsq", "vq", "ddcl"])
def test_compress_refuses_nan_inf_and_out_of_range_and_converts_other_floats(quantizer):
    model = model_with_prior(quantizer, "learned")
    x = images(3)
    for bad, shown in ((x.clone().index_fill_(0, torch.tensor([1]), float("nan")), "NaN or inf"),
                       (x.clone().index_fill_(0, torch.tensor([0]), float("inf")), "NaN or inf"),
                       (x * 2 - 0.5, "got values in [-0.49")):
        with pytest.raises(ConfigError, match="compress takes images in \\[0, 1\\]") as err:
            model.compress(bad)
        assert shown in str(err.value) and "\n" not in str(err.value)
    expected = model.compress(x)
    assert model.compress(x.double()) == expected
    half = x.half()
    assert model.compress(half) == model.compress(half.float())


def test_without_indices_there_is_nothing_to_compress():
    model = build_model({**ARGS, "quantizer": "none", "entropy_model": "fitted"})
    with pytest.raises(ConfigError, match="nothing to compress"):
        model.compress(images(1))


def test_a_checkpoint_without_a_stored_prior_says_how_to_get_one(run_train, tmp_path, image_folder):
    run_train(quantizer="fsq")
    path = str(tmp_path / "checkpoints" / "fsq_vae_best.pt")
    model, _ = load_checkpoint(path)
    x = images(3)
    strings = model.compress(x)  # training stored the prior that evaluation fitted
    assert torch.equal(model.decompress(strings), model.decode(model.encode(x)))
    model.quantizer.fitted_prior = None  # a model that was never evaluated
    save_checkpoint(path, {**read_checkpoint(path), "model": model.state_dict()})
    bare, _ = load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"evaluate.py CHECKPOINT --save_prior=True"):
        bare.compress(x)
    evaluate_main([path, "--save_prior=True", f"--output_dir={tmp_path / 'eval'}", f"--data_dir={image_folder}"])
    restored, _ = load_checkpoint(path)
    assert restored.compress(x) == strings


def test_check_rates_script_reports_the_charged_bits_and_the_round_trip(run_train, tmp_path, capsys, image_folder):
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import check_rates

    run_train(quantizer="ddcl", entropy_model="learned", run_name="learned")
    capsys.readouterr()
    check_rates.main([str(tmp_path / "checkpoints" / "learned_vae_best.pt"), "--images=20", f"--data_dir={image_folder}"])
    out = capsys.readouterr().out
    assert "training charges" in out and "on 20 images: True" in out
    assert "stream and strings decode back: True" in out
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        check_rates.main([str(tmp_path / "missing.pt")])


def test_check_rates_measures_fsqs_fitted_histogram_joint_and_per_channel(run_train, tmp_path):
    """The joint number is the fitted prior evaluation uses; per channel, each channel's levels alone."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import check_rates

    from discrete_ae.data import load_dataset

    config, metrics = run_train(quantizer="fsq", fsq_levels=[5, 4, 4])
    model, _ = load_checkpoint(str(tmp_path / "checkpoints" / "fsq_vae_best.pt"))
    train_u8, val_u8 = load_dataset(config["dataset"], config["data_dir"])
    joint, per_channel = check_rates.fsq_histogram_bits(model, train_u8, val_u8)
    assert joint == pytest.approx(evaluate(model, val_u8, train_u8)["bits_entropy"], rel=1e-9)
    assert 0 < per_channel < 2 * 16 * sum(np.log2([5, 4, 4]))  # finite, near or under a fixed-length code


def test_a_post_hoc_fit_never_replaces_another_runs_checkpoint(run_train, tmp_path, image_folder):
    """#37: a DDCL run named p and a separately trained FSQ run named p_posthoc share a folder."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import fit_context_prior

    from discrete_ae.errors import UserError

    run_train(quantizer="ddcl", run_name="p")
    run_train(quantizer="fsq", run_name="p_posthoc")
    other = tmp_path / "checkpoints" / "p_posthoc_vae_best.pt"
    before = other.read_bytes()
    with pytest.raises(UserError, match="is not a context prior fitted to"):
        fit_context_prior.main([str(tmp_path / "checkpoints" / "p_vae_best.pt"), "--epochs=1", "--batch_size=16",
                                f"--data_dir={image_folder}"])
    assert other.read_bytes() == before


def test_a_context_prior_fitted_after_training_codes_the_same_images(run_train, tmp_path, capsys, image_folder):
    """scripts/fit_context_prior.py: the frozen autoencoder gets a context prior; its images and
    integers stay those of the source, its curve is drawn apart, and a non-DDCL checkpoint is one error."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    import fit_context_prior

    run_train(quantizer="ddcl", run_name="surrogate")
    run_train(quantizer="fsq", run_name="fsq")
    source = str(tmp_path / "checkpoints" / "surrogate_vae_best.pt")
    fit_context_prior.main([source, "--epochs=1", "--batch_size=16", f"--data_dir={image_folder}"])
    fitted = str(tmp_path / "checkpoints" / "surrogate_posthoc_vae_best.pt")
    fit_context_prior.main([source, "--epochs=1", "--batch_size=16", f"--output_dir={tmp_path / 'again' / 'new'}",
                            f"--data_dir={image_folder}"])
    again = load_checkpoint(str(tmp_path / "again" / "new" / "surrogate_posthoc_vae_best.pt"))[0].state_dict()
    first = load_checkpoint(fitted)[0].state_dict()  # the same fit on every run, into a folder it creates
    assert all(torch.equal(first[k], again[k]) for k in first if isinstance(first[k], torch.Tensor))
    old, _ = load_checkpoint(source)
    new, config = load_checkpoint(fitted)
    assert new.quantizer.entropy_model == "context" and config["context_prior_fitted_to"] == os.path.abspath(source)
    x = images(6)
    assert torch.equal(new.encode(x, seed=1), old.encode(x, seed=1))
    assert torch.equal(new.decompress(new.compress(x, seed=1), seed=1), old.decode(old.encode(x, seed=1), seed=1))
    evaluate_main([source, fitted, f"--output_dir={tmp_path / 'eval'}", f"--data_dir={image_folder}"])
    assert os.path.isfile(tmp_path / "eval" / "rate_distortion_ddcl_context_posthoc.json")
    with pytest.raises(CheckpointError, match="fitted after training .* does not train on; resume .*surrogate_vae_best.pt"):
        resolve([f"--resume={fitted}"])
    with pytest.raises(ConfigError, match="fitted to DDCL checkpoints without one"):
        fit_context_prior.main([str(tmp_path / "checkpoints" / "fsq_vae_best.pt")])
