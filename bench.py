"""How fast this repo trains: quality reached per second (--quality=True), and raw throughput.

    python bench.py                                   # throughput: fsq and ddcl on the default device
    python bench.py --quality=True --data_dir=DIR     # time to quality: PSNR and bits after 30 s and 120 s
    python bench.py --quality=True --data_dir=DIR --budgets="[60]" --channels="[32, 64, 128]"   # another candidate
    python bench.py --device=cuda --batch_size=512 --quantizers="['fsq']"

Time to quality (--quality=True), on an image folder (DIR/train, DIR/test): for each budget in
seconds and each quantizer, train.py's own `train` runs the defaults (with any train.py knob given
here) for the whole number of epochs nearest to filling the budget, estimated from a timing of up
to 100 steps and of the evaluations; the table gives the epochs, the seconds the run really took
(evaluations included), and the held-out PSNR and measured bits per image of its best checkpoint.

Throughput (the default), on synthetic uint8 data of CIFAR-10's shape held on the device:
  a  model only: the training step on one ready batch (images/s)
  b  full step: train.py's `run_epoch` (batch gather, augmentation, the step) (images/s)
  c  the per-epoch evaluation train.py runs (seconds)
  d  the same on a 10,000-image validation split with a 10,000-image prior (seconds)
Options: --quantizers, --steps, --warmup, --quality, --data_dir, --budgets and every train.py knob.
"""
import contextlib
import io
import tempfile
import time

import torch

import train
from config import validate_config
from discrete_ae.data import head, load_dataset, to_float_images
from discrete_ae.device import pick_device, seed_everything, use_bf16
from discrete_ae.errors import ConfigError, cli
from discrete_ae.optim import build_optimizer, build_scheduler
from discrete_ae.overrides import parse_overrides
from evaluate import evaluate
from models import build_model, model_args_from_config

BENCH_DEFAULTS = dict(quantizers=["fsq", "ddcl"], steps=100, warmup=20, quality=False, data_dir="", budgets=[30, 120],
                      **{k: v for k, v in train.DEFAULT_CONFIG.items() if k not in ("quantizer", "data_dir")})
SPLIT_IMAGES = 10000  # synthetic validation images (d) and prior images
CALIBRATION_STEPS = 100  # timed training steps (at most) that estimate how many epochs fit a budget


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elif dev.type == "mps":
        torch.mps.synchronize()


def timed(fn, dev):
    sync(dev)
    t0 = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t0


def training_step(config, dev):
    """(model, step) as train.py builds them for `config`, seeded."""
    seed_everything(config["seed"])
    model = build_model(model_args_from_config(config)).to(dev, memory_format=torch.channels_last).train()
    optimizer = build_optimizer(model, config)
    return model, train.make_step(model, optimizer, build_scheduler(optimizer, 1, 1), config["amp"], dev)


def config_for(quantizer, opts, **more):
    knobs = {k: v for k, v in opts.items() if k in train.DEFAULT_CONFIG}
    return validate_config({**train.DEFAULT_CONFIG, **knobs, "quantizer": quantizer, **more})


