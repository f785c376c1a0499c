"""evaluate.py: one table, BD lines, CompressAI-style JSON and a plot; clear errors for bad files;
Bjontegaard deltas on curves whose answer is known."""
import json

import pytest
import torch

from conftest import run_script
from discrete_ae.bjontegaard import bd_psnr, bd_rate, interval, monotone, verdict
from discrete_ae.data import load_dataset
from discrete_ae.errors import cli
from evaluate import evaluate
from evaluate import main as evaluate_main
from quantizers import QUANTIZERS
from utils import load_checkpoint


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_each_bottleneck_trains_and_round_trips_through_its_checkpoint(run_train, tmp_path, quantizer):
    config, metrics = run_train(quantizer=quantizer, codebook_size=64, fsq_levels=[5, 4, 4])
    model, saved = load_checkpoint(str(tmp_path / "checkpoints" / f"{quantizer}_vae_best.pt"))
    assert saved == config
    train_u8, val_u8 = load_dataset(config["dataset"], config["data_dir"])
    again = evaluate(model, val_u8, train_u8)
    assert again["mse"] == pytest.approx(metrics["mse"], rel=1e-5)
    assert again["bits"] == pytest.approx(metrics["bits"], rel=1e-6)
    indices = model.encode(val_u8[:4].float() / 255)
    if model.quantizer.codebook_size:
        assert 0 <= indices.min() and indices.max() < model.quantizer.codebook_size
        assert metrics["rate_source"] == "bitstream" and metrics["roundtrip_exact"]
        assert 0 < metrics["codebook_usage"] <= 100 and metrics["perplexity"] >= 1
    assert metrics["rate_source"] == {"none": "float32", "vae": "KL"}.get(quantizer, "bitstream")
    if model.quantizer.has_indices:
        x = val_u8[:5].float() / 255
        assert torch.equal(model.decompress(model.compress(x, seed=4), seed=4), model.decode(model.encode(x, seed=4), seed=4))
    assert metrics["bpp"] == pytest.approx(metrics["bits"] / 1024)


def test_ddcl_reports_its_surrogate_beside_the_measured_rates(run_train):
    _, metrics = run_train(quantizer="ddcl")
    for key in ("bits_fixed", "bits_entropy", "bits_coded", "bits_estimate"):
        assert metrics[key] > 0, key
    assert metrics["bits_coded"] >= metrics["bits_entropy"]


