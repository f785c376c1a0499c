"""Train a convolutional autoencoder with a pluggable discrete bottleneck on CIFAR-10.

    python train.py                                   # DDCL on CIFAR-10 with the defaults below
    python train.py --quantizer=fsq --epochs=5 --fsq_levels="[8,5,5,5]"
    python train.py --quantizer=fsq --entropy_model=learned --rate_weight=0.1   # train against learned bits
    python train.py --resume=last                     # continue the newest interrupted run
    torchrun --standalone --nproc_per_node=2 train.py # data-parallel on 2 GPUs (or CPU processes)

Edit the config block below or override any knob as --key=value (a Python literal, checked
against the default's type); `python train.py --help` lists them. Each epoch writes a grid, a
metrics row and checkpoints (see README.md).

Measured (README, "Training recipe"): the defaults, 50 epochs on 20,000 32x32 crops of 29
photographs (python scripts/make_patches.py /tmp/photos --set=wallpapers), 2 CPU cores, one
thread a run, about 10 minutes, PSNR on 2,000 crops of 6 other photos: FSQ [8,6,6,5] 24.76 dB
at 154.0 range-coded bits per image, DDCL 25.10 dB at 172.4 bits (--seed=1338: 24.72 dB at 154.6,
25.06 dB at 173.4; the seed's recipe: 23.79 and 24.42 dB, DDCL at 184.9 bits); after --epochs=10
(under 2 minutes) 24.52 dB at 153.1 bits and 24.89 dB at 176.0 bits.
Command: python train.py --dataset=folder --data_dir=/tmp/photos --quantizer=fsq (or ddcl). The
recipe (Muon for the hidden filters at 0.02 and Adam for the rest at 3e-3, batch 64, warmup +
cosine, flips, quarter turns and colour gains) and why: README, "Training recipe"; the
bottlenecks compared at equal bits: README, "Comparing quantizers".
"""
import functools
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from errors import CheckpointError, ConfigError, UserError
from evaluate import EVAL_BATCH_SIZE, evaluate
from metrics import psnr_per_image
from models import ABSENT_KEY_MEANS, build_model, model_args_from_config
from optim import MuonAdam
from quantizers import implied_latent_dim
from plots import plot_curves, save_grid
from process import (RunLock, SignalFlag, all_reduce_mean, barrier, gather, setup_distributed,
                     teardown_distributed)
from utils import (check_dataset, coerce, ensure_writable_dir, get_rng_state, head, load_dataset, parse_overrides,
                   read_checkpoint, read_jsonl, run_label, save_checkpoint, save_json, save_jsonl, seed_everything,
                   set_rng_state, to_float_images, use_bf16)

