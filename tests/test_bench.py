"""bench.py runs end to end on tiny settings (its numbers are for people, not for asserts on speed)."""
import pytest

import bench
from discrete_ae.errors import ConfigError


def test_bench_prints_a_row_per_quantizer(capsys, monkeypatch):
    monkeypatch.setattr(bench, "SPLIT_IMAGES", 64)
    bench.main(["--quantizers=['fsq', 'ddcl']", "--steps=2", "--warmup=1", "--batch_size=8", "--channels=[8, 8, 16]",
                "--device=cpu"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device cpu | torch ") and "threads" in out[0]
    assert out[1].split()[:2] == ["quantizer", "a"]
    for line, name in zip(out[2:], ("fsq", "ddcl")):
        cells = line.split()
        assert cells[0] == name and all(float(c.replace(",", "")) > 0 for c in cells[1:])


def test_time_to_quality_trains_each_quantizer_within_its_budget(capsys, image_folder):
    bench.main(["--quality=True", f"--data_dir={image_folder}", "--budgets=[1]", "--quantizers=['fsq', 'ddcl']",
                "--device=cpu", "--channels=[8, 8, 16]"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["quantizer", "budget", "s"]
    rows = [line.split() for line in out[1:]]
    assert [r[0] for r in rows] == ["fsq", "ddcl"]
    for r in rows:
        epochs, took, psnr, bits = int(r[2]), float(r[3]), float(r[4]), float(r[5])
        assert epochs >= 1 and took > 0 and 5 < psnr < 60 and bits > 0 and r[6] == "bitstream"


def test_time_to_quality_needs_a_folder_and_knobs_are_checked_like_train_py():
    with pytest.raises(ConfigError, match="--quality=True needs --data_dir"):
        bench.main(["--quality=True"])
    with pytest.raises(ConfigError, match="color_gain=1.5 must be in"):
        bench.main(["--color_gain=1.5", "--steps=1"])
    with pytest.raises(ConfigError, match="unknown option 'baseline'"):
        bench.main(["--baseline=True"])
