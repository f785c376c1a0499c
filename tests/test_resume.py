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
from conftest import REPO, same_state, tiny_args
from errors import ConfigError, UserError
from utils import read_checkpoint


def interrupt_after_first_epoch(monkeypatch):
    """Deliver a real SIGINT while epoch 1 is being saved: the run stops after that epoch, as a
    Ctrl-C would stop it."""
    save_grid = train.save_grid

    def grid_then_sigint(*args):
        save_grid(*args)
        monkeypatch.setattr(train, "save_grid", save_grid)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train, "save_grid", grid_then_sigint)


@pytest.mark.parametrize("quantizer, hflip, rotate, entropy_model", [("ddcl", True, True, "learned"),
                                                                     ("ddcl", False, False, "context"),
                                                                     ("vq", False, True, "fitted")])
def test_resumed_run_ends_with_bitwise_identical_weights(tmp_path, image_folder, quantizer, hflip, rotate, entropy_model,
                                                         monkeypatch):
    """2 epochs straight == a 2-epoch run stopped after epoch 1 and resumed (DDCL draws noise, VQ
    re-seeds codes, flips and turns draw from the RNG, the lr schedule continues from the stored scheduler
    state, and a learned prior's parameters and Adam moments come back with the weights)."""
    args = dict(quantizer=quantizer, epochs=2, hflip=hflip, rotate=rotate, entropy_model=entropy_model)
    straight = train.resolve_config(tiny_args(tmp_path / "a", image_folder, **args))
    train.train(straight)
    first = train.resolve_config(tiny_args(tmp_path / "b", image_folder, **args))
    interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(train.Stop, match="SIGINT"):
        train.train(first)
    last = str(tmp_path / "b" / "checkpoints" / f"{quantizer}_vae_last.pt")
    assert read_checkpoint(last)["epoch"] == 1
    resumed = train.resolve_config(["--resume=" + last])
    assert resumed["output_dir"] == first["output_dir"]  # the rest of the config comes from the checkpoint
    train.train(resumed)
    straight = read_checkpoint(str(tmp_path / "a" / "checkpoints" / f"{quantizer}_vae_last.pt"))
    ended = read_checkpoint(last)
    assert same_state(straight["model"], ended["model"])
    assert same_state(straight["optimizer"], ended["optimizer"])  # Adam's moments and Muon's momenta too
    rows = utils.read_jsonl(os.path.join(first["output_dir"], f"{quantizer}_metrics.jsonl"))
    assert [r["epoch"] for r in rows] == [1, 2]
    assert ended["epoch"] == 2


def test_random_hflip_mirrors_about_half_the_batch_left_right():
    torch.manual_seed(0)
    x = torch.rand(400, 3, 8, 8)
    y = train.random_hflip(x)
    mirrored = torch.tensor([torch.equal(a.flip(2), b) for a, b in zip(x, y)])
    unchanged = torch.tensor([torch.equal(a, b) for a, b in zip(x, y)])
    assert (mirrored | unchanged).all() and 150 < int(mirrored.sum()) < 250


def test_random_symmetry_draws_every_symmetry_of_the_square_alike():
    """hflip + rotate: each image becomes one of its 8 views (4 turns, mirrored or not), about
    equally often; rotate alone: one of its 4 turns; neither: the batch itself."""
    torch.manual_seed(0)
    x = torch.rand(800, 3, 8, 8)

    def views(image, mirrored):  # (3, 8, 8) -> its turns (and the turns of its mirror image)
        return [torch.rot90(v, t, (1, 2)) for v in ([image, image.flip(2)] if mirrored else [image]) for t in range(4)]

    for hflip, n in ((True, 8), (False, 4)):
        y = train.random_symmetry(x, hflip, True)
        which = [[torch.equal(v, b) for v in views(a, hflip)].index(True) for a, b in zip(x, y)]  # ValueError if none
        counts = torch.bincount(torch.tensor(which), minlength=n)
        assert len(counts) == n and (counts > 0.6 * len(x) / n).all(), counts
    assert train.random_symmetry(x, False, False) is x


def test_random_gains_scale_each_channel_within_the_spread_and_stay_in_range():
    torch.manual_seed(0)
    x = torch.rand(200, 3, 8, 8) * 0.8  # <= 0.8: a gain up to 1.2 needs no clipping
    y = train.random_gains(x, 0.2)
    ratio = y / x  # (B, 3, 8, 8): one gain per image and channel
    gains = ratio[:, :, 0, 0]
    assert torch.allclose(ratio, gains[:, :, None, None].expand_as(ratio), rtol=1e-5)
    assert gains.min() >= 0.8 and gains.max() <= 1.2 and gains.std(0).min() > 0.08  # spread out, in [1 - s, 1 + s]
    assert not torch.allclose(gains[:, 0], gains[:, 1])  # the channels draw their own gains
    bright = train.random_gains(torch.ones(50, 3, 4, 4), 0.5)
    assert bright.max() == 1.0 and bright.min() >= 0.5  # clipped to the [0, 1] contract
    state = torch.get_rng_state()
    assert train.random_gains(x, 0.0) is x and torch.equal(torch.get_rng_state(), state)  # off: no draw


