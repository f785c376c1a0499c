"""Whole photos to files with a trained checkpoint, and back; and the comparison with JPEG, WebP
and AVIF at equal bytes.

    python codec.py compress CKPT photo.png photo.bin      # any size; every byte of photo.bin is the rate
    python codec.py decompress CKPT photo.bin photo_out.png
    python codec.py evaluate CKPT [CKPT ...] --photos=DIR [--output_dir=outputs/codec] [--results=]
    python codec.py plot [--results=docs/results]         # codec.png again from codec.json

A photo is coded as the 32x32 blocks the model was trained on (padded to whole blocks by repeating
its edge), all of their integers in one range-coded stream under the checkpoint's prior (fitted,
learned or context) behind one header: no per-block header, one final partial byte. One latent for
the whole photo was measured and not kept: the model, trained on 32x32 crops, reconstructs interior
positions worse than the blocks it knows (docs/codec.md).

The file format is discrete_ae/codec_file.py's.

`evaluate`: for every photo in DIR and every checkpoint, the file's bytes (bpp of the whole file),
PSNR and SSIM, encode and decode megapixels per second (each the median of TIMING_REPEATS runs, for
every codec alike); and Pillow's JPEG (optimised Huffman tables), WebP (method 6) and AVIF (aom,
speed 4), each at the highest quality whose file is no larger than the model's, searched from
quality 0, with no metadata (an embedded ICC profile alone is ~3 KB), plus each codec's curve over
qualities for BD-rate against WebP. Writes OUTPUT_DIR/codec.json and codec.png (with
--results=DIR, there instead).
"""
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from discrete_ae.bjontegaard import bd_pair
from discrete_ae.codec_file import (
    HEADER,
    PHOTO_EXTENSIONS,
    SEED,
    PhotoCodec,
    decode_photo,
    decoder_threads,
    from_blocks,
    keep_freed_memory,
    read_photo,
    to_blocks,
    to_tensor,
)
from discrete_ae.errors import ConfigError, DataError, cli
from discrete_ae.files import atomic_write, check_distinct, save_json
from discrete_ae.metrics import psnr_per_image, ssim_per_image
from discrete_ae.overrides import parse_paths_and_options
from discrete_ae.runs import cpu_name, curve_name
from utils import load_checkpoint

PER_BLOCK = " (a string per block)"  # the curve of model.compress's strings: in codec.json, not drawn
CLASSICAL = {  # Pillow's save options at their best for small files; qualities are searched from 0 (docs/codec.md)
    "jpeg": dict(format="JPEG", optimize=True),
    "webp": dict(format="WEBP", method=6),
    "avif": dict(format="AVIF", speed=4),
}
CURVE_QUALITIES = (0, 2, 5, 10, 15, 20, 30, 40, 50, 60, 75)
TIMING_REPEATS = 3  # every codec's encode and decode of a photo is timed this often, the median kept: one run of a few ms moves with the cache
PLOT_MARGIN = 1.6  # the plot's x axis ends at this multiple of the largest model file's bpp
EVAL_DEFAULTS = dict(photos="", output_dir="outputs/codec", results="", device="cpu")


def _model(path, device="cpu"):
    model, _ = load_checkpoint(path, device)
    return model


def compress_file(checkpoint, source, target):
    """Write the file -> (bytes, bits per pixel, the PSNR it decodes to, checked by decoding it)."""
    check_distinct(target, source, checkpoint)
    codec, rgb = PhotoCodec(_model(checkpoint)), read_photo(source)
    blob = codec.encode(rgb)
    atomic_write(target, lambda f: f.write(blob))
    psnr, _ = quality(rgb, codec.decode(blob))
    return len(blob), 8 * len(blob) / (rgb.shape[0] * rgb.shape[1]), psnr


def decompress_file(checkpoint, source, target):
    from PIL import Image

    check_distinct(target, source, checkpoint)
    try:
        blob = Path(source).read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {source}: {err.strerror}") from None
    image = Image.fromarray(decode_photo(_model(checkpoint), blob))
    atomic_write(target, lambda f: image.save(f, format="PNG"))
    return image.size


# ----------------------------------------------------------------------------- evaluation

