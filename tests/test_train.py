"""End to end on tiny image folders: outputs, checkpoints, learning, and bad input."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

from conftest import REPO, run_script, tiny_args
from discrete_ae import data, files
from discrete_ae.errors import CheckpointError, DataError
from utils import load_checkpoint, read_checkpoint


def test_one_epoch_writes_grid_checkpoint_and_metrics(run_train, tmp_path):
    config, metrics = run_train(quantizer="fsq", checkpoint_every=1, epochs=2)
    out, ck = tmp_path / "outputs", tmp_path / "checkpoints"
    assert (out / "fsq_epoch_001.png").is_file() and (out / "fsq_curves.png").is_file()  # the last epoch draws them
    assert sorted(os.listdir(ck)) == ["fsq_vae_best.pt", "fsq_vae_epoch_1.pt", "fsq_vae_epoch_2.pt", "fsq_vae_last.pt"]
    assert not any(name.endswith(".lock") for name in os.listdir(out))  # a finished run leaves no lock files
    rows = [json.loads(line) for line in open(out / "fsq_metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("val_psnr", "val_ssim", "val_codebook_usage", "val_perplexity", "val_bits", "val_bits_entropy",
                "val_bits_coded", "val_bits_fixed", "val_bpp", "train_loss"):
        assert np.isfinite(rows[0][key]), key
    assert rows[0]["val_roundtrip_exact"] is True
    saved = json.load(open(out / "fsq_config.json"))
    assert {k: saved[k] for k in config} == config and len(saved["run_id"]) == 32
    # grid: 4x4 images of 32 px with 2 px padding, upscaled 4x, and a caption strip
    from PIL import Image

    from discrete_ae.plots import CAPTION_PX, LABEL_PX
    grid = Image.open(out / "fsq_epoch_001.png")
    assert grid.size == (4 * (4 * 34 + 2) + LABEL_PX, 4 * (4 * 34 + 2) + CAPTION_PX) and grid.size[0] >= 512  # rows named left
    tiles = np.asarray(grid)[:4 * (4 * 34 + 2), LABEL_PX:]  # the image right of the row labels
    assert (tiles[8:8 + 4 * 32:4, 8:8 + 4 * 32:4] == tiles[8 + 3:8 + 4 * 32:4, 8 + 3:8 + 4 * 32:4]).all()  # nearest
    caption = np.asarray(grid)[-CAPTION_PX:]
    assert (caption < 128).any() and (caption == 255).mean() > 0.5  # dark text on white
    state = torch.load(ck / "fsq_vae_last.pt", weights_only=True)
    assert {"format", "model", "optimizer", "epoch", "best_val_objective", "scheduler", "config", "model_args",
            "run_id"} <= set(state)
    assert state["config"] == config and state["epoch"] == 2 and state["run_id"] == saved["run_id"]
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


def test_checkpoint_in_a_fresh_process_reproduces_the_logged_mse(run_train, tmp_path, image_folder):
    config, metrics = run_train(quantizer="ddcl")
    assert not (tmp_path / "outputs" / "ddcl_curves.png").exists()  # one epoch: no curves to draw
    code = (
        "import sys, json; from utils import load_checkpoint; from discrete_ae.data import load_dataset; from evaluate import evaluate\n"
        f"model, config = load_checkpoint({str(tmp_path / 'checkpoints' / 'ddcl_vae_best.pt')!r})\n"
        "assert not model.training\n"
        "train, val = load_dataset(config['dataset'], config['data_dir'])\n"
        "x = val[:4].float() / 255; r = model(x)[0]; assert r.shape == x.shape and 0 <= r.min() and r.max() <= 1\n"
        "print(json.dumps(evaluate(model, val)['mse']))\n")
    result = run_script("-c", code)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(metrics["mse"], rel=1e-5)


@pytest.mark.parametrize("quantizer", ["fsq", "ddcl"])
def test_validation_loss_falls(run_train, quantizer):
    # the default widths: with [8, 16, 16] DDCL under Muon (the default optimizer) stays at the mean
    # image for these 60 steps where Adam does not (docs/recipe.md, Muon)
    config, _ = run_train(quantizer=quantizer, epochs=5, batch_size=8, lr=5e-3, channels=[16, 32, 64])
    rows = files.read_jsonl(os.path.join(config["output_dir"], f"{quantizer}_metrics.jsonl"))
    losses = [r["val_loss"] for r in rows]
    assert losses[-1] < 0.85 * losses[0], losses
    assert rows[-1]["val_bits"] > 50  # the latent carries information: no collapse to the mean image


def test_data_dir_without_images_is_one_clear_error(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "test").mkdir()
    result = run_script("train.py", *tiny_args(tmp_path, str(tmp_path / "empty")))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: no readable .png/.jpg images under {str(tmp_path / 'empty' / 'train')!r}"]
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "checkpoints").exists()  # nothing left behind


def test_folder_without_splits_names_the_layout(tmp_path):
    with pytest.raises(DataError, match="needs data_dir with train/ and test/ subfolders"):
        data.load_dataset("folder", str(tmp_path))


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    from conftest import write_images
    write_images(tmp_path / "f", 3, seed=0)
    (tmp_path / "f" / "broken.png").write_bytes(b"not a png")
    images = data.load_image_folder(str(tmp_path / "f"))
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "nope.pt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_loading_onto_a_missing_gpu_is_one_line(run_train, tmp_path):
    from discrete_ae.errors import UserError
    run_train(quantizer="fsq")
    with pytest.raises(UserError, match="CUDA is not available here"):
        load_checkpoint(str(tmp_path / "checkpoints" / "fsq_vae_best.pt"), "cuda")


def test_corrupt_and_truncated_checkpoints(run_train, tmp_path):
    run_train(quantizer="fsq")
    good = tmp_path / "checkpoints" / "fsq_vae_best.pt"
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
    for name in ("trunc.pt", "junk.pt"):
        with pytest.raises(CheckpointError, match="corrupt"):
            load_checkpoint(str(tmp_path / name))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this repo"):
        load_checkpoint(str(tmp_path / "other.pt"))
    from discrete_ae.errors import cli
    from evaluate import main as evaluate_main
    with pytest.raises(SystemExit) as exit_:
        cli(evaluate_main, "", [str(tmp_path / "trunc.pt")])
    assert exit_.value.code == 2


class Payload:
    def __reduce__(self):
        return (print, ("this ran at load time",))


def test_checkpoint_with_pickled_objects_is_refused(run_train, tmp_path):
    run_train(quantizer="fsq")
    state = torch.load(tmp_path / "checkpoints" / "fsq_vae_best.pt", weights_only=True)
    state["config"]["evil"] = Payload()
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="holds pickled Python objects"):
        read_checkpoint(str(tmp_path / "evil.pt"))


def test_checkpoint_with_invalid_model_args(run_train, tmp_path):
    run_train(quantizer="fsq")
    state = torch.load(tmp_path / "checkpoints" / "fsq_vae_best.pt", weights_only=True)
    state["model_args"]["fsq_levels"] = [8, 0, 5, 5]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="invalid model_args: fsq_levels"):
        load_checkpoint(str(tmp_path / "bad.pt"))


# ----------------------------------------------------------------------------- CIFAR-10 loading

def write_tiny_cifar(root, n_train=10, n_test=4):
    """A CIFAR-10 'python version' folder with the real layout and tiny batches."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in batches:
        n = n_test if name == "test_batch" else n_train
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": [0] * n}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return folder


