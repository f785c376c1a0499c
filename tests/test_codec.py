"""codec.py: whole photos to files and back, every byte counted; bad files are one line; the
same file decodes to the same pixels whatever the thread count."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import codec
from conftest import run_script
from discrete_ae.errors import BitstreamError, CheckpointError, ConfigError, DataError
from utils import load_checkpoint


def photo(path, width, height, seed=0):
    """A smooth photo-like image of any size."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((4, 6, 3)) * 255).astype(np.uint8))
    small.resize((width, height), Image.BILINEAR).save(path)
    return path


@pytest.fixture
def checkpoint(run_train, tmp_path):
    def make(**knobs):
        config, _ = run_train(**knobs)
        return str(tmp_path / "checkpoints" / f"{config['run_name'] or config['quantizer']}_vae_best.pt")

    return make


@pytest.mark.parametrize("knobs", [dict(quantizer="fsq"), dict(quantizer="ddcl", entropy_model="learned"),
                                   dict(quantizer="ddcl", entropy_model="context"), dict(quantizer="fsq", entropy_model="context"),
                                   dict(quantizer="rfsq", fsq_levels=[4, 3, 3]), dict(quantizer="vq", codebook_size=32)])
def test_a_photo_of_any_size_round_trips_through_one_file(checkpoint, tmp_path, knobs):
    ck = checkpoint(**knobs)
    src = photo(tmp_path / "p.png", 45, 37)
    size, bpp, psnr = codec.compress_file(ck, src, tmp_path / "p.bin")
    assert size == os.path.getsize(tmp_path / "p.bin") and size > codec.HEADER and bpp == 8 * size / (45 * 37)
    codec.decompress_file(ck, tmp_path / "p.bin", tmp_path / "back.png")
    back = np.asarray(Image.open(tmp_path / "back.png"))
    assert back.shape == (37, 45, 3)
    assert psnr == pytest.approx(codec.quality(np.asarray(Image.open(src).convert("RGB")), back)[0])  # what it decodes to
    model, _ = load_checkpoint(ck)
    x = torch.from_numpy(np.array(Image.open(src))).permute(2, 0, 1)[None].float() / 255
    x = torch.nn.functional.pad(x, (0, 64 - 45, 0, 64 - 37), mode="replicate")  # 2 x 2 blocks of 32
    blocks = torch.cat([x[..., r:r + 32, c:c + 32] for r in (0, 32) for c in (0, 32)])  # raster order
    with codec.decoder_threads():
        expected = model.decode(model.encode(blocks, seed=codec.SEED), seed=codec.SEED)
    top = torch.cat([expected[0], expected[1]], 2)
    whole = torch.cat([top, torch.cat([expected[2], expected[3]], 2)], 1)[:, :37, :45]
    assert np.array_equal(back, (whole.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    strings = model.compress(blocks, seed=codec.SEED)  # one stream saves the per-block headers
    assert size < codec.HEADER + sum(len(s) for s in strings)


DECODE = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
import codec
codec.decompress_file(sys.argv[2], sys.argv[3], sys.argv[4])
"""


def test_a_file_decodes_to_the_same_pixels_in_another_process_with_other_threads(checkpoint, tmp_path):
    ck = checkpoint(quantizer="fsq", channels=[16, 32, 64])
    codec.compress_file(ck, photo(tmp_path / "p.png", 200, 120, seed=3), tmp_path / "p.bin")
    outs = []
    for threads in (1, 3):
        out = tmp_path / f"t{threads}.png"
        done = subprocess.run([sys.executable, "-c", DECODE, str(threads), ck, str(tmp_path / "p.bin"),
                               str(out)], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        assert done.returncode == 0, done.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_bad_files_and_bad_checkpoints_are_one_line(checkpoint, tmp_path):
    ck = checkpoint(quantizer="fsq")
    codec.compress_file(ck, photo(tmp_path / "p.png", 40, 40), tmp_path / "p.bin")
    blob = (tmp_path / "p.bin").read_bytes()
    model, _ = load_checkpoint(ck)
    cases = [(blob[:5], "fewer than the 13-byte header"), (blob[:-2], "fails its checksum"),
             (blob[:14] + bytes([blob[14] ^ 0x40]) + blob[15:], "fails its checksum"),
             (b"\x89PNG" + blob[4:], "not written by `python codec.py compress`"),
             (bytes([blob[0] + 1]) + blob[1:], "codec format 5; this code reads format 4")]
    for bad, message in cases:
        with pytest.raises(BitstreamError, match=message):
            codec.decode_photo(model, bad)
    other = checkpoint(quantizer="fsq", run_name="other", seed=7)
    with pytest.raises(BitstreamError, match="written with another model"):
        codec.decode_photo(load_checkpoint(other)[0], blob)
    none = checkpoint(quantizer="none", run_name="floats")
    with pytest.raises(ConfigError, match="sends no integers: nothing to code"):
        codec.compress_file(none, tmp_path / "p.png", tmp_path / "c.bin")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="is not a photo Pillow can read"):
        codec.compress_file(ck, tmp_path / "notes.txt", tmp_path / "n.bin")
    (tmp_path / "cut.bin").write_bytes(blob[:-3])
    result = run_script("codec.py", "decompress", ck, str(tmp_path / "cut.bin"), str(tmp_path / "never.png"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: the file fails its checksum: it is truncated or corrupted"]
    assert not (tmp_path / "never.png").exists()  # no half-written output
    result = run_script("codec.py", "squash", ck)
    assert result.returncode == 2 and "usage: python codec.py compress|decompress" in result.stderr


def test_a_checkpoint_without_a_prior_says_how_to_get_one(checkpoint, tmp_path):
    from utils import read_checkpoint, save_checkpoint

    ck = checkpoint(quantizer="fsq")
    model, _ = load_checkpoint(ck)
    model.quantizer.fitted_prior = None
    save_checkpoint(ck, {**read_checkpoint(ck), "model": model.state_dict()})
    with pytest.raises(CheckpointError, match="--save_prior=True"):
        codec.compress_file(ck, photo(tmp_path / "p.png", 32, 32), tmp_path / "p.bin")


def test_evaluate_sets_each_checkpoint_against_jpeg_webp_and_avif(checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        photo(folder / f"{i}.png", 96, 64, seed=i)
    cks = [checkpoint(quantizer="fsq", fsq_levels=levels, run_name=name)
           for name, levels in (("a", [5, 4, 4]), ("b", [8, 6, 6, 5]))]
    codec.main(["evaluate", *cks, f"--photos={folder}", f"--output_dir={tmp_path / 'out'}"])
    result = json.load(open(tmp_path / "out" / "codec.json"))
    assert result["photos"] == ["0.png", "1.png"] and len(result["equal_bytes"]) == 4
    for r in result["equal_bytes"]:
        assert r["bytes"] * 8 / (96 * 64) == pytest.approx(r["bpp"])
        for c, other in r["classical"].items():
            assert other["bytes"] <= r["bytes"] or not other["reached"]
    ours = "fsq, 1 epoch"
    assert set(result["curves"]) == {ours, f"{ours} (a string per block)", "jpeg", "webp", "avif"}
    assert len(result["curves"][ours]) == 2  # one point per checkpoint
    assert set(result["speed_median"]) == {ours, "jpeg", "webp", "avif"}
    assert set(result["bd_vs_webp"]) == {ours, f"{ours} (a string per block)"}
    assert (tmp_path / "out" / "codec.png").stat().st_size > 1000
    assert "against WebP, BD-rate " in capsys.readouterr().out
    with pytest.raises(DataError, match="holds no .png/.jpg photos"):
        codec.main(["evaluate", cks[0], f"--photos={tmp_path / 'none'}"])


def test_compress_says_the_size_the_bits_per_pixel_and_the_psnr_it_decodes_to(checkpoint, tmp_path):
    ck = checkpoint(quantizer="fsq")
    result = run_script("codec.py", "compress", ck, photo(tmp_path / "p.png", 40, 30), str(tmp_path / "p.bin"))
    assert result.returncode == 0, result.stderr
    size = os.path.getsize(tmp_path / "p.bin")
    assert re.fullmatch(rf"wrote \S+p\.bin \({size} bytes, {8 * size / 1200:.3f} bpp; decodes to \d+\.\d\d dB PSNR\)",
                        result.stdout.strip())


def test_the_codec_figure_names_curves_as_a_reader_says_them_in_fixed_colours(monkeypatch):
    from discrete_ae import plots

    seen = {}
    monkeypatch.setattr(plots, "save_figure", lambda path, fig: seen.update(fig=fig))
    result = {"photos": ["a.png"], "equal_bytes": [{"bpp": 0.12}, {"bpp": 0.2}],
              "curves": {"ddcl_context_posthoc, 50 epochs": [[0.1, 23.5], [0.2, 24.5]], "webp": [[0.15, 25.0], [0.6, 30.0]],
                         "fsq, 10 epochs": [[0.12, 23.1], [0.18, 24.0]], "fsq, 10 epochs (a string per block)": [[0.2, 23.0]]}}
    codec.plot("unused.png", result)
    ax = seen["fig"].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["DDCL, context prior fitted after training, 50 epochs", "FSQ, fitted histogram, 10 epochs",
                      "WebP (method 6)"]
    assert [line.get_color() for line in ax.get_lines()] == [plots.COLOURS["ddcl"], plots.COLOURS["fsq"], plots.COLOURS["webp"]]
    low, high = ax.get_xlim()
    assert low > 0 and high == pytest.approx(0.2 * codec.PLOT_MARGIN)  # the models' range, not from 0
    assert ax.get_ylim()[1] >= float(np.interp(high, [0.15, 0.6], [25.0, 30.0]))  # WebP leaves by the right edge, not the top


@pytest.mark.parametrize("table", [{"lo": 10**30, "probs": torch.ones(3) / 3}, {"lo": 0, "probs": torch.ones(0)},
                                   {"lo": 0, "probs": torch.full((3,), float("nan"))}, {"lo": 0, "probs": torch.ones(2, 2)},
                                   {"lo": 0, "probs": -torch.ones(3)}, "table"])
def test_a_crafted_prior_table_in_a_checkpoint_is_one_line(checkpoint, table):
    from discrete_ae.errors import CheckpointError

    ck = checkpoint(quantizer="fsq")
    state = torch.load(ck, weights_only=True)
    state["model"]["quantizer._extra_state"] = {"fitted_prior": [table]}
    torch.save(state, ck)
    with pytest.raises(CheckpointError, match="not one this repo writes|not a checkpoint this repo wrote"):
        load_checkpoint(ck)


def test_a_header_asking_for_gigapixels_is_refused_before_anything_is_allocated(checkpoint, tmp_path):
    import resource
    import time

    ck = checkpoint(quantizer="ddcl", entropy_model="context")
    codec.compress_file(ck, photo(tmp_path / "p.png", 40, 40), tmp_path / "p.bin")
    blob = bytearray((tmp_path / "p.bin").read_bytes())
    model, _ = load_checkpoint(ck)
    for side in (8193, 65535):
        blob[1:5] = side.to_bytes(2, "big") * 2
        t0, before = time.time(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(BitstreamError, match=f"the header says {side}x{side} pixels"):
            codec.decode_photo(model, bytes(blob))
        assert time.time() - t0 < 1 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


def test_a_photo_over_the_pixel_limit_is_refused_before_it_is_decoded(checkpoint, tmp_path):
    Image.new("RGB", (9000, 8000), "white").save(tmp_path / "big.png")  # a small file, 72 megapixels
    with pytest.raises(DataError, match="9000x8000: this codec takes photos up to 64 megapixels"):
        codec.compress_file(checkpoint(quantizer="fsq"), tmp_path / "big.png", tmp_path / "big.bin")
    assert not (tmp_path / "big.bin").exists()


def test_a_photo_of_several_runs_round_trips_and_a_claimed_size_is_checked_at_once(checkpoint, tmp_path, monkeypatch):
    from discrete_ae import codec_file

    monkeypatch.setattr(codec_file, "RUN_BLOCKS", 2)  # 3 x 2 blocks: runs of 2, 2 and 2 blocks
    ck = checkpoint(quantizer="ddcl", entropy_model="context")
    model, _ = load_checkpoint(ck)
    rgb = (torch.rand(70, 90, 3) * 255).to(torch.uint8).numpy()
    blob = codec_file.encode_photo(model, rgb)
    blocks, grid = codec.to_blocks(rgb, "cpu")
    with codec.decoder_threads():
        expected = codec.from_blocks(model.decode(model.encode(blocks, seed=codec.SEED), seed=codec.SEED), grid, 70, 90)
    assert np.array_equal(codec_file.decode_photo(model, blob), expected)
    one = codec_file.PhotoCodec(model)  # built once, as codec.py evaluate does, for photos of any size
    other = (torch.rand(40, 33, 3) * 255).to(torch.uint8).numpy()
    assert [one.encode(rgb), one.encode(other), one.encode(rgb)] == [blob, codec_file.encode_photo(model, other), blob]
    assert np.array_equal(one.decode(blob), expected)
    first = int.from_bytes(blob[codec.HEADER:codec.HEADER + 3], "big")
    assert 0 < first < len(blob)  # run 1's length, before it
    forged = bytearray(blob)
    forged[1:5] = (2000).to_bytes(2, "big") * 2  # 63 x 63 blocks claimed: runs whose lengths the payload cannot hold
    with pytest.raises(BitstreamError, match="is truncated, or its header is not the one it was written with"):
        codec_file.decode_photo(model, bytes(forged))


def test_the_speed_lines_give_every_codec_and_its_ratio_to_webp():
    lines = codec.speed_lines({"webp": {"encode_mp_s": 8.0, "decode_mp_s": 40.0},
                               "ddcl_context, 10 epochs": {"encode_mp_s": 2.0, "decode_mp_s": 4.0}})
    assert lines[0].startswith("speed, median over the photos") and "core" in lines[0]
    assert lines[1:] == ["  webp: encode 8.00, decode 40.00 MP/s (1.00x / 1.00x WebP's)",
                         "  ddcl_context, 10 epochs: encode 2.00, decode 4.00 MP/s (0.25x / 0.10x WebP's)"]


def test_the_codec_keeps_freed_memory_where_glibc_allocates_and_codes_the_same_bytes(checkpoint, tmp_path):
    import platform

    from discrete_ae.codec_file import PhotoCodec, keep_freed_memory, read_photo

    ck = checkpoint(quantizer="ddcl", entropy_model="context")
    rgb = read_photo(photo(tmp_path / "p.png", 70, 40))
    model, _ = load_checkpoint(ck)
    before = PhotoCodec(model).encode(rgb)
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
    codec_ = PhotoCodec(model)
    assert codec_.encode(rgb) == before and np.array_equal(codec_.decode(before), PhotoCodec(model).decode(before))


def test_every_codec_is_timed_as_the_median_of_its_repeats(monkeypatch):
    clock, calls = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0]), []
    monkeypatch.setattr(codec.time, "perf_counter", lambda: next(clock))
    assert codec.timed(lambda: calls.append(1) or "out", 3) == ("out", 2.0) and len(calls) == 3  # runs of 1, 3, 2 s
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    monkeypatch.undo()
    blob, decoded, enc, dec = codec.classical(rgb, "webp", 50, repeats=codec.TIMING_REPEATS)
    assert blob == codec.classical(rgb, "webp", 50)[0] and decoded.shape == rgb.shape and enc > 0 and dec > 0
