"""Train a convolutional autoencoder with a pluggable discrete bottleneck on CIFAR-10.

    python train.py                                   # DDCL on CIFAR-10 with the defaults below
    python train.py --quantizer=fsq --epochs=5 --fsq_levels="[8,5,5,5]"
    python train.py --resume=last                     # continue the newest interrupted run
    torchrun --standalone --nproc_per_node=2 train.py # data-parallel on 2 GPUs (or CPU processes)

Edit the config block below or override any knob as --key=value (a Python literal, checked
against the default's type); `python train.py --help` lists them. Each epoch writes a grid, a
metrics row and checkpoints (see README.md).

Measured (README, "Comparing quantizers at equal rate"): 10 epochs of the defaults on 20,000
natural-image patches, 2 CPU cores, about 2 minutes a run: FSQ [8,5,5,5] 22.79 dB PSNR at 139.5
range-coded bits per image; DDCL (comm weight 1e-3) 23.72 dB at 183.6 bits, where its surrogate
claimed 98.7. Command: python train.py --dataset=folder --data_dir=/tmp/patches --epochs=10 ...,
then python evaluate.py checkpoints/*_best.pt.
"""
import math
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from evaluate import evaluate
from models import build_model, model_args_from_config
from quantizers import QUANTIZERS, ConfigError, UserError, implied_latent_dim
from utils import (CheckpointError, coerce, ensure_writable_dir, get_rng_state, load_dataset, parse_overrides, pick_device,
                   read_checkpoint, read_jsonl, save_checkpoint, save_figure, save_grid, save_json, save_jsonl,
                   seed_everything, set_rng_state, to_float_images)

# ----------------------------------------------------------------------------- config
quantizer = "ddcl"  # bottleneck: "fsq", "ddcl", "vq", "none" (no bottleneck) or "vae" (Gaussian)
run_name = ""  # names outputs and checkpoints; "" means the quantizer's name
dataset = "cifar10"  # "cifar10" (torchvision download into data_dir) or "folder" (data_dir/train, data_dir/test)
data_dir = "data"  # where CIFAR-10 lives or is downloaded to, or the image folder's root
output_dir = "outputs"  # grids, metrics, curves and the run's config
checkpoint_dir = "checkpoints"  # {run}_vae_best.pt, {run}_vae_last.pt, {run}_vae_epoch_{n}.pt
batch_size = 128  # images per optimizer step (per process under torchrun)
epochs = 50  # total epochs; a resumed run continues up to this number
lr = 3e-4  # Adam learning rate
seed = 1337  # seeds torch, numpy, python and the data order
device = "auto"  # "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:1", "mps"
latent_dim = 4  # latent channels C of the 4x4 grid; FSQ sets it to len(fsq_levels)
channels = [16, 32, 64]  # encoder widths at 16, 8 and 4 px (the decoder mirrors them)
fsq_levels = [8, 6, 6, 5]  # FSQ levels per channel: prod(levels) codes per position
ddcl_delta = 1 / 15  # DDCL quantization step (dither width) delta
ddcl_comm_weight = 1e-3  # weight of DDCL's communication cost log2(2|z|/delta + 1)
vq_codebook_size = 1024  # VQ codes per position
vq_decay = 0.99  # VQ EMA decay of the codebook
vq_commitment_weight = 0.25  # VQ commitment loss weight
vq_dead_code_threshold = 2  # VQ: re-seed codes whose EMA usage falls below this (0 = never)
vae_kl_weight = 1e-3  # Gaussian VAE: weight of the KL term (nats per latent value)
aux_warmup_epochs = 1.0  # ramp the auxiliary loss (DDCL cost, VQ commitment, KL) from 0 over this many epochs
max_train_images = 0  # use only the first N training images (0 = all): quick experiments
eval_batch_size = 500  # images per evaluation batch (also fixes DDCL's per-batch dither seeds)
rate_prior_images = 10000  # training images that fit the rate prior each epoch (0 = all)
checkpoint_every = 10  # also keep {run}_vae_epoch_{n}.pt every n epochs (0 = never)
log_interval = 50  # steps between progress-bar updates (each one reads the loss back from the device)
resume = ""  # "" (fresh run), a checkpoint path, or "last" (the run's newest checkpoint)
compile = False  # torch.compile the model (no gain measured on a 2-core CPU; GPUs not yet measured)
amp = "auto"  # bf16 autocast: "auto" (CUDA, and CPUs with native bf16), "bf16" (everywhere), "off"
channels_last = True  # channels-last memory format for the convolutions (see README: Speed)
# -----------------------------------------------------------------------------
DEFAULT_CONFIG = {k: v for k, v in globals().items() if not k.startswith("_") and k.islower()
                  and isinstance(v, (bool, int, float, str, list))}