def test_cifar10_python_format_loads_as_uint8_tensors(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    write_tiny_cifar(tmp_path)
    import torchvision.datasets.cifar as cifar

    # the tiny files have other MD5s than the real ones
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    train_u8, val_u8 = data.load_dataset("cifar10", str(tmp_path))
    assert train_u8.shape == (50, 3, 32, 32) and val_u8.shape == (4, 3, 32, 32) and train_u8.dtype == torch.uint8
    raw = pickle.load(open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb"))["data"][0]
    assert torch.equal(train_u8[0].flatten(), torch.from_numpy(raw))  # CHW order preserved


def test_missing_cifar10_says_where_to_put_it(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        data.load_dataset("cifar10", str(tmp_path))
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and str(tmp_path) in message and "--dataset=folder" in message
    assert "\n" not in message


def test_offline_first_run_names_the_offline_route_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    from urllib.error import URLError

    import torchvision.datasets.cifar as cifar

    import train
    from discrete_ae.errors import cli

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    folders = {k: tmp_path / k for k in ("data", "outputs", "checkpoints")}
    with pytest.raises(SystemExit) as exit_:
        cli(train.main, "", [f"--data_dir={folders['data']}", f"--output_dir={folders['outputs']}",
                             f"--checkpoint_dir={folders['checkpoints']}"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "scripts/make_patches.py" in err
    assert not any(f.exists() for f in folders.values())  # no empty folders, no lock file


def test_each_epoch_line_says_about_how_long_the_run_has_left(run_train, capsys):
    run_train(quantizer="fsq", epochs=3)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ") and "/3 |" in line]
    assert len(lines) == 3 and all(" left" in line for line in lines[:2]) and " left" not in lines[2]


def test_a_saved_config_reruns_the_run_with_overrides_on_top(run_train, tmp_path):
    first, _ = run_train(quantizer="fsq", fsq_levels=[5, 4, 4], seed=7, run_name="first")
    saved = os.path.join(first["output_dir"], "first_config.json")
    again, _ = run_train(config=saved, run_name="again")
    assert {k: v for k, v in again.items() if k != "run_name"} == {k: v for k, v in first.items() if k != "run_name"}
    with open(os.path.join(first["output_dir"], "again_config.json")) as f:
        assert json.load(f)["seed"] == 7


def test_a_torchvision_that_does_not_run_beside_torch_stops_the_run_with_one_line(tmp_path, image_folder):
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    result = run_script(os.path.join(REPO, "train.py"), *tiny_args(tmp_path, image_folder, quantizer="fsq"),
                        env={"PYTHONPATH": str(tmp_path / "fake")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "does not work with torch" in line and "pip install torch==" in line
    assert not (tmp_path / "checkpoints").exists()


def test_tensorboard_logging_writes_events_that_tensorboard_reads_back(run_train, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config, _ = run_train(quantizer="fsq", epochs=2, tensorboard=True)
    events = EventAccumulator(os.path.join(config["output_dir"], "fsq_tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "train/epoch_loss", "val/psnr", "val/bits"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("val/psnr")] == [1, 2] and len(events.Scalars("train/loss")) >= 2
    assert len(events.Images("grid")) == 2 and any("config" in t for t in tags["tensors"])


def test_no_tensorboard_files_unless_asked(run_train):
    config, _ = run_train(quantizer="fsq")
    assert not os.path.exists(os.path.join(config["output_dir"], "fsq_tensorboard"))