# ----------------------------------------------------------------------------- config
quantizer = "ddcl"  # bottleneck: "fsq", "ddcl", "vq", "none" (no bottleneck) or "vae" (Gaussian)
run_name = ""  # names outputs and checkpoints; "" means the quantizer's name
dataset = "cifar10"  # "cifar10" (torchvision download into data_dir) or "folder" (data_dir/train, data_dir/test)
data_dir = "data"  # where CIFAR-10 lives or is downloaded to, or the image folder's root
output_dir = "outputs"  # grids, metrics, curves and the run's config
checkpoint_dir = "checkpoints"  # {run}_vae_best.pt, {run}_vae_last.pt, {run}_vae_epoch_{n}.pt
batch_size = 64  # images per optimizer step (per process under torchrun); 64, not 128: more steps per CPU second (README: Training recipe)
epochs = 50  # total epochs; the learning-rate schedule ends here; a resumed run continues up to it
optimizer = "muon"  # "muon": Muon for the hidden convolution filters, Adam for the rest (optim.py); "adam": Adam for all (README: Training recipe)
muon_lr = 0.02  # peak Muon learning rate of the hidden convolution filters (optimizer="muon"); the schedule scales it like lr
lr = 3e-3  # peak Adam learning rate, reached after the warmup (README: "Training recipe" for why not 3e-4)
beta2 = 0.999  # Adam's second-moment decay (beta1 0.9); with --optimizer=adam, ~10-epoch runs do better with --lr=5e-3 --beta2=0.95 (README: Training recipe)
lr_schedule = "cosine"  # "cosine" (linear warmup, then cosine decay to min_lr at the last step) or "constant"
warmup_epochs = 0.25  # linear warmup of the learning rate from ~0 to lr over this many epochs
min_lr = 0.0  # learning rate at the last step of the cosine schedule (Muon's ends at the same fraction of muon_lr)
seed = 1337  # seeds torch, numpy, python and the data order
device = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
latent_dim = 4  # latent channels C of the 4x4 grid; FSQ sets it to len(fsq_levels)
channels = [16, 32, 64]  # encoder widths at 16, 8 and 4 px (the decoder mirrors them)
res_blocks = 0  # residual blocks at each of the 8 and 4 px scales, in the encoder and the decoder
fsq_levels = [8, 6, 6, 5]  # FSQ levels per channel: prod(levels) codes per position
ddcl_delta = 1 / 15  # DDCL quantization step (dither width) delta
ddcl_comm_weight = 1e-3  # weight of DDCL's communication cost log2(2|z|/delta + 1)
vq_codebook_size = 1024  # VQ codes per position
vq_decay = 0.99  # VQ EMA decay of the codebook
vq_commitment_weight = 0.25  # VQ commitment loss weight
vq_dead_code_threshold = 1  # VQ: re-seed codes whose moving average of uses per batch falls below this (0 = never); 1, not 2, at batch 64 (README: Comparing quantizers)
vae_kl_weight = 1e-3  # Gaussian VAE: weight of the KL term (nats per latent value)
entropy_model = "fitted"  # "fitted" (a histogram fitted after training), "learned" (a prior trained with the model; fsq, vq, ddcl) or "context" (learned, each value predicted from those sent before it; fsq, ddcl)
rate_weight = 0.01  # "learned"/"context": loss per bit per pixel, loss = MSE + rate_weight * bits / 1024 (= 1 / (255^2 lambda) in CompressAI's terms)
prior_lr_scale = 10.0  # "learned"/"context": the prior's learning rate is this times lr, so it keeps up with the encoder (README: Learned entropy model)
aux_warmup_epochs = 1.0  # ramp the auxiliary loss (DDCL cost, VQ commitment, KL) from 0 over this many epochs
hflip = True  # flip a random half of each training batch left-right (augmentation; README: Training recipe)
rotate = True  # also turn each training image by a random multiple of 90 degrees (with hflip: one of the square's 8 symmetries)
color_gain = 0.2  # multiply each training image's R, G and B by gains drawn from [1 - c, 1 + c], clipped to [0, 1] (white-balance variety; 0 = off)
max_train_images = 0  # use only the first N training images (0 = all): quick experiments
eval_images = 2000  # validation images evaluated after each epoch (0 = all); the best checkpoint gets the whole split at the end
eval_batch_size = EVAL_BATCH_SIZE  # images per evaluation batch (also fixes DDCL's per-batch dither seeds)
rate_prior_images = 5000  # training images that fit the rate prior (0 = all)
checkpoint_every = 10  # also keep {run}_vae_epoch_{n}.pt every n epochs (0 = never)
grid_scale = 4  # nearest-neighbour upscaling of the per-epoch grid PNG (4: 552 px wide)
curves_every = 5  # redraw {run}_curves.png every n epochs and after the last (0 = never; a draw costs ~0.5 s on a laptop CPU)
log_interval = 50  # steps between progress updates (each one reads the loss back from the device)
resume = ""  # "" (fresh run), a checkpoint path, or "last" (the run's newest checkpoint)
compile = False  # torch.compile the model (no gain measured on a 2-core CPU; GPUs not yet measured)
amp = "auto"  # bf16 autocast: "auto" (CUDA, and CPUs with native bf16), "bf16" (everywhere), "off"
channels_last = True  # channels-last memory format for the convolutions (see README: Speed)
# -----------------------------------------------------------------------------
DEFAULT_CONFIG = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
                  and isinstance(v, (bool, int, float, str, list))}