def test_lr_schedule_warms_up_peaks_and_decays_to_min():
    total, warmup = 100, 10
    f = [train.lr_factor(s, total, warmup, "cosine", 0.0) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup, never a zero step
    assert f[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(f[10:], f[11:]))  # then only down
    assert f[55] == pytest.approx(0.5, abs=0.02) and train.lr_factor(total, total, warmup, "cosine", 0.0) == 0.0
    assert train.lr_factor(total, total, warmup, "cosine", 0.1) == pytest.approx(0.1)  # min_lr / lr
    assert [train.lr_factor(s, total, warmup, "constant", 0.0) for s in (0, 10, 99)] == [0.1, 1.0, 1.0]


def test_resume_with_more_epochs_continues_the_step_count(tmp_path, image_folder):
    """The scheduler's step count comes from the checkpoint; a larger `epochs` re-plans the decay."""
    config = train.resolve_config(tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=1))
    train.train(config)
    last = str(tmp_path / "checkpoints" / "fsq_vae_last.pt")
    steps = read_checkpoint(last)["scheduler"]["last_epoch"]
    assert steps == 96 // 16  # one epoch of 16-image batches
    resumed = train.resolve_config(["--resume=" + last, "--epochs=3"])
    train.train(resumed)
    state = read_checkpoint(last)
    assert state["scheduler"]["last_epoch"] == 3 * steps
    rows = utils.read_jsonl(os.path.join(config["output_dir"], "fsq_metrics.jsonl"))
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0.0 and rows[2]["lr"] == 0.0


def test_checkpoints_with_the_old_best_key_still_resume(tmp_path, image_folder):
    config = train.resolve_config(tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=1) + ["--optimizer=adam"])
    train.train(config)
    last = tmp_path / "checkpoints" / "fsq_vae_last.pt"
    state = torch.load(last, weights_only=True)
    state["best_val_loss"] = state.pop("best_val_objective")  # as written when epochs were ranked by MSE alone
    del state["scheduler"]  # and before the lr schedule existed
    del state["config"]["hflip"], state["config"]["rotate"]  # and before flips and turns
    del state["config"]["rate_weight"]  # and before learned priors
    del state["config"]["beta2"]  # and before Adam's beta2 was a knob (its optimizer groups hold torch's 0.999 already)
    del state["config"]["optimizer"], state["config"]["muon_lr"]  # and before Muon (Adam trained every parameter)
    del state["config"]["color_gain"]  # and before colour gains
    torch.save(state, last)
    assert read_checkpoint(str(last))["best_val_objective"] == float("inf")  # the MSE is not the objective: rank again
    resumed = train.resolve_config([f"--resume={last}", "--epochs=2"])
    assert resumed["hflip"] is False and resumed["rotate"] is False  # the recipe it was trained with, not today's
    assert resumed["rate_weight"] == 0.0  # what build_model reads for the absent key, not the config default
    assert resumed["beta2"] == 0.999 and resumed["optimizer"] == "adam" and resumed["color_gain"] == 0.0
    train.train(resumed)
    assert read_checkpoint(str(last))["epoch"] == 2


def test_beta2_reaches_adam_and_a_resumed_run_takes_a_new_one(tmp_path, image_folder):
    config = train.resolve_config(tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=1) + ["--beta2=0.98"])
    train.train(config)
    last = str(tmp_path / "checkpoints" / "fsq_vae_last.pt")
    groups = read_checkpoint(last)["optimizer"]["param_groups"]
    assert all(g["betas"] == (0.9, 0.98) for g in groups)
    train.train(train.resolve_config(["--resume=" + last, "--epochs=2", "--beta2=0.95"]))
    state = read_checkpoint(last)
    assert state["config"]["beta2"] == 0.95
    assert all(g["betas"] == (0.9, 0.95) for g in state["optimizer"]["param_groups"])


