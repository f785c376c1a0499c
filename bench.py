"""How fast this repo trains: quality reached per second (--quality), and raw throughput.

    python bench.py --quality=True --data_dir=DIR    # time-to-quality: PSNR and bits after 30 s and 120 s
    python bench.py --quality=True --data_dir=DIR --budgets="[60]" --baseline=True   # also the seed's recipe
    python bench.py                                  # throughput: fsq and ddcl on the default device
    python bench.py --device=cuda --compile=True --batch_size=512
    python bench.py --quantizers="['fsq']" --channels_last=False --amp=off

Time-to-quality (--quality=True), on a folder of images (DIR/train, DIR/test): for each budget in
seconds and each quantizer, train.py's defaults are trained for the whole number of epochs nearest
to filling the budget (estimated from a timing of up to 100 steps, of one per-epoch evaluation and
of the final whole-split evaluation), by train.py's own `train` (with
the train.py knobs in BENCH_DEFAULTS given here, such as --channels, --res_blocks, --batch_size or
--lr, to time another candidate; the seed's recipe keeps its own values of those it sets), and
the table gives the epochs, the seconds the run really took (data from the folder's cache, every
per-epoch evaluation and the final whole-split evaluation included), held-out PSNR and the measured
bits per image of the best checkpoint on the whole test split. --baseline=True adds the seed's recipe
(constant lr 3e-4, no flips or turns, every epoch evaluated on the whole split with a 10,000-image prior) for
the same budgets, and a closing block sets each seed run against the defaults at the seconds that
run really took (read off between the two defaults runs around it, linear in log-seconds; outside them, the
defaults' longest run that took fewer seconds gives a lower bound on their lead). This is how speed is
judged: quality reached per second, not images/s alone.

Throughput (the default):
For each quantizer, on synthetic uint8 data of CIFAR-10's shape held on the device:
  (a) model only: the training step (forward, backward, Adam) on one ready float batch;
  (b) full step:  train.py's own `train_epoch` (batch gather from the uint8 tensor, float
      conversion, the step, on-device loss accumulation, the progress bar);
  (c) epoch eval: train.py's per-epoch `evaluate` with its defaults (the fixed subset of
      `eval_images` validation images, the rate prior fitted on `rate_prior_images` training
      images, SSIM and the range coder), in seconds;
  (d) whole split: the same on all `val_images` validation images with a prior fitted on as many
      training images, which is what every epoch cost before `eval_images` existed (the seed's
      per-epoch evaluation), in seconds.
It warms up, times `steps` steps (or whole evaluations), and prints images/s, the ratio b/a, and
the seconds of each evaluation.
"""
import contextlib
import io
import math
import sys
import tempfile
import time

import torch

from errors import ConfigError, UserError
from evaluate import evaluate
from models import model_args_from_config
from train import (DEFAULT_CONFIG, build_scheduler, build_training, make_train_step, train, train_epoch,
                   validate_config, wrap_model)
from utils import head, load_dataset, parse_overrides, pick_device, seed_everything, to_float_images, use_bf16

BENCH_DEFAULTS = dict(quantizers=["fsq", "ddcl"], steps=100, warmup=20, val_images=10000, train_images=50000,
                      quality=False, data_dir="", budgets=[30, 120], baseline=False,
                      **{k: DEFAULT_CONFIG[k] for k in (
                          "device", "batch_size", "channels", "res_blocks", "compile", "amp", "channels_last",
                          "fsq_levels", "eval_batch_size", "eval_images", "rate_prior_images", "seed", "latent_dim",
                          # the recipe and bottleneck knobs, so a candidate recipe is timed like an architecture
                          "optimizer", "muon_lr", "lr", "beta2", "lr_schedule", "warmup_epochs", "min_lr", "hflip", "rotate",
                          "color_gain", "ddcl_delta", "ddcl_comm_weight", "vq_codebook_size", "entropy_model", "rate_weight")})
# The seed's training recipe, for --baseline: what these knobs were before the recipe was measured.
SEED_RECIPE = dict(optimizer="adam", lr=3e-4, beta2=0.999, lr_schedule="constant", warmup_epochs=0.0, hflip=False, rotate=False,
                   color_gain=0.0, batch_size=128, channels=[16, 32, 64], res_blocks=0, eval_images=0, rate_prior_images=10000)
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
    """(model, step function, memory format): train.py's own training step for `config`, seeded."""
    seed_everything(config["seed"])
    model, optimizer, memory_format = build_training(model_args_from_config(config), config, dev)
    step_fn = make_train_step(wrap_model(model, config, dev, 1), optimizer, build_scheduler(optimizer, config, 1),
                              config, dev)
    return model, step_fn, memory_format