ARCHITECTURE_KEYS = tuple(model_args_from_config(DEFAULT_CONFIG))
# What a checkpoint written before a knob existed meant by its absence: the architecture keys'
# table that build_model applies, plus the recipe knobs, so a resumed run keeps the model and the
# recipe it was trained with, not today's defaults.
ABSENT_CONFIG_MEANS = {**ABSENT_KEY_MEANS, "hflip": False, "rotate": False, "beta2": 0.999, "optimizer": "adam",
                       "color_gain": 0.0}
GRID_IMAGES = 8  # a 4x4 grid: 8 originals on top, their reconstructions below
AMP_CHOICES = ("auto", "bf16", "off")
LR_SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("muon", "adam")


class Stop(UserError):
    """Training stopped on purpose (a signal) or because it cannot go on (a non-finite loss)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- config checks

def validate_config(config, given=()):
    """Stop with one line on any value that cannot work; fill in derived values."""
    for key in ("batch_size", "eval_batch_size", "log_interval", "grid_scale"):
        if config[key] <= 0:
            raise ConfigError(f"{key}={config[key]} must be > 0")
    for key in ("epochs", "checkpoint_every", "curves_every", "max_train_images", "rate_prior_images",
                "aux_warmup_epochs", "warmup_epochs", "eval_images"):
        if config[key] < 0:
            raise ConfigError(f"{key}={config[key]} must be >= 0")
    if not (config["prior_lr_scale"] > 0 and math.isfinite(config["prior_lr_scale"])):
        raise ConfigError(f"prior_lr_scale={config['prior_lr_scale']} must be a finite number > 0")
    for key in ("lr", "muon_lr"):
        if not (config[key] > 0 and math.isfinite(config[key])):
            raise ConfigError(f"{key}={config[key]} must be a finite number > 0")
    if config["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"optimizer={config['optimizer']!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not 0 <= config["color_gain"] < 1:
        raise ConfigError(f"color_gain={config['color_gain']} must be in [0, 1) (gains are drawn from [1 - c, 1 + c]), e.g. 0.2")
    if not 0 <= config["beta2"] < 1:
        raise ConfigError(f"beta2={config['beta2']} must be in [0, 1) (Adam's second-moment decay), e.g. 0.999")
    if not 0 <= config["min_lr"] <= config["lr"]:
        raise ConfigError(f"min_lr={config['min_lr']} must be between 0 and lr={config['lr']}")
    if config["lr_schedule"] not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule={config['lr_schedule']!r}; choose one of {', '.join(LR_SCHEDULES)}")
    if config["amp"] not in AMP_CHOICES:
        raise ConfigError(f"amp={config['amp']!r}; choose one of {', '.join(AMP_CHOICES)}")
    check_dataset(config["dataset"])
    implied = implied_latent_dim(config)  # FSQ: one channel per level
    if implied is not None and "latent_dim" not in given:
        config["latent_dim"] = implied  # a contradicting --latent_dim is refused by build_model
    build_model(model_args_from_config(config))  # every architecture check, before any data is read
    return config


def resolve_config(argv):
    """Defaults + --key=value overrides (+ the resumed checkpoint's config) -> checked config."""
    config, given = parse_overrides(argv, DEFAULT_CONFIG)
    if config["resume"]:
        path = resume_path(config, given)
        saved = {**ABSENT_CONFIG_MEANS, **read_checkpoint(path)["config"]}
        if "context_prior_fitted_to" in saved:
            raise CheckpointError(f"{path} holds a context prior fitted after training (scripts/fit_context_prior.py): it "
                                  f"evaluates and compresses but does not train on; resume {saved['context_prior_fitted_to']}")
        unknown = sorted(set(saved) - set(DEFAULT_CONFIG))
        if unknown:
            raise CheckpointError(f"{path} was written with config keys this train.py does not know: {', '.join(unknown)}")
        try:
            saved = {k: coerce(k, v, DEFAULT_CONFIG[k]) for k, v in saved.items()}
        except ConfigError as err:
            raise CheckpointError(f"{path} holds an invalid config: {err}") from None
        changed = [k for k in ARCHITECTURE_KEYS if k in given and config[k] != saved[k]]
        if changed:
            raise ConfigError(f"cannot resume {path} with a different architecture: "
                              + ", ".join(f"{k}={config[k]!r} (checkpoint: {saved[k]!r})" for k in changed))
        if "optimizer" in given and config["optimizer"] != saved["optimizer"]:
            raise ConfigError(f"cannot resume {path} with optimizer={config['optimizer']!r}: it holds the state of "
                              f"optimizer={saved['optimizer']!r}; drop --optimizer, or start a new run without --resume")
        config = {**DEFAULT_CONFIG, **saved, **{k: config[k] for k in given}, "resume": path}
    return validate_config(config, given)


def checkpoint_path(config, tag):
    return os.path.join(config["checkpoint_dir"], f"{run_label(config)}_vae_{tag}.pt")


def resume_path(config, given):
    """`resume` as a path; "last" is the run's last checkpoint, or the newest one in checkpoint_dir
    when neither run_name nor quantizer was given."""
    if config["resume"] != "last":
        return config["resume"]
    if given & {"run_name", "quantizer"}:
        path = checkpoint_path(config, "last")
        if not os.path.isfile(path):
            raise CheckpointError(f"--resume=last: no {path}; train first or pass a checkpoint path")
        return path
    folder = config["checkpoint_dir"]
    found = [os.path.join(folder, f) for f in os.listdir(folder)] if os.path.isdir(folder) else []
    found = [p for p in found if p.endswith("_vae_last.pt")]
    if not found:
        raise CheckpointError(f"--resume=last: no *_vae_last.pt in {folder!r}; train first or pass a checkpoint path")
    return max(found, key=os.path.getmtime)


# ----------------------------------------------------------------------------- training

def batches_per_epoch(n, world, batch_size):
    """(full batches per epoch, batch size) for one rank: each rank gets n // world images."""
    per_rank = n // world
    batch = min(batch_size, per_rank)
    return per_rank // batch, batch


def epoch_order(n, generator, rank, world, batch_size):
    """This rank's shuffled indices for one epoch, the number of full batches and the batch size.
    Every rank draws the same permutation (same generator state) and takes every world-th index."""
    perm = torch.randperm(n, generator=generator)[rank::world]
    return (perm[:n // world], *batches_per_epoch(n, world, batch_size))


def log_line(epoch, epochs, train_loss, metrics, seconds):
    parts = [f"epoch {epoch}/{epochs}", f"train_loss {train_loss:.5f}", f"val_mse {metrics['mse']:.5f}",
             f"psnr {metrics['psnr']:.2f} dB", f"ssim {metrics['ssim']:.3f}", f"aux {metrics['aux_loss']:.4f}",
             f"bits/img {metrics['bits']:.1f} ({metrics['rate_source']}; estimate {metrics['bits_estimate']:.1f})"]
    if "codebook_usage" in metrics:
        parts.append(f"usage {metrics['codebook_usage']:.1f}% perplexity {metrics['perplexity']:.1f}")
    return " | ".join(parts) + f" | {metrics['images']} val images | {seconds:.1f}s"


def lr_factor(step, total_steps, warmup_steps, schedule, min_ratio):
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup over
    `warmup_steps`, then a half cosine from 1 to `min_ratio` at the last step (Loshchilov & Hutter,
    "SGDR", ICLR 2017, without restarts)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(config):
    """Run training with a checked config; returns (the unwrapped model, last validation metrics).
    Under torchrun every rank returns its own model; only rank 0 evaluates (others get {})."""
    rank, world, dev = setup_distributed(config["device"])
    try:
        for key in ("output_dir", "checkpoint_dir"):
            ensure_writable_dir(config[key], key)
        lock = os.path.join(config["checkpoint_dir"], f".{run_label(config)}.lock")
        with RunLock(lock, f"run {run_label(config)!r}") if rank == 0 else nullcontext():
            return train_loop(config, rank, world, dev)
    finally:
        teardown_distributed(world)


def train_loop(config, rank, world, dev):
    master = rank == 0
    run = run_label(config)
    train_u8, val_u8 = load_dataset(config["dataset"], config["data_dir"])
    train_u8 = head(train_u8, config["max_train_images"])
    if len(train_u8) < world:
        raise UserError(f"{len(train_u8)} training images cannot be shared by {world} processes")
    train_u8, val_u8 = train_u8.to(dev), val_u8.to(dev)  # the whole split lives on the device
    prior_u8 = head(train_u8, config["rate_prior_images"])
    epoch_val_u8 = head(val_u8, config["eval_images"])  # a fixed subset
    grid = to_float_images(val_u8[:GRID_IMAGES])  # fixed validation images shown every epoch

    seed_everything(config["seed"])
    model_args = model_args_from_config(config)
    raw_model, optimizer, memory_format = build_training(model_args, config, dev)
    data_gen = torch.Generator().manual_seed(config["seed"])
    scheduler = build_scheduler(optimizer, config, batches_per_epoch(len(train_u8), world, config["batch_size"])[0])
    torch.manual_seed(config["seed"] + rank)  # per-rank noise (dither, VAE sampling); same init above
    start_epoch, best_val, rows = 0, math.inf, []
    metrics_path = os.path.join(config["output_dir"], f"{run}_metrics.jsonl")
    if config["resume"]:
        state = read_checkpoint(config["resume"], map_location=dev)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:  # the loaded groups carry the checkpoint's betas; --beta2 wins
            group["betas"] = (group["betas"][0], config["beta2"])
        if "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_val = state["epoch"], state["best_val_objective"]
        data_gen.set_state(state["data_rng"])
        rng = state["rng"]
        if len(rng) == world:
            set_rng_state(rng[rank])
        elif master:
            print(f"warning: {config['resume']} was written by {len(rng)} process(es), this run has {world}: "
                  "random streams restart from the seed (resume is not bitwise exact)", file=sys.stderr)
        rows = [r for r in read_jsonl(metrics_path) if r["epoch"] <= start_epoch]
        if master:
            print(f"resumed {config['resume']} at epoch {start_epoch} (best val objective {best_val:.5f})")
    if master:
        print("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
        save_json(os.path.join(config["output_dir"], f"{run}_config.json"), config)

    step_fn = make_train_step(wrap_model(raw_model, config, dev, world), optimizer, scheduler, config, dev)

    metrics = state["metrics"] if config["resume"] else {}
    if start_epoch >= config["epochs"] and master:
        print(f"nothing to train: the checkpoint is at epoch {start_epoch} and epochs={config['epochs']}; "
              f"raise --epochs to train further")
    with SignalFlag() as flag:
        for epoch in range(start_epoch + 1, config["epochs"] + 1):
            t0 = time.time()
            raw_model.train()
            order, steps, batch = epoch_order(len(train_u8), data_gen, rank, world, config["batch_size"])
            loss_sum, first_bad, done = train_epoch(step_fn, train_u8, order.to(dev), steps, batch, memory_format,
                                                    epoch, config, stop=lambda: flag.signum is not None, show=master,
                                                    lr=lambda: optimizer.param_groups[0]["lr"])
            if flag.signum is not None:
                raise interrupted(flag.signum, epoch, done, steps, config)
            check_finite(first_bad, epoch, steps, checkpoint_path(config, "best"), config)
            train_loss = all_reduce_mean(loss_sum / steps, world).item()
            rng = gather(get_rng_state(), world)
            if master:
                metrics = evaluate(raw_model, epoch_val_u8, prior_u8, config["eval_batch_size"])
                with torch.inference_mode():
                    recon = raw_model.eval()(grid)[0]
                caption = (f"{run} | epoch {epoch} | these 8: {psnr_per_image(recon, grid).mean():.2f} dB | "
                           f"val: {metrics['psnr']:.2f} dB, {metrics['bits']:.1f} bits/img ({metrics['rate_source']})")
                save_grid(os.path.join(config["output_dir"], f"{run}_epoch_{epoch:03d}.png"), grid, recon,
                          config["grid_scale"], caption)
                rows.append({"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                             "seconds": time.time() - t0, **{f"val_{k}": v for k, v in metrics.items()}})
                save_jsonl(metrics_path, rows)
                if config["curves_every"] and (epoch % config["curves_every"] == 0 or epoch == config["epochs"]):
                    plot_curves(os.path.join(config["output_dir"], f"{run}_curves.png"), rows)
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch,
                         "best_val_objective": min(best_val, metrics["loss"]), "config": config, "model_args": model_args,
                         "metrics": metrics, "rng": rng, "data_rng": data_gen.get_state()}
                if metrics["loss"] < best_val:  # the objective, MSE + rate term: MSE alone favours high-rate epochs
                    save_checkpoint(checkpoint_path(config, "best"), state)
                if config["checkpoint_every"] and epoch % config["checkpoint_every"] == 0:
                    save_checkpoint(checkpoint_path(config, f"epoch_{epoch}"), state)
                save_checkpoint(checkpoint_path(config, "last"), state)
                print(log_line(epoch, config["epochs"], train_loss, metrics, time.time() - t0), flush=True)
                best_val = min(best_val, metrics["loss"])
            barrier(world)
            if flag.signum is not None:
                raise interrupted(flag.signum, epoch + 1, 0, steps, config)
    if master and len(epoch_val_u8) < len(val_u8) and os.path.isfile(checkpoint_path(config, "best")):
        metrics = evaluate_best_on_whole_split(config, val_u8, prior_u8, dev)
    return raw_model, metrics


def evaluate_best_on_whole_split(config, val_u8, prior_u8, dev):
    """Per-epoch metrics come from a fixed validation subset (they only rank the epochs); the best
    checkpoint is scored once on the whole split, and those numbers replace its metrics, go into
    {run}_final.json and are returned."""
    path = checkpoint_path(config, "best")
    state = read_checkpoint(path, map_location=dev)
    model = build_model(state["model_args"]).to(dev)
    model.load_state_dict(state["model"])
    t0 = time.time()
    metrics = evaluate(model, val_u8, prior_u8, config["eval_batch_size"])
    save_checkpoint(path, {**state, "metrics": metrics})
    save_json(os.path.join(config["output_dir"], f"{run_label(config)}_final.json"),
              {"checkpoint": path, "epoch": state["epoch"], **metrics})
    print(f"best checkpoint (epoch {state['epoch']}) on all {len(val_u8)} validation images: "
          f"psnr {metrics['psnr']:.2f} dB | ssim {metrics['ssim']:.3f} | bits/img {metrics['bits']:.1f} "
          f"({metrics['rate_source']}) | {time.time() - t0:.1f}s", flush=True)
    return metrics


def build_training(model_args, config, dev):
    """(model, optimizer, memory format) on `dev`, as every training run builds them. Parameter
    groups, in this order (a checkpoint's optimizer state follows it): the model's parameters at
    lr (Adam); with optimizer="muon" the hidden convolution filters of the encoder and decoder at
    muon_lr (Muon) instead; a learned prior's parameters at prior_lr_scale x lr (Adam). The schedule
    scales every group alike."""
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    model = build_model(model_args).to(dev, memory_format=memory_format)
    prior = model.quantizer.prior
    muon = config["optimizer"] == "muon"
    convs = [p for part in (model.encoder, model.decoder) for p in part.parameters() if p.dim() == 4]
    # Muon takes the hidden layers; the first (reads pixels) and last (writes them) stay with Adam,
    # as the paper advises (measured: level with Muon on all of them, README: Training recipe)
    filters = convs[1:-1] if muon else []
    taken = {id(p) for p in filters}
    groups = [{"params": [p for n, p in model.named_parameters()
                          if not n.startswith("quantizer.prior.") and id(p) not in taken]}]
    if filters:
        groups.append({"params": filters, "lr": config["muon_lr"], "muon": True})
    if prior is not None:
        groups.append({"params": list(prior.parameters()), "lr": config["lr"] * config["prior_lr_scale"]})
    optimizer = (MuonAdam if muon else torch.optim.Adam)(groups, lr=config["lr"], betas=(0.9, config["beta2"]))
    return model, optimizer, memory_format


def build_scheduler(optimizer, config, steps_per_epoch):
    """Per-step LambdaLR of the schedule in `config` over `epochs` x `steps_per_epoch` steps. Its
    state (the step count) goes into every checkpoint, so a resumed run continues the same curve;
    resuming with another `epochs` re-plans the rest of the decay towards the new end."""
    total = config["epochs"] * steps_per_epoch
    warmup = round(config["warmup_epochs"] * steps_per_epoch)
    min_ratio = config["min_lr"] / config["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, config["lr_schedule"], min_ratio))


def wrap_model(raw_model, config, dev, world):
    """torch.compile and DDP wrappers around the module that checkpoints save unwrapped."""
    model = torch.compile(raw_model) if config["compile"] else raw_model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return model


def make_train_step(model, optimizer, scheduler, config, dev):
    """step(x, aux_weight) -> detached loss: forward, backward, update and lr step, with no host sync."""
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16(config["amp"], dev) else nullcontext()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def step(x, aux_weight):
        with autocast:
            out = model(x)
        loss = F.mse_loss(out.recon.float(), x) + aux_weight * out.aux_loss.float()
        optimizer.zero_grad(set_to_none=True)
        (loss + out.prior_loss).backward()  # the prior's own loss reaches only the prior (quantizers.py)
        optimizer.step()
        scheduler.step()
        return loss.detach()

    return step


class Progress:
    """Progress within an epoch: a tqdm bar on a terminal; plain lines every `log_interval` steps
    when stdout is a file or a pipe (a bar would fill a log with redraws)."""

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


def train_epoch(step_fn, images_u8, order, steps, batch, memory_format, epoch, config, stop=lambda: False, show=True,
                lr=lambda: float("nan")):
    """One pass over `order` (device indices into the uint8 images on the device).

    Returns (loss sum, first non-finite step or -1, steps done), all but the last on the device:
    the host reads the loss back only every `log_interval` steps, for the progress report."""
    loss_sum = torch.zeros((), device=images_u8.device)
    first_bad = torch.full((), -1, device=images_u8.device, dtype=torch.long)
    progress = Progress(epoch, steps, show)
    done = 0
    for step in range(steps):
        x = to_float_images(images_u8[order[step * batch:(step + 1) * batch]])
        x = random_gains(random_symmetry(x, config["hflip"], config["rotate"]), config["color_gain"])
        x = x.contiguous(memory_format=memory_format)
        loss = step_fn(x, aux_ramp(epoch, step, steps, config["aux_warmup_epochs"]))
        loss_sum += loss
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        done = step + 1
        if done % config["log_interval"] == 0 or done == steps:
            check_finite(first_bad, epoch, steps, checkpoint_path(config, "best"), config)
            progress.update(done, loss_sum.item() / done, lr())
        if stop():
            break
    progress.close()
    return loss_sum, first_bad, done


def random_hflip(x):
    """(B, 3, H, W) -> the same batch with a random half of the images mirrored left-right. Draws
    from the global RNG of x's device, whose state every checkpoint stores (resume stays exact)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@functools.lru_cache(maxsize=None)
def _symmetry_index(size, device):
    """(8, size * size): for symmetry k of the square (mirrored left-right if k >= 4, then k % 4
    quarter turns), the source pixel of every output pixel, row-major."""
    grid = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([torch.rot90(grid.flip(1) if k >= 4 else grid, k % 4, (0, 1)).reshape(-1) for k in range(8)])


def random_symmetry(x, hflip, rotate):
    """(B, 3, S, S) -> the batch with each image mirrored left-right (hflip) and/or turned by a
    multiple of 90 degrees (rotate), drawn per image: with both, uniformly one of the 8 symmetries
    of the square (the dihedral group D4: an up-down flip is a left-right flip and a half turn).
    Why: eight views of every training crop; the held-out photos gain once the model starts to fit
    its training photos (README: Training recipe, measured at 50 epochs). One gather over a
    precomputed pixel permutation: 0.5 ms per batch of 128 on the 2-core CPU, where rot90 and
    torch.where per symmetry took 3.7 ms (the training step: ~22 ms).
    Draws from the global RNG of x's device, whose state every checkpoint stores."""
    if not rotate:  # flips alone keep their own draws, so rotate=False repeats earlier runs bit for bit
        return random_hflip(x) if hflip else x
    b, c, h, w = x.shape
    k = torch.randint(0, 8 if hflip else 4, (b,), device=x.device)  # (B,) symmetry of each image
    source = _symmetry_index(h, x.device)[k]  # (B, S * S)
    return x.reshape(b, c, h * w).gather(2, source[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


def random_gains(x, spread):
    """(B, 3, S, S) in [0, 1] -> each image's R, G and B multiplied by its own gains, drawn uniformly
    from [1 - spread, 1 + spread] and clipped back to [0, 1]: the white balance of another camera
    or light. Why: after ~20 epochs the held-out PSNR flattens while the training MSE keeps
    falling, and flips and turns vary only the geometry; 0.2 added 0.09-0.16 dB at 50 epochs
    (README: Training recipe). Draws from the global RNG of x's device, whose state every
    checkpoint stores."""
    if spread <= 0:  # off: no draw, so color_gain=0 repeats earlier runs bit for bit
        return x
    gains = 1 + spread * (2 * torch.rand(x.shape[0], x.shape[1], 1, 1, device=x.device) - 1)  # (B, 3, 1, 1)
    return (x * gains).clamp_(0, 1)


def aux_ramp(epoch, step, steps, warmup_epochs):
    """Weight of the auxiliary loss: a linear ramp from 0 to 1 over `warmup_epochs`, so the rate
    term cannot collapse the latent before the decoder uses it (README: "The bottlenecks")."""
    if warmup_epochs <= 0:
        return 1.0
    return min(1.0, (epoch - 1 + step / steps) / warmup_epochs)


def check_finite(first_bad, epoch, steps, best_path, config):
    bad = int(first_bad)
    if bad >= 0:
        lower = f"--lr (now {config['lr']:g})"
        if config["optimizer"] == "muon":
            lower += f" or --muon_lr (now {config['muon_lr']:g})"
        raise Stop(f"loss became NaN or inf at epoch {epoch}, step {bad + 1}/{steps}; stopped without touching "
                   f"{best_path}. Try a lower {lower}", code=3)


def interrupted(signum, epoch, step, steps, config):
    name = signal.Signals(signum).name
    done = epoch - 1
    if done > 0:
        where = f"epoch {done} is saved in {checkpoint_path(config, 'last')}. Resume with: python train.py --resume={checkpoint_path(config, 'last')}"
    else:
        where = "no epoch had finished, so there is nothing to resume"
    return Stop(f"{name}: stopped in epoch {epoch} after step {step}/{steps}; {where}", code=128 + signum)


def print_help():
    with open(__file__) as f:
        source = f.read()
    block = source.split("# ----------------------------------------------------------------------------- config\n")[1].split("# ---")[0]
    print(__doc__.strip() + "\n\nconfig knobs (defaults):\n" + block)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print_help()
        return
    try:
        train(resolve_config(argv))
    except KeyboardInterrupt:  # before the training loop installs its own handler: nothing to save yet
        print("\ninterrupted before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)
    except Stop as err:
        print(f"\n{err}", file=sys.stderr)
        sys.exit(err.code)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
