"""A run is never lost: exact resume, atomic files, signals, NaN, and clear I/O errors."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
import utils
from conftest import REPO, resolve, run_script, same_state, tiny_args
from discrete_ae import data, files, optim
from discrete_ae.errors import CheckpointError, ConfigError, Stop, UserError
from utils import read_checkpoint


def resume_args(tmp_path, image_folder, last, **overrides):
    """--resume=LAST with the run's folders and data named again (a checkpoint never chooses them)."""
    return tiny_args(tmp_path, image_folder, resume=str(last), **overrides)


def interrupt_after_first_epoch(monkeypatch):
    """Deliver a real SIGINT while epoch 1 is being saved: the run stops after that epoch, as a
    Ctrl-C would stop it."""
    save_grid = train.save_grid

    def grid_then_sigint(*args):
        save_grid(*args)
        monkeypatch.setattr(train, "save_grid", save_grid)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "save_grid", grid_then_sigint)


@pytest.mark.parametrize("quantizer, symmetries, entropy_model", [("ddcl", 8, "learned"), ("ddcl", 1, "context"),
                                                                 ("vq", 4, "fitted"), ("fsp", 2, "fitted")])
def test_resumed_run_ends_with_bitwise_identical_weights(tmp_path, image_folder, quantizer, symmetries, entropy_model,
                                                         monkeypatch):
    """2 epochs straight == a 2-epoch run stopped after epoch 1 and resumed (DDCL draws noise, VQ
    re-seeds codes, flips and turns draw from the RNG, the lr schedule continues from the stored scheduler
    state, and a learned prior's parameters and Adam moments come back with the weights)."""
    args = dict(quantizer=quantizer, epochs=2, symmetries=symmetries, entropy_model=entropy_model, codebook_size=64)
    straight = resolve(tiny_args(tmp_path / "a", image_folder, **args))
    train.train(straight)
    first = resolve(tiny_args(tmp_path / "b", image_folder, **args))
    interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(Stop, match="SIGINT"):
        train.train(first)
    last = str(tmp_path / "b" / "checkpoints" / f"{quantizer}_vae_last.pt")
    assert read_checkpoint(last)["epoch"] == 1
    resumed = resolve(["--resume=" + last, "--dataset=folder", f"--data_dir={image_folder}",
                       f"--output_dir={first['output_dir']}", f"--checkpoint_dir={first['checkpoint_dir']}"])
    assert resumed["symmetries"] == symmetries and resumed["epochs"] == 2  # the rest comes from the checkpoint
    train.train(resumed)
    straight = read_checkpoint(str(tmp_path / "a" / "checkpoints" / f"{quantizer}_vae_last.pt"))
    ended = read_checkpoint(last)
    assert same_state(straight["model"], ended["model"])
    assert same_state(straight["optimizer"], ended["optimizer"])  # Adam's moments and Muon's momenta too
    rows = files.read_jsonl(os.path.join(first["output_dir"], f"{quantizer}_metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2]
    assert ended["epoch"] == 2


def test_random_symmetry_draws_every_view_alike():
    """8: each image becomes one of its 8 views (4 turns, mirrored or not), about equally often;
    4: one of its 4 turns; 2: itself or its mirror image; 1: the batch itself."""
    torch.manual_seed(0)
    x = torch.rand(800, 3, 8, 8)

    def views(image, n):  # (3, 8, 8) -> its n views
        if n == 2:
            return [image, image.flip(2)]
        return [torch.rot90(v, t, (1, 2)) for v in ([image, image.flip(2)] if n == 8 else [image]) for t in range(4)]

    for n in (8, 4, 2):
        y = data.random_symmetry(x, n)
        which = [[torch.equal(v, b) for v in views(a, n)].index(True) for a, b in zip(x, y)]  # ValueError if none
        counts = torch.bincount(torch.tensor(which), minlength=n)
        assert len(counts) == n and (counts > 0.6 * len(x) / n).all(), counts
    assert data.random_symmetry(x, 1) is x


def test_random_gains_scale_each_channel_within_the_spread_and_stay_in_range():
    torch.manual_seed(0)
    x = torch.rand(200, 3, 8, 8) * 0.8  # <= 0.8: a gain up to 1.2 needs no clipping
    y = data.random_gains(x, 0.2)
    ratio = y / x  # (B, 3, 8, 8): one gain per image and channel
    gains = ratio[:, :, 0, 0]
    assert torch.allclose(ratio, gains[:, :, None, None].expand_as(ratio), rtol=1e-5)
    assert gains.min() >= 0.8 and gains.max() <= 1.2 and gains.std(0).min() > 0.08  # spread out, in [1 - s, 1 + s]
    assert not torch.allclose(gains[:, 0], gains[:, 1])  # the channels draw their own gains
    bright = data.random_gains(torch.ones(50, 3, 4, 4), 0.5)
    assert bright.max() == 1.0 and bright.min() >= 0.5  # clipped to the [0, 1] contract
    state = torch.get_rng_state()
    assert data.random_gains(x, 0.0) is x and torch.equal(torch.get_rng_state(), state)  # off: no draw


def test_lr_schedule_warms_up_peaks_and_decays_to_zero():
    total, warmup = 100, 10
    f = [optim.lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup, never a zero step
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))  # then only down
    assert f[55] == pytest.approx(0.5, abs=0.02) and optim.lr_factor(total, total, warmup) == 0.0


def test_resume_with_more_epochs_continues_the_step_count(tmp_path, image_folder):
    """The scheduler's step count comes from the checkpoint; a larger `epochs` re-plans the decay."""
    config = resolve(tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=1))
    train.train(config)
    last = tmp_path / "checkpoints" / "fsq_vae_last.pt"
    steps = read_checkpoint(str(last))["scheduler"]["last_epoch"]
    assert steps == 96 // 16  # one epoch of 16-image batches
    train.train(resolve(resume_args(tmp_path, image_folder, last, epochs=3)))
    state = read_checkpoint(str(last))
    assert state["scheduler"]["last_epoch"] == 3 * steps
    rows = files.read_jsonl(os.path.join(config["output_dir"], "fsq_metrics.jsonl"))
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0.0 and rows[2]["lr"] == 0.0


