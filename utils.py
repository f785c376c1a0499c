"""Checkpoints: written atomically, read back with weights_only=True, rebuilt into a model.

A checkpoint is a dict saved with torch.save:

    format              CHECKPOINT_FORMAT; a file of another format is refused with one line
    model, model_args   the weights and the arguments `models.build_model` rebuilds the model from
    config              the run's whole resolved config
    run_id              the run that wrote it (discrete_ae/runs.py: a run's files belong to one run)
    epoch, optimizer, scheduler, best_val_objective, metrics, rng, data_rng   training state

The machinery (overrides, devices and RNG, atomic files) lives in the discrete_ae package.
"""
import os
import pickle
import warnings
import zipfile

import torch

from discrete_ae.device import pick_device
from discrete_ae.errors import CheckpointError, ConfigError
from discrete_ae.files import save_tensors

CHECKPOINT_FORMAT = 2  # 1: written before formats were numbered (no "format" key)
CHECKPOINT_KEYS = ("model", "model_args", "config", "epoch", "run_id")




def save_checkpoint(path, state):
    """Write `state` with this format's stamp, atomically (files.save_tensors)."""
    save_tensors(path, {"format": CHECKPOINT_FORMAT, **state})


def read_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, loaded with weights_only=True; one clear line for every way it can fail."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}; pass the path of a .pt file written by train.py")
    check_unpacked_size(path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a bare pickle is someone else's file
        with open(path, "rb") as f:
            pickled = f.read(1) == b"\x80"  # a pickle's protocol marker
        raise CheckpointError(f"{path} holds a plain pickle, not a checkpoint torch.save wrote; pickles can run code: refused"
                              if pickled else f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive)")
    try:
        with warnings.catch_warnings():  # torch's own warnings about a file's pickle protocol: the error says it
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # "Unsupported global" or "unsupported GLOBAL ... is blocked": could run code
            raise CheckpointError(f"{path} holds pickled Python objects, which can run code; refused (weights_only=True). "
                                  "Only load it with weights_only=False if you trust its author") from None
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is corrupt or truncated ({first[:120]})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint of this repo (it holds a {type(state).__name__})")
    version = state.get("format", 1 if {"model", "model_args", "config", "epoch"} <= state.keys() else None)
    if "format" in state and not (isinstance(version, int) and not isinstance(version, bool)):
        raise CheckpointError(f"{path} has format={version!r}, not a format number: not a checkpoint this repo wrote")
    if version is None:
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        raise CheckpointError(f"{path} is not a checkpoint of this repo (missing {', '.join(missing)})")
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is checkpoint format {version!r}; this code reads format {CHECKPOINT_FORMAT}: "
                              "use the version of this repo that wrote it, or train again")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this repo (missing {', '.join(missing)})")
    check_structure(path, state, STRUCTURE)
    return state


MAX_UNPACKED = 2**30  # bytes a checkpoint may unpack to: this repo's largest are a few MB


def check_unpacked_size(path):
    """Refuse a checkpoint whose zip entries unpack to more than MAX_UNPACKED bytes, before any is
    read (a few MB of deflated zeros can hold gigabytes)."""
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, OSError):
        return  # not a zip: torch.load says what it is
    if total > MAX_UNPACKED:
        raise CheckpointError(f"{path} unpacks to {total / 2**30:.1f} GiB, above this repo's limit of "
                              f"{MAX_UNPACKED / 2**30:.0f} GiB: not a checkpoint this repo wrote")


def _is_epoch(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_config(v):
    return isinstance(v, dict) and isinstance(v.get("dataset"), str) and isinstance(v.get("quantizer"), str)


# what each key of a checkpoint must hold (weights are checked against the model when loaded)
STRUCTURE = {"model": (lambda v: isinstance(v, dict), "a state dict"),
             "model_args": (lambda v: isinstance(v, dict), "a dict of model arguments"),
             "config": (_is_config, "a config dict with its dataset and quantizer"),
             "epoch": (_is_epoch, "a whole number >= 0"),
             "run_id": (lambda v: v is None or isinstance(v, str), "a run id string")}
TRAINING_STATE = {"optimizer": (lambda v: isinstance(v, dict), "the optimizer's state dict"),
                  "scheduler": (lambda v: isinstance(v, dict), "the scheduler's state dict"),
                  "rng": (lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "a list of RNG states"),
                  "data_rng": (lambda v: isinstance(v, torch.Tensor), "the data order's generator state"),
                  "best_val_objective": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                                         "a number")}


def check_structure(path, state, structure):
    """One line naming the first key of `structure` that is missing or holds the wrong kind of value."""
    for key, (valid, what) in structure.items():
        if key not in state:
            raise CheckpointError(f"{path} lacks {key!r} ({what}): it is not a whole checkpoint of this repo")
        if not valid(state[key]):
            raise CheckpointError(f"{path}: {key!r} must be {what}; got {type(state[key]).__name__} {str(state[key])[:40]!r}")


def load_checkpoint(path, device="cpu"):
    """Notebook helper: (model in eval mode on `device`, config dict), rebuilt from the file alone.

        from utils import load_checkpoint
        model, config = load_checkpoint("checkpoints/fsq_vae_best.pt")
        recon = model(images).recon  # images: (B, 3, 32, 32) in [0, 1]
    """
    from models import build_model

    device = pick_device(device) if isinstance(device, str) else device  # "auto" works; a missing GPU is one line
    state = read_checkpoint(path)
    try:
        model = build_model(state["model_args"])
    except ConfigError as err:
        raise CheckpointError(f"{path} has invalid model_args: {err}") from None
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: weights do not match its model_args ({str(err).splitlines()[0][:200]})") from None
    return model.to(device).eval(), state["config"]
