"""scripts/compare.py: which train.py runs it starts, how it summarises seeds, and the README table
it writes (the committed one must be what the committed results give)."""
import json
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import compare  # noqa: E402

from discrete_ae.errors import ConfigError  # noqa: E402


def test_every_bottleneck_gets_three_points_per_seed_and_the_knobs_given(capsys):
    compare.main(["DATA", "--dry_run=True", "--seeds=3", "--train=['--color_gain=0.1']"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 3 * len(compare.POINTS) + 3 * len(compare.REFERENCES)
    assert all("--color_gain=0.1" in line and "--data_dir=DATA" in line and "--epochs=10" in line for line in lines)
    for method in compare.POINTS:
        runs = {line.split("--run_name=")[1].split()[0] for line in lines if f"--quantizer={method} " in line}
        assert len(runs) == 9, method  # 3 operating points x 3 seeds
    compare.main(["DATA", "--dry_run=True", "--only=['fsq']", "--seeds=2"])
    assert len(capsys.readouterr().out.splitlines()) == 6
    with pytest.raises(ConfigError, match="unknown bottlenecks"):
        compare.main(["DATA", "--dry_run=True", "--only=['pq']"])


def fake_evals(plan, gain_db):
    """Evaluations of the plan where every bottleneck but FSQ sits `gain_db` above FSQ's line."""
    evals = {}
    for method, label, seed, name, _ in plan:
        k = [p for p, _ in compare.POINTS.get(method, [("ref", {})])].index(label)
        bits = 120.0 + 30 * k + (seed - 1337)
        psnr = 22.0 + 0.02 * (bits - 120) + (0 if method == "fsq" else gain_db) + 0.01 * (seed - 1337)
        got = {"psnr": psnr, "bits": bits, "ssim": 0.6, "settings": label, "rate_source": "bitstream", "epoch": 10}
        evals[name] = {"best": got, "early": got, "seconds": 60.0}
    return evals


def test_summary_reads_bd_rate_over_seeds_and_the_table_says_level_only_when_the_interval_holds_zero(tmp_path):
    opts = {**compare.DEFAULTS, "only": ["fsq", "ddcl", "none"], "seeds": 3}
    plan = compare.runs(opts)
    seeds = [1337, 1338, 1339]
    summary = compare.summarise(plan, fake_evals(plan, 0.2), "best", seeds)
    bd = summary["ddcl"]["bd_vs_fsq"]
    assert bd["bd_psnr"]["mean"] == pytest.approx(0.2, abs=1e-6) and bd["bd_rate"]["mean"] < 0
    assert bd["bd_rate"]["verdict"] == "better" and len(bd["bd_rate"]["seeds"]) == 3
    point = summary["ddcl"]["points"][0]
    assert point["bits"]["seeds"] == [120.0, 121.0, 122.0] and point["bits"]["interval"][0] < 121.0 < point["bits"]["interval"][1]
    table = compare.results_table({"best": summary})
    assert "| **fsq** |" in table and "| ddcl |" in table and "fewer bits than FSQ" in table
    level = compare.summarise(plan, fake_evals(plan, 0.0), "best", seeds)
    assert level["ddcl"]["bd_vs_fsq"]["bd_rate"]["verdict"] == "level"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{compare.TABLE_START}\nold\n{compare.TABLE_END}\nrest\n")
    compare.write_readme(str(readme), {"best": summary})
    assert readme.read_text() == f"intro\n{compare.TABLE_START}\n{table}\n{compare.TABLE_END}\nrest\n"


def test_the_readme_table_is_the_one_the_committed_results_give():
    with open(os.path.join(REPO, "docs", "results", "comparison.json")) as f:
        summary = json.load(f)
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert f"{compare.TABLE_START}\n{compare.results_table(summary)}\n{compare.TABLE_END}" in readme
    assert summary["runs"] >= 3 * 3 * len(compare.POINTS)  # every point over three seeds


@pytest.mark.parametrize("results, words", [("comparison.json", "{mean:.1f}% more bits"),
                                            (os.path.join("skimage", "comparison.json"), "{mean:+.1f}%")])
def test_the_readme_answer_quotes_the_committed_results(results, words):
    """The answer above the table is prose; its DDCL-vs-FSQ numbers must be the results file's."""
    with open(os.path.join(REPO, "docs", "results", results)) as f:
        bd = json.load(f)["best"]["ddcl"]["bd_vs_fsq"]["bd_rate"]
    with open(os.path.join(REPO, "README.md")) as f:
        answer = " ".join(f.read().split(compare.TABLE_START)[0].split())  # as read, whatever the line breaks
    low, high = bd["interval"]
    assert words.format(mean=bd["mean"]) in answer
    assert f"{low:+.1f} to {high:+.1f}%" in answer