ARCHITECTURE_KEYS = tuple(model_args_from_config(DEFAULT_CONFIG))
GRID_IMAGES = 8  # a 4x4 grid: 8 originals on top, their reconstructions below
AMP_CHOICES = ("auto", "bf16", "off")


class Stop(UserError):
    """Training stopped on purpose (a signal) or because it cannot go on (a non-finite loss)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- config checks

def validate_config(config, given=()):
    """Stop with one line on any value that cannot work; fill in derived values."""
    if config["quantizer"] not in QUANTIZERS:
        raise ConfigError(f"quantizer={config['quantizer']!r} is unknown; choose one of {', '.join(QUANTIZERS)}")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] <= 0:
            raise ConfigError(f"{key}={config[key]} must be > 0")
    for key in ("epochs", "checkpoint_every", "max_train_images", "rate_prior_images", "aux_warmup_epochs"):
        if config[key] < 0:
            raise ConfigError(f"{key}={config[key]} must be >= 0")
    if config["log_interval"] <= 0:
        raise ConfigError(f"log_interval={config['log_interval']} must be > 0")
    if not (config["lr"] > 0 and math.isfinite(config["lr"])):
        raise ConfigError(f"lr={config['lr']} must be a finite number > 0")
    if config["amp"] not in AMP_CHOICES:
        raise ConfigError(f"amp={config['amp']!r}; choose one of {', '.join(AMP_CHOICES)}")
    if config["dataset"] not in ("cifar10", "folder"):
        raise ConfigError(f"dataset={config['dataset']!r} is unknown; use 'cifar10' or 'folder'")
    implied = implied_latent_dim(config)
    if implied is not None:
        if "latent_dim" in given and config["latent_dim"] != implied:
            raise ConfigError(f"latent_dim={config['latent_dim']} but {config['quantizer']} implies latent_dim = {implied}; drop --latent_dim")
        config["latent_dim"] = implied
    build_model(model_args_from_config(config))  # every architecture check, before any data is read
    return config


def resolve_config(argv):
    """Defaults + --key=value overrides (+ the resumed checkpoint's config) -> checked config."""
    config, given = parse_overrides(argv, DEFAULT_CONFIG)
    if config["resume"]:
        path = resume_path(config, given)
        saved = read_checkpoint(path)["config"]
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
        config = {**DEFAULT_CONFIG, **saved, **{k: config[k] for k in given}, "resume": path}
    return validate_config(config, given)


def run_label(config):
    return config["run_name"] or config["quantizer"]


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


# ----------------------------------------------------------------------------- distributed

def setup_distributed(config):
    """(rank, world_size, device). DDP is on when torchrun sets RANK (as in nanoGPT)."""
    if int(os.environ.get("RANK", -1)) < 0:
        return 0, 1, pick_device(config["device"])
    import torch.distributed as dist

    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(config["device"])
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_reduce_mean(value, world):
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(value)
        value /= world
    return value


def gather(obj, world):
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- signals

class SignalFlag:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second one
    falls back to the default behaviour (stop at once)."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signum = signum
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- training

def epoch_order(n, generator, rank, world, batch_size):
    """This rank's shuffled indices for one epoch, and the number of full batches. Every rank
    draws the same permutation (same generator state) and takes every world-th index."""
    perm = torch.randperm(n, generator=generator)[rank::world]
    per_rank = n // world
    batch = min(batch_size, per_rank)
    return perm[:per_rank], per_rank // batch, batch


def plot_curves(path, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs_ = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs_, [r["train_loss"] for r in rows], label="train loss")
    axes[0].plot(epochs_, [r["val_loss"] for r in rows], label="val loss")
    axes[0].plot(epochs_, [r["val_mse"] for r in rows], label="val MSE")
    axes[0].set_yscale("log")
    axes[1].plot(epochs_, [r["val_psnr"] for r in rows], label="val PSNR (dB)")
    axes[2].plot(epochs_, [r["val_bits"] for r in rows], label=f"bits/image ({rows[-1]['val_rate_source']})")
    axes[2].plot(epochs_, [r["val_bits_estimate"] for r in rows], "--", label="quantizer's estimate")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(path, fig)
    plt.close(fig)


def log_line(epoch, config, train_loss, metrics, seconds):
    parts = [f"epoch {epoch}/{config['epochs']}", f"train_loss {train_loss:.5f}", f"val_mse {metrics['mse']:.5f}",
             f"psnr {metrics['psnr']:.2f} dB", f"ssim {metrics['ssim']:.3f}", f"aux {metrics['aux_loss']:.4f}",
             f"bits/img {metrics['bits']:.1f} ({metrics['rate_source']}; estimate {metrics['bits_estimate']:.1f})"]
    if "codebook_usage" in metrics:
        parts.append(f"usage {metrics['codebook_usage']:.1f}% perplexity {metrics['perplexity']:.1f}")
    return " | ".join(parts) + f" | {seconds:.1f}s"


def train(config):
    """Run training with a checked config; returns (the unwrapped model, last validation metrics).
    Under torchrun every rank returns its own model; only rank 0 evaluates (others get {})."""
    rank, world, dev = setup_distributed(config)
    try:
        return train_loop(config, rank, world, dev)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def train_loop(config, rank, world, dev):
    from tqdm import tqdm

    master = rank == 0
    run = run_label(config)
    for key in ("output_dir", "checkpoint_dir"):
        ensure_writable_dir(config[key], key)
    train_u8, val_u8 = load_dataset(config["dataset"], config["data_dir"])
    if config["max_train_images"]:
        train_u8 = train_u8[:config["max_train_images"]]
    if len(train_u8) < world:
        raise UserError(f"{len(train_u8)} training images cannot be shared by {world} processes")
    train_u8, val_u8 = train_u8.to(dev), val_u8.to(dev)  # the whole split lives on the device
    prior_u8 = train_u8[:config["rate_prior_images"]] if config["rate_prior_images"] else train_u8
    grid = to_float_images(val_u8[:GRID_IMAGES])  # fixed validation images shown every epoch

    seed_everything(config["seed"])
    model_args = model_args_from_config(config)
    raw_model, optimizer, memory_format = build_training(model_args, config, dev)
    data_gen = torch.Generator().manual_seed(config["seed"])
    torch.manual_seed(config["seed"] + rank)  # per-rank noise (dither, VAE sampling); same init above
    start_epoch, best_val, rows = 0, math.inf, []
    metrics_path = os.path.join(config["output_dir"], f"{run}_metrics.jsonl")
    if config["resume"]:
        state = read_checkpoint(config["resume"], map_location=dev)
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, best_val = state["epoch"], state["best_val_loss"]
        data_gen.set_state(state["data_rng"])
        rng = state["rng"]
        if len(rng) == world:
            set_rng_state(rng[rank])
        elif master:
            print(f"warning: {config['resume']} was written by {len(rng)} process(es), this run has {world}: "
                  "random streams restart from the seed (resume is not bitwise exact)", file=sys.stderr)
        rows = [r for r in read_jsonl(metrics_path) if r["epoch"] <= start_epoch]
        if master:
            print(f"resumed {config['resume']} at epoch {start_epoch} (best val MSE {best_val:.5f})")
    if master:
        print("config: " + ", ".join(f"{k}={v!r}" for k, v in config.items()))
        save_json(os.path.join(config["output_dir"], f"{run}_config.json"), config)

    step_fn = make_train_step(wrap_model(raw_model, config, dev, world), optimizer, config, dev)

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
                                                    epoch, config, stop=lambda: flag.signum is not None, show=master)
            if flag.signum is not None:
                raise interrupted(flag.signum, epoch, done, steps, config)
            check_finite(first_bad, epoch, steps, config)
            train_loss = all_reduce_mean(loss_sum / steps, world).item()
            rng = gather(get_rng_state(), world)
            if master:
                metrics = evaluate(raw_model, val_u8, prior_u8, config["eval_batch_size"])
                with torch.inference_mode():
                    recon = raw_model.eval()(grid)[0]
                save_grid(os.path.join(config["output_dir"], f"{run}_epoch_{epoch:03d}.png"), grid, recon)
                rows.append({"epoch": epoch, "train_loss": train_loss, "seconds": time.time() - t0,
                             **{f"val_{k}": v for k, v in metrics.items()}})
                save_jsonl(metrics_path, rows)
                plot_curves(os.path.join(config["output_dir"], f"{run}_curves.png"), rows)
                state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                         "best_val_loss": min(best_val, metrics["mse"]), "config": config, "model_args": model_args,
                         "metrics": metrics, "rng": rng, "data_rng": data_gen.get_state()}
                if metrics["mse"] < best_val:
                    save_checkpoint(checkpoint_path(config, "best"), state)
                if config["checkpoint_every"] and epoch % config["checkpoint_every"] == 0:
                    save_checkpoint(checkpoint_path(config, f"epoch_{epoch}"), state)
                save_checkpoint(checkpoint_path(config, "last"), state)
                tqdm.write(log_line(epoch, config, train_loss, metrics, time.time() - t0))
                best_val = min(best_val, metrics["mse"])
            barrier(world)
            if flag.signum is not None:
                raise interrupted(flag.signum, epoch + 1, 0, steps, config)
    return raw_model, metrics