def test_a_learning_rate_given_with_resume_is_the_one_applied(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=1)))
    last = tmp_path / "checkpoints" / "fsq_vae_last.pt"
    config = resolve(resume_args(tmp_path, image_folder, last, epochs=4, lr=1e-3, muon_lr=0.005))
    train.train(config)
    state = read_checkpoint(str(last))
    groups = state["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-3, 0.005]  # the new peaks, recorded and applied
    steps, total = state["scheduler"]["last_epoch"], 4 * (96 // 16)
    factor = optim.lr_factor(steps, total, round(optim.WARMUP_EPOCHS * 96 // 16))
    assert groups[0]["lr"] == pytest.approx(1e-3 * factor) and groups[1]["lr"] == pytest.approx(0.005 * factor)
    assert state["config"]["lr"] == 1e-3 and state["config"]["muon_lr"] == 0.005


def test_checkpoints_of_another_format_are_refused_in_one_line(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    last = tmp_path / "checkpoints" / "fsq_vae_last.pt"
    state = torch.load(last, weights_only=True)
    del state["format"]  # as every checkpoint before formats were numbered
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="is checkpoint format 1; this code reads format 2: use the version"):
        resolve(resume_args(tmp_path, image_folder, tmp_path / "old.pt"))


def test_resume_last_finds_the_newest_run(tmp_path, image_folder, monkeypatch):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    monkeypatch.chdir(tmp_path)
    folder = ["--dataset=folder", f"--data_dir={image_folder}", f"--checkpoint_dir={tmp_path / 'checkpoints'}"]
    config = resolve(["--resume=last", *folder, "--epochs=2"])
    assert config["quantizer"] == "fsq" and config["resume"].endswith("fsq_vae_last.pt")
    with pytest.raises(UserError, match="no .*ddcl_vae_last.pt"):
        resolve(["--resume=last", "--quantizer=ddcl", *folder])
    with pytest.raises(UserError, match=r"no \*_vae_last.pt in"):
        resolve(["--resume=last", f"--checkpoint_dir={tmp_path / 'none'}"])


def test_resume_refuses_a_different_architecture(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    last = str(tmp_path / "checkpoints" / "fsq_vae_last.pt")
    with pytest.raises(ConfigError) as err:
        resolve(resume_args(tmp_path, image_folder, last, channels=[8, 8, 32], fsq_levels=[8, 5, 5, 5]))
    assert "channels=[8, 8, 32] (checkpoint: [8, 8, 16])" in str(err.value)
    assert "fsq_levels=[8, 5, 5, 5] (checkpoint: [8, 6, 6, 5])" in str(err.value)


def test_resume_refuses_another_optimizer_and_keeps_the_muon_group(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    last = str(tmp_path / "checkpoints" / "fsq_vae_last.pt")
    with pytest.raises(ConfigError, match="cannot resume .* with optimizer='adam': it holds the state of optimizer='muon'; drop --optimizer"):
        resolve(resume_args(tmp_path, image_folder, last, optimizer="adam"))
    resumed = resolve(resume_args(tmp_path, image_folder, last, epochs=2, optimizer="muon"))
    assert resumed["optimizer"] == "muon"
    train.train(resumed)
    groups = read_checkpoint(last)["optimizer"]["param_groups"]
    assert [g["muon"] for g in groups] == [False, True]
    assert [g["initial_lr"] for g in groups] == [resumed["lr"], resumed["muon_lr"]]  # the schedule's peaks


def test_resume_validates_the_stored_config(tmp_path, image_folder):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="ddcl")))
    state = torch.load(tmp_path / "checkpoints" / "ddcl_vae_last.pt", weights_only=True)
    state["config"]["ddcl_delta"] = -1.0
    torch.save(state, tmp_path / "bad.pt")
    folder = ["--dataset=folder", f"--data_dir={image_folder}"]
    with pytest.raises(ConfigError, match="ddcl_delta must be a finite number > 0"):
        resolve([f"--resume={tmp_path / 'bad.pt'}", *folder])
    state["config"]["ddcl_delta"], state["config"]["batch_size"] = 0.1, "128"
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="holds an invalid config: batch_size='128': expected int"):
        resolve([f"--resume={tmp_path / 'bad.pt'}", *folder])


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    utils.save_checkpoint(path, {"step": torch.tensor(1)})

    def dying_write(f):  # writes half a file, then the process "dies"
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, dying_write)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        files.save_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_disk_full_is_one_clear_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    files.save_jsonl(path, [{"epoch": 1}])

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="the disk is full; free space; the previous file, if any, is intact"):
        files.save_jsonl(path, [{"epoch": 1}, {"epoch": 2}])
    monkeypatch.undo()
    assert files.read_jsonl(path) == [{"epoch": 1}]