def test_resume_last_finds_the_newest_run(tmp_path, image_folder, monkeypatch):
    train.train(train.resolve_config(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    monkeypatch.chdir(tmp_path)
    config = train.resolve_config(["--resume=last", f"--checkpoint_dir={tmp_path / 'checkpoints'}", "--epochs=2"])
    assert config["quantizer"] == "fsq" and config["resume"].endswith("fsq_vae_last.pt")
    with pytest.raises(UserError, match="no .*ddcl_vae_last.pt"):
        train.resolve_config(["--resume=last", "--quantizer=ddcl", f"--checkpoint_dir={tmp_path / 'checkpoints'}"])
    with pytest.raises(UserError, match=r"no \*_vae_last.pt in"):
        train.resolve_config(["--resume=last", f"--checkpoint_dir={tmp_path / 'none'}"])


def test_resume_refuses_a_different_architecture(tmp_path, image_folder):
    train.train(train.resolve_config(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    last = str(tmp_path / "checkpoints" / "fsq_vae_last.pt")
    with pytest.raises(ConfigError) as err:
        train.resolve_config([f"--resume={last}", "--channels=[8,8,32]", "--fsq_levels=[8,5,5,5]"])
    assert "channels=[8, 8, 32] (checkpoint: [8, 8, 16])" in str(err.value)
    assert "fsq_levels=[8, 5, 5, 5] (checkpoint: [8, 6, 6, 5])" in str(err.value)


def test_resume_refuses_another_optimizer_and_keeps_the_muon_group(tmp_path, image_folder):
    train.train(train.resolve_config(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    last = str(tmp_path / "checkpoints" / "fsq_vae_last.pt")
    with pytest.raises(ConfigError, match="cannot resume .* with optimizer='adam': it holds the state of optimizer='muon'; drop --optimizer"):
        train.resolve_config([f"--resume={last}", "--optimizer=adam"])
    resumed = train.resolve_config([f"--resume={last}", "--epochs=2", "--optimizer=muon"])
    assert resumed["optimizer"] == "muon"
    train.train(resumed)
    groups = read_checkpoint(last)["optimizer"]["param_groups"]
    assert [g["muon"] for g in groups] == [False, True]
    assert [g["initial_lr"] for g in groups] == [resumed["lr"], resumed["muon_lr"]]  # the schedule's peaks


def test_resume_validates_the_stored_config(tmp_path, image_folder):
    train.train(train.resolve_config(tiny_args(tmp_path, image_folder, quantizer="ddcl")))
    state = torch.load(tmp_path / "checkpoints" / "ddcl_vae_last.pt", weights_only=True)
    state["config"]["ddcl_delta"] = -1.0
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="ddcl_delta must be a finite number > 0"):
        train.resolve_config([f"--resume={tmp_path / 'bad.pt'}"])
    state["config"]["ddcl_delta"], state["config"]["batch_size"] = 0.1, "128"
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="holds an invalid config: batch_size='128': expected int"):
        train.resolve_config([f"--resume={tmp_path / 'bad.pt'}"])


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    utils.save_checkpoint(path, {"step": torch.tensor(1)})

    def dying_save(obj, f):  # writes half a file, then the process "dies"
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint(path, {"step": torch.tensor(2)})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind


def test_atomic_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        utils.save_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def test_disk_full_is_one_clear_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    utils.save_jsonl(path, [{"epoch": 1}])

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UserError, match="the disk is full; free space; the previous file, if any, is intact"):
        utils.save_jsonl(path, [{"epoch": 1}, {"epoch": 2}])
    monkeypatch.undo()
    assert utils.read_jsonl(path) == [{"epoch": 1}]


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
    args = tiny_args(tmp_path, image_folder, quantizer="fsq", epochs=10000, batch_size=4, eval_batch_size=32)
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
    resumed = train.resolve_config([f"--resume={last}", f"--epochs={epoch + 1}"])
    train.train(resumed)
    assert read_checkpoint(str(last))["epoch"] == epoch + 1


def test_nan_loss_stops_without_touching_the_best_checkpoint(tmp_path, image_folder, monkeypatch):
    train.train(train.resolve_config(tiny_args(tmp_path, image_folder, quantizer="fsq")))
    best = tmp_path / "checkpoints" / "fsq_vae_best.pt"
    before = best.read_bytes()
    calls = {"n": 0}
    real = torch.nn.functional.mse_loss

    def poisoned(a, b):
        calls["n"] += 1
        return real(a, b) * (float("nan") if calls["n"] == 3 else 1.0)

    monkeypatch.setattr(train.F, "mse_loss", poisoned)
    config = train.resolve_config([f"--resume={tmp_path / 'checkpoints' / 'fsq_vae_last.pt'}", "--epochs=2"])
    with pytest.raises(train.Stop, match=r"loss became NaN or inf at epoch 2, step 3/6; .* Try a lower --lr \(now 0.003\) or --muon_lr \(now 0.02\)"):
        train.train(config)
    assert best.read_bytes() == before


def test_unwritable_output_folder_is_one_clear_line(tmp_path, image_folder):
    (tmp_path / "a_file").write_text("x")
    config = train.resolve_config(tiny_args(tmp_path, image_folder, output_dir=str(tmp_path / "a_file" / "out")))
    with pytest.raises(UserError, match=r"output_dir='.*a_file/out' is not a writable folder .*--output_dir=PATH"):
        train.train(config)
