"""Throughput of the training step, with and without train.py's data path, and of evaluation.

    python bench.py                                  # fsq and ddcl on the default device
    python bench.py --device=cuda --compile=True --batch_size=512
    python bench.py --quantizers="['fsq']" --channels_last=False --amp=off

For each quantizer, on synthetic uint8 data of CIFAR-10's shape held on the device:
  (a) model only: the training step (forward, backward, Adam) on one ready float batch;
  (b) full step:  train.py's own `train_epoch` (batch gather from the uint8 tensor, float
      conversion, the step, on-device loss accumulation, the progress bar);
  (c) evaluate:   train.py's per-epoch `evaluate` on 10,000 images (the metrics, the rate prior
      fitted on 10,000 training images, and the range coder).
It warms up, times `steps` steps (or whole evaluations), and prints images/s and the ratio b/a.
"""
import sys
import time

import torch

from evaluate import evaluate
from models import model_args_from_config
from quantizers import UserError
from train import DEFAULT_CONFIG, build_training, make_train_step, train_epoch, use_bf16, validate_config, wrap_model
from utils import parse_overrides, pick_device, seed_everything, to_float_images

BENCH_DEFAULTS = dict(quantizers=["fsq", "ddcl"], steps=100, warmup=20, eval_images=10000, train_images=50000,
                      **{k: DEFAULT_CONFIG[k] for k in ("device", "batch_size", "channels", "compile", "amp",
                                                        "channels_last", "fsq_levels", "eval_batch_size")})


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


def bench_quantizer(name, opts, dev):
    config = validate_config({**DEFAULT_CONFIG, **{k: v for k, v in opts.items() if k in DEFAULT_CONFIG},
                              "quantizer": name, "log_interval": opts["steps"]})
    seed_everything(config["seed"])
    raw_model, optimizer, memory_format = build_training(model_args_from_config(config), config, dev)
    step_fn = make_train_step(wrap_model(raw_model, config, dev, 1), optimizer, config, dev)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (opts["train_images"], 3, 32, 32), dtype=torch.uint8, generator=gen).to(dev)
    val, prior = images[:opts["eval_images"]], images[-opts["eval_images"]:]
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
    evaluate(raw_model, val[:config["eval_batch_size"]], prior[:config["eval_batch_size"]], config["eval_batch_size"])
    c = timed(lambda: evaluate(raw_model, val, prior, config["eval_batch_size"]), dev)
    n = 2 * (opts["steps"] // 2) * batch
    return n / a, n / b, opts["eval_images"] / c


def main(argv=None):
    try:
        opts, _ = parse_overrides(sys.argv[1:] if argv is None else argv, BENCH_DEFAULTS)
        dev = pick_device(opts["device"])
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
        print(f"device {name} | torch {torch.__version__} | threads {torch.get_num_threads()} | batch {opts['batch_size']} | "
              f"channels {opts['channels']} | compile {opts['compile']} | amp {opts['amp']} (bf16 {use_bf16(opts['amp'], dev)}) | "
              f"channels_last {opts['channels_last']}")
        print(f"{'quantizer':10} {'a model-only img/s':>19} {'b full-step img/s':>18} {'b/a':>6} {'c evaluate img/s':>17}")
        for q in opts["quantizers"]:
            a, b, c = bench_quantizer(q, opts, dev)
            print(f"{q:10} {a:19,.0f} {b:18,.0f} {b / a:6.3f} {c:17,.0f}", flush=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