def quality(a_u8, b_u8):
    """(PSNR, SSIM) of two uint8 (H, W, 3) images."""
    a, b = to_tensor(a_u8, "cpu"), to_tensor(b_u8, "cpu")
    return float(psnr_per_image(a, b)[0]), float(ssim_per_image(a, b)[0])


def timed(f, repeats=TIMING_REPEATS):
    """(f()'s result, the median of `repeats` runs' seconds)."""
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        seconds.append(time.perf_counter() - t0)
    return out, float(np.median(seconds))


def classical(rgb, codec, q, repeats=1):
    """(file bytes, decoded uint8 image, encode s, decode s) of Pillow's `codec` at quality q."""
    from PIL import Image

    image = Image.fromarray(rgb)  # no metadata: nothing but the picture is counted

    def save():
        buffer = io.BytesIO()
        image.save(buffer, quality=q, **CLASSICAL[codec])
        return buffer.getvalue()

    blob, enc = timed(save, repeats)
    decoded, dec = timed(lambda: np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")), repeats)
    return blob, decoded, enc, dec


def at_most(rgb, codec, budget):
    """The highest quality whose file has at most `budget` bytes (bisection from 0; sizes rise with
    quality), as a result row; with `reached` False when even quality 0 is larger."""
    lo, hi, best = 0, 100, None
    while lo <= hi:
        mid = (lo + hi) // 2
        blob, _, _, _ = classical(rgb, codec, mid)
        if len(blob) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return row(rgb, codec, 0 if best is None else best, reached=best is not None)


def row(rgb, codec, q, reached=True):
    blob, decoded, enc, dec = classical(rgb, codec, q, TIMING_REPEATS)
    psnr, ssim = quality(rgb, decoded)
    pixels = rgb.shape[0] * rgb.shape[1]
    return {"codec": codec, "quality": q, "bytes": len(blob), "bpp": 8 * len(blob) / pixels, "psnr": psnr, "ssim": ssim,
            "reached": reached, "encode_mp_s": pixels / 1e6 / enc, "decode_mp_s": pixels / 1e6 / dec}


def model_row(codec, name, rgb):
    """The model's file for `rgb` through `codec` (a PhotoCodec, built once per checkpoint as a
    server would) and its speed."""
    blob, enc = timed(lambda: codec.encode(rgb))
    decoded, dec = timed(lambda: codec.decode(blob))
    psnr, ssim = quality(rgb, decoded)
    pixels = rgb.shape[0] * rgb.shape[1]
    return {"codec": name, "bytes": len(blob), "bpp": 8 * len(blob) / pixels, "psnr": psnr, "ssim": ssim,
            "encode_mp_s": pixels / 1e6 / enc, "decode_mp_s": pixels / 1e6 / dec}


def tiled_row(model, name, rgb):
    """The same blocks as one `model.compress` string each (a 3-byte header and a last partial byte
    per block) plus this format's header: what coding the blocks as one stream saves."""
    height, width = rgb.shape[:2]
    blocks, grid = to_blocks(rgb, next(model.parameters()).device)
    strings = model.compress(blocks, seed=SEED)
    with decoder_threads():
        decoded = from_blocks(model.decompress(strings, seed=SEED).cpu(), grid, height, width)
    psnr, ssim = quality(rgb, decoded)
    size = HEADER + sum(len(s) for s in strings)
    return {"codec": name + PER_BLOCK, "bytes": size, "bpp": 8 * size / (height * width), "psnr": psnr, "ssim": ssim}


def mean_curve(rows):
    """{codec: [(mean bpp, mean PSNR)] over photos, one point per quality (or checkpoint)}."""
    curves = {}
    for r in rows:
        curves.setdefault(r["codec"], {}).setdefault(r.get("quality", r.get("checkpoint")), []).append((r["bpp"], r["psnr"]))
    return {c: sorted((float(np.mean([p[0] for p in pts])), float(np.mean([p[1] for p in pts]))) for pts in by.values())
            for c, by in curves.items()}


def evaluate_photos(checkpoints, opts):
    folder = opts["photos"]
    photos = sorted(p for p in Path(folder).glob("*") if p.suffix.lower() in PHOTO_EXTENSIONS) if os.path.isdir(folder) else []
    if not photos:
        raise DataError(f"--photos={folder!r} holds no .png/.jpg photos (scripts/make_patches.py writes OUT/photos/)")
    models = {}
    for path in checkpoints:
        codec = PhotoCodec(_model(path, opts["device"]))  # a curve per bottleneck and prior; its checkpoints are the points
        models[path] = (codec, q_name(load_checkpoint(path)[1], codec.q))
    equal_bytes, curve_rows = [], []
    for photo in photos:
        rgb = read_photo(photo)
        for path, (codec, name) in models.items():
            ours = {**model_row(codec, name, rgb), "checkpoint": path, "settings": codec.q.settings(), "photo": photo.name}
            curve_rows += [ours, {**tiled_row(codec.model, name, rgb), "checkpoint": path, "photo": photo.name}]
            equal_bytes.append({**ours, "classical": {c: at_most(rgb, c, ours["bytes"]) for c in CLASSICAL}})
            print(line_of(equal_bytes[-1]), flush=True)
        curve_rows += [{**row(rgb, c, q), "photo": photo.name} for c in CLASSICAL for q in CURVE_QUALITIES]
    return photos, equal_bytes, curve_rows


def q_name(config, q):
    """A curve's name: evaluate.py's (the bottleneck and its prior) and how long it trained
    ("ddcl, 50 epochs")."""
    return f"{curve_name(config, q)}, {config['epochs']} epoch" + ("s" if config["epochs"] != 1 else "")


def line_of(r):
    parts = [f"{r['photo']}: {r['codec']} ({r['settings']}) {r['bytes']} B ({r['bpp']:.3f} bpp) {r['psnr']:.2f} dB"]
    for c, other in r["classical"].items():
        gap = r["psnr"] - other["psnr"]
        parts.append(f"{c} q{other['quality']} {other['bytes']} B {other['psnr']:.2f} dB ({gap:+.2f})" if other["reached"]
                     else f"{c} cannot reach it (smallest {other['bytes']} B, {other['psnr']:.2f} dB)")
    return " | ".join(parts)


def summary(photos, equal_bytes, curve_rows):
    curves = mean_curve(curve_rows)
    bd = {}
    for name in {r["codec"] for r in curve_rows} - set(CLASSICAL):
        rate, psnr = bd_pair(curves[name], curves["webp"])
        bd[name] = {"bd_rate_vs_webp": rate, "bd_psnr_vs_webp": psnr}
    speed = {}
    for r in curve_rows:
        if "encode_mp_s" in r:
            speed.setdefault(r["codec"], []).append((r["encode_mp_s"], r["decode_mp_s"]))
    speed = {c: {"encode_mp_s": float(np.median([s[0] for s in v])), "decode_mp_s": float(np.median([s[1] for s in v]))}
             for c, v in speed.items()}
    return {"photos": [p.name for p in photos], "equal_bytes": equal_bytes, "curves": curves, "bd_vs_webp": bd,
            "speed_median": speed, "threads": torch.get_num_threads(), "curve_rows": curve_rows}


CODEC_NAMES = {"jpeg": "JPEG (optimised)", "webp": "WebP (method 6)", "avif": "AVIF (speed 4)"}
PRIOR_NAMES = {"": "fitted histogram", "learned": "learned prior", "context": "context prior",
               "context_posthoc": "context prior fitted after training"}
PRIOR_STYLES = {"": ":", "learned": "--", "context": "-", "context_posthoc": "-."}


def readable(name):
    """A curve's name as a reader says it: "ddcl_context_posthoc, 50 epochs" -> "DDCL, context prior
    fitted after training, 50 epochs"; and its line style (by prior)."""
    if name in CODEC_NAMES:
        return CODEC_NAMES[name], (0, (5, 2))
    curve, _, epochs = name.partition(", ")
    method, _, prior = curve.partition("_")
    return f"{method.upper()}, {PRIOR_NAMES.get(prior, prior)}, {epochs}", PRIOR_STYLES.get(prior, "-")


def plot(path, result):
    """codec.png: every curve of codec.json, named as a reader says it, one colour per bottleneck and
    codec (plots.COLOURS), the axes fitted to the models' range."""
    from discrete_ae.plots import colour, pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.8), constrained_layout=True)
    curves = {n: pts for n, pts in sorted(result["curves"].items()) if not n.endswith(PER_BLOCK)}
    ours = [r["bpp"] for r in result["equal_bytes"]]
    left, right = min(ours) * 0.8, max(ours) * PLOT_MARGIN  # the models' range, not the codecs' 1-bpp tail
    shown = []
    for name, pts in curves.items():
        label, style = readable(name)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, linestyle=style, marker="o" if "50 epochs" in name or name in CODEC_NAMES else "x",
                markersize=3.5, color=colour(name), label=label)
        inside = [y for x, y in zip(xs, ys) if left <= x <= right]
        edges = [float(np.interp(e, xs, ys)) for e in (left, right) if xs[0] <= e <= xs[-1]]  # where a line leaves
        shown += inside + edges
    ax.set(xlabel="bits per pixel of the whole file (mean over photos)", ylabel="PSNR (dB, mean over photos)",
           title=f"Whole photos, every byte counted ({len(result['photos'])} held-out photos)")
    ax.set_xlim(left, right)
    ax.set_ylim(min(shown) - 0.3, max(shown) + 0.3)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(path, fig)
    return fig