def test_cli_compares_two_quantizers(run_train, tmp_path, image_folder):
    run_train(quantizer="fsq")
    run_train(quantizer="ddcl")
    ck, out = tmp_path / "checkpoints", tmp_path / "rd"
    result = run_script("evaluate.py", str(ck / "fsq_vae_best.pt"), str(ck / "ddcl_vae_best.pt"), f"--output_dir={out}",
                        f"--data_dir={image_folder}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "settings", "fixed", "ideal"]
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
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'notes.txt'} is not a PyTorch checkpoint (torch.save writes a zip archive)"]
    run_train(quantizer="fsq")
    state = torch.load(tmp_path / "checkpoints" / "fsq_vae_best.pt", weights_only=True)
    state["model_args"]["quantizer"] = "rvq"
    torch.save(state, tmp_path / "foreign.pt")
    capsys.readouterr()  # drop the training run's progress output
    for argv, message in (([str(tmp_path / "foreign.pt")], "quantizer='rvq' is unknown"),
                          ([], "usage: python evaluate.py CHECKPOINT")):
        with pytest.raises(SystemExit) as exit_:
            cli(evaluate_main, "", argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bd_rate_and_bd_psnr_of_curves_whose_answer_is_known():
    rates, psnrs = [100.0, 150.0, 200.0, 300.0], [22.0, 23.5, 24.4, 25.6]
    assert bd_rate([0.9 * r for r in rates], psnrs, rates, psnrs) == pytest.approx(-10.0)  # the notes' check
    assert bd_rate([1.25 * r for r in rates], psnrs, rates, psnrs) == pytest.approx(25.0)
    assert bd_psnr(rates, [p + 0.5 for p in psnrs], rates, psnrs) == pytest.approx(0.5)
    assert bd_psnr(rates, psnrs, rates, psnrs) == pytest.approx(0.0) and bd_rate(rates, psnrs, rates, psnrs) == pytest.approx(0.0)
    # a curve shifted by a constant in log rate is a constant PSNR shift for a line in log rate
    line = [20 + 3 * __import__("math").log(r / 100) for r in rates]
    assert bd_psnr(rates, line, [2 * r for r in rates], line) == pytest.approx(3 * __import__("math").log(2), rel=1e-6)


def test_curves_that_do_not_overlap_get_no_number():
    a = ([100.0, 120.0, 140.0], [20.0, 21.0, 22.0])
    b = ([200.0, 250.0, 300.0], [25.0, 26.0, 27.0])
    assert bd_psnr(*a, *b) is None and bd_rate(*a, *b) is None
    c = ([200.0, 250.0, 300.0], [19.0, 20.0, 20.5])  # rates apart, PSNR overlapping: BD-rate only
    assert bd_psnr(*a, *c) is None and bd_rate(*a, *c) is not None


def test_a_noisy_curve_is_made_monotone_before_the_fit():
    r, p = monotone([100.0, 150.0, 200.0], [23.0, 22.8, 24.0])
    assert list(p) == pytest.approx([22.9, 22.9, 24.0])  # pooled, never falling with the rate
    assert bd_rate([100.0, 150.0, 200.0], [23.0, 22.8, 24.0], [100.0, 150.0, 200.0], [22.0, 23.0, 24.0]) is not None


def test_intervals_over_seeds_and_their_reading():
    mean, lo, hi = interval([1.0, 2.0, 3.0])
    half = 4.303 / 3 ** 0.5  # t(0.975, 2 degrees of freedom) x sd 1 / sqrt(3)
    assert mean == 2.0 and (lo, hi) == pytest.approx((2.0 - half, 2.0 + half))
    assert interval([5.0]) == (5.0, None, None)
    assert verdict(-3.0, 1.0, True) == "level" and verdict(-3.0, -1.0, True) == "better" and verdict(1.0, 3.0, True) == "worse"


def test_cli_says_why_two_curves_have_no_equal_bits_line(capsys):
    from evaluate import comparison_lines

    def row(curve, bits, psnr):
        return {"curve": curve, "bits": bits, "psnr": psnr, "rate_source": "bitstream"}

    rows = [row("a", 100, 20), row("a", 120, 21), row("b", 300, 25), row("b", 330, 26), row("c", 110, 20.5)]
    lines = comparison_lines(rows)
    assert lines[0] == "a vs b: the rates do not overlap (a 100-120 bits, b 300-330 bits): no equal-bits comparison"
    assert lines[1].startswith("a vs c: no BD numbers, a curve needs 2 points or more")
    both = comparison_lines([row("a", 100, 20), row("a", 200, 24), row("b", 110, 20.5), row("b", 220, 24.2)])
    assert both[0].startswith("a vs b: BD-rate ") and "% bits at equal PSNR, BD-PSNR " in both[0]


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


def test_the_printed_table_fits_a_terminal_and_says_what_its_columns_are():
    from evaluate import TABLE_KEY, format_table

    row = {"run": "fsq_7-5-5-5-5_s1339", "quantizer": "fsq", "settings": "levels=[7, 5, 5, 5, 5] | learned prior rw=0.01",
           "bits_fixed": 193.6, "bits_entropy": 150.2, "bits_coded": 150.4, "bits_per_image_coded": 176.9,
           "bits_estimate": 150.2, "bpp": 0.1469, "psnr": 24.81, "ssim": 0.6012, "codebook_usage": 71.3, "perplexity": 812.4}
    lines = format_table([row, {**row, "codebook_usage": None}]).splitlines()
    assert max(len(line) for line in lines[:-1]) <= 130 and lines[-1] == TABLE_KEY
    assert lines[0].split()[:4] == ["run", "settings", "fixed", "ideal"] and "24.81" in lines[1] and " - " in lines[2] + " "
