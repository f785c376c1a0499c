"""evaluate.py: one table, CompressAI-style JSON and a plot; clear errors for bad files."""
import json

import pytest
import torch

from conftest import run_script
from evaluate import evaluate
from evaluate import main as evaluate_main
from utils import load_checkpoint, load_dataset


@pytest.mark.parametrize("quantizer", ["fsq", "ddcl", "vq", "none", "vae"])
def test_each_bottleneck_trains_and_round_trips_through_its_checkpoint(run_train, tmp_path, quantizer):
    config, metrics = run_train(quantizer=quantizer, vq_codebook_size=64)
    model, saved = load_checkpoint(str(tmp_path / "checkpoints" / f"{quantizer}_vae_best.pt"))
    assert saved == config
    train_u8, val_u8 = load_dataset(config["dataset"], config["data_dir"])
    again = evaluate(model, val_u8, train_u8, batch_size=config["eval_batch_size"])
    assert again["mse"] == pytest.approx(metrics["mse"], rel=1e-5)
    assert again["bits"] == pytest.approx(metrics["bits"], rel=1e-6)
    indices = model.encode(val_u8[:4].float() / 255)
    if model.quantizer.codebook_size:
        assert 0 <= indices.min() and indices.max() < model.quantizer.codebook_size
        assert metrics["rate_source"] == "bitstream" and metrics["roundtrip_exact"]
        assert 0 < metrics["codebook_usage"] <= 100 and metrics["perplexity"] >= 1
    expected_source = {"fsq": "bitstream", "ddcl": "bitstream", "vq": "bitstream", "none": "float32", "vae": "KL"}
    assert metrics["rate_source"] == expected_source[quantizer]
    assert metrics["bpp"] == pytest.approx(metrics["bits"] / 1024)


def test_ddcl_reports_its_surrogate_beside_the_measured_rates(run_train):
    _, metrics = run_train(quantizer="ddcl")
    for key in ("bits_fixed", "bits_entropy", "bits_coded", "bits_estimate"):
        assert metrics[key] > 0, key
    assert metrics["bits_coded"] >= metrics["bits_entropy"]


def test_cli_compares_two_quantizers(run_train, tmp_path):
    run_train(quantizer="fsq")
    run_train(quantizer="ddcl")
    ck, out = tmp_path / "checkpoints", tmp_path / "rd"
    result = run_script("evaluate.py", str(ck / "fsq_vae_best.pt"), str(ck / "ddcl_vae_best.pt"), f"--output_dir={out}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "quantizer", "settings", "bits_fixed"]
    assert lines[1].startswith("fsq ") and lines[2].startswith("ddcl ")
    results = json.load(open(out / "rate_distortion.json"))
    assert {"name", "description", "results"} <= set(results)
    assert len(results["results"]["psnr-rgb"]) == len(results["results"]["bpp"]) == len(results["results"]["ssim-rgb"]) == 2
    assert results["results"]["quantizer"] == ["fsq", "ddcl"]
    assert (out / "rate_distortion.png").stat().st_size > 1000


def test_cli_refuses_non_checkpoints_and_foreign_configs(run_train, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    result = run_script("evaluate.py", str(tmp_path / "notes.txt"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'notes.txt'} is corrupt or not a PyTorch checkpoint"]
    run_train(quantizer="fsq")
    state = torch.load(tmp_path / "checkpoints" / "fsq_vae_best.pt", weights_only=True)
    state["model_args"]["quantizer"] = "rvq"
    torch.save(state, tmp_path / "foreign.pt")
    capsys.readouterr()  # drop the training run's progress output
    for argv, message in (([str(tmp_path / "foreign.pt")], "quantizer='rvq' is unknown"),
                          ([], "usage: python evaluate.py CHECKPOINT")):
        with pytest.raises(SystemExit) as exit_:
            evaluate_main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_psnr_gain_at_equal_bits_interpolates_in_log_rate():
    from evaluate import equal_bits_lines, psnr_gain_at_equal_bits

    a = [{"bits": 100.0, "psnr": 22.0, "curve": "a"}, {"bits": 400.0, "psnr": 26.0, "curve": "a"}]
    b = [{"bits": 200.0, "psnr": 23.0, "curve": "b"}, {"bits": 800.0, "psnr": 25.0, "curve": "b"}]
    gain, lo, hi, inside_a, inside_b = psnr_gain_at_equal_bits(a, b)
    # over log-bits [200, 400]: a goes 24 -> 26, b goes 23 -> 24; the mean difference is 1.5 dB
    assert (lo, hi) == pytest.approx((200.0, 400.0)) and gain == pytest.approx(1.5, abs=1e-3)
    assert (inside_a, inside_b) == (1, 1)  # a's 400 and b's 200 lie in [200, 400]
    assert psnr_gain_at_equal_bits(a, [{"bits": 900.0, "psnr": 1.0}, {"bits": 999.0, "psnr": 2.0}]) is None
    # the line says how many measured points of each curve lie in the compared range
    assert equal_bits_lines(a + b) == ["a vs b at equal bits (200-400 bits/img, 1 + 1 measured points): +1.50 dB PSNR"]
    denser = a + [{"bits": 300.0, "psnr": 25.5, "curve": "a"}]
    assert equal_bits_lines(denser + b)[0].startswith("a vs b at equal bits (200-400 bits/img, 2 + 1 measured points)")


def test_learned_and_fitted_runs_of_one_bottleneck_are_separate_curves():
    from evaluate import per_bottleneck_results

    def row(run, curve, bits, entropy_model):
        return {"run": run, "curve": curve, "quantizer": "ddcl", "entropy_model": entropy_model, "bits": bits,
                "psnr": 20.0 + bits / 100, "ssim": 0.5, "bpp": bits / 1024, "rate_source": "bitstream", "mse": 0.01,
                "settings": "s", "checkpoint": run + ".pt"}

    files = per_bottleneck_results([row("b", "ddcl_learned", 120.0, "learned"), row("a", "ddcl", 100.0, "fitted"),
                                    row("c", "ddcl_learned", 60.0, "learned")])
    assert sorted(files) == ["ddcl", "ddcl_learned"]
    assert files["ddcl_learned"]["results"]["checkpoint"] == ["c.pt", "b.pt"]  # ordered by rate
    assert files["ddcl_learned"]["results"]["entropy_model"] == ["learned", "learned"]
