"""Build the natural-image patch folders that the README's measurements use.

    python scripts/make_patches.py /tmp/patches                  # set "skimage": pip downloads the scikit-image wheel
    python scripts/make_patches.py /tmp/patches --wheel=scikit_image-0.26.0-....whl
    python scripts/make_patches.py /tmp/photos --set=wallpapers  # set "wallpapers": 3 Debian packages (156 MB)
    python scripts/make_patches.py /tmp/photos --set=wallpapers --debs=FOLDER   # .deb files already downloaded
    python scripts/make_patches.py /tmp/objects --set=objects    # set "objects": Tux Paint's photographed stamps
    python scripts/make_patches.py /tmp/textures --set=textures  # set "textures": GIMP's photographed materials

CIFAR-10 cannot be downloaded on the machine the README was measured on, so its numbers come from
32x32 crops of photos that anyone can fetch from a package registry. Training and test crops come
from different photos (held-out photos, not held-out crops). Random crops are cut from each photo
at a few scales (bicubic downscaling, numpy seed 0), so a folder is the same on every machine:

set "skimage" (the default of this script; 9 photos: scikit-image 0.26.0's wheel and matplotlib):
    OUT/train/  20,000 crops of astronaut, hubble_deep_field, ihc, motorcycle_left, retina, rocket
                and matplotlib's grace_hopper, each downscaled 2x and 3x
    OUT/test/    2,000 crops of chelsea and coffee

set "objects" (photographed objects and animals, close up: Tux Paint's stamps, one Debian 12 package
of 161 MB, checked by SHA-256): the photographed stamps (animals, food, plants, household objects,
vehicles, buildings; no cartoons or symbols), every 6th held out; crops only inside each object
(fully opaque), at short sides of 96 and 160 pixels.

set "textures" (materials, close up: GIMP's patterns, two Debian 12 packages of 18 MB, checked by
SHA-256): the 29 patterns that are photographs (bark, brick, stone, wood, leaves, leather, cloth,
paper, coffee beans, soil, marble, banknotes; no rendered or filtered ones), 64 to 161 pixels a
side, cropped at their own scale (a crop holds a fifth to a half of the pattern); every 5th in name
order held out.

set "wallpapers" (the README's first set; 35 photographs from Debian 12's wallpaper packages, checked by SHA-256):
    OUT/train/  20,000 crops of 29 photos (landscapes, plants, animals, objects, interiors)
    OUT/test/    2,000 crops of 6 other photos
    each photo is scaled to a short side of 96, 160 and 256 pixels, so a 32x32 crop holds a third
    to an eighth of the picture's height, near CIFAR-10's framing.

Every set also writes OUT/photos/: the held-out photos whole, at the middle of the crops' scales
(wallpapers: a short side of 160 pixels, where a 32x32 block holds a fifth of the height;
skimage: downscaled 2.5x; objects: a short side of 160 on mid-grey; textures: as they are), as PNG
without metadata: what codec.py's evaluation compresses.
"""
import glob
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
import zipfile

import numpy as np
from PIL import Image

from discrete_ae.errors import DataError, UserError, cli
from discrete_ae.files import atomic_write
from discrete_ae.overrides import parse_paths_and_options

