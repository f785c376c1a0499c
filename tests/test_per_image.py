"""scripts/per_image.py: every held-out image scored by FSQ and DDCL runs laid out as compare.py lays
them out, DDCL's equal-bits gain against each image's content, and one line for what is missing."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import per_image  # noqa: E402

from discrete_ae.errors import DataError  # noqa: E402


def test_png_size_ranks_flat_crops_below_noisy_ones():
    flat = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)
    noise = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    small, large = per_image.png_bpp(torch.cat([flat, noise]))
    assert small < 1.0 < 20.0 < large


def test_bins_hold_every_image_once():
    content = np.linspace(0, 1, 101)
    rows = per_image.binned(content, content - 0.5, np.quantile(content, np.linspace(0, 1, 6)))
    counts = [r["images"] for r in rows]
    assert sum(counts) == 101 and all(19 <= c <= 21 for c in counts)  # [lo, hi) bins, the last closed
    assert rows[0]["gain_db"] < 0 < rows[-1]["gain_db"]


def test_a_set_with_no_crop_in_a_quintile_is_drawn_without_it(tmp_path):
    """A set of busy crops only (the textures) leaves the flat quintiles empty: no point, no crash."""
    edges = np.array([0.0, 1.0, 2.0, 3.0])
    busy = np.array([2.5, 2.6, 2.7])
    rows = per_image.binned(busy, np.array([0.1, 0.2, 0.3]), edges)
    assert [r["gain_db"] is None for r in rows] == [True, True, False]
    result = {"prior": "context", "fsq": "a", "ddcl": "b",
              "sets": {"busy": {"content_bpp": busy.tolist(), "binned": rows, "mean_gain_db": 0.2}}}
    per_image.plot(str(tmp_path / "per_image.png"), result, edges)
    assert (tmp_path / "per_image.png").stat().st_size > 0


def test_the_analysis_scores_every_image_of_every_set(run_train, tmp_path, image_folder):
    runs = tmp_path / "runs"
    for name, knobs in (("fsq_a_s1337", {"quantizer": "fsq", "fsq_levels": [5, 4, 4]}),
                        ("fsq_b_s1337", {"quantizer": "fsq", "fsq_levels": [5, 5, 4]}),
                        ("ddcl_rw1e-2_s1337", {"quantizer": "ddcl"})):
        run_train(run_name=name, entropy_model="learned", checkpoint_dir=str(runs / "tiny_learned" / "checkpoints"), **knobs)
    results = tmp_path / "results" / "tiny" / "learned"
    results.mkdir(parents=True)
    fsq_points = [{"label": label, "bits": {"mean": bits}, "psnr": {"mean": psnr}} for label, bits, psnr in
                  (("a", 100.0, 20.0), ("b", 120.0, 21.0))]
    (results / "comparison.json").write_text(json.dumps({"best": {"fsq": {"points": fsq_points}}}))
    out = tmp_path / "out"
    per_image.main([f"tiny={image_folder}", f"--runs={runs}", f"--results={tmp_path / 'results'}", f"--out={out}",
                    "--fsq=a"])
    result = json.loads((out / "per_image.json").read_text())
    entry = result["sets"]["tiny"]
    assert len(entry["gain_db"]) == len(entry["content_bpp"]) == 32  # the test split's 32 images
    assert entry["fsq_slope_db_per_bit"] == pytest.approx(0.05)
    gain = (np.array(entry["ddcl"]["psnr"]) - entry["fsq"]["psnr"]) - 0.05 * (np.array(entry["ddcl"]["bits"]) - entry["fsq"]["bits"])
    assert np.allclose(gain, entry["gain_db"])
    assert os.path.getsize(out / "per_image.png") > 10_000
    with pytest.raises(DataError, match="no checkpoint matches"):
        per_image.main([f"tiny={image_folder}", f"--runs={runs}", f"--results={tmp_path / 'results'}", "--prior=context",
                        f"--out={out}"])