def build_training(model_args, config, dev):
    """(model, Adam optimizer, memory format) on `dev`, as every training run builds them."""
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    model = build_model(model_args).to(dev, memory_format=memory_format)
    return model, torch.optim.Adam(model.parameters(), lr=config["lr"]), memory_format


def wrap_model(raw_model, config, dev, world):
    """torch.compile and DDP wrappers around the module that checkpoints save unwrapped."""
    model = torch.compile(raw_model) if config["compile"] else raw_model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    return model


def native_cpu_bf16():
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(amp, dev):
    """amp="auto": bf16 autocast on CUDA and on CPUs with native bf16 (measured: same PSNR, see README)."""
    if amp != "auto":
        return amp == "bf16"
    return dev.type == "cuda" or (dev.type == "cpu" and native_cpu_bf16())


def make_train_step(model, optimizer, config, dev):
    """step(x, aux_weight) -> detached loss: forward, backward and update, with no host sync."""
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if use_bf16(config["amp"], dev) else nullcontext()
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True

    def step(x, aux_weight):
        with autocast:
            out = model(x)
        loss = F.mse_loss(out.recon.float(), x) + aux_weight * out.aux_loss.float()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def train_epoch(step_fn, images_u8, order, steps, batch, memory_format, epoch, config, stop=lambda: False, show=True):
    """One pass over `order` (device indices into the uint8 images on the device).

    Returns (loss sum, first non-finite step or -1, steps done), all but the last on the device:
    the host reads the loss back only every `log_interval` steps, for the progress bar."""
    from tqdm import tqdm

    loss_sum = torch.zeros((), device=images_u8.device)
    first_bad = torch.full((), -1, device=images_u8.device, dtype=torch.long)
    bar = tqdm(range(steps), desc=f"epoch {epoch}", disable=not show, leave=False, dynamic_ncols=True)
    done = 0
    for step in bar:
        x = to_float_images(images_u8[order[step * batch:(step + 1) * batch]]).contiguous(memory_format=memory_format)
        loss = step_fn(x, aux_ramp(epoch, step, steps, config))
        loss_sum += loss
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
        done = step + 1
        if done % config["log_interval"] == 0 or done == steps:
            check_finite(first_bad, epoch, steps, config)
            bar.set_postfix(loss=f"{loss_sum.item() / done:.5f}")
        if stop():
            break
    bar.close()
    return loss_sum, first_bad, done


def aux_ramp(epoch, step, steps, config):
    """Weight of the auxiliary loss: a linear ramp from 0 to 1 over `aux_warmup_epochs`.

    At initialisation the decoder ignores z, so the rate term alone pulls every latent to 0, where
    log2(2|z|/delta + 1) is steepest, and the latent collapses before the reconstruction can use it
    (measured here: DDCL at weight 1e-4 ends at 8 bits/image and no better than the mean image).
    KL annealing does the same for VAEs (Bowman et al., "Generating Sentences from a Continuous
    Space", CoNLL 2016)."""
    if config["aux_warmup_epochs"] <= 0:
        return 1.0
    return min(1.0, (epoch - 1 + step / steps) / config["aux_warmup_epochs"])


def barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def check_finite(first_bad, epoch, steps, config):
    bad = int(first_bad)
    if bad >= 0:
        raise Stop(f"loss became NaN or inf at epoch {epoch}, step {bad + 1}/{steps}; stopped without touching "
                   f"{checkpoint_path(config, 'best')}. Try a lower --lr (now {config['lr']:g})", code=3)


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
