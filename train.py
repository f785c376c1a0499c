"""Train a convolutional autoencoder with a pluggable discrete bottleneck.

    python train.py                                     # DDCL on CIFAR-10, downloaded into data/
    python train.py --quantizer=fsq --fsq_levels="[8,5,5,5]" --epochs=10
    python train.py --dataset=folder --data_dir=DIR     # DIR/train/ and DIR/test/ (scripts/make_patches.py DIR)
    python train.py --resume=last                       # continue the newest interrupted run
    torchrun --standalone --nproc_per_node=2 train.py   # data-parallel (GPUs, or CPU processes)

Override any knob of the config block below as --key=value (a Python literal checked against the
default's type). Every epoch writes a grid of validation images and their reconstructions, a
metrics row and checkpoints; the run ends with one line saying what it wrote where.

What the defaults reach, and what a run costs on which CPU: README.md (Results) and docs/comparison.md.
"""
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F

from config import resolve_config
from discrete_ae.data import (
    batches_per_epoch,
    epoch_order,
    head,
    load_dataset,
    random_gains,
    random_symmetry,
    to_float_images,
)
from discrete_ae.device import get_rng_state, seed_everything, set_rng_state, use_bf16
from discrete_ae.errors import CheckpointError, Stop, UserError, cli
from discrete_ae.files import read_jsonl, save_json, save_jsonl
from discrete_ae.metrics import psnr_per_image
from discrete_ae.optim import build_optimizer, build_scheduler, restore
from discrete_ae.plots import check_torchvision, plot_curves, save_grid
from discrete_ae.process import (
    SignalFlag,
    all_reduce_mean,
    barrier,
    gather,
    setup_distributed,
    stop_on_sigterm,
    teardown_distributed,
)
from discrete_ae.runs import RunFiles, new_run_id, run_label
from discrete_ae.tracking import Tracker
from evaluate import evaluate
from models import build_model, model_args_from_config
from utils import read_checkpoint, save_checkpoint

# ----------------------------------------------------------------------------- config
# the bottleneck (README: Bottlenecks)
quantizer = "ddcl"  # fsq, ddcl, vq, lfq, fsp, simvq, rfsq, none (no bottleneck) or vae (Gaussian)
fsq_levels = [8, 6, 6, 5]  # fsq, fsp, rfsq: levels per latent channel; prod(levels) codes per position
num_quantizers = 2  # rfsq: residual stages, each sending one more code per position
codebook_size = 1024  # vq, simvq, lfq: codes per position (lfq: a power of 2, one latent channel per bit)
ddcl_delta = 1 / 15  # ddcl: quantization step, the width of the training noise and of the dither
ddcl_comm_weight = 1e-3  # ddcl: loss weight of the cost log2(2|z|/delta + 1) bits per latent value
vae_kl_weight = 1e-3  # vae: loss weight of the KL term (nats per latent value)
entropy_model = "fitted"  # rate prior: "fitted" after training; "learned" or "context" (earlier integers) trained in
rate_weight = 0.01  # learned/context prior: loss = MSE + rate_weight * bits / 1024
# the autoencoder
latent_dim = 4  # latent channels C of the 4x4 grid (fsq, fsp, rfsq and lfq set it themselves)
channels = [16, 32, 64]  # encoder widths at 16, 8 and 4 px; the decoder mirrors them
res_blocks = 0  # residual blocks at each of the 8 and 4 px scales
# data
dataset = "cifar10"  # "cifar10" (downloaded into data_dir) or "folder" (data_dir/train/, data_dir/test/)
data_dir = "data"  # where CIFAR-10 is or goes, or the image folder's root
max_train_images = 0  # train on the first N training images only (0 = all)
# optimisation
epochs = 50  # total epochs; the learning rate decays to 0 at the last step
batch_size = 64  # images per step (per process under torchrun)
optimizer = "muon"  # "muon" (Muon for the hidden convolution filters, Adam for the rest) or "adam"
lr = 3e-3  # peak Adam learning rate, after a quarter-epoch warmup
muon_lr = 0.02  # peak Muon learning rate of the hidden convolution filters
symmetries = 8  # training views of each crop: 1 none, 2 left-right flips, 4 quarter turns, 8 both
color_gain = 0.2  # scale each training image's R, G and B by gains from [1 - c, 1 + c] (0 = off)
seed = 1337  # seeds the weights, the data order and the noise
# the run
run_name = ""  # names the run's files; "" means the quantizer's name
output_dir = "outputs"  # grids, metrics, curves and the run's config
checkpoint_dir = "checkpoints"  # {run}_vae_best.pt, {run}_vae_last.pt, {run}_vae_epoch_{n}.pt
checkpoint_every = 10  # also keep {run}_vae_epoch_{n}.pt every n epochs (0 = never)
tensorboard = False  # also log for TensorBoard into output_dir/{run}_tensorboard/ (needs `pip install tensorboard`)
resume = ""  # a checkpoint to continue, or "last" (the newest *_vae_last.pt in checkpoint_dir)
device = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1" or "mps"
amp = "auto"  # bf16 autocast: "auto" (CUDA, and CPUs with native bf16), "bf16" or "off"
# -----------------------------------------------------------------------------
DEFAULT_CONFIG = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
                  and isinstance(v, (bool, int, float, str, list))}
