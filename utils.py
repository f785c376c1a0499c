"""Command-line overrides, devices and RNG, atomic files, and checkpoints.

A checkpoint is a dict saved with torch.save and read back with weights_only=True:

    format              CHECKPOINT_FORMAT; a file of another format is refused with one line
    model, model_args   the weights and the arguments `models.build_model` rebuilds the model from
    config              the run's whole resolved config
    run_id              the run that wrote it (runs.py: a run's files belong to one run)
    epoch, optimizer, scheduler, best_val_objective, metrics, rng, data_rng   training state
"""
import ast
import errno
import io
import json
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from errors import CheckpointError, ConfigError, UserError

CHECKPOINT_FORMAT = 2  # 1: written before formats were numbered (no "format" key)
CHECKPOINT_KEYS = ("model", "model_args", "config", "epoch", "run_id")

# ----------------------------------------------------------------------------- command line


def parse_value(key, text, default):
    """Parse `text` as a Python literal (no exec) and check it against `default`'s type."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if not isinstance(default, str):
            raise ConfigError(f"--{key}={text}: not a Python literal; expected {type(default).__name__} like {default!r}") from None
        value = text  # a bare word is a string: --quantizer=fsq
    return coerce(key, value, default, f"--{key}={text}")


def coerce(key, value, default, shown=None):
    """`value` with `default`'s type (an int is accepted for a float), or a ConfigError."""
    shown = shown or f"{key}={value!r}"
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{shown}: expected {type(default).__name__} (like {default!r}), got {type(value).__name__}")
    if isinstance(default, list) and default:
        kind = type(default[0])
        if kind is float:
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        if not all(type(v) is kind for v in value):
            raise ConfigError(f"{shown}: expected a list of {kind.__name__} (like {default!r})")
    return value


def parse_overrides(argv, defaults):
    """`--key=value` arguments -> (options dict, set of keys given). Unknown keys stop."""
    config, given = dict(defaults), set()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value (see --help)")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown option {key!r}; allowed: {', '.join(defaults)} (see --help)")
        config[key] = parse_value(key, text, defaults[key])
        given.add(key)
    return config, given


def parse_paths_and_options(argv, defaults, usage, count=None):
    """File paths and --key=value options (checked against `defaults`) -> (paths, options). Too few
    paths (none, or other than `count` when given) stop with `usage`."""
    paths = [a for a in argv if not a.startswith("--")]
    options, _ = parse_overrides([a for a in argv if a.startswith("--")], defaults)
    if not paths or (count is not None and len(paths) != count):
        raise ConfigError(usage)
    return paths, options


# ----------------------------------------------------------------------------- devices and RNG

def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use --device=auto or --device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but MPS is not available here; use --device=auto or --device=cpu")
    return device


def native_cpu_bf16():
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(amp, dev):
    """amp="auto": bf16 autocast on CUDA and on CPUs with native bf16 (docs/speed.md)."""
    if amp != "auto":
        return amp == "bf16"
    return dev.type == "cuda" or (dev.type == "cpu" and native_cpu_bf16())


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_rng_state():
    """Every RNG a run draws from, as plain tensors and numbers (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- files

def ensure_writable_dir(path, key):
    """Create `path` and prove a file can be written there, or stop with one line naming `key`."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{key}={str(path)!r} is not a writable folder ({err.strerror}); choose another with --{key}=PATH") from None


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_failure(path, err):
    hints = {errno.ENOSPC: "the disk is full; free space", errno.EFBIG: "the file is over the size limit (ulimit -f)",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}
    return UserError(f"could not write {path}: {hints.get(err.errno, err.strerror or str(err))}; "
                     "the previous file, if any, is intact")


def atomic_write(path, write):
    """Write through `write(fileobj)` into a temporary file beside `path`, fsync, then os.replace.

    A crash or kill at any moment leaves either the old file or the new one, never a mix; the
    temporary file is named `.{name}.{random}.tmp` (runs.py removes those a kill left behind).
    Any OSError, creating the temporary file included, is one UserError line."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _write_failure(path, err) from None
        raise


def save_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_jsonl(path, rows):
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- checkpoints

def unwrap(model):
    """The plain module under torch.compile (_orig_mod) and DDP (module) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_checkpoint(path, state):
    """Serialise in memory first, so a full disk is an OSError of the write (one line), never an
    error from inside torch's zip writer; then write atomically."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def read_checkpoint(path, map_location="cpu"):
    """The checkpoint dict, loaded with weights_only=True; one clear line for every way it can fail."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path!r}; pass the path of a .pt file written by train.py")
    try:
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
    if version is None:
        missing = [k for k in CHECKPOINT_KEYS if k not in state]
        raise CheckpointError(f"{path} is not a checkpoint of this repo (missing {', '.join(missing)})")
    if version != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is checkpoint format {version!r}; this code reads format {CHECKPOINT_FORMAT}: "
                              "use the version of this repo that wrote it, or train again")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this repo (missing {', '.join(missing)})")
    return state


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
