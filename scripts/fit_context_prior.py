"""Fit a DDCL context prior to a trained checkpoint after the fact, the autoencoder frozen.

    python scripts/fit_context_prior.py CHECKPOINT [CHECKPOINT ...] [--data_dir=DIR] [--epochs=4] [--output_dir=DIR]

For each DDCL checkpoint (trained with the surrogate or a per-channel prior), trains an
priors.ContextMixturePrior on the dithered latents of its training split and writes
OUTPUT_DIR/{run}_posthoc_vae_best.pt: the same weights with entropy_model="context", so that
evaluate.py and model.compress code its integers position by position under the context prior.
Its `config` names the source checkpoint (`context_prior_fitted_to`), and evaluate.py draws such
checkpoints as their own curve ("ddcl_context_posthoc"). This is the fair reference for
entropy_model="context": the same coder for a model that was not trained against it
(docs/entropy_models.md).
"""
import math
import os

import torch

from discrete_ae.data import DEFAULT_DATA_DIR, load_dataset, to_float_images
from discrete_ae.errors import ConfigError, UserError, cli
from discrete_ae.files import ensure_writable_dir
from discrete_ae.overrides import parse_paths_and_options
from discrete_ae.runs import RunLock, check_run_name, run_label
from evaluate import EVAL_BATCH_SIZE
from models import build_model
from utils import load_checkpoint, read_checkpoint, save_checkpoint

DEFAULTS = dict(data_dir="", epochs=4, output_dir="", batch_size=128, lr=3e-2, seed=0)


@torch.no_grad()
def latents(model, images_u8, batch_size=EVAL_BATCH_SIZE):
    """(N, C, H, W) float32 encoder outputs of uint8 images."""
    return torch.cat([model.encoder(to_float_images(images_u8[i:i + batch_size])).float()
                      for i in range(0, len(images_u8), batch_size)])


def fit(path, opts):
    if opts["epochs"] < 1:
        raise ConfigError(f"--epochs={opts['epochs']} must be >= 1")
    source, config = load_checkpoint(path)
    q = source.quantizer
    if config["quantizer"] != "ddcl" or q.entropy_model == "context":
        raise ConfigError(f"{path}: a context prior is fitted to DDCL checkpoints without one; this is "
                          f"{config['quantizer']} with entropy_model={q.entropy_model!r}")
    state = read_checkpoint(path)
    model_args = {**state["model_args"], "entropy_model": "context", "rate_weight": 0.0}
    out_dir = opts["output_dir"] or os.path.dirname(os.path.abspath(path))
    ensure_writable_dir(out_dir, "output_dir")  # before the fit, not after it
    name = check_run_name(run_label(config) + "_posthoc", f"the run name stored in {path}")
    out = os.path.join(out_dir, f"{name}_vae_best.pt")
    check_ours(out, path)
    torch.manual_seed(opts["seed"])  # the prior's initial weights too: the same fit on every run
    model = build_model(model_args)
    model.load_state_dict(state["model"], strict=False)  # the prior is new; every other weight is the source's
    model.eval()
    train_u8, _ = load_dataset(config["dataset"], opts["data_dir"] or DEFAULT_DATA_DIR)  # never from the file
    z = latents(model, train_u8)  # (N, C, H, W), the encoder frozen
    prior, delta = model.quantizer.prior, model.quantizer.delta
    optimizer = torch.optim.Adam(prior.parameters(), lr=opts["lr"])
    batch = opts["batch_size"]
    steps_per_epoch = len(z) // batch
    steps = opts["epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(opts["epochs"]):
        order = torch.randperm(len(z))
        for i in range(steps_per_epoch):
            picked = z[order[i * batch:(i + 1) * batch]]
            noisy = picked + (torch.rand_like(picked) - 0.5) * delta  # the uniform-noise proxy of training
            _, bits = prior.bits(noisy.flatten(2), delta)
            optimizer.zero_grad(set_to_none=True)
            bits.mean().backward()
            optimizer.step()
            schedule.step()
    new_config = {**config, **model_args, "run_name": name, "context_prior_fitted_to": os.path.abspath(path)}
    with RunLock(os.path.join(out_dir, f".{name}.lock"), f"run {name!r} in {out_dir!r}"):  # never beside its writer
        check_ours(out, path)  # again, under the lock
        save_checkpoint(out, {**state, "model": model.state_dict(), "model_args": model_args, "config": new_config,
                              "optimizer": {}})
    return f"{path} -> {out} ({steps} steps; last batch {bits.sum((1, 2)).mean().item():.1f} bits/img under the noise proxy)"


def check_ours(out, source):
    """`out` may be replaced only by a new fit to the same source checkpoint, never when it is
    another run's file."""
    if not os.path.exists(out):
        return
    try:
        fitted_to = read_checkpoint(out)["config"].get("context_prior_fitted_to")
    except UserError:
        fitted_to = None
    if fitted_to != os.path.abspath(source):
        raise UserError(f"{out} exists and is not a context prior fitted to {source}: another run's file is never "
                        "replaced; pass another --output_dir")


def main(argv):
    paths, opts = parse_paths_and_options(argv, DEFAULTS, "usage: python scripts/fit_context_prior.py CHECKPOINT [...] "
                                          "[--data_dir=DIR] [--epochs=4] [--output_dir=DIR] (see --help)")
    for path in paths:
        print(fit(path, opts), flush=True)


if __name__ == "__main__":
    cli(main, __doc__)