EVAL_IMAGES = 2000  # validation images scored after each epoch (they rank the epochs)
RATE_PRIOR_IMAGES = 5000  # training images that fit the rate prior after each epoch
AUX_WARMUP_EPOCHS = 1.0  # the auxiliary loss ramps up from 0, so the rate cannot collapse the latent early
LOG_INTERVAL = 50  # steps between progress updates (each reads the loss back from the device)
CURVES_EVERY = 5  # redraw {run}_curves.png every n epochs and after the last
GRID_IMAGES, GRID_SCALE = 8, 4  # 8 validation images over their reconstructions, upscaled 4x
COLLAPSE_MARGIN_DB = 1.0  # a run that ends within this of sending nothing (the mean image) collapsed


def make_step(model, optimizer, scheduler, amp, dev):
    """step(x, aux_weight) -> detached loss: forward, backward, update and lr step, with no host sync."""
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16(amp, dev) else nullcontext()

    def step(x, aux_weight):
        with autocast:
            out = model(x)
        loss = F.mse_loss(out.recon.float(), x) + aux_weight * out.aux_loss.float()
        optimizer.zero_grad(set_to_none=True)
        (loss + out.prior_loss).backward()  # the prior's own loss reaches only the prior (discrete_ae/bottleneck.py)
        optimizer.step()
        scheduler.step()
        return loss.detach()

    return step


def run_epoch(step, images_u8, order, steps, batch, epoch, config, stop=lambda: False, show=False, lr=None, log=None):
    """One pass over `order` (device indices into the uint8 images) -> (loss sum on the device,
    steps done). Stops at a non-finite loss; the host reads the loss back every LOG_INTERVAL steps
    (and hands it to `log(step in the epoch, mean loss, lr)` when given)."""
    loss_sum = torch.zeros((), device=images_u8.device)
    progress = Progress(epoch, steps, show)
    done = 0
    for i in range(steps):
        x = to_float_images(images_u8[order[i * batch:(i + 1) * batch]])
        x = random_gains(random_symmetry(x, config["symmetries"]), config["color_gain"])
        ramp = min(1.0, (epoch - 1 + i / steps) / AUX_WARMUP_EPOCHS)
        loss_sum += step(x.contiguous(memory_format=torch.channels_last), ramp)
        done = i + 1
        if done % LOG_INTERVAL == 0 or done == steps:
            total = loss_sum.item()  # the one read-back of the interval
            if not math.isfinite(total):
                raise Stop(f"the loss became NaN or inf in epoch {epoch} by step {done}/{steps}; stopped before "
                           f"writing this epoch. Try a lower --lr (now {config['lr']:g}) or --muon_lr "
                           f"(now {config['muon_lr']:g})", code=3)
            mean, now = total / done, lr() if lr else float("nan")
            progress.update(done, mean, now)
            if log is not None:
                log(done, mean, now)
        if stop():
            break
    progress.close()
    return loss_sum, done


