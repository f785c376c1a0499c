"""A run's files belong to that run (discrete_ae/runs.py): nothing lost, nothing written outside the folders the
user chose, whatever a checkpoint says; real kills, full and read-only file systems where the
sandbox allows them."""
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import REPO, resolve, run_script, tiny_args, write_images
from discrete_ae import data
from discrete_ae.errors import BitstreamError, CheckpointError, ConfigError, UserError
from discrete_ae.files import read_jsonl
from discrete_ae.runs import RunLock
from utils import read_checkpoint


def rows_of(tmp_path, name):
    return read_jsonl(str(tmp_path / "outputs" / f"{name}_metrics.jsonl"))


# ----------------------------------------------------------------------------- whose files

def test_resuming_someone_elses_checkpoint_into_an_existing_run_is_refused(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq", run_name="sk", epochs=4)))
    elsewhere = tmp_path / "elsewhere"
    train.train(resolve(tiny_args(elsewhere, image_folder, quantizer="fsq", run_name="sk", epochs=1)))
    before = (tmp_path / "checkpoints" / "sk_vae_last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="belongs to another run than .*elsewhere.*resuming would overwrite it"):
        train.train(resolve(tiny_args(tmp_path, image_folder, resume=str(elsewhere / "checkpoints" / "sk_vae_last.pt"),
                                      epochs=2)))
    assert (tmp_path / "checkpoints" / "sk_vae_last.pt").read_bytes() == before and len(rows_of(tmp_path, "sk")) == 4


def test_resuming_an_older_checkpoint_of_the_same_run_would_lose_epochs_and_is_refused(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=2, checkpoint_every=1)))
    with pytest.raises(CheckpointError, match="is at epoch 2, newer than .*fsq_vae_epoch_1.pt .epoch 1.; resuming would "
                                              "overwrite epochs 2-2"):
        train.train(resolve(tiny_args(tmp_path, image_folder, resume=str(tmp_path / "checkpoints" / "fsq_vae_epoch_1.pt"),
                                      epochs=3)))
    assert read_checkpoint(str(tmp_path / "checkpoints" / "fsq_vae_last.pt"))["epoch"] == 2


def test_a_new_run_never_writes_over_a_trained_one(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    result = run_script("train.py", *tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=2))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: run 'fsq' already has trained files: {tmp_path / 'checkpoints' / 'fsq_vae_last.pt'} (epoch 1); continue "
        f"it with --resume={tmp_path / 'checkpoints' / 'fsq_vae_last.pt'}, choose another --run_name, or delete its files"]


def test_a_crafted_checkpoint_chooses_no_folder_and_no_path(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path / "mine", image_folder, quantizer="ddcl")))
    state = torch.load(tmp_path / "mine" / "checkpoints" / "ddcl_vae_last.pt", weights_only=True)
    target = tmp_path / "victim"
    state["config"].update(run_name="/../../../" + str(target / "trav").lstrip("/"), output_dir=str(target),
                           checkpoint_dir=str(target))
    torch.save(state, tmp_path / "crafted.pt")
    mine = tiny_args(tmp_path / "mine", image_folder, resume=str(tmp_path / "crafted.pt"), epochs=2)
    with pytest.raises(ConfigError, match="the run name stored in .*crafted.pt='.*trav' is not a plain name"):
        resolve(mine)
    config = resolve(mine + ["--run_name=fork"])
    assert config["output_dir"] == str(tmp_path / "mine" / "outputs")  # the folders are the command line's
    train.train(config)
    assert not target.exists()
    assert read_checkpoint(str(tmp_path / "mine" / "checkpoints" / "fork_vae_last.pt"))["epoch"] == 2


