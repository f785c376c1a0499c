"""scripts/make_patches.py's "wallpapers" set, on tiny .deb files the test builds itself (the real
packages are 156 MB and need the network): the ar/tar reading, the held-out split, the checksum."""
import hashlib
import io
import os
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import make_patches  # noqa: E402

from discrete_ae.errors import UserError  # noqa: E402

TRAIN_RGB, TEST_RGB = (200, 30, 30), (30, 30, 200)


def ar_member(name, data):
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def fake_deb(members, image_format="JPEG"):
    """A .deb (ar archive) whose data.tar.xz holds {path: PIL image (saved as JPEG or PNG) or bytes}
    as ./path files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for path, member in members.items():
            data = member
            if not isinstance(member, bytes):
                encoded = io.BytesIO()
                member.save(encoded, format=image_format)
                data = encoded.getvalue()
            info = tarfile.TarInfo("./" + path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("data.tar.xz", buf.getvalue())


def pinned_debs(folder, pools, members):
    """One fake package per pool file in `folder`, {path: member} dealt out in path order ->
    {pool: SHA-256}, the checksums make_patches pins."""
    folder.mkdir()
    hashes = {}
    for i, pool in enumerate(pools):
        data = fake_deb({p: m for j, (p, m) in enumerate(sorted(members.items())) if j % len(pools) == i})
        (folder / os.path.basename(pool)).write_bytes(data)
        hashes[pool] = hashlib.sha256(data).hexdigest()
    return hashes


@pytest.fixture
def debs(tmp_path, monkeypatch):
    """One fake package per pool file, each holding its share of the photos; DEBS pinned to them."""
    folder = tmp_path / "debs"
    photos = {p: Image.new("RGB", (300, 200), TRAIN_RGB) for p in make_patches.WALLPAPER_TRAIN}
    photos.update({p: Image.new("RGB", (200, 300), TEST_RGB) for p in make_patches.WALLPAPER_TEST})
    monkeypatch.setattr(make_patches, "DEBS", pinned_debs(folder, list(make_patches.DEBS), photos))
    monkeypatch.setattr(make_patches, "SPLIT_SIZES", {"train": 40, "test": 12})
    return folder


def test_wallpapers_set_splits_photos(tmp_path, debs):
    out = tmp_path / "out"
    make_patches.main([str(out), "--set=wallpapers", f"--debs={debs}"])
    for split, rgb, count in (("train", TRAIN_RGB, 40), ("test", TEST_RGB, 12)):
        files = sorted(os.listdir(out / split))
        assert len(files) == count
        crops = np.stack([np.asarray(Image.open(out / split / f)) for f in files]).astype(int)
        assert crops.shape == (count, 32, 32, 3)
        # every crop of a split comes from that split's photos (JPEG moves a solid colour by a few levels)
        assert np.abs(crops - np.array(rgb)).max() < 12


def test_wallpapers_set_refuses_a_changed_package(tmp_path, debs):
    pool = next(iter(make_patches.DEBS))
    path = debs / os.path.basename(pool)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(UserError, match="SHA-256"):
        make_patches.main([str(tmp_path / "out"), "--set=wallpapers", f"--debs={debs}"])


def test_failed_download_is_a_one_line_error(tmp_path, debs, monkeypatch):
    def offline(url, timeout):
        raise make_patches.urllib.error.URLError("no network")

    monkeypatch.setattr(make_patches.urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="could not download .*no network.*--debs=DIR"):
        make_patches.main([str(tmp_path / "out"), "--set=wallpapers"])


def test_missing_package_and_unknown_set_are_one_line_errors(tmp_path, debs):
    os.remove(debs / os.path.basename(next(iter(make_patches.DEBS))))
    with pytest.raises(UserError, match="download it from https://deb.debian.org"):
        make_patches.main([str(tmp_path / "out"), "--set=wallpapers", f"--debs={debs}"])
    with pytest.raises(UserError, match="unknown --set=photos"):
        make_patches.main([str(tmp_path / "out"), "--set=photos"])
    with pytest.raises(UserError, match="unknown option 'sets'"):  # not ignored, building the other set
        make_patches.main([str(tmp_path / "out"), "--sets=wallpapers"])
    with pytest.raises(UserError, match="usage"):
        make_patches.main(["--set=wallpapers"])


def test_a_full_disk_is_one_line_and_leaves_no_empty_png(tmp_path, debs, capsys):
    """A real write failure (the process's file-size limit, as a full disk fails a write)."""
    import resource
    import signal

    out = tmp_path / "out"
    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, before[1]))  # every PNG is larger (capsys keeps prints in memory)
    try:
        with pytest.raises(UserError, match="could not write .*over the size limit"):
            make_patches.main([str(out), "--set=wallpapers", f"--debs={debs}"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)
        signal.signal(signal.SIGXFSZ, old)
    assert not [p for p in out.rglob("*") if p.is_file()]  # no 0-byte or cut PNG, no temporary file


def test_objects_set_crops_only_inside_photographed_stamps_and_holds_every_sixth_out(tmp_path, monkeypatch):
    root = make_patches.OBJECT_ROOT
    stamps = {}
    for i in range(18):  # opaque red squares on a clear background, a hole of clear pixels around them
        image = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
        image.paste(Image.new("RGBA", (220, 220), (200, 30, 30, 255)), (40, 40))
        stamps[f"{root}animals/a{i:02d}.png"] = image
    stamps[f"{root}animals/cartoon/drawn.png"] = Image.new("RGBA", (300, 300), (30, 200, 30, 255))  # left out
    stamps[f"{root}symbols/sign.png"] = Image.new("RGBA", (300, 300), (30, 200, 30, 255))  # left out
    folder = tmp_path / "debs"
    folder.mkdir()
    data = fake_deb(stamps, "PNG")
    (pool,) = make_patches.OBJECT_DEBS
    (folder / os.path.basename(pool)).write_bytes(data)
    monkeypatch.setattr(make_patches, "OBJECT_DEBS", {pool: hashlib.sha256(data).hexdigest()})
    monkeypatch.setattr(make_patches, "SPLIT_SIZES", {"train": 30, "test": 9})
    out = tmp_path / "out"
    make_patches.main([str(out), "--set=objects", f"--debs={folder}"])
    crops = np.stack([np.asarray(Image.open(out / "train" / f)) for f in sorted(os.listdir(out / "train"))])
    assert crops.shape == (30, 32, 32, 3)
    assert np.abs(crops.astype(int) - np.array([200, 30, 30])).max() < 12  # inside the stamp, never its clear edge
    held_out = sorted(os.listdir(out / "photos"))
    assert held_out == [f"animals_a{i:02d}.png" for i in range(0, 18, 6)]  # every sixth stamp in path order


def gimp_pattern(rgb, size=(80, 64)):
    """A GIMP .pat file: the big-endian header (size, version 1, width, height, 3 bytes a pixel,
    b"GPAT", a NUL-ended name), then the RGB pixels."""
    import struct

    name = b"test\0"
    header = struct.pack(">5I", 24 + len(name), 1, *size, 3) + b"GPAT" + name
    return header + bytes(rgb) * (size[0] * size[1])


def fake_pattern_debs(tmp_path, monkeypatch, patterns):
    """The two pattern packages, {name: .pat bytes} split between them (some in a folder, as gimp-data)."""
    folder = tmp_path / "debs"
    members = {f"{make_patches.TEXTURE_ROOT}{'Wood/' if i % 3 == 0 else ''}{name}.pat": data
               for i, (name, data) in enumerate(sorted(patterns.items()))}
    monkeypatch.setattr(make_patches, "TEXTURE_DEBS", pinned_debs(folder, list(make_patches.TEXTURE_DEBS), members))
    monkeypatch.setattr(make_patches, "SPLIT_SIZES", {"train": 24, "test": 12})
    return folder


def test_textures_set_reads_gimp_patterns_and_holds_every_fifth_out(tmp_path, monkeypatch):
    patterns = {n: gimp_pattern(TEST_RGB if i % 5 == 0 else TRAIN_RGB) for i, n in enumerate(make_patches.TEXTURES)}
    patterns["a_rendered_one"] = gimp_pattern((0, 255, 0))  # not in TEXTURES: left out
    folder = fake_pattern_debs(tmp_path, monkeypatch, patterns)
    out = tmp_path / "out"
    make_patches.main([str(out), "--set=textures", f"--debs={folder}"])
    for split, colour in (("train", TRAIN_RGB), ("test", TEST_RGB)):
        crops = np.stack([np.asarray(Image.open(out / split / f)) for f in sorted(os.listdir(out / split))])
        assert crops.shape[1:] == (32, 32, 3) and (crops == np.array(colour, dtype=np.uint8)).all()
    assert sorted(os.listdir(out / "photos")) == sorted(n + ".png" for n in make_patches.TEXTURES[::5])
    assert Image.open(out / "photos" / "amethyst.png").size == (80, 64)  # whole, at its own scale


@pytest.mark.parametrize("damage, message", [("missing", "lack the patterns bark"), ("magic", "not a GIMP pattern"),
                                             ("truncated", "truncated")])
def test_textures_set_refuses_other_packages_in_one_line(tmp_path, monkeypatch, damage, message):
    patterns = {n: gimp_pattern(TRAIN_RGB) for n in make_patches.TEXTURES}
    if damage == "missing":
        del patterns["bark"]
    elif damage == "magic":
        patterns["bark"] = patterns["bark"][:20] + b"XPAT" + patterns["bark"][24:]
    else:
        patterns["bark"] = patterns["bark"][:100]
    folder = fake_pattern_debs(tmp_path, monkeypatch, patterns)
    with pytest.raises(make_patches.DataError, match=message):
        make_patches.main([str(tmp_path / "out"), "--set=textures", f"--debs={folder}"])