class Progress:
    """A tqdm bar on a terminal; a plain line every LOG_INTERVAL steps into a file or a pipe."""

    def __init__(self, epoch, steps, show):
        from tqdm import tqdm

        self.epoch, self.steps, self.show, self.tty = epoch, steps, show, sys.stdout.isatty()
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True) if show and self.tty else None

    def update(self, done, loss, lr):
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.5f}", lr=f"{lr:.2e}")
        elif self.show and done < self.steps:
            print(f"epoch {self.epoch} step {done}/{self.steps} | loss {loss:.5f} | lr {lr:.2e}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def train(config, state=None):
    """Train with a checked config (and a resumed checkpoint's state) -> (the model, the best
    checkpoint's metrics). Under torchrun every rank trains; rank 0 alone evaluates and writes."""
    if state is None and config["resume"]:
        state = read_checkpoint(config["resume"])
    rank, world, dev = setup_distributed(config["device"])
    run = RunFiles(config["output_dir"], config["checkpoint_dir"], run_label(config))
    try:
        with run if rank == 0 else nullcontext():
            if rank == 0 and state is None:
                run.claim_fresh()
            elif rank == 0:
                run.claim_resume(state["run_id"], state["epoch"], config["resume"])
            return train_loop(config, state, run, rank, world, dev)
    finally:
        teardown_distributed(world)


class Training(NamedTuple):
    """What an epoch updates; a checkpoint stores all of it."""
    model: torch.nn.Module
    model_args: dict
    optimizer: torch.optim.Optimizer
    scheduler: object
    data_gen: torch.Generator


def train_loop(config, state, run, rank, world, dev):
    """Data, model, resumed state; then each epoch: train, evaluate, checkpoint, log (rank 0 writes)."""
    master = rank == 0
    train_u8, val_u8 = load_split(config, world, dev)
    prior_u8, epoch_val_u8 = head(train_u8, RATE_PRIOR_IMAGES), head(val_u8, EVAL_IMAGES)
    grid = to_float_images(val_u8[:GRID_IMAGES])
    t = build_training(config, len(train_u8), rank, world, dev)
    start, best, rows, run_id = 0, math.inf, [], new_run_id()
    if state is not None:
        start, best, rows, run_id = resume_training(t, state, config, run, rank, world)
    if master:
        announce(config, run, run_id, start)

    step = make_step(wrap_model(t.model, world, dev), t.optimizer, t.scheduler, config["amp"], dev)
    undrawn = []  # (path, why) of every picture that could not be drawn
    track = Tracker(run.output("tensorboard"), config) if master and config["tensorboard"] else nullcontext()
    with SignalFlag() as flag, track as tracker:
        for epoch in range(start + 1, config["epochs"] + 1):
            t0 = time.time()
            t.model.train()
            order, steps, batch = epoch_order(len(train_u8), t.data_gen, rank, world, config["batch_size"])
            log = None if tracker is None else (lambda i, loss, lr, e=epoch, n=steps: tracker.train_loss((e - 1) * n + i, loss, lr))
            loss_sum, done = run_epoch(step, train_u8, order.to(dev), steps, batch, epoch, config,
                                       stop=lambda: flag.signum is not None, show=master,
                                       lr=lambda: t.optimizer.param_groups[0]["lr"], log=log)
            if flag.signum is not None:
                raise interrupted(flag.signum, epoch, done, steps, run)
            train_loss = all_reduce_mean(loss_sum / steps, world).item()
            rng = gather(get_rng_state(), world)
            if master:
                metrics = evaluate(t.model, epoch_val_u8, prior_u8, store_prior=True)
                best = save_epoch(run, t, config, run_id, epoch, metrics, best, rng)
                rows.append({"epoch": epoch, "train_loss": train_loss, "lr": t.optimizer.param_groups[0]["lr"],
                             "seconds": time.time() - t0, **{f"val_{k}": v for k, v in metrics.items()}})
                save_jsonl(run.metrics, rows)
                failed = draw_pictures(run, t.model, grid, epoch, metrics, rows, config["epochs"])
                undrawn += failed
                if tracker is not None:
                    drawn = run.grid(epoch) not in [path for path, _ in failed]
                    tracker.epoch(epoch, train_loss, metrics, run.grid(epoch) if drawn else None)
                this_run = [r["seconds"] for r in rows[-(epoch - start):]]  # the epochs this process trained
                left = (config["epochs"] - epoch) * sum(this_run) / len(this_run)
                print(log_line(epoch, config["epochs"], train_loss, metrics, time.time() - t0, left), flush=True)
            barrier(world)
            if flag.signum is not None:
                raise interrupted(flag.signum, epoch + 1, 0, steps, run)
    metrics = finish(run, val_u8, prior_u8, train_u8, dev, undrawn) if master else {}
    barrier(world)  # the ranks leave together: a process group torn down under a busy rank aborts it
    return t.model, metrics


def load_split(config, world, dev):
    """(train, val) uint8 images, each split one tensor on the device."""
    train_u8, val_u8 = load_dataset(config["dataset"], config["data_dir"])
    train_u8 = head(train_u8, config["max_train_images"])
    if len(train_u8) < world:
        raise UserError(f"{len(train_u8)} training images cannot be shared by {world} processes")
    return train_u8.to(dev), val_u8.to(dev)


def build_training(config, n_train, rank, world, dev):
    """The model, its optimizer and schedule, and the data-order generator, from the seed."""
    seed_everything(config["seed"])
    model_args = model_args_from_config(config)
    model = build_model(model_args).to(dev, memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config["epochs"], batches_per_epoch(n_train, world, config["batch_size"])[0])
    data_gen = torch.Generator().manual_seed(config["seed"])
    torch.manual_seed(config["seed"] + rank)  # per-rank noise (DDCL, FSP, the VAE); the same init above
    return Training(model, model_args, optimizer, scheduler, data_gen)


def resume_training(t, state, config, run, rank, world):
    """Load a checkpoint's state into `t` -> (epochs done, best objective, metrics rows, run id)."""
    master = rank == 0
    try:
        t.model.load_state_dict(state["model"])
        restore(t.optimizer, t.scheduler, state, config)
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"{config['resume']}: its weights or optimizer state do not match its model_args "
                              f"({str(err).strip().splitlines()[0][:160]})") from None
    start, best = state["epoch"], state["best_val_objective"]
    t.data_gen.set_state(state["data_rng"])
    if len(state["rng"]) == world:
        set_rng_state(state["rng"][rank])
    elif master:
        print(f"warning: {config['resume']} was written by {len(state['rng'])} process(es), this run has {world}: "
              "random streams restart from the seed (resume is not bitwise exact)", file=sys.stderr)
    rows = [r for r in read_jsonl(run.metrics) if r["epoch"] <= start]
    data_then = (state["config"]["dataset"], state["config"]["data_dir"])
    if data_then != (config["dataset"], config["data_dir"]):
        best = math.inf
        if master:
            print(f"warning: continuing on other data than {config['resume']} was trained on {data_then}: the best "
                  "checkpoint is chosen anew from here", file=sys.stderr)
    if master:
        print(f"resumed {config['resume']} at epoch {start}")
    return start, best, rows, state["run_id"]


