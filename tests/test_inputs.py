"""Bad and unusual inputs found by trying the repo as a new user would: each loads correctly or
stops with one line."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import utils
from conftest import REPO, run_script, tiny_args, write_images
from discrete_ae import data
from discrete_ae.errors import CheckpointError, ConfigError, UserError
from utils import load_checkpoint


def test_sixteen_bit_greyscale_pngs_are_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")  # really a 16-bit image
    images = data.load_image_folder(str(tmp_path))
    expected = np.round(ramp / 257.0)  # 65535 -> 255, as an 8-bit export would
    assert torch.equal(images[0, 0], images[0, 2])  # grey stays grey
    assert np.abs(images[0, 0].numpy().astype(float) - expected).max() <= 2  # bicubic resize to the same size
    assert 120 < images.float().mean() < 135  # a 0..max ramp averages mid-grey, not white


def test_decompression_bomb_is_skipped_with_a_warning(tmp_path, monkeypatch, capsys):
    write_images(tmp_path, 2, seed=0)
    Image.new("RGB", (300, 300)).save(tmp_path / "huge.png")
    # PIL refuses images above 2 x MAX_IMAGE_PIXELS (a 14,000 x 14,000 PNG by default); lower the
    # limit so a small file takes the same path
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)
    images = data.load_image_folder(str(tmp_path))
    assert images.shape[0] == 2
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "huge.png" in err and "decompression-bomb limit" in err


def test_folder_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    write_images(tmp_path, 4, seed=0)
    first = data.load_image_folder(str(tmp_path))
    assert os.path.isfile(data.image_cache_path(str(tmp_path)))
    calls = []
    monkeypatch.setattr(data, "_decode_all", lambda paths, size: calls.append(len(paths)) or [])
    assert torch.equal(data.load_image_folder(str(tmp_path)), first) and calls == []  # served from the cache
    monkeypatch.undo()
    write_images(tmp_path / "more", 1, seed=5)  # a new file changes the key
    assert data.load_image_folder(str(tmp_path)).shape[0] == 5
    path = tmp_path / "0000.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(path)  # same name, new content and mtime
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    assert data.load_image_folder(str(tmp_path))[0, 0].float().mean() == 255


def test_corrupt_cache_is_rebuilt(tmp_path):
    write_images(tmp_path, 3, seed=0)
    first = data.load_image_folder(str(tmp_path))
    with open(data.image_cache_path(str(tmp_path)), "wb") as f:
        f.write(b"garbage")
    assert torch.equal(data.load_image_folder(str(tmp_path)), first)


def test_parallel_decoding_matches_serial(tmp_path, monkeypatch):
    write_images(tmp_path, 12, seed=3)
    serial = data.load_image_folder(str(tmp_path))
    os.remove(data.image_cache_path(str(tmp_path)))
    monkeypatch.setattr(data, "PARALLEL_DECODE_MIN", 1)
    monkeypatch.setattr(data, "DECODE_CHUNK", 5)
    assert torch.equal(data.load_image_folder(str(tmp_path)), serial)


def test_checkpoint_calling_os_system_is_refused_for_safety(tmp_path):
    code = ("import os, torch\n"
            "class Evil:\n"
            "    def __reduce__(self):\n"
            "        return (os.system, ('echo pwned',))\n"
            f"torch.save({{'model': {{}}, 'config': Evil()}}, {str(tmp_path / 'evil.pt')!r})\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    with pytest.raises(CheckpointError) as err:
        utils.read_checkpoint(str(tmp_path / "evil.pt"))
    assert "holds pickled Python objects" in str(err.value) and "refused" in str(err.value)
    assert "corrupt" not in str(err.value)


@pytest.mark.parametrize("folder", ["checkpoints", "outputs"])
def test_a_second_run_of_the_same_name_stops_while_the_first_lives(tmp_path, image_folder, folder):
    """In either folder: two runs of one name with another checkpoint_dir still share output_dir."""
    from discrete_ae.runs import RunLock

    lock = tmp_path / folder / ".fsq.lock"
    lock.parent.mkdir()
    with RunLock(str(lock), f"run 'fsq' in {str(lock.parent)!r}"):
        result = run_script("train.py", *tiny_args(tmp_path, image_folder, quantizer="fsq"))
        assert result.returncode == 2
        line = result.stderr.strip()
        assert line.startswith(f"error: run 'fsq' in {str(tmp_path / folder)!r} is in use by pid ") and "\n" not in line
        assert not os.path.exists(tmp_path / "checkpoints" / "fsq_vae_last.pt")


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    lock = tmp_path / "r.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; "
                               "from discrete_ae.runs import RunLock\nwith RunLock(sys.argv[1], 'r'):\n print('held', flush=True); time.sleep(60)",
                               str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from discrete_ae.runs import RunLock
    with pytest.raises(UserError, match="is in use by pid"):
        RunLock(str(lock), "r").__enter__()
    holder.kill()
    holder.wait()
    with RunLock(str(lock), "r"):  # the kernel released the dead process's lock
        assert open(lock).read().strip() == f"pid {os.getpid()}"
    assert not lock.exists()  # a holder that finishes removes it


def test_output_to_a_file_has_plain_progress_lines(tmp_path, image_folder):
    result = run_script("train.py", *tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=1, batch_size=1,
                                               max_train_images=51))  # 51 steps: a line at step 50
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout + result.stderr  # no progress-bar redraws in a log
    steps = [line for line in result.stdout.splitlines() if line.startswith("epoch 1 step ")]
    assert steps and all("| loss " in line and "| lr " in line for line in steps)


@pytest.mark.parametrize("seed", [2**70, 1.5, True, [1, "a"]])
def test_a_seed_that_cannot_be_sent_is_one_line(run_train, tmp_path, seed):
    run_train(quantizer="fsq")
    model, _ = load_checkpoint(str(tmp_path / "checkpoints" / "fsq_vae_best.pt"))
    with pytest.raises(ConfigError, match=r"pass one integer in \[-2\*\*63, 2\*\*63\)"):
        model.compress(torch.rand(2, 3, 32, 32), seed=seed)


def test_ddcl_given_more_seeds_than_images_says_so(run_train, tmp_path):
    run_train(quantizer="ddcl")
    model, _ = load_checkpoint(str(tmp_path / "checkpoints" / "ddcl_vae_best.pt"))
    with pytest.raises(ConfigError, match="3 seeds for 2 images"):
        model.compress(torch.rand(2, 3, 32, 32), seed=[1, 2, 3])


def test_a_rank_outside_torchrun_neither_silences_errors_nor_crashes(tmp_path, image_folder):
    bad = run_script("codec.py", "decompress", str(tmp_path / "none.pt"), "x.bin", "y.png", env={"RANK": "1"})
    assert bad.returncode == 2 and "cannot read x.bin" in bad.stderr  # spoken, though RANK says 1
    alone = run_script("train.py", *tiny_args(tmp_path, image_folder, quantizer="fsq"), env={"RANK": "0"})
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "WORLD_SIZE is missing" in alone.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("knob, value, message", [("res_blocks", 10**7, "res_blocks=10000000 is above"),
                                                  ("num_quantizers", 10**7, "num_quantizers=10000000 is above"),
                                                  ("channels", [2**20, 8, 8], r"channels=\[1048576, 8, 8\] is above"),
                                                  ("fsq_levels", [1000] * 4, "codes, above this repo's limit")])
def test_a_checkpoint_cannot_ask_for_a_model_too_big_to_build(run_train, tmp_path, knob, value, message):
    run_train(quantizer="fsq")
    path = tmp_path / "checkpoints" / "fsq_vae_best.pt"
    state = torch.load(path, weights_only=True)
    state["model_args"][knob] = value
    torch.save(state, path)
    t0 = time.time()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(path))
    assert time.time() - t0 < 5  # refused before anything is built


def test_a_small_checkpoint_that_unpacks_to_gigabytes_is_refused_before_loading(tmp_path):
    import zipfile

    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("archive/data/0", "w", force_zip64=True) as f:
            chunk = bytes(2**24)
            for _ in range(80):  # 1.25 GiB of zeros, a few MB on disk
                f.write(chunk)
    assert path.stat().st_size < 10 * 2**20
    with pytest.raises(CheckpointError, match="unpacks to 1.2 GiB"):
        utils.read_checkpoint(str(path))


def test_a_float_image_in_0_1_is_read_as_the_picture_not_black(tmp_path):
    values = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    rgb, _ = data.read_rgb(tmp_path / "f.tif")
    assert rgb.shape == (32, 32, 3) and rgb.max() == 255 and rgb.min() == 0


def test_evaluate_takes_no_folder_from_the_checkpoint(run_train, tmp_path, image_folder):
    run_train(quantizer="fsq")
    elsewhere = tmp_path / "elsewhere"
    path = tmp_path / "checkpoints" / "fsq_vae_best.pt"
    state = torch.load(path, weights_only=True)
    state["config"]["data_dir"] = str(elsewhere)
    state["config"]["run_name"] = "../../important"
    torch.save(state, path)
    result = run_script(os.path.join(REPO, "evaluate.py"), str(path), f"--output_dir={tmp_path / 'eval'}", cwd=str(tmp_path))
    assert result.returncode == 2 and "'data/train' is not a folder" in result.stderr  # the default, not the file's
    assert not elsewhere.exists()
    result = run_script(os.path.join(REPO, "evaluate.py"), str(path), "--save_prior=True", f"--data_dir={image_folder}",
                        f"--output_dir={tmp_path / 'eval'}", cwd=str(tmp_path))
    assert result.returncode == 2 and "run name stored in" in result.stderr.strip().splitlines()[-1]


def test_a_plain_pickle_or_a_format_of_none_is_one_line_without_torch_warnings(tmp_path):
    import pickle

    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": {}}, protocol=4))
    result = run_script(os.path.join(REPO, "evaluate.py"), str(plain))
    assert result.stderr.strip().splitlines() == [f"error: {plain} holds a plain pickle, not a checkpoint torch.save "
                                                  "wrote; pickles can run code: refused"]
    odd = tmp_path / "odd.pt"
    torch.save({"format": None, "model": {}}, odd)
    with pytest.raises(CheckpointError, match="has format=None, not a format number"):
        utils.read_checkpoint(str(odd))