WHEEL = "scikit-image==0.26.0"
TRAIN_PHOTOS = ("astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
TEST_PHOTOS = ("chelsea.png", "coffee.png")
SCALES = (2, 3)  # set "skimage": each photo is downscaled by these factors before cropping
CROP = 32
SPLIT_SIZES = {"train": 20000, "test": 2000}

DEBIAN_POOL = "https://deb.debian.org/debian/pool/main/"
# package file in Debian 12 (bookworm) -> SHA-256; old releases stay on snapshot.debian.org
DEBS = {
    "l/lomiri-wallpapers/lomiri-wallpapers-16.04_20.04.0-2_all.deb":
        "a99ff6a3bfe451e4cc0682ecb3cc82e71740626d59e4845ae34a0a0e45421eab",
    "m/mate-backgrounds/mate-backgrounds_1.26.0-1_all.deb":
        "7bf4c2209f34b4f61ba6d24c8b58c28b361e82e4b943aae6d42c030169af9e04",
    "p/plasma-workspace-wallpapers/plasma-workspace-wallpapers_5.27.5-2_all.deb":
        "32cd18b71c8c938a18b3b351f217c02ac590e323caa3cf322fbb875ce8892f8b",
}
LOMIRI = "usr/share/backgrounds/{}_by_{}.jpg"
MATE = "usr/share/backgrounds/mate/nature/{}.jpg"
PLASMA = "usr/share/wallpapers/{}/contents/images/2560x1600.jpg"
WALLPAPER_TRAIN = tuple(
    [LOMIRI.format(*n.split("/")) for n in (
        "Bridge/Sander_Klootwijk", "Dragonfly/Bolly", "Picture_1A/freespace", "Wine/Jakkub_Mede",
        "aitzgorri/Aitzol_Berasategi", "free/Peter_Nerlich", "life/Aitzol_Berasategi",
        "seeding/Clements_Engelhardt", "sunset/Aitzol_Berasategi")]
    + [MATE.format(n) for n in (
        "Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "RainDrops", "Storm",
        "TwoWings", "Wood", "YellowFlower")]
    + [PLASMA.format(n) for n in (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "summer_1am")])
WALLPAPER_TEST = (LOMIRI.format("picosdeeuropa", "Aitzol_Berasategi"), LOMIRI.format("Picture_0B", "freespace"),
                  LOMIRI.format("friends", "Aitzol_Berasategi"), MATE.format("LadyBird"),
                  PLASMA.format("EveningGlow"), PLASMA.format("Path"))
SHORT_SIDES = (96, 160, 256)  # set "wallpapers": each photo is scaled to these short sides
# set "objects": Tux Paint's photographed stamps (Debian 12), crops inside each object
OBJECT_DEBS = {"t/tuxpaint-stamps/tuxpaint-stamps-default_2022.06.04-1_all.deb":
               "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34"}
OBJECT_ROOT = "usr/share/tuxpaint/stamps/"
OBJECT_CATEGORIES = ("animals", "food", "plants", "household", "clothes", "vehicles", "town", "hobbies", "sports",
                     "military", "people", "medical")  # photographs; "symbols", "space", "seasonal" are drawings
OBJECT_SIDES = (96, 160)  # each stamp scaled to these short sides; a crop holds a fifth to a third of it
MIN_OPAQUE_WINDOWS = 8  # opaque crops (on an 8-pixel grid, at 160 px) a stamp needs to be used
OBJECT_TEST_EVERY = 6  # every 6th stamp in path order is held out for the test split
# set "textures": GIMP's photographed patterns (Debian 12), at their own scale
TEXTURE_DEBS = {"g/gimp/gimp-data_2.10.34-1+deb12u10_all.deb":
                "89007a69d4ef2b0440e5419e75d4112cfd1c49e97db38220d210b9f86322be7c",
                "g/gimp-data-extras/gimp-data-extras_2.0.2-1.1_all.deb":
                "aa7cb9f0993aebe1585ec6de7e401c4cac22a5961a6585a005acccee2a969f97"}
TEXTURE_ROOT = "usr/share/gimp/2.0/patterns/"
TEXTURES = ("amethyst", "bark", "brick", "burlap", "burlwood", "clovers", "connestoga", "corkboard", "crinklepaper",
            "dirt", "drymud", "ground1", "java", "leather", "leaves3", "leaves4", "leaves6", "marble3", "money",
            "parque1", "parque2", "parque3", "pebbles", "pink_marble", "rock", "stone33", "walnut", "wood1", "wood5")
TEXTURE_TEST_EVERY = 5  # every 5th pattern in name order is held out for the test split
PHOTO_SHORT_SIDE = 160  # set "wallpapers": the whole held-out photos, the middle of SHORT_SIDES
PHOTO_DOWNSCALE = 2.5  # set "skimage": the whole held-out photos, between SCALES


def fetch_wheel(folder):
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    WHEEL, "-d", folder], check=True)
    return glob.glob(os.path.join(folder, "scikit_image-*.whl"))[0]


def read_skimage_photos(wheel):
    """name -> RGB PIL image, from the wheel's skimage/data/ and matplotlib's sample data."""
    photos = {}
    with zipfile.ZipFile(wheel) as zf:
        for name in TRAIN_PHOTOS + TEST_PHOTOS:
            with zf.open(f"skimage/data/{name}") as f:
                photos[name] = Image.open(f).convert("RGB")
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photos["grace_hopper.jpg"] = Image.open(f).convert("RGB")
    return photos


def deb_bytes(pool_path, debs_dir, checksums=None):
    """The .deb's bytes from debs_dir (if given) or Debian's mirror, checked against `checksums`
    (DEBS by default)."""
    checksums = DEBS if checksums is None else checksums
    name = os.path.basename(pool_path)
    if debs_dir:  # apt-get download names it with the version's epoch ("_4%3a5.27.5-2_")
        matches = glob.glob(os.path.join(debs_dir, name.split("_")[0] + "_*.deb"))
        if not matches:
            raise DataError(f"no {name} in {debs_dir}; download it from {DEBIAN_POOL + pool_path}")
        with open(matches[0], "rb") as f:
            data = f.read()
    else:
        try:
            with urllib.request.urlopen(DEBIAN_POOL + pool_path, timeout=60) as r:
                data = r.read()
        except OSError as err:  # URLError, timeouts, resets
            raise DataError(f"could not download {DEBIAN_POOL + pool_path} ({err}); fetch the packages "
                            "another way (e.g. `apt-get download` or snapshot.debian.org) and pass --debs=DIR") from None
    if hashlib.sha256(data).hexdigest() != checksums[pool_path]:
        raise DataError(f"{name} does not have the SHA-256 this script expects; fetch it again from {DEBIAN_POOL}")
    return data