def plot_main(argv):
    _, opts = parse_paths_and_options(["-", *argv], dict(results="docs/results"), "usage: python codec.py plot [--results=DIR]")
    path = os.path.join(opts["results"], "codec.json")
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        raise DataError(f"no readable {path}: run python codec.py evaluate ... --results={opts['results']} first") from None
    plot(os.path.join(opts["results"], "codec.png"), result)
    print(f"wrote {opts['results']}/codec.png")


def evaluate_main(argv):
    checkpoints, opts = parse_paths_and_options(argv, EVAL_DEFAULTS, "usage: python codec.py evaluate CHECKPOINT [...] "
                                                "--photos=DIR (see --help)")
    photos, equal_bytes, curve_rows = evaluate_photos(checkpoints, opts)
    result = summary(photos, equal_bytes, curve_rows)
    out = opts["results"] or opts["output_dir"]
    os.makedirs(out, exist_ok=True)
    save_json(os.path.join(out, "codec.json"), result)
    plot(os.path.join(out, "codec.png"), result)
    for name, bd in sorted(result["bd_vs_webp"].items()):
        rate = "no overlap" if bd["bd_rate_vs_webp"] is None else f"{bd['bd_rate_vs_webp']:+.1f}%"
        psnr = "no overlap" if bd["bd_psnr_vs_webp"] is None else f"{bd['bd_psnr_vs_webp']:+.2f} dB"
        print(f"{name}: against WebP, BD-rate {rate}, BD-PSNR {psnr} (mean curves over the photos)")
    for line in speed_lines(result["speed_median"]):
        print(line)
    print(f"wrote {out}/codec.json and codec.png")


