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


def test_one_results_file_per_bottleneck_ordered_by_rate(two_runs, tmp_path, capsys, image_folder):
    out = tmp_path / "rd"
    evaluate_main([str(p) for p in sorted(two_runs.glob("*_best.pt"))] + [f"--output_dir={out}", f"--data_dir={image_folder}"])
    curves = {name: compressai_plot_reads(out / f"rate_distortion_{name}.json") for name in ("fsq", "ddcl")}
    assert curves["fsq"]["name"] == "fsq" and len(curves["fsq"]["xs"]) == 1
    ddcl = curves["ddcl"]
    assert ddcl["name"] == "ddcl" and len(ddcl["xs"]) == 2 and ddcl["xs"] == sorted(ddcl["xs"])
    combined = json.load(open(out / "rate_distortion.json"))["results"]
    assert sorted(ddcl["ys"]) == sorted(y for y, q in zip(combined["psnr-rgb"], combined["quantizer"]) if q == "ddcl")


def test_samples_sheet_shows_every_run_on_the_same_images(two_runs, tmp_path, monkeypatch, image_folder):
    import evaluate
    from discrete_ae import plots

    seen = {}
    draw = plots.plot_samples

    def spy(path, originals, columns, row_labels):
        seen.update(originals=originals, runs=[r["run"] for r, _ in columns], bits=[r["bits"] for r, _ in columns],
                    labels=row_labels)
        draw(path, originals, columns, row_labels)

    monkeypatch.setattr(evaluate, "plot_samples", spy)
    out = tmp_path / "rd"
    evaluate_main([str(p) for p in sorted(two_runs.glob("*_best.pt"))] + [f"--output_dir={out}", f"--data_dir={image_folder}"])
    assert sorted(seen["runs"]) == ["ddcl_a", "ddcl_b", "fsq"] and seen["bits"] == sorted(seen["bits"])  # by rate
    assert len(seen["labels"]) == evaluate.SAMPLE_FIXED + evaluate.SAMPLE_HARDEST
    assert seen["labels"][:2] == ["val #0", "val #1"] and all("(hard)" in s for s in seen["labels"][evaluate.SAMPLE_FIXED:])
    sheet = Image.open(out / "rate_distortion_samples.png")
    assert sheet.size[0] > 400 and np.asarray(sheet).std() > 10


def test_reconstructions_are_the_images_evaluate_scored(two_runs):
    import torch

    from discrete_ae.data import load_dataset
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


def captured_figure(monkeypatch):
    from discrete_ae import plots

    seen = {}
    monkeypatch.setattr(plots, "save_figure", lambda path, fig: seen.update(fig=fig))
    return seen


def test_curves_have_a_title_labelled_axes_and_whole_epochs(monkeypatch):
    from discrete_ae import plots

    seen = captured_figure(monkeypatch)
    rows = [{"epoch": e, "train_loss": 0.01 / e, "val_loss": 0.012 / e, "val_mse": 0.011 / e, "val_psnr": 20 + e,
             "val_bits": 150.0 + e, "val_bits_estimate": 160.0, "val_rate_source": "bitstream"} for e in (1, 2, 3)]
    plots.plot_curves("unused.png", rows, "fsq")
    fig = seen["fig"]
    assert fig._suptitle.get_text() == "fsq: training curves"
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title_box = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        assert ax.get_title() and ax.get_ylabel() and ax.get_xlabel() == "epoch"
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert not title_box.overlaps(ax.title.get_window_extent(renderer))  # the figure title clears each panel's
    lo, hi = fig.axes[0].get_ylim()  # the log axis names values inside the data's range, not only powers of 10
    assert len([t for t in fig.axes[0].get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]) >= 2
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
        "train loss", "validation loss (MSE + rate term)", "validation MSE"]
    for row in rows:
        row["val_loss"] = row["val_mse"]  # FSQ: no rate term, the loss is the MSE
    plots.plot_curves("unused.png", rows, "fsq")
    labels = [t.get_text() for t in seen["fig"].axes[0].get_legend().get_texts()]
    assert labels == ["train loss", "validation MSE (= its loss: no rate term)"] and len(seen["fig"].axes[0].lines) == 2