def test_resuming_on_other_data_names_it_and_ranks_the_epochs_anew(tmp_path, image_folder, capsys):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    last = tmp_path / "checkpoints" / "fsq_vae_last.pt"
    with pytest.raises(ConfigError, match=f"was trained on data_dir={str(image_folder)!r} .folder.: pass "
                                          f"--data_dir={image_folder} to continue on it"):
        resolve([f"--resume={last}", f"--output_dir={tmp_path / 'outputs'}", f"--checkpoint_dir={tmp_path / 'checkpoints'}"])
    noise = tmp_path / "noise"
    for split, n in (("train", 48), ("test", 16)):
        (noise / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise / split / f"{i}.png")
    capsys.readouterr()
    train.train(resolve(tiny_args(tmp_path, str(noise), resume=str(last), epochs=2)))
    assert "warning: continuing on other data than" in capsys.readouterr().err
    assert read_checkpoint(str(tmp_path / "checkpoints" / "fsq_vae_best.pt"))["epoch"] == 2  # not compared with epoch 1's


def test_a_run_removes_the_temporaries_a_kill_left_and_no_others(tmp_path, image_folder):
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / ".fsq_vae_last.pt.k1ll3d.tmp"
    other = tmp_path / "checkpoints" / ".fsq2_vae_last.pt.abc123.tmp"  # another run's
    stale.write_bytes(b"half")
    other.write_bytes(b"half")
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    assert not stale.exists() and other.exists()


def test_evaluate_never_rewrites_a_checkpoint_its_run_is_writing(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    path = tmp_path / "checkpoints" / "fsq_vae_best.pt"
    before = path.read_bytes()
    with RunLock(str(tmp_path / "checkpoints" / ".fsq.lock"), "run 'fsq'"):
        result = run_script("evaluate.py", str(path), "--save_prior=True", f"--output_dir={tmp_path / 'eval'}",
                            f"--data_dir={image_folder}")
    assert result.returncode == 2 and "is in use by pid" in result.stderr.strip().splitlines()[-1]
    assert path.read_bytes() == before


def test_a_picture_that_cannot_be_written_never_costs_the_checkpoint(tmp_path, image_folder, capsys):
    (tmp_path / "outputs" / "fsq_curves.png").mkdir(parents=True)  # a real write failure: the path is a folder
    _, metrics = train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=2)))
    out, err = capsys.readouterr()
    assert "warning: could not draw" in err and "fsq_curves.png" in err and "the checkpoint of epoch 2 is saved" in err
    assert read_checkpoint(str(tmp_path / "checkpoints" / "fsq_vae_last.pt"))["epoch"] == 2 and metrics["psnr"] > 0
    last = out.strip().splitlines()[-1]  # the end line says what was not written, not "grids, metrics and curves"
    assert "picture(s) could not be drawn" in last and "fsq_curves.png" in last and "grids" not in last


def test_a_collapsed_run_says_so(tmp_path, image_folder, capsys):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq", optimizer="adam", lr=50.0)))
    err = capsys.readouterr().err
    assert "warning: the run collapsed:" in err and "of codes used" in err and "try a lower --lr" in err


def test_a_bad_run_name_is_one_line():
    result = run_script("train.py", "--run_name=a/b")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "run_name='a/b' is not a plain name" in result.stderr


# ----------------------------------------------------------------------------- images as a viewer shows them

def test_exif_orientation_is_respected_and_odd_shapes_are_counted(tmp_path, capsys):
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, :40] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: a viewer rotates it 90 degrees clockwise
    Image.fromarray(wide).save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    Image.new("RGB", (1, 1), (0, 0, 255)).save(tmp_path / "dot.png")
    images = data.load_image_folder(str(tmp_path))  # sorted: dot, turned, wide
    turned, wide_loaded = images[1].float(), images[2].float()
    assert turned[0, :16].mean() > 200 and turned[0, 16:].mean() < 60  # upright: red on top, not on the left
    assert wide_loaded[0, :, :8].mean() > 200 and wide_loaded[0, :, 24:].mean() < 60  # centre crop keeps both halves
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: {tmp_path}: of 3 images, 1 turned upright by their EXIF orientation, 2 centre-cropped "
                   "to a square, 1 upscaled from under 32 px, to make them 32x32"]
    data.load_image_folder(str(tmp_path))  # from the cache: said again
    assert "1 turned upright" in capsys.readouterr().err