def throughput_row(quantizer, opts, dev):
    config = config_for(quantizer, opts)
    model, step = training_step(config, dev)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (max(SPLIT_IMAGES, opts["steps"] * config["batch_size"]), 3, 32, 32),
                           dtype=torch.uint8, generator=gen).to(dev)
    batch = config["batch_size"]
    x = to_float_images(images[:batch]).contiguous(memory_format=torch.channels_last)

    def model_only(n):
        for _ in range(n):
            step(x, 1.0)

    def full(n):
        order = torch.randperm(len(images), generator=gen)[:n * batch].to(dev)
        train.run_epoch(step, images, order, n, batch, 2, config)[0].item()

    timed(lambda: (model_only(opts["warmup"]), full(opts["warmup"])), dev)
    a = b = 0.0
    for _ in range(2):  # interleaved, so a busy neighbour or a drifting clock hurts both alike
        a += timed(lambda: model_only(opts["steps"] // 2), dev)
        b += timed(lambda: full(opts["steps"] // 2), dev)
    val, prior = images[:SPLIT_IMAGES], images[-SPLIT_IMAGES:]
    c = timed(lambda: evaluate(model, head(val, train.EVAL_IMAGES), head(prior, train.RATE_PRIOR_IMAGES)), dev)
    d = timed(lambda: evaluate(model, val, prior), dev)
    n = 2 * (opts["steps"] // 2) * batch
    return n / a, n / b, c, d


def throughput(opts, dev):
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    print(f"device {name} | torch {torch.__version__} | threads {torch.get_num_threads()} | batch {opts['batch_size']} | "
          f"channels {opts['channels']} | amp {opts['amp']} (bf16 {use_bf16(opts['amp'], dev)}) | optimizer {opts['optimizer']}")
    print(f"{'quantizer':10} {'a model-only img/s':>19} {'b full-step img/s':>18} {'b/a':>6} {'c epoch eval s':>15} "
          f"{'d 10k eval s':>13}")
    for q in opts["quantizers"]:
        a, b, c, d = throughput_row(q, opts, dev)
        print(f"{q:10} {a:19,.0f} {b:18,.0f} {b / a:6.3f} {c:15.2f} {d:13.2f}", flush=True)


def fitting_epochs(config, budget, train_u8, val_u8, dev):
    """The whole number of epochs of `config` nearest to filling `budget` seconds here (at least 1)."""
    model, step = training_step(config, dev)
    steps_per_epoch = len(train_u8) // config["batch_size"]
    steps = min(CALIBRATION_STEPS, max(1, steps_per_epoch))
    order = torch.randint(0, len(train_u8), (max(steps, 2) * config["batch_size"],)).to(dev)
    run = lambda n: train.run_epoch(step, train_u8, order, n, config["batch_size"], 2, config)[0].item()  # noqa: E731
    run(2)
    step_s = timed(lambda: run(steps), dev) / steps
    prior = head(train_u8, train.RATE_PRIOR_IMAGES)
    eval_s = timed(lambda: evaluate(model, head(val_u8, train.EVAL_IMAGES), prior), dev)
    final_s = timed(lambda: evaluate(model, val_u8, prior), dev)
    return max(1, round((budget - final_s) / (steps_per_epoch * step_s + eval_s)))


def time_to_quality(opts, dev):
    if not opts["data_dir"]:
        raise ConfigError("--quality=True needs --data_dir=DIR (an image folder with train/ and test/)")
    train_u8, val_u8 = load_dataset("folder", opts["data_dir"])  # fills the folder's cache before any timing
    print(f"{'quantizer':9} {'budget s':>8} {'epochs':>6} {'took s':>7} {'psnr dB':>8} {'bits/img':>8}  rate source")
    for budget in opts["budgets"]:
        for q in opts["quantizers"]:
            with tempfile.TemporaryDirectory() as tmp:
                config = config_for(q, opts, dataset="folder", data_dir=opts["data_dir"], output_dir=tmp,
                                    checkpoint_dir=tmp, checkpoint_every=0)
                config["epochs"] = fitting_epochs(config, budget, train_u8.to(dev), val_u8.to(dev), dev)
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # the table, not train.py's epoch lines
                    _, metrics = train.train(config)
                took = time.perf_counter() - t0
            print(f"{q:9} {budget:8.0f} {config['epochs']:6d} {took:7.1f} {metrics['psnr']:8.2f} {metrics['bits']:8.1f}  "
                  f"{metrics['rate_source']}", flush=True)


def main(argv):
    opts, _ = parse_overrides(argv, BENCH_DEFAULTS)
    dev = pick_device(opts["device"])
    (time_to_quality if opts["quality"] else throughput)(opts, dev)


if __name__ == "__main__":
    cli(main, __doc__)
