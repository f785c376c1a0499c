"""bench.py runs end to end on tiny settings (its numbers are for people, not for asserts on speed)."""
import bench


def test_bench_prints_a_row_per_quantizer(capsys):
    bench.main(["--quantizers=['fsq', 'ddcl']", "--steps=2", "--warmup=1", "--train_images=64", "--eval_images=32",
                "--batch_size=8", "--eval_batch_size=16", "--channels=[8, 8, 16]", "--device=cpu"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device cpu | torch ") and "threads" in out[0]
    assert out[1].split()[:2] == ["quantizer", "a"]
    for line, name in zip(out[2:], ("fsq", "ddcl")):
        cells = line.split()
        assert cells[0] == name and all(float(c.replace(",", "")) > 0 for c in cells[1:])
