"""Config overrides, devices, data, atomic files and checkpoints.

Images leave this module as uint8 tensors (N, 3, 32, 32); batches are turned into floats in
[0, 1] on the training device (see models.py for the data-range contract).
"""
import ast
import errno
import hashlib
import json
import os
import pickle
import random
import sys
import tempfile
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from errors import CheckpointError, ConfigError, DataError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DATASETS = ("cifar10", "folder")
CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "config", "model_args")
IMAGE_CACHE_VERSION = 1  # bump when decoding changes, so old caches are rebuilt
PARALLEL_DECODE_MIN = 2000  # folders with fewer images decode in this process (no pool start-up)
DECODE_CHUNK = 256  # images per task handed to a decoding worker

# ----------------------------------------------------------------------------- config

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
    """`--key=value` arguments -> (config dict, set of keys the user set). Unknown keys stop."""
    config, given = dict(defaults), set()
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form --key=value (see --help)")
        key, text = arg[2:].split("=", 1)
        if key not in defaults:
            raise ConfigError(f"unknown config key {key!r}; allowed keys: {', '.join(defaults)}")
        config[key] = parse_value(key, text, defaults[key])
        given.add(key)
    return config, given


def parse_paths_and_options(argv, defaults, usage):
    """A command line of file paths and --key=value options (checked against `defaults`) ->
    (paths, options); no path stops with `usage`."""
    paths = [a for a in argv if not a.startswith("--")]
    options, _ = parse_overrides([a for a in argv if a.startswith("--")], defaults)
    if not paths:
        raise ConfigError(usage)
    return paths, options


def main_over_checkpoints(argv, defaults, usage, one):
    """The main of a script over checkpoint paths (scripts/check_rates.py, scripts/fit_context_prior.py):
    prints one(path, options) for each path; a UserError prints one line and exits with status 2."""
    try:
        paths, opts = parse_paths_and_options(sys.argv[1:] if argv is None else argv, defaults, usage)
        for path in paths:
            print(one(path, opts), flush=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


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
    """amp="auto": bf16 autocast on CUDA and on CPUs with native bf16 (measured: same PSNR, see README)."""
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


def atomic_write(path, write):
    """Write through `write(fileobj)` into a temporary file beside `path`, fsync, then os.replace.

    A crash or kill at any moment leaves either the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            hint = "the disk is full; free space" if err.errno == errno.ENOSPC else err.strerror or str(err)
            raise UserError(f"could not write {path}: {hint}; the previous file, if any, is intact") from None
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


def save_figure(path, fig):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


# ----------------------------------------------------------------------------- checkpoints

def run_label(config):
    """The name of a run's files: run_name, or the quantizer's name when that is empty."""
    return config.get("run_name") or config["quantizer"]


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
    atomic_write(path, lambda f: torch.save(state, f))


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
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of this repo (missing {', '.join(missing)})")
    if "best_val_objective" not in state:  # older checkpoints ranked epochs by MSE alone: rank again from here
        state["best_val_objective"] = float("inf")
        state.pop("best_val_mse", None)
        state.pop("best_val_loss", None)
    return state


def load_checkpoint(path, device="cpu"):
    """Notebook helper: (model in eval mode on `device`, config dict), rebuilt from the file alone.

        from utils import load_checkpoint
        model, config = load_checkpoint("checkpoints/fsq_vae_best.pt")
        recon = model(images)[0]  # images: (B, 3, 32, 32) in [0, 1]
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
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match its model_args ({str(err).splitlines()[0]})") from None
    return model.to(device).eval(), state["config"]


# ----------------------------------------------------------------------------- data

def _cifar_split(root, train):
    from torchvision.datasets import CIFAR10

    return CIFAR10(root=root, train=train, download=True)


def load_cifar10(data_dir):
    """CIFAR-10 via torchvision (downloaded into data_dir once) -> uint8 (N, 3, 32, 32) train, test."""
    try:
        splits = [_cifar_split(data_dir, train) for train in (True, False)]
    except Exception as err:  # no network, a partial archive, a checksum mismatch...
        raise DataError(
            f"CIFAR-10 is not in {data_dir!r} and could not be downloaded ({type(err).__name__}: {str(err)[:80]}); "
            f"put cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) in {data_dir}/ "
            f"or train on your own images with --dataset=folder --data_dir=DIR (DIR/train/ and DIR/test/)") from None
    return tuple(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in splits)


def _to_8bit_rgb(img):
    """A PIL image of any mode -> uint8 RGB array. 16-bit greyscale (modes I;16*, I) is scaled to
    8 bits: PIL's own convert("RGB") clips it, turning a 16-bit photo white."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
        img = Image.fromarray(np.round(wide.clip(0, top) * (255.0 / top)).astype(np.uint8))
    return np.asarray(img.convert("RGB"))


def _read_image(path, size):
    """(uint8 (size, size, 3) array, None) or (None, why it could not be read)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            rgb = _to_8bit_rgb(img)
        return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC)), None
    except Image.DecompressionBombError:
        return None, f"over PIL's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
    except (OSError, ValueError, SyntaxError) as err:
        return None, type(err).__name__


