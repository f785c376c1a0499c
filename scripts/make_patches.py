"""Build the natural-image patch folder that the README's measurements use.

    python scripts/make_patches.py /tmp/patches              # downloads the scikit-image wheel with pip
    python scripts/make_patches.py /tmp/patches --wheel=scikit_image-0.26.0-....whl

CIFAR-10 cannot be downloaded on the machine the README was measured on, so its numbers come from
32x32 crops of photos that ship inside the scikit-image 0.26.0 wheel and matplotlib. Training and
test crops come from different photos (held-out photos, not held-out crops). Each photo is
downscaled 2x and 3x (bicubic) and random crops are cut from both scales (numpy seed 0), so the
folder is the same on every machine:

    OUT/train/  20,000 crops of astronaut, hubble_deep_field, ihc, motorcycle_left, retina, rocket
                and matplotlib's grace_hopper
    OUT/test/    2,000 crops of chelsea and coffee
"""
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from PIL import Image

WHEEL = "scikit-image==0.26.0"
TRAIN_PHOTOS = ("astronaut.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "retina.jpg", "rocket.jpg")
TEST_PHOTOS = ("chelsea.png", "coffee.png")
SCALES = (2, 3)  # each photo is downscaled by these factors before cropping
CROP = 32
SPLIT_SIZES = {"train": 20000, "test": 2000}


def fetch_wheel(folder):
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    WHEEL, "-d", folder], check=True)
    return glob.glob(os.path.join(folder, "scikit_image-*.whl"))[0]


def read_photos(wheel):
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


def crops(photos, count, rng):
    """`count` random CROP x CROP uint8 crops, spread evenly over photos x scales."""
    scaled = [np.asarray(p.resize((p.width // s, p.height // s), Image.BICUBIC)) for p in photos for s in SCALES]
    out = []
    for i in range(count):
        img = scaled[i % len(scaled)]
        y = rng.integers(0, img.shape[0] - CROP + 1)
        x = rng.integers(0, img.shape[1] - CROP + 1)
        out.append(img[y:y + CROP, x:x + CROP])
    return out


def main(argv):
    if not argv or argv[0].startswith("--"):
        sys.exit("usage: python scripts/make_patches.py OUT_DIR [--wheel=PATH]")
    out_dir = argv[0]
    wheel = next((a.split("=", 1)[1] for a in argv[1:] if a.startswith("--wheel=")), None)
    with tempfile.TemporaryDirectory() as tmp:
        photos = read_photos(wheel or fetch_wheel(tmp))
    rng = np.random.default_rng(0)
    names = {"train": TRAIN_PHOTOS + ("grace_hopper.jpg",), "test": TEST_PHOTOS}
    for split, count in SPLIT_SIZES.items():
        folder = os.path.join(out_dir, split)
        os.makedirs(folder, exist_ok=True)
        for i, crop in enumerate(crops([photos[n] for n in names[split]], count, rng)):
            Image.fromarray(crop).save(os.path.join(folder, f"{i:05d}.png"))
        print(f"wrote {count} crops to {folder}")


if __name__ == "__main__":
    main(sys.argv[1:])
