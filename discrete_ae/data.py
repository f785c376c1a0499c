"""Training data: CIFAR-10 or an image folder as one uint8 tensor, and the augmentation.

Images leave this module as uint8 tensors (N, 3, 32, 32), the whole split at once (as in
KellerJordan/cifar10-airbench: no DataLoader, no per-sample transforms); `to_float_images`
turns a batch into floats in [0, 1] on the training device (models.py states the contract).
"""
import functools
import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from discrete_ae.errors import ConfigError, DataError, UserError
from discrete_ae.files import save_tensors
from discrete_ae.geometry import IMAGE_SIZE

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DATASETS = ("cifar10", "folder")
DEFAULT_DATA_DIR = "data"  # where train.py and the programs read data when no --data_dir is given
IMAGE_CACHE_VERSION = 2  # 2: EXIF orientation applied, non-square images centre-cropped
PARALLEL_DECODE_MIN = 2000  # folders with fewer images decode in this process (no pool start-up)
DECODE_CHUNK = 256  # images per task handed to a decoding worker
SYMMETRIES = (1, 2, 4, 8)  # views per crop: none, left-right flips, quarter turns, both (the square's 8)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MAKE_PATCHES = "python scripts/make_patches.py DIR"  # builds DIR/train/ and DIR/test/ of photo crops offline
OFFLINE_HINT = f"or, offline, build photo crops with `{MAKE_PATCHES}` and train on them with --dataset=folder --data_dir=DIR"


# ----------------------------------------------------------------------------- CIFAR-10

def _cifar_split(root, train):
    from torchvision.datasets import CIFAR10

    return CIFAR10(root=root, train=train, download=True)


def load_cifar10(data_dir):
    """CIFAR-10 via torchvision (downloaded into data_dir once) -> uint8 (N, 3, 32, 32) train, test."""
    existed = os.path.isdir(data_dir)
    try:
        splits = [_cifar_split(data_dir, train) for train in (True, False)]
    except Exception as err:  # no network, a partial archive, a checksum mismatch...
        if not existed:  # the folder torchvision made for the download: nothing of the user's is in it
            shutil.rmtree(data_dir, ignore_errors=True)
        raise DataError(f"CIFAR-10 is not in {data_dir!r} and could not be downloaded ({type(err).__name__}: "
                        f"{str(err)[:80]}); put cifar-10-python.tar.gz ({CIFAR_URL}) in {data_dir}/ {OFFLINE_HINT}") from None
    return tuple(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in splits)


# ----------------------------------------------------------------------------- image folders

def _to_8bit_rgb(img):
    """A PIL image of any mode -> uint8 RGB array. 16-bit greyscale (modes I;16*, I) is scaled to
    8 bits: PIL's own convert("RGB") clips it, turning a 16-bit photo white."""
    from PIL import Image

    if img.mode == "F":  # 32-bit float: [0, 1] as this repo's images are, or 0-255
        wide = np.asarray(img, dtype=np.float64)
        top = 1.0 if np.nanmax(wide, initial=0.0) <= 1.0 else 255.0
        img = Image.fromarray(np.round(np.nan_to_num(wide).clip(0, top) * (255.0 / top)).astype(np.uint8))
    elif img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
        img = Image.fromarray(np.round(wide.clip(0, top) * (255.0 / top)).astype(np.uint8))
    return np.asarray(img.convert("RGB"))


def read_rgb(path):
    """A photo file -> (uint8 (H, W, 3) array turned upright by its EXIF orientation, whether it was
    turned). Pillow's errors pass through; callers say what they mean."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        upright = ImageOps.exif_transpose(img)
        return _to_8bit_rgb(upright), _exif_orientation(img) > 1  # 2-8: mirrored and/or turned


def _read_image(path, size):
    """(uint8 (size, size, 3) array, what was changed, None) or (None, (), why it could not be read).

    Changes, as a photo viewer and torchvision's Resize + CenterCrop would make them: "rotated"
    (turned upright by its EXIF orientation), "cropped" (centre-cropped to a square), "upscaled"
    (its short side was under `size`)."""
    from PIL import Image

    try:
        array, turned = read_rgb(path)
        changes = ("rotated",) if turned else ()
        rgb = Image.fromarray(array)
        w, h = rgb.size
        if w != h:
            side = min(w, h)
            rgb = rgb.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
            changes += ("cropped",)
        if rgb.size[0] < size:
            changes += ("upscaled",)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.BICUBIC)
        return np.asarray(rgb), changes, None
    except Image.DecompressionBombError:
        return None, (), f"over PIL's decompression-bomb limit of {2 * Image.MAX_IMAGE_PIXELS:,} pixels"
    except (OSError, ValueError, SyntaxError) as err:
        return None, (), type(err).__name__


def _exif_orientation(img):
    try:
        return int(img.getexif().get(0x0112, 1))  # 0x0112: the Orientation tag
    except (ValueError, TypeError, AttributeError):
        return 1


def _read_images(paths, size):
    return [_read_image(p, size) for p in paths]


def _die_with_parent():
    """A decoding worker ends when the process that started it ends, even by SIGKILL (Linux's
    PR_SET_PDEATHSIG), and leaves Ctrl-C to its parent, which ends the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _decode_all(paths, size):
    """Decode every path, in worker processes for large folders (PIL holds the GIL). The workers
    are spawned, not forked, so they inherit no open file (the run lock included)."""
    if len(paths) < PARALLEL_DECODE_MIN or (os.cpu_count() or 1) < 2:
        return _read_images(paths, size)
    chunks = [(paths[i:i + DECODE_CHUNK], size) for i in range(0, len(paths), DECODE_CHUNK)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count(), initializer=_die_with_parent) as pool:
        return [r for part in pool.starmap(_read_images, chunks) for r in part]  # leaving `with` ends the workers