def _read_images(paths, size):
    return [_read_image(p, size) for p in paths]


def _decode_all(paths, size):
    """Decode every path, in parallel worker processes for large folders (PIL holds the GIL)."""
    if len(paths) < PARALLEL_DECODE_MIN or (os.cpu_count() or 1) < 2:
        return _read_images(paths, size)
    chunks = [paths[i:i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        return [r for part in pool.map(_read_images, chunks, [size] * len(chunks)) for r in part]


def _folder_key(folder, paths, size):
    """A digest of what the decoded tensor depends on: file names, sizes, mtimes, size, version."""
    h = hashlib.sha256(f"{IMAGE_CACHE_VERSION} {size}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"\n{p.relative_to(folder)} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()


def image_cache_path(folder, size=32):
    return os.path.join(folder, f".images_{size}px.cache.pt")


def _read_cache(path, key):
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return cached if cached.get("key") == key else None
    except Exception:  # missing, stale, truncated or foreign: decode again
        return None


def load_image_folder(folder, size=32):
    """All png/jpg images under `folder` (any depth), resized to size x size -> uint8 (N, 3, size, size).

    The first load decodes them (in parallel for large folders) and caches the tensor in
    `folder/.images_{size}px.cache.pt`; later loads read the cache while the file names, sizes and
    mtimes are unchanged. Unreadable files (and images beyond PIL's decompression-bomb limit) are
    skipped and counted; a warning names the first one."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder!r} is not a folder; dataset='folder' needs data_dir with train/ and test/ subfolders of images")
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    key = _folder_key(folder, paths, size)
    cache = image_cache_path(folder, size)
    cached = _read_cache(cache, key)
    if cached is None:
        decoded = _decode_all(paths, size)
        bad = [(str(p), why) for p, (_, why) in zip(paths, decoded) if why is not None]
        arrays = [a for a, why in decoded if why is None]
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else None
        cached = {"key": key, "images": images, "bad": bad}
        if images is not None:
            try:
                save_checkpoint(cache, cached)
            except UserError:  # a read-only data folder: no cache, decode again next time
                pass
    bad = cached["bad"]
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s) in {folder} (first: {bad[0][0]}: {bad[0][1]})", file=sys.stderr)
    if cached["images"] is None:
        raise DataError(f"no readable .png/.jpg images under {folder!r}" + (f" ({len(bad)} unreadable)" if bad else ""))
    return cached["images"]


def check_dataset(dataset):
    if dataset not in DATASETS:
        raise ConfigError(f"dataset={dataset!r} is unknown; use one of {', '.join(DATASETS)}")


def load_dataset(dataset, data_dir):
    """(train, val) uint8 tensors (N, 3, 32, 32) on the CPU."""
    check_dataset(dataset)
    if dataset == "cifar10":
        return load_cifar10(data_dir)
    return tuple(load_image_folder(os.path.join(data_dir, split)) for split in ("train", "test"))


def head(images, n):
    """The first `n` images, or all of them when n is 0 (the convention of every "*_images" knob)."""
    return images[:n] if n > 0 else images


def to_float_images(batch_u8):
    """uint8 (B, 3, H, W) -> float in [0, 1] on the same device."""
    return batch_u8.float().div_(255.0)
