"""What a researcher looks at: the per-bottleneck results files, the samples sheet, the notebook."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from evaluate import main as evaluate_main


def compressai_plot_reads(path, metric="psnr-rgb"):
    """What CompressAI 1.2.8's `python -m compressai.utils.plot -f FILE` takes from a file: the
    line's name, x = results["bpp"], y = results[metric] (one line per file, points in file order)."""
    with open(path) as f:
        data = json.load(f)
    results = data["results"]
    return {"name": data.get("name"), "xs": results["bpp"], "ys": results[metric]}


@pytest.fixture
def two_runs(run_train, tmp_path):
    run_train(quantizer="fsq")
    run_train(quantizer="ddcl", run_name="ddcl_a")
    run_train(quantizer="ddcl", run_name="ddcl_b", ddcl_comm_weight=0.05)
    return tmp_path / "checkpoints"


def test_one_results_file_per_bottleneck_ordered_by_rate(two_runs, tmp_path, capsys):
    out = tmp_path / "rd"
    evaluate_main([str(p) for p in sorted(two_runs.glob("*_best.pt"))] + [f"--output_dir={out}"])
    curves = {name: compressai_plot_reads(out / f"rate_distortion_{name}.json") for name in ("fsq", "ddcl")}
    assert curves["fsq"]["name"] == "fsq" and len(curves["fsq"]["xs"]) == 1
    ddcl = curves["ddcl"]
    assert ddcl["name"] == "ddcl" and len(ddcl["xs"]) == 2 and ddcl["xs"] == sorted(ddcl["xs"])
    combined = json.load(open(out / "rate_distortion.json"))["results"]
    assert sorted(ddcl["ys"]) == sorted(y for y, q in zip(combined["psnr-rgb"], combined["quantizer"]) if q == "ddcl")


def test_samples_sheet_shows_every_run_on_the_same_images(two_runs, tmp_path, monkeypatch):
    import evaluate
    import plots

    seen = {}
    draw = plots.plot_samples

    def spy(path, originals, columns, row_labels):
        seen.update(originals=originals, runs=[r["run"] for r, _ in columns], bits=[r["bits"] for r, _ in columns],
                    labels=row_labels)
        draw(path, originals, columns, row_labels)

    monkeypatch.setattr(evaluate, "plot_samples", spy)
    out = tmp_path / "rd"
    evaluate_main([str(p) for p in sorted(two_runs.glob("*_best.pt"))] + [f"--output_dir={out}"])
    assert sorted(seen["runs"]) == ["ddcl_a", "ddcl_b", "fsq"] and seen["bits"] == sorted(seen["bits"])  # by rate
    assert len(seen["labels"]) == evaluate.SAMPLE_FIXED + evaluate.SAMPLE_HARDEST
    assert seen["labels"][:2] == ["val #0", "val #1"] and all("(hard)" in s for s in seen["labels"][evaluate.SAMPLE_FIXED:])
    sheet = Image.open(out / "rate_distortion_samples.png")
    assert sheet.size[0] > 400 and np.asarray(sheet).std() > 10


def test_reconstructions_are_the_images_evaluate_scored(two_runs):
    import torch

    from data import load_dataset
    from evaluate import model_outputs, reconstructions
    from utils import load_checkpoint

    model, config = load_checkpoint(str(two_runs / "ddcl_a_vae_best.pt"))
    _, val = load_dataset(config["dataset"], config["data_dir"])
    batch = 10  # several batches: each image's dither seed is its number in the split
    every = torch.cat([out.recon for _, out in model_outputs(model, val, batch)])
    picks = [0, 13, 27, 31]
    assert torch.equal(reconstructions(model, val, picks, batch), every[picks])


def test_notebook_runs_top_to_bottom(two_runs, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("EXPLORE_CHECKPOINTS", str(two_runs / "*_best.pt"))
    monkeypatch.setenv("EXPLORE_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    path = os.path.join(REPO, "notebooks", "explore.ipynb")
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")  # stripped in git
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()  # raises CellExecutionError on any cell error
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "decode(encode(x)) equals the model's reconstruction: True" in text
    assert "ddcl_a" in text and "fsq" in text