KILL_LOOP = """
import sys, torch
from utils import save_checkpoint
print("ready", flush=True)
i = 0
while True:
    i += 1
    save_checkpoint(sys.argv[1], {"i": torch.tensor(i), "w": torch.full((1 << 20,), float(i))})
"""


def test_sigkill_during_saves_never_corrupts_the_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    utils.save_checkpoint(path, {"i": torch.tensor(0), "w": torch.zeros(1 << 20)})
    for delay in (0.3, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP, str(path)], cwd=REPO, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = torch.load(path, weights_only=True)
        assert torch.equal(state["w"], torch.full((1 << 20,), float(state["i"])))


def test_sigint_saves_and_says_how_to_resume(tmp_path, image_folder):
    args = tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=10000, batch_size=4)
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    last = tmp_path / "checkpoints" / "fsq_vae_last.pt"
    deadline = time.time() + 60
    while not last.exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("SIGINT: stopped in epoch") and f"--resume={last}" in message
    epoch = read_checkpoint(str(last))["epoch"]
    assert epoch >= 1 and f"epoch {epoch} is saved" in message
    train.train(resolve(resume_args(tmp_path, image_folder, last, epochs=epoch + 1)))
    assert read_checkpoint(str(last))["epoch"] == epoch + 1


def test_nan_loss_stops_without_touching_the_best_checkpoint(tmp_path, image_folder, monkeypatch):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    best = tmp_path / "checkpoints" / "fsq_vae_best.pt"
    before = best.read_bytes()
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def poisoned(a, b):
        calls["n"] += 1
        return real(a, b) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(train.F, "mse_loss", poisoned)
    config = resolve(resume_args(tmp_path, image_folder, tmp_path / "checkpoints" / "fsq_vae_last.pt", epochs=2))
    with pytest.raises(Stop, match=r"loss became NaN or inf in epoch 2 by step 6/6; .* Try a lower --lr \(now 0.003\) or --muon_lr \(now 0.02\)"):
        train.train(config)
    assert best.read_bytes() == before


def test_unwritable_output_folder_is_one_clear_line(tmp_path, image_folder):
    (tmp_path / "a_file").write_text("x")
    config = resolve(tiny_args(tmp_path, image_folder, output_dir=str(tmp_path / "a_file" / "out")))
    with pytest.raises(UserError, match=r"output_dir='.*a_file/out' is not a writable folder .*--output_dir=PATH"):
        train.train(config)


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("optimizer"), "lacks 'optimizer'"),
    (lambda s: s.pop("rng"), "lacks 'rng'"),
    (lambda s: s.pop("best_val_objective"), "lacks 'best_val_objective'"),
    (lambda s: s.update(epoch=-3), "'epoch' must be a whole number >= 0"),
    (lambda s: s.update(epoch="one"), "'epoch' must be a whole number >= 0"),
    (lambda s: s.update(config=[1, 2]), "'config' must be a config dict"),
    (lambda s: s["config"].pop("dataset"), "'config' must be a config dict"),
    (lambda s: s["model"].pop(next(iter(s["model"]))), "weights or optimizer state do not match"),
])
def test_a_damaged_checkpoint_is_refused_with_one_line_naming_what_is_wrong(tmp_path, image_folder, damage, message):
    train.train(resolve(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    path = tmp_path / "checkpoints" / "fsq_vae_last.pt"
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    result = run_script(os.path.join(REPO, "train.py"), f"--resume={path}", "--epochs=2", f"--data_dir={image_folder}",
                        f"--output_dir={tmp_path / 'outputs'}", f"--checkpoint_dir={tmp_path / 'checkpoints'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr.strip().splitlines()[-1]
