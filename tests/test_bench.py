"""bench.py runs end to end on tiny settings (its numbers are for people, not for asserts on speed)."""
import math

import pytest
import torch

import bench
from conftest import tiny_args


def test_bench_prints_a_row_per_quantizer(capsys):
    bench.main(["--quantizers=['fsq', 'ddcl']", "--steps=2", "--warmup=1", "--train_images=64", "--val_images=32",
                "--eval_images=16", "--rate_prior_images=32", "--batch_size=8", "--eval_batch_size=16",
                "--channels=[8, 8, 16]", "--device=cpu"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device cpu | torch ") and "threads" in out[0]
    assert out[1].split()[:2] == ["quantizer", "a"]
    for line, name in zip(out[2:], ("fsq", "ddcl")):
        cells = line.split()
        assert cells[0] == name and all(float(c.replace(",", "")) > 0 for c in cells[1:])


def test_time_to_quality_trains_each_recipe_within_its_budget(capsys, image_folder):
    bench.main(["--quality=True", f"--data_dir={image_folder}", "--budgets=[1]", "--quantizers=['fsq']",
                "--baseline=True", "--device=cpu"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["recipe", "quantizer", "budget"]
    rows = [line.split() for line in out[1:] if line.split() and line.split()[0] in ("defaults", "seed")]
    assert [r[:2] for r in rows] == [["defaults", "fsq"], ["seed", "fsq"]]
    for r in rows:
        epochs, took, psnr, bits = int(r[3]), float(r[4]), float(r[5]), float(r[6])
        assert epochs >= 1 and took > 0 and 5 < psnr < 60 and bits > 0 and r[7] == "bitstream"
    equal = out.index(next(line for line in out if line.startswith("at equal seconds")))
    assert out[equal + 1].split()[:2] == ["fsq", "in"] and f"{float(rows[1][4]):.1f} s" in out[equal + 1]


def test_at_seconds_reads_between_runs_and_never_beyond():
    runs = [(90.0, 24.0, 180.0), (30.0, 22.0, 150.0), (60.0, 23.5, 170.0)]  # (seconds, psnr, bits), any order
    w = math.log(45.0 / 30.0) / math.log(60.0 / 30.0)  # linear in log-seconds: 0.585 of the way, not 0.5
    assert bench.at_seconds(runs, 45.0) == pytest.approx((22.0 + 1.5 * w, 150.0 + 20.0 * w))
    assert bench.at_seconds(runs, 75.0)[0] > 23.5 + 0.5 * 0.5  # above the straight line in seconds
    assert bench.at_seconds(runs, 60.0) == pytest.approx((23.5, 170.0))
    assert bench.at_seconds(runs, 90.0) == pytest.approx((24.0, 180.0))
    assert bench.at_seconds(runs, 29.9) is None and bench.at_seconds(runs, 90.1) is None
    assert bench.at_seconds([(30.0, 22.0, 150.0)], 30.0) == (22.0, 150.0)
    assert bench.at_seconds([], 30.0) is None


def test_recipe_knobs_are_bench_options_checked_like_train_py():
    from utils import parse_overrides

    opts, _ = parse_overrides(["--lr=6e-3", "--batch_size=64", "--hflip=False", "--beta2=0.95"], bench.BENCH_DEFAULTS)
    assert (opts["lr"], opts["batch_size"], opts["hflip"], opts["beta2"]) == (6e-3, 64, False, 0.95)
    assert bench.SEED_RECIPE["lr"] == 3e-4 and bench.SEED_RECIPE["beta2"] == 0.999  # the seed keeps its own optimizer
    for bad in ("--lr=fast", "--learning_rate=1e-3"):
        with pytest.raises(SystemExit) as exit_:
            bench.main(["--quality=True", bad])
        assert exit_.value.code == 2


def test_time_to_quality_needs_a_folder():
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--quality=True"])
    assert exit_.value.code == 2


def test_fitting_epochs_grows_with_the_budget_and_is_at_least_one(tmp_path, image_folder):
    from train import resolve_config
    from utils import load_dataset

    train_u8, val_u8 = load_dataset("folder", image_folder)
    config = resolve_config(tiny_args(tmp_path, image_folder, quantizer="fsq", batch_size=8, device="cpu"))
    dev = torch.device("cpu")
    tiny, large = (bench.fitting_epochs(config, budget, train_u8, val_u8, dev) for budget in (1e-6, 1e4))
    # a budget below one epoch still trains one; 10,000 s of a few tiny images are many epochs
    assert tiny == 1 and large > 100


def test_equal_time_gives_a_lower_bound_outside_the_defaults_runs(capsys):
    runs = {("defaults", "fsq"): [(45.3, 24.07, 148.6), (61.9, 24.19, 149.6)],
            ("seed", "fsq"): [(38.4, 21.87, 138.5), (50.0, 22.30, 139.0), (88.2, 22.99, 140.2)]}
    bench.print_equal_time(runs, ["fsq"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines[0].endswith("every defaults run took longer: no reading")  # 38.4 s: no defaults run that short
    here = bench.at_seconds(runs[("defaults", "fsq")], 50.0)  # bracketed: read off between the runs
    assert lines[1].endswith(f"defaults {here[0]:.2f} dB {here[1]:.1f} bits: {here[0] - 22.30:+.2f} dB at {here[1] - 139.0:+.1f} bits")
    assert lines[2].endswith("defaults in 61.9 s 24.19 dB 149.6 bits: at least +1.20 dB at +9.4 bits")  # the longest in 88.2 s
    assert bench.within_seconds(runs[("defaults", "fsq")], 45.0) is None