def deb_data_members(data):
    """The data.tar.xz of a .deb (an ar archive: 8-byte magic, then 60-byte headers, 2-byte aligned)."""
    pos = 8
    while pos < len(data):
        name, size = data[pos:pos + 16].decode().strip(), int(data[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            return tarfile.open(fileobj=io.BytesIO(data[pos + 60:pos + 60 + size]))
        pos += 60 + size + size % 2
    raise ValueError("no data.tar in the package")


def read_wallpaper_photos(debs_dir):
    """path -> RGB PIL image for WALLPAPER_TRAIN + WALLPAPER_TEST."""
    wanted, photos = set(WALLPAPER_TRAIN + WALLPAPER_TEST), {}
    for pool_path in DEBS:
        with deb_data_members(deb_bytes(pool_path, debs_dir)) as tar:
            for member in tar.getmembers():
                path = member.name.removeprefix("./")
                if path in wanted:
                    photos[path] = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
    return photos


def crops(scaled, count, rng):
    """`count` random CROP x CROP uint8 RGB crops, spread evenly over the (H, W, 3) arrays in
    scaled; an (H, W, 4) array is cropped only where its alpha is opaque (inside the object), and
    left out when no crop fits there."""
    places = [np.argwhere(opaque_windows(img)) if img.shape[2] == 4 else None for img in scaled]
    usable = [(img, where) for img, where in zip(scaled, places) if where is None or len(where)]
    out = []
    for i in range(count):
        img, where = usable[i % len(usable)]
        if where is not None:
            y, x = where[rng.integers(len(where))]
        else:
            y = rng.integers(0, img.shape[0] - CROP + 1)
            x = rng.integers(0, img.shape[1] - CROP + 1)
        out.append(np.ascontiguousarray(img[y:y + CROP, x:x + CROP, :3]))
    return out


def opaque_windows(rgba):
    """(H - CROP + 1, W - CROP + 1) bools: where a CROP x CROP window is fully opaque (an integral image)."""
    clear = np.pad((rgba[..., 3] < 255).astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    c = CROP
    return (clear[c:, c:] - clear[:-c, c:] - clear[c:, :-c] + clear[:-c, :-c]) == 0


def read_object_photos(debs_dir):
    """name -> RGBA PIL image: Tux Paint's photographed stamps (OBJECT_CATEGORIES, no cartoons) with at
    least MIN_OPAQUE_WINDOWS fully opaque crops at the middle scale."""
    (pool_path,) = OBJECT_DEBS
    photos = {}
    with deb_data_members(deb_bytes(pool_path, debs_dir, OBJECT_DEBS)) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            path = member.name.removeprefix("./")
            parts = path.split("/")
            if (not path.startswith(OBJECT_ROOT) or not path.endswith(".png") or "cartoon" in parts
                    or parts[len(OBJECT_ROOT.split("/")) - 1] not in OBJECT_CATEGORIES):
                continue
            photo = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGBA")
            if opaque_windows(to_short_side(photo, OBJECT_SIDES[1]))[::8, ::8].sum() >= MIN_OPAQUE_WINDOWS:
                photos[path] = photo
    if len(photos) < 2 * OBJECT_TEST_EVERY:
        raise DataError(f"only {len(photos)} photographed stamps in the package: not the one this script expects")
    return photos


def read_pattern(data):
    """A GIMP pattern (.pat: a big-endian header of size, version, width, height, bytes per pixel,
    b"GPAT" and a name, then the pixels row by row) -> RGB PIL image."""
    import struct

    if len(data) < 24 or data[20:24] != b"GPAT":
        raise DataError("a pattern in the package is not a GIMP pattern: not the package this script expects")
    header, _, width, height, depth = struct.unpack(">5I", data[:20])
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(depth)
    if mode is None or len(data) < header + width * height * depth:
        raise DataError("a GIMP pattern in the package is truncated or has an unknown pixel format")
    return Image.frombytes(mode, (width, height), data[header:header + width * height * depth]).convert("RGB")


def read_texture_photos(debs_dir):
    """name -> RGB PIL image for TEXTURES, from GIMP's two pattern packages."""
    photos = {}
    for pool_path in TEXTURE_DEBS:
        with deb_data_members(deb_bytes(pool_path, debs_dir, TEXTURE_DEBS)) as tar:
            for member in tar.getmembers():
                path = member.name.removeprefix("./")  # gimp-data keeps them in folders (Wood/bark.pat)
                if path.startswith(TEXTURE_ROOT) and os.path.basename(path)[:-4] in TEXTURES and path.endswith(".pat"):
                    photos[os.path.basename(path)[:-4]] = read_pattern(tar.extractfile(member).read())
    missing = sorted(set(TEXTURES) - set(photos))
    if missing:
        raise DataError(f"the packages lack the patterns {', '.join(missing)}: not the ones this script expects")
    return photos


def as_is(photo, _):
    return np.asarray(photo)


def downscaled(photo, factor):
    return np.asarray(photo.resize((photo.width // factor, photo.height // factor), Image.BICUBIC))


def to_short_side(photo, side):
    scale = side / min(photo.size)
    return np.asarray(photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC))


def flattened(rgba):
    """An (H, W, 4) stamp on mid-grey, as a whole photo for codec.py (it codes RGB)."""
    alpha = rgba[..., 3:4] / 255.0
    return np.round(rgba[..., :3] * alpha + 128 * (1 - alpha)).astype(np.uint8)


def save_png(path, array):
    """Written whole or not at all: a full disk is one line, never a 0-byte PNG."""
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def photo_name(path):
    """A file name for a photo: the plasma wallpapers are all 2560x1600.jpg, in folders of their name;
    stamps are named by their category path."""
    parts = path.split("/")
    if path.startswith(OBJECT_ROOT):
        return "_".join(os.path.splitext(path[len(OBJECT_ROOT):])[0].split("/"))
    return parts[3] if parts[-1] == "2560x1600.jpg" else os.path.splitext(parts[-1])[0]  # a pattern: its name


USAGE = "usage: python scripts/make_patches.py OUT_DIR [--set=skimage|wallpapers|objects|textures] [--wheel=PATH] [--debs=DIR]"


def main(argv):
    paths, opts = parse_paths_and_options(argv, dict(set="skimage", wheel="", debs=""), USAGE, count=1)
    out_dir, set_name = paths[0], opts["set"]
    if set_name == "skimage":
        with tempfile.TemporaryDirectory() as tmp:
            photos = read_skimage_photos(opts["wheel"] or fetch_wheel(tmp))
        names = {"train": TRAIN_PHOTOS + ("grace_hopper.jpg",), "test": TEST_PHOTOS}
        scale = [(downscaled, s) for s in SCALES]
        whole = lambda photo: to_short_side(photo, round(min(photo.size) / PHOTO_DOWNSCALE))  # noqa: E731
    elif set_name == "wallpapers":
        photos = read_wallpaper_photos(opts["debs"])
        names = {"train": WALLPAPER_TRAIN, "test": WALLPAPER_TEST}
        scale = [(to_short_side, s) for s in SHORT_SIDES]
        whole = lambda photo: to_short_side(photo, PHOTO_SHORT_SIDE)  # noqa: E731
    elif set_name == "objects":
        photos = read_object_photos(opts["debs"])
        ordered = sorted(photos)
        names = {"test": tuple(ordered[::OBJECT_TEST_EVERY]),
                 "train": tuple(p for i, p in enumerate(ordered) if i % OBJECT_TEST_EVERY)}
        scale = [(to_short_side, s) for s in OBJECT_SIDES]
        whole = lambda photo: flattened(to_short_side(photo, OBJECT_SIDES[1]))  # noqa: E731
    elif set_name == "textures":
        photos = read_texture_photos(opts["debs"])
        names = {"test": TEXTURES[::TEXTURE_TEST_EVERY],
                 "train": tuple(n for i, n in enumerate(TEXTURES) if i % TEXTURE_TEST_EVERY)}
        scale = [(as_is, None)]
        whole = np.asarray
    else:
        raise UserError(f"unknown --set={set_name}; use --set=skimage, --set=wallpapers, --set=objects or --set=textures")
    rng = np.random.default_rng(0)
    for split, count in SPLIT_SIZES.items():
        folder = os.path.join(out_dir, split)
        os.makedirs(folder, exist_ok=True)
        scaled = [f(photos[n], s) for n in names[split] for f, s in scale]
        for i, crop in enumerate(crops(scaled, count, rng)):
            save_png(os.path.join(folder, f"{i:05d}.png"), crop)
        print(f"wrote {count} crops of {len(names[split])} photos to {folder}")
    folder = os.path.join(out_dir, "photos")
    os.makedirs(folder, exist_ok=True)
    for name in names["test"]:
        save_png(os.path.join(folder, photo_name(name) + ".png"), whole(photos[name]))
    print(f"wrote the {len(names['test'])} held-out photos whole to {folder}")


if __name__ == "__main__":
    cli(main, __doc__)