# ----------------------------------------------------------------------------- diverged latents

def test_a_diverged_ddcl_latent_costs_no_huge_table_and_no_traceback():
    from discrete_ae.coding import compress
    from discrete_ae.priors import MAX_SUPPORT, fit_prior

    values = torch.cat([torch.randint(-5, 6, (200, 1, 16)), torch.full((1, 1, 16), 10 ** 9)])
    prior = fit_prior(values)[0]
    assert len(prior.probs) <= MAX_SUPPORT and prior.probs[-1] > 0  # the outlier goes through the escape
    with pytest.raises(BitstreamError, match="beyond the \\+-32767 that the coder sends: the latent diverged"):
        compress(values[-1:].numpy(), [prior.table(16)], b"")


# ----------------------------------------------------------------------------- kills, full and read-only disks

@pytest.fixture(scope="module")
def large_folder(tmp_path_factory):
    """A folder large enough that the folder loader decodes it in worker processes."""
    root = tmp_path_factory.mktemp("large")
    write_images(root / "train", data.PARALLEL_DECODE_MIN, seed=0)
    write_images(root / "test", 8, seed=1)
    return root


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2,
                    reason="needs Linux's /proc and PR_SET_PDEATHSIG, and 2 cores for parallel decoding")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_kill_during_parallel_decoding_leaves_no_worker_and_no_held_lock(tmp_path, large_folder, sig):
    args = tiny_args(tmp_path, str(large_folder), quantizer="fsq")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline, workers = time.time() + 60, []
    while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
        workers = children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the folder was not decoded in worker processes"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    deadline = time.time() + 20
    while any(alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers)
    if sig == signal.SIGKILL:
        for folder in ("checkpoints", "outputs"):
            with RunLock(str(tmp_path / folder / ".fsq.lock"), "r"):  # free: no worker inherited it
                pass
    else:  # the run cleaned up after itself: no lock, no empty folder
        assert proc.returncode == 128 + signal.SIGTERM
        assert err.strip().splitlines()[-1] == "SIGTERM: stopped before training started; nothing was saved"
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "outputs").exists()


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes; skipped where the sandbox cannot mount."""
    mounted = []

    def mount(name, size):
        path = tmp_path / name
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, image_folder, tmpfs):
    disk = tmpfs("disk", 256 * 1024)
    (disk / "filler").write_bytes(b"\0" * (256 * 1024 - 24 * 1024))  # leaves less than a checkpoint needs
    result = run_script("train.py", *tiny_args(tmp_path, image_folder, quantizer="fsq", checkpoint_dir=str(disk)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: could not write {disk}/fsq_vae_")
    assert "the disk is full; free space; the previous file, if any, is intact" in result.stderr
    assert sorted(os.listdir(disk)) == ["filler"]  # no temporary file, no lock file


def test_a_file_size_limit_while_saving_is_one_line(tmp_path, image_folder):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))

    args = tiny_args(tmp_path, image_folder, quantizer="fsq", channels=[16, 32, 64])
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                            preexec_fn=limit)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: could not write ") and "over the size limit (ulimit -f)" in line
    assert "Traceback" not in result.stderr


def test_a_read_only_data_folder_trains_without_a_cache(tmp_path, image_folder, tmpfs):
    ro = tmpfs("ro", 8 * 1024 * 1024)
    shutil.copytree(image_folder, ro, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".images_*"))
    if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only here")
    result = run_script("train.py", *tiny_args(tmp_path, str(ro), quantizer="fsq"))
    assert result.returncode == 0, result.stderr
    assert not os.path.exists(data.image_cache_path(str(ro / "train")))


def test_a_read_only_folder_for_checkpoints_is_one_line(tmp_path, image_folder, tmpfs):
    ro = tmpfs("ro_out", 1024 * 1024)
    if subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot remount read-only here")
    with pytest.raises(UserError, match="checkpoint_dir=.* is not a writable folder .Read-only file system."):
        train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq", checkpoint_dir=str(ro))))