def test_the_rd_plot_keeps_the_coded_range_and_draws_references_as_lines(monkeypatch):
    from discrete_ae import plots

    seen = captured_figure(monkeypatch)

    def row(run, curve, bits, psnr, source="bitstream"):
        return {"run": run, "curve": curve, "quantizer": curve, "bits": bits, "psnr": psnr, "rate_source": source}

    plots.plot_rate_distortion("unused.png", [row("a", "fsq", 120, 23), row("b", "fsq", 180, 25), row("c", "ddcl", 150, 24),
                                              row("none", "none", 2048, 27, "float32"), row("vae", "vae", 150, 26, "KL")])
    ax = seen["fig"].axes[0]
    assert ax.get_xscale() == "linear" and ax.get_xlim()[1] < 500  # 2,048 float bits do not squeeze the curves
    assert not [t for t in ax.texts if t.get_text() in ("a", "b", "c")]  # no point labels to collide
    assert any("not a code length" in t.get_text() for t in ax.texts) and len(ax.lines) == 4  # 2 curves, 2 references


def test_the_samples_sheet_calls_a_kl_a_kl(monkeypatch):
    import torch

    from discrete_ae import plots

    seen = captured_figure(monkeypatch)
    x = torch.rand(2, 3, 32, 32)
    rows = [{"run": "vae", "bits": 147.0, "psnr": 26.0, "rate_source": "KL"},
            {"run": "fsq", "bits": 150.0, "psnr": 24.0, "rate_source": "bitstream"}]
    plots.plot_samples("unused.png", x, [(r, x) for r in rows], ["a", "b"])
    titles = [ax.get_title() for ax in seen["fig"].axes[1:3]]
    assert titles == ["vae\nKL 147 bits, 26.00 dB", "fsq\n150 bits, 24.00 dB"]


def test_the_overlay_draws_one_line_per_run_named_after_its_file(run_train, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "scripts"))
    import overlay

    from discrete_ae.errors import DataError
    from discrete_ae.files import read_jsonl
    from discrete_ae.plots import plot_overlay

    first, _ = run_train(quantizer="fsq", epochs=2, run_name="alpha")
    run_train(quantizer="ddcl", epochs=2, run_name="beta")
    files = [os.path.join(first["output_dir"], f"{n}_metrics.jsonl") for n in ("alpha", "beta")]
    out = tmp_path / "overlay.png"
    overlay.main([*files, f"--out={out}"])
    assert out.stat().st_size > 10_000
    runs = {overlay.run_name(f): read_jsonl(f) for f in files}
    fig = plot_overlay(str(tmp_path / "again.png"), runs)
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alpha", "beta"]
        assert all(len(line.get_xdata()) == 2 for line in ax.get_lines())
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(DataError, match="not a metrics file"):
        overlay.main([str(bad)])


def test_the_epoch_grid_names_its_rows_and_gives_each_reconstruction_its_psnr(tmp_path, monkeypatch):
    import torch
    from PIL import ImageDraw

    from discrete_ae import plots
    from discrete_ae.metrics import psnr_per_image

    originals = torch.rand(8, 3, 32, 32)
    recons = (originals + 0.1).clamp(0, 1)
    texts, real_text = [], ImageDraw.ImageDraw.text

    def record(self, xy, text, *args, **kwargs):
        texts.append(text)
        return real_text(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", record)
    plots.save_grid(str(tmp_path / "g.png"), originals, recons, 4, "caption")
    assert "original" in texts and "reconstruction" in texts and "caption" in texts
    assert [t for t in texts if t.endswith(" dB")] == [f"{v:.1f} dB" for v in psnr_per_image(recons, originals).tolist()]
    side = 4 * (4 * (32 + 2) + 2)  # 4 x 4 tiles of 32 px with 2 px padding, upscaled 4x
    assert Image.open(tmp_path / "g.png").size == (side + plots.LABEL_PX, side + plots.CAPTION_PX)


def test_the_comparison_figure_keeps_far_curves_apart_and_labels_references_in_the_margin(monkeypatch):
    from discrete_ae import plots

    seen = captured_figure(monkeypatch)
    methods = {"fsq": [(120, None, 23.7, None), (170, None, 24.8, None)],
               "ddcl": [(130, [125, 135], 23.8, [23.7, 23.9]), (220, None, 25.5, None)],
               "lfq": [(75, None, 18.2, None), (88, None, 18.5, None)]}
    plots.plot_comparison("unused.png", methods, [("none: 25.91 dB", 25.91)], "title")
    fig = seen["fig"]
    main, apart = fig.axes
    assert [t.get_text() for t in main.get_legend().get_texts()] == ["fsq", "ddcl"]
    assert [t.get_text() for t in apart.get_legend().get_texts()] == ["lfq"]
    assert main.get_ylim()[0] > 22 and main.get_ylim()[1] > 25.91  # lfq does not stretch it; the reference fits
    label = [t for t in main.texts if t.get_text().startswith("none")][0]
    assert label.xy[0] > 1.0  # in the right margin: no curve crosses it, no frame cuts it
    assert plots.colour("ddcl") == plots.colour("ddcl_context, 50 epochs") == plots.COLOURS["ddcl"]
