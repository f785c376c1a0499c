"""scripts/compare.sh: which train.py runs it starts, with a stand-in `python` that only echoes."""
import os
import stat
import subprocess

from conftest import REPO


def test_compare_passes_extra_knobs_to_every_training_run(tmp_path):
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "COMPARE_DIR": str(tmp_path / "cmp")}
    script = os.path.join(REPO, "scripts", "compare.sh")
    run = subprocess.run(["bash", script, "DATA", "20", "bottlenecks", "--rotate=False", "--seed=7"],
                         env=env, capture_output=True, text=True, check=True)
    trains = [line for line in run.stdout.splitlines() if line.startswith("train.py")]
    assert len(trains) == 9  # 3 FSQ level sets, 3 DDCL weights, vq, none, vae
    assert all("--rotate=False --seed=7" in line and "--epochs=20" in line for line in trains)
    plain = subprocess.run(["bash", script, "DATA", "20"], env=env, capture_output=True, text=True, check=True)
    assert not any("--rotate" in line for line in plain.stdout.splitlines())