def _folder_key(folder, paths, size):
    """A digest of what the decoded tensor depends on: file names, sizes, mtimes, size, version."""
    h = hashlib.sha256(f"{IMAGE_CACHE_VERSION} {size}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"\n{p.relative_to(folder)} {st.st_size} {st.st_mtime_ns}".encode())
    return h.hexdigest()


def image_cache_path(folder, size=IMAGE_SIZE):
    return os.path.join(folder, f".images_{size}px.cache.pt")


def _read_cache(path, key):
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
        return cached if cached.get("key") == key else None
    except Exception:  # missing, stale, truncated or foreign: decode again
        return None


def _decode_folder(folder, paths, size, key):
    decoded = _decode_all(paths, size)
    bad = [(str(p), why) for p, (_, _, why) in zip(paths, decoded) if why is not None]
    arrays = [a for a, _, why in decoded if why is None]
    changed = {c: sum(c in changes for _, changes, _ in decoded) for c in ("rotated", "cropped", "upscaled")}
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else None
    return {"key": key, "images": images, "bad": bad, "changed": changed}


def load_image_folder(folder, size=IMAGE_SIZE):
    """All png/jpg images under `folder` (any depth) -> uint8 (N, 3, size, size): turned upright by
    their EXIF orientation, centre-cropped to a square, resized (bicubic). One warning line counts
    what was changed, another the files that could not be read (skipped; the first is named).

    The first load decodes them (in parallel for large folders) and caches the tensor in
    `folder/.images_{size}px.cache.pt`; later loads read the cache while the file names, sizes and
    mtimes are unchanged. A folder that cannot be written goes without a cache."""
    if not os.path.isdir(folder):
        raise DataError(f"{folder!r} is not a folder; dataset='folder' needs data_dir with train/ and test/ "
                        f"subfolders of images (`{MAKE_PATCHES}` builds such a folder)")
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    key = _folder_key(folder, paths, size)
    cache = image_cache_path(folder, size)
    cached = _read_cache(cache, key)
    if cached is None:
        cached = _decode_folder(folder, paths, size, key)
        if cached["images"] is not None:
            try:
                save_tensors(cache, cached)
            except UserError:  # a read-only data folder: no cache, decode again next time
                pass
    bad, changed, images = cached["bad"], cached["changed"], cached["images"]
    if bad:
        print(f"warning: skipped {len(bad)} unreadable image(s) in {folder} (first: {bad[0][0]}: {bad[0][1]})", file=sys.stderr)
    if images is None:
        raise DataError(f"no readable .png/.jpg images under {folder!r}" + (f" ({len(bad)} unreadable)" if bad else ""))
    if any(changed.values()):
        print(f"warning: {folder}: of {len(images)} images, {changed['rotated']} turned upright by their EXIF "
              f"orientation, {changed['cropped']} centre-cropped to a square, {changed['upscaled']} upscaled from "
              f"under {size} px, to make them {size}x{size}", file=sys.stderr)
    return images


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
    """The first `n` images, or all of them when n is 0."""
    return images[:n] if n > 0 else images


def to_float_images(batch_u8):
    """uint8 (B, 3, H, W) -> float in [0, 1] on the same device."""
    return batch_u8.float().div_(255.0)


# ----------------------------------------------------------------------------- order and augmentation

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


@functools.lru_cache(maxsize=None)
def _symmetry_index(size, device):
    """(8, size * size): for symmetry k of the square (mirrored left-right if k >= 4, then k % 4
    quarter turns), the source pixel of every output pixel, row-major."""
    grid = torch.arange(size * size, device=device).view(size, size)
    return torch.stack([torch.rot90(grid.flip(1) if k >= 4 else grid, k % 4, (0, 1)).reshape(-1) for k in range(8)])


def random_symmetry(x, symmetries):
    """(B, 3, S, S) -> each image mapped by one symmetry of the square drawn uniformly from the
    first `symmetries` views: 1 none, 2 identity or a left-right flip, 4 the quarter turns, 8 the
    dihedral group D4 (flips and turns). One gather over a precomputed pixel permutation. Draws
    from the global RNG of x's device, whose state every checkpoint stores."""
    if symmetries == 1:
        return x
    b, c, h, w = x.shape
    k = torch.randint(0, symmetries if symmetries != 2 else 2, (b,), device=x.device)  # (B,)
    if symmetries == 2:
        k = 4 * k  # 0: as it is, 4: mirrored
    source = _symmetry_index(h, x.device)[k]  # (B, S * S)
    return x.reshape(b, c, h * w).gather(2, source[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


def random_gains(x, spread):
    """(B, 3, S, S) in [0, 1] -> each image's R, G and B multiplied by its own gains drawn from
    [1 - spread, 1 + spread], clipped to [0, 1]: the white balance of another camera or light,
    variety that flips and turns cannot add (docs/recipe.md). Draws from x's device's global RNG."""
    if spread <= 0:
        return x
    gains = 1 + spread * (2 * torch.rand(x.shape[0], x.shape[1], 1, 1, device=x.device) - 1)  # (B, 3, 1, 1)
    return (x * gains).clamp_(0, 1)