def announce(config, run, run_id, start):
    print("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
    save_json(run.output("config.json"), {**config, "run_id": run_id})
    if start >= config["epochs"]:
        print(f"nothing to train: the checkpoint is at epoch {start} and epochs={config['epochs']}; raise --epochs")


def save_epoch(run, t, config, run_id, epoch, metrics, best, rng):
    """Write the epoch's checkpoints (last; best when the objective improved; every n epochs) -> the
    best objective so far. The objective is MSE + rate term: MSE alone favours high rates."""
    improved = metrics["loss"] < best
    best = min(best, metrics["loss"])
    state = {"model": t.model.state_dict(), "model_args": t.model_args, "config": config, "run_id": run_id,
             "epoch": epoch, "optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict(),
             "best_val_objective": best, "metrics": metrics, "rng": rng, "data_rng": t.data_gen.get_state()}
    if improved:
        save_checkpoint(run.checkpoint("best"), state)
    if config["checkpoint_every"] and epoch % config["checkpoint_every"] == 0:
        save_checkpoint(run.checkpoint(f"epoch_{epoch}"), state)
    save_checkpoint(run.checkpoint("last"), state)
    return best


def wrap_model(model, world, dev):
    """DDP around the module that checkpoints save unwrapped."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def draw_pictures(run, model, grid, epoch, metrics, rows, epochs):
    """The epoch's grid and, every CURVES_EVERY epochs and at the end, the curves -> [(path, why)]
    of those that failed. Pictures never cost a checkpoint: they are drawn after it is saved, and a
    failure is a warning."""
    with torch.inference_mode():
        recon = model.eval()(grid).recon
    caption = (f"{run.name} | epoch {epoch} | these 8: {psnr_per_image(recon, grid).mean():.2f} dB | "
               f"val: {metrics['psnr']:.2f} dB, {metrics['bits']:.1f} bits/img ({metrics['rate_source']})")
    drawings = [(run.grid(epoch), lambda: save_grid(run.grid(epoch), grid, recon, GRID_SCALE, caption))]
    if len(rows) > 1 and (epoch % CURVES_EVERY == 0 or epoch == epochs):
        drawings.append((run.output("curves.png"), lambda: plot_curves(run.output("curves.png"), rows, run.name)))
    failed = []
    for path, draw in drawings:
        try:
            draw()
        except (UserError, OSError, ValueError, RuntimeError) as err:
            failed.append((path, str(err)[:160]))
            print(f"warning: could not draw {path} ({failed[-1][1]}); the checkpoint of epoch {epoch} is saved", file=sys.stderr)
    return failed


def finish(run, val_u8, prior_u8, train_u8, dev, undrawn=()):
    """Score the best checkpoint on the whole validation split (epochs were ranked on a subset),
    store those metrics in it and {run}_final.json, warn if the run collapsed, say what was written
    and which pictures could not be drawn."""
    path = run.checkpoint("best")
    if not os.path.isfile(path):
        return {}
    state = read_checkpoint(path, map_location=dev)
    model = build_model(state["model_args"]).to(dev)
    model.load_state_dict(state["model"])
    metrics = state["metrics"]
    if metrics["images"] < len(val_u8):
        metrics = evaluate(model, val_u8, prior_u8, store_prior=True)
        save_checkpoint(path, {**state, "metrics": metrics})
    save_json(run.output("final.json"), {"checkpoint": path, "epoch": state["epoch"], **metrics})
    mean_image = to_float_images(train_u8[:RATE_PRIOR_IMAGES]).mean(0, keepdim=True)
    floor = psnr_per_image(mean_image.expand(len(val_u8), -1, -1, -1), to_float_images(val_u8)).mean().item()
    if metrics["psnr"] < floor + COLLAPSE_MARGIN_DB:
        usage = f", {metrics['codebook_usage']:.1f}% of codes used" if "codebook_usage" in metrics else ""
        print(f"warning: the run collapsed: {metrics['psnr']:.2f} dB{usage}, where sending nothing (the mean training "
              f"image) gives {floor:.2f} dB; try a lower --lr or --muon_lr", file=sys.stderr)
    files = os.path.join(run.output_dir, run.name + "_*")
    wrote = (f"grids, metrics and curves in {files}" if not undrawn else
             f"metrics in {files}; {len(undrawn)} picture(s) could not be drawn (first: {undrawn[0][0]}: {undrawn[0][1]})")
    print(f"done: {path} (epoch {state['epoch']}): {metrics['psnr']:.2f} dB, {metrics['bits']:.1f} bits/image "
          f"({metrics['rate_source']}) on all {metrics['images']} validation images; {wrote}", flush=True)
    return metrics


def log_line(epoch, epochs, train_loss, metrics, seconds, left=0.0):
    parts = [f"epoch {epoch}/{epochs}", f"train_loss {train_loss:.5f}", f"val_mse {metrics['mse']:.5f}",
             f"psnr {metrics['psnr']:.2f} dB", f"ssim {metrics['ssim']:.3f}", f"aux {metrics['aux_loss']:.4f}",
             f"bits/img {metrics['bits']:.1f} ({metrics['rate_source']}; estimate {metrics['bits_estimate']:.1f})"]
    if "codebook_usage" in metrics:
        parts.append(f"usage {metrics['codebook_usage']:.1f}% perplexity {metrics['perplexity']:.1f}")
    line = " | ".join(parts) + f" | {metrics['images']} val images | {seconds:.1f}s"
    return line + (f" | about {duration(left)} left" if epoch < epochs else "")


def duration(seconds):
    """'45 s', '12 min', '2 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def interrupted(signum, epoch, step, steps, run):
    done = epoch - 1
    where = (f"epoch {done} is saved in {run.checkpoint('last')}. Resume with: python train.py "
             f"--resume={run.checkpoint('last')}" if done > 0 else "no epoch had finished, so there is nothing to resume")
    return Stop(f"{signal.Signals(signum).name}: stopped in epoch {epoch} after step {step}/{steps}; {where}",
                code=128 + signum)


def help_text():
    with open(__file__) as f:
        block = f.read().split("# " + "-" * 77 + " config\n")[1].split("# " + "-" * 77 + "\n")[0]
    return __doc__.strip() + "\n\nconfig knobs (defaults):\n" + block


def main(argv):
    stop_on_sigterm()
    config, state = resolve_config(argv, DEFAULT_CONFIG)
    check_torchvision()  # the epoch grids and CIFAR-10 need it working beside this torch
    train(config, state)


if __name__ == "__main__":
    cli(main, help_text())