def bench_quantizer(name, opts, dev):
    config = validate_config({**DEFAULT_CONFIG, **{k: v for k, v in opts.items() if k in DEFAULT_CONFIG},
                              "quantizer": name, "log_interval": opts["steps"]})
    raw_model, step_fn, memory_format = training_step(config, dev)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (opts["train_images"], 3, 32, 32), dtype=torch.uint8, generator=gen).to(dev)
    val = images[:opts["val_images"]]
    per_epoch = (head(val, config["eval_images"]),  # the prior from the other end: not the validation images
                 images[-config["rate_prior_images"]:] if config["rate_prior_images"] else images)
    batch = config["batch_size"]
    x = to_float_images(images[:batch]).contiguous(memory_format=memory_format)

    def model_only(steps):
        for _ in range(steps):
            step_fn(x, 1.0)

    def full(steps):
        order = torch.randperm(len(images), generator=gen)[:steps * batch].to(dev)
        loss_sum, _, _ = train_epoch(step_fn, images, order, steps, batch, memory_format, 2, config, show=False)
        loss_sum.item()

    raw_model.train()
    timed(lambda: (model_only(opts["warmup"]), full(opts["warmup"])), dev)
    # interleave a and b twice so that a drifting clock or a busy neighbour hurts both alike
    a = b = 0.0
    for _ in range(2):
        a += timed(lambda: model_only(opts["steps"] // 2), dev)
        b += timed(lambda: full(opts["steps"] // 2), dev)
    evaluate(raw_model, val[:config["eval_batch_size"]], val[:config["eval_batch_size"]], config["eval_batch_size"])
    c = timed(lambda: evaluate(raw_model, *per_epoch, config["eval_batch_size"]), dev)
    whole = timed(lambda: evaluate(raw_model, val, images[-opts["val_images"]:], config["eval_batch_size"]), dev)
    n = 2 * (opts["steps"] // 2) * batch
    return n / a, n / b, c, whole


def fitting_epochs(config, budget, train_u8, val_u8, dev):
    """The whole number of epochs of `config` nearest to filling `budget` seconds on this machine (at
    least 1): per epoch, the steps (timed over up to CALIBRATION_STEPS of them) and one per-epoch
    evaluation; once per run, the final whole-split evaluation of the best checkpoint."""
    model, step_fn, memory_format = training_step(config, dev)
    steps_per_epoch = len(train_u8) // config["batch_size"]
    steps = min(CALIBRATION_STEPS, max(1, steps_per_epoch))
    order = torch.randint(0, len(train_u8), (max(steps, 2) * config["batch_size"],)).to(dev)  # 2: the warm-up
    run = lambda n: train_epoch(step_fn, train_u8, order, n, config["batch_size"], memory_format, 2,
                                config, show=False)[0].item()
    run(2)
    step_s = timed(lambda: run(steps), dev) / steps
    prior = head(train_u8, config["rate_prior_images"])
    eval_s = timed(lambda: evaluate(model, head(val_u8, config["eval_images"]), prior, config["eval_batch_size"]), dev)
    final_s = timed(lambda: evaluate(model, val_u8, prior, config["eval_batch_size"]), dev)
    epoch_s = steps_per_epoch * step_s + eval_s
    return max(1, round((budget - final_s) / epoch_s))


def time_to_quality(opts, dev):
    """Train the defaults (and with --baseline the seed's recipe) for each budget; print a table."""
    if not opts["data_dir"]:
        raise ConfigError("--quality=True needs --data_dir=DIR (an image folder with train/ and test/)")
    train_u8, val_u8 = load_dataset("folder", opts["data_dir"])  # fills the folder's cache before any timing
    recipes = {"defaults": {}, **({"seed": SEED_RECIPE} if opts["baseline"] else {})}
    knobs_given = {k: v for k, v in opts.items() if k in DEFAULT_CONFIG}  # e.g. --channels: another candidate
    print(f"{'recipe':9} {'quantizer':9} {'budget s':>8} {'epochs':>6} {'took s':>7} {'psnr dB':>8} {'bits/img':>8}  rate source")
    runs = {}  # (recipe, quantizer) -> [(seconds taken, psnr, bits)]
    for budget in opts["budgets"]:
        for recipe, knobs in recipes.items():
            for q in opts["quantizers"]:
                with tempfile.TemporaryDirectory() as tmp:
                    config = validate_config({**DEFAULT_CONFIG, **knobs_given, "quantizer": q, "dataset": "folder",
                                              "data_dir": opts["data_dir"], "device": opts["device"],
                                              "output_dir": tmp, "checkpoint_dir": tmp, "checkpoint_every": 0,
                                              "log_interval": 10 ** 9, **knobs})
                    config["epochs"] = fitting_epochs(config, budget, train_u8.to(dev), val_u8.to(dev), dev)
                    t0 = time.perf_counter()
                    with contextlib.redirect_stdout(io.StringIO()):  # the table, not train.py's epoch lines
                        _, metrics = train(config)
                    took = time.perf_counter() - t0
                print(f"{recipe:9} {q:9} {budget:8.0f} {config['epochs']:6d} {took:7.1f} {metrics['psnr']:8.2f} "
                      f"{metrics['bits']:8.1f}  {metrics['rate_source']}", flush=True)
                runs.setdefault((recipe, q), []).append((took, metrics["psnr"], metrics["bits"]))
    if opts["baseline"]:
        print_equal_time(runs, opts["quantizers"])


def at_seconds(points, seconds):
    """(psnr, bits) of a recipe at `seconds`, linear in log-seconds between its two runs that bracket
    it (points: (seconds taken, psnr, bits) per run); None outside the runs' range (no extrapolation).
    Log-seconds because quality rises fast early and slowly later: between runs of 19.3 s and 102.8 s
    a straight line in seconds passed 0.47 dB under a DDCL run of 40.1 s, one in log-seconds 0.26 dB
    (FSQ, 23.4 s to 101.1 s: 0.17 and 0.02 dB under a run of 41.4 s; README: Training recipe)."""
    points = sorted(points)
    for (t0, *v0), (t1, *v1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            w = math.log(seconds / t0) / math.log(t1 / t0) if t1 > t0 else 0.0
            return tuple(a + w * (b - a) for a, b in zip(v0, v1))
    return next((tuple(v) for t, *v in points if t == seconds), None)


def within_seconds(points, seconds):
    """The run that took the most seconds but no more than `seconds`, (seconds, psnr, bits), or None:
    as quality does not fall with more training, what it reached is a lower bound at `seconds`."""
    return max((p for p in points if p[0] <= seconds), default=None)


def print_equal_time(runs, quantizers):
    """Each seed-recipe run against the defaults at the seconds it really took: runs end off their
    budget by up to ~40% here (the epoch estimate), so the table's rows alone compare unequal times.
    Outside the defaults' runs, their longest run that took no more seconds gives a lower bound."""
    print("at equal seconds (the defaults read off between their runs, linear in log-seconds; outside them, "
          "a lower bound from their longest run that took fewer seconds):")
    for q in quantizers:
        defaults = runs.get(("defaults", q), [])
        for took, psnr, bits in runs.get(("seed", q), []):
            here, bound = at_seconds(defaults, took), within_seconds(defaults, took)
            if here is not None:
                line = f"defaults {here[0]:.2f} dB {here[1]:.1f} bits: {here[0] - psnr:+.2f} dB at {here[1] - bits:+.1f} bits"
            elif bound is not None:
                line = (f"defaults in {bound[0]:.1f} s {bound[1]:.2f} dB {bound[2]:.1f} bits: at least "
                        f"{bound[1] - psnr:+.2f} dB at {bound[2] - bits:+.1f} bits")
            else:
                line = "every defaults run took longer: no reading"
            print(f"  {q:5} in {took:6.1f} s: seed {psnr:.2f} dB {bits:.1f} bits | {line}")


def throughput(opts, dev):
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    print(f"device {name} | torch {torch.__version__} | threads {torch.get_num_threads()} | batch {opts['batch_size']} | "
          f"channels {opts['channels']} | res_blocks {opts['res_blocks']} | compile {opts['compile']} | "
          f"amp {opts['amp']} (bf16 {use_bf16(opts['amp'], dev)}) | channels_last {opts['channels_last']} | "
          f"optimizer {opts['optimizer']}")
    print(f"{'quantizer':10} {'a model-only img/s':>19} {'b full-step img/s':>18} {'b/a':>6} {'c epoch eval s':>15} "
          f"{'d whole-split eval s':>21}")
    for q in opts["quantizers"]:
        a, b, c, d = bench_quantizer(q, opts, dev)
        print(f"{q:10} {a:19,.0f} {b:18,.0f} {b / a:6.3f} {c:15.2f} {d:21.2f}", flush=True)


def main(argv=None):
    try:
        opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, BENCH_DEFAULTS)
        dev = pick_device(opts["device"])
        (time_to_quality if opts["quality"] else throughput)(opts, dev)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