def speed_lines(speed):
    """Every codec's median encode and decode megapixels per second, and their ratio to WebP's."""
    webp = speed.get("webp")
    lines = [f"speed, median over the photos of each photo's median of {TIMING_REPEATS} runs, {torch.get_num_threads()} "
             f"thread(s), {cpu_name()}:"]
    for name, s in sorted(speed.items(), key=lambda kv: -kv[1]["decode_mp_s"]):
        ratio = (f" ({s['encode_mp_s'] / webp['encode_mp_s']:.2f}x / {s['decode_mp_s'] / webp['decode_mp_s']:.2f}x WebP's)"
                 if webp else "")
        lines.append(f"  {name}: encode {s['encode_mp_s']:.2f}, decode {s['decode_mp_s']:.2f} MP/s{ratio}")
    return lines


def main(argv):
    commands = {"compress": compress_file, "decompress": decompress_file}
    keep_freed_memory()  # a photo's arrays reused, not mapped afresh (discrete_ae/codec_file.py)
    if argv and argv[0] == "evaluate":
        return evaluate_main(argv[1:])
    if argv and argv[0] == "plot":
        return plot_main(argv[1:])
    if len(argv) != 4 or argv[0] not in commands:
        raise ConfigError("usage: python codec.py compress|decompress CHECKPOINT SOURCE TARGET, or "
                          "python codec.py evaluate CHECKPOINT [...] --photos=DIR (see --help)")
    done = commands[argv[0]](*argv[1:])
    print(f"wrote {argv[3]} ({done[0]} bytes, {done[1]:.3f} bpp; decodes to {done[2]:.2f} dB PSNR)"
          if argv[0] == "compress" else f"wrote {argv[3]} ({done[0]}x{done[1]})")


if __name__ == "__main__":
    cli(main, __doc__, sys.argv[1:])
