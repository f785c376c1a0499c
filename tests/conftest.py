"""Shared fixtures: tiny synthetic image folders and configs that train in a second or two."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# pytest.ini runs one worker per core (pytest-xdist): tiny models gain nothing from more threads
# than that, and each worker's own threads would contend with the other's
os.environ.setdefault("OMP_NUM_THREADS", "1")


def randomised(prior, std=0.3):
    """A prior with seeded weights of a trained network's size (the defaults are near zero)."""
    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        for p in prior.parameters():
            p.normal_(0, std)
    return prior


def write_images(folder, n, seed):
    """n smooth 32x32 RGB PNGs (random 4x4 colour fields, bilinearly upsampled): easy to learn."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        small = Image.fromarray((rng.random((4, 4, 3)) * 255).astype(np.uint8))
        small.resize((32, 32), Image.BILINEAR).save(os.path.join(folder, f"{i:04d}.png"))


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_images(root / "train" / "nested", 96, seed=0)
    write_images(root / "test", 32, seed=1)
    return str(root)


def tiny_args(tmp_path, image_folder, **overrides):
    """--key=value arguments for a run that takes about a second on two CPU cores."""
    args = dict(dataset="folder", data_dir=image_folder, output_dir=str(tmp_path / "outputs"),
                checkpoint_dir=str(tmp_path / "checkpoints"), batch_size=16, epochs=1, lr=3e-3, channels=[8, 8, 16])
    args.update(overrides)
    return [f"--{k}={v!r}" if not isinstance(v, str) else f"--{k}={v}" for k, v in args.items()]


def resolve(args):
    """train.py's checked config for command-line `args`."""
    import train
    from config import resolve_config

    return resolve_config(args, train.DEFAULT_CONFIG)[0]


@pytest.fixture
def run_train(tmp_path, image_folder):
    """Train in-process with tiny settings; returns (config, the best checkpoint's metrics)."""
    import train
    from config import resolve_config

    def run(**overrides):
        config, state = resolve_config(tiny_args(tmp_path, image_folder, **overrides), train.DEFAULT_CONFIG)
        return config, train.train(config, state)[1]

    return run


def run_script(*args, cwd=REPO, timeout=120, env=None):
    """Run a repo script in a fresh Python process; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def same_state(a, b):
    """Two state_dicts hold the same keys and bitwise equal tensors (extra state compared as values)."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b
