"""scripts/compare.py: which train.py runs it starts, how it summarises seeds, and the README table
it writes (the committed one must be what the committed results give)."""
import json
import os
import sys
import time

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "scripts"))
import compare  # noqa: E402

from discrete_ae.errors import ConfigError, DataError  # noqa: E402


def test_every_bottleneck_gets_three_points_per_seed_and_the_knobs_given(capsys):
    compare.main(["DATA", "--dry_run=True", "--seeds=3", "--train=['--color_gain=0.1']"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 * 3 * len(compare.POINTS) + 3 * len(compare.REFERENCES)
    data = os.path.abspath("DATA")
    assert all("--color_gain=0.1" in line and f"--data_dir={data}" in line and "--epochs=10" in line for line in lines)
    for method in compare.POINTS:
        runs = {line.split("--run_name=")[1].split()[0] for line in lines if f"--quantizer={method} " in line}
        assert len(runs) == 9, method  # 3 operating points x 3 seeds
    compare.main(["DATA", "--dry_run=True", "--only=['fsq']", "--seeds=2"])
    assert len(capsys.readouterr().out.splitlines()) == 6
    with pytest.raises(ConfigError, match="unknown bottlenecks"):
        compare.main(["DATA", "--dry_run=True", "--only=['pq']"])


def test_each_set_and_prior_family_gets_its_own_runs_and_ddcl_moves_rate_weight_under_a_trained_prior(capsys):
    compare.main(["a=/x/one", "b=/x/two", "--dry_run=True", "--seeds=1", "--only=['fsq', 'ddcl', 'none']",
                  "--priors=['fitted', 'context']"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * (7 + 6)  # fitted: 3 + 3 + the reference; context: no reference (it sends no integers)
    context = [line for line in lines if "--entropy_model=context" in line]
    assert len(context) == 12 and all("_context/" in line for line in context)
    ddcl = [line for line in context if "--quantizer=ddcl" in line]
    assert sorted(line.split("--rate_weight=")[1].split()[0] for line in ddcl) == ["0.005"] * 2 + ["0.01"] * 2 + ["0.02"] * 2
    assert all("--data_dir=/x/two" in line for line in lines if "/b_" in line)
    compare.main(["cifar10", "--dry_run=True", "--seeds=1", "--only=['fsq']"])
    assert all("--dataset=cifar10" in line for line in capsys.readouterr().out.splitlines())
    with pytest.raises(ConfigError, match="unknown prior"):
        compare.main(["a=/x", "--dry_run=True", "--priors=['hyper']"])
    with pytest.raises(ConfigError, match="same name"):
        compare.main(["a=/x", "a=/y", "--dry_run=True"])


def test_a_finished_run_counts_only_when_its_config_is_the_one_asked_for(tmp_path):
    data = compare.parse_set(f"s={tmp_path}")
    opts = {**compare.DEFAULTS, "epochs": 5}
    where = compare.folders({**opts, "out": str(tmp_path)}, data, "fitted")
    method, label, seed, name, args = compare.runs({**opts, "only": ["fsq"], "seeds": 1})[0]
    os.makedirs(where["outputs"])
    (tmp_path / "s_fitted" / "outputs" / f"{name}_final.json").write_text("{}")
    saved = {"quantizer": "fsq", "seed": seed, "epochs": 2, "entropy_model": "fitted", "dataset": "folder",
             "fsq_levels": [8, 6, 5]}
    config = tmp_path / "s_fitted" / "outputs" / f"{name}_config.json"
    config.write_text(json.dumps(saved))
    assert not compare.finished(where, name, compare.wanted_config(data, opts, args))  # trained 2 epochs, not 5
    config.write_text(json.dumps({**saved, "epochs": 5}))
    assert compare.finished(where, name, compare.wanted_config(data, opts, args))
    config.write_text("{trunc")
    assert not compare.finished(where, name, compare.wanted_config(data, opts, args))


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
    assert "| **fsq** |" in table and "| ddcl |" in table and "ahead of FSQ |" in table
    level = compare.summarise(plan, fake_evals(plan, 0.0), "best", seeds)
    assert level["ddcl"]["bd_vs_fsq"]["bd_rate"]["verdict"] == "level"
    results = tmp_path / "results"
    for set_name, gain in (("one", 0.2), ("two", 0.1)):
        os.makedirs(results / set_name / "learned")
        comp = {"best": compare.summarise(plan, fake_evals(plan, gain), "best", seeds), "epochs": 10, "seeds": seeds,
                "runs": 21, "training_cpu_minutes": 30.0, "command": "python scripts/compare.py ..."}
        (results / set_name / "learned" / "comparison.json").write_text(json.dumps(comp))
    cross = compare.cross_summary(str(results))
    assert cross["headline_prior"] == "learned" and cross["holds"]["learned"]["ddcl"]["on_every_set"] == "better"
    answer = compare.answer_text(cross)
    assert "**DDCL is ahead of FSQ on every set**" in answer and "2 sets, 10 epochs, 3 seeds" in answer
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{compare.ANSWER_START}\nold\n{compare.ANSWER_END}\nmid\n{compare.TABLE_START}\nold\n"
                      f"{compare.TABLE_END}\nrest\n")
    compare.write_readme(str(readme), cross)
    assert readme.read_text() == (f"intro\n{compare.ANSWER_START}\n{answer}\n{compare.ANSWER_END}\nmid\n"
                                  f"{compare.TABLE_START}\n{compare.summary_table(cross, compare.README_PRIORS)}\n"
                                  f"{compare.TABLE_END}\nrest\n")


def test_the_answer_names_the_other_bottlenecks_on_the_sets_they_ran_on(tmp_path):
    seeds = [1337, 1338, 1339]
    results = tmp_path / "results"
    for set_name, only, gain in (("one", ["fsq", "ddcl", "vq"], -0.3), ("two", ["fsq", "ddcl"], 0.2)):
        plan = compare.runs({**compare.DEFAULTS, "only": only, "seeds": 3})
        os.makedirs(results / set_name / "context")
        comp = {"best": compare.summarise(plan, fake_evals(plan, gain), "best", seeds), "epochs": 10, "seeds": seeds,
                "runs": 9 * len(only), "training_cpu_minutes": 30.0, "command": "python scripts/compare.py ..."}
        (results / set_name / "context" / "comparison.json").write_text(json.dumps(comp))
    answer = compare.answer_text(compare.cross_summary(str(results)))
    assert "**the verdict differs between sets**" in answer  # DDCL: behind on one, ahead on two
    others = answer.split("\n")[-1]
    assert others.startswith("The library's other bottlenecks under the same prior (one only, 10 epochs, 3 seeds;")
    assert "vq behind FSQ (+" in others and "ddcl" not in others and "fsq " not in others
    cross = compare.cross_summary(str(results))
    vq = cross["priors"]["context"]["one"]["methods"]["vq"]
    for key in ("bd_rate", "bd_psnr"):
        vq["bd_vs_fsq"][key]["overlap"] = False  # as LFQ's curve, far below FSQ's
    others = compare.answer_text(cross).split("\n")[-1]
    low, high = vq["points"][0], vq["points"][-1]
    assert f"vq outside FSQ's range ({low['bits']:.0f}-{high['bits']:.0f} bits at " in others


def test_the_readme_answer_and_table_are_the_ones_the_committed_results_give():
    results = os.path.join(REPO, "docs", "results")
    with open(os.path.join(results, "summary.json")) as f:
        summary = json.load(f)
    assert summary == json.loads(json.dumps(compare.cross_summary(results)))  # summary.json is current
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    assert f"{compare.ANSWER_START}\n{compare.answer_text(summary)}\n{compare.ANSWER_END}" in readme
    assert f"{compare.TABLE_START}\n{compare.summary_table(summary, compare.README_PRIORS)}\n{compare.TABLE_END}" in readme
    first = "\n".join(readme.splitlines()[:60])
    assert compare.ANSWER_START in first and summary["headline_prior"] in first and "epochs" in first


def test_runs_go_through_submitits_local_executor_and_are_reused_afterwards(tmp_path, image_folder, capsys):
    args = [f"tiny={image_folder}", "--only=['fsq']", "--seeds=1", "--epochs=1", "--early=1", "--jobs=2",
            f"--out={tmp_path / 'runs'}", "--train=['--channels=[8,8,16]', '--batch_size=16']"]
    compare.main(args + ["--executor=submitit_local"])
    out = capsys.readouterr().out
    assert out.count("trained tiny/") == 3 and os.path.isdir(tmp_path / "runs" / "submitit")
    summary = json.loads((tmp_path / "runs" / "results" / "tiny" / "fitted" / "comparison.json").read_text())
    assert summary["runs"] == 3 and len(summary["best"]["fsq"]["points"]) == 3
    readme = open(os.path.join(REPO, "README.md")).read()
    committed = open(os.path.join(REPO, "docs", "results", "summary.json")).read()
    compare.main(args)  # the same runs, asked again: finished, nothing trained
    assert "trained tiny/" not in capsys.readouterr().out
    # a small run writes its results beside its runs: the README and the committed results only when asked
    assert (tmp_path / "runs" / "results" / "summary.json").is_file()
    assert open(os.path.join(REPO, "README.md")).read() == readme
    assert open(os.path.join(REPO, "docs", "results", "summary.json")).read() == committed
    with pytest.raises(ConfigError, match="--executor='pbs'"):
        compare.main(args + ["--executor=pbs"])


def start_compare(tmp_path, image_folder):
    import subprocess

    command = [sys.executable, os.path.join(REPO, "scripts", "compare.py"), f"tiny={image_folder}", "--only=['fsq']",
               "--seeds=2", "--epochs=300", "--early=1", "--jobs=1", f"--out={tmp_path / 'runs'}",
               "--train=['--channels=[8,8,16]', '--batch_size=16']"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    logs = tmp_path / "runs" / "tiny_fitted" / "logs"
    deadline = time.time() + 60
    while time.time() < deadline and not any("epoch 1/300" in p.read_text() for p in logs.glob("*.log")):
        time.sleep(0.2)
    return proc, logs


def trainers(tmp_path):
    """pids of train.py processes writing under tmp_path."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "train.py" in cmdline and str(tmp_path) in cmdline:
            found.append(int(pid))
    return found


def test_ctrl_c_stops_at_once_with_one_line_and_starts_no_queued_run(tmp_path, image_folder):
    import signal

    proc, logs = start_compare(tmp_path, image_folder)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted: the runs in flight stopped")
    assert len(list(logs.glob("*.log"))) == 1 and not trainers(tmp_path)  # the second run never started


def test_a_killed_compare_takes_its_training_run_with_it(tmp_path, image_folder):
    proc, _ = start_compare(tmp_path, image_folder)
    assert trainers(tmp_path)
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.time() + 30
    while trainers(tmp_path) and time.time() < deadline:
        time.sleep(0.2)
    assert not trainers(tmp_path)


def test_a_truncated_evaluation_cache_is_one_line(tmp_path, image_folder):
    root = tmp_path / "runs" / "tiny_fitted"
    (root / "outputs").mkdir(parents=True)
    name = compare.runs({**compare.DEFAULTS, "only": ["fsq"], "seeds": 1})[0][3]
    (root / "outputs" / f"{name}_final.json").write_text("{}")  # a finished run, by its files
    (root / "outputs" / f"{name}_config.json").write_text(json.dumps({"epochs": 10, "dataset": "folder"}))
    (root / "evaluations.json").write_text('{"trunc')
    with pytest.raises(DataError, match="evaluations.json is truncated or not JSON: delete it"):
        compare.main([f"tiny={image_folder}", "--only=['fsq']", "--seeds=1", f"--out={tmp_path / 'runs'}",
                      "--report_only=True"])


def test_a_second_compare_on_the_same_folder_is_refused_at_once(tmp_path, image_folder):
    from discrete_ae.errors import UserError
    from discrete_ae.runs import RunLock

    (tmp_path / "runs").mkdir()
    with RunLock(str(tmp_path / "runs" / ".compare.lock"), "another compare.py"):
        with pytest.raises(UserError, match="is in use by pid"):
            compare.main([f"tiny={image_folder}", "--only=['fsq']", "--seeds=1", f"--out={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs" / "tiny_fitted").exists()


def test_where_the_psnr_ranges_do_not_overlap_the_answer_reads_bd_psnr():
    no_rate = {"mean": None, "interval": None, "seeds": [None] * 3, "overlap": False, "verdict": "no overlap"}
    ahead = {"mean": 0.24, "interval": [0.13, 0.35], "seeds": [0.2, 0.25, 0.27], "overlap": True, "verdict": "better"}
    bd = {"bd_rate": no_rate, "bd_psnr": ahead}
    assert compare.verdict_of(bd) == "better"
    assert compare._bd_words(bd) == "+0.24 dB [+0.13, +0.35] at equal bits"
    assert compare.verdict_of({"bd_rate": no_rate, "bd_psnr": {**no_rate}}) == "no overlap"


def test_a_failed_run_starts_no_queued_run(tmp_path, image_folder):
    args = [f"tiny={image_folder}", "--only=['fsq']", "--seeds=2", "--jobs=1", f"--out={tmp_path / 'runs'}",
            "--train=['--lr=-1.0']"]  # every run fails its config check at once
    with pytest.raises(ConfigError, match="failed \\(exit 2\\)"):
        compare.main(args)
    time.sleep(1)  # a queued run would have started by now
    assert len(list((tmp_path / "runs" / "tiny_fitted" / "logs").glob("*.log"))) == 1


def fake_comparison(path, prior, scale):
    """A comparison.json with FSQ's curve at bits x `scale` for two seeds (and DDCL only in one file)."""
    def point(bits, psnr):
        return {"seeds": [1337, 1338], "bits": {"seeds": [bits * scale, bits * scale * 1.01]},
                "psnr": {"seeds": [psnr, psnr + 0.01]}}

    best = {"fsq": {"points": [point(90, 23.6), point(110, 24.2), point(125, 24.5)]}}
    if scale == 1.0:
        best["ddcl"] = {"points": [point(100, 24.0), point(130, 24.6)]}
    path.write_text(json.dumps({"set": "wallpapers", "prior": prior, "epochs": 10, "best": best}))
    return str(path)


def test_compare_priors_prices_a_layout_against_the_reference_per_seed(tmp_path, capsys):
    import compare_priors

    slow, fast = fake_comparison(tmp_path / "a.json", "context", 1.0), fake_comparison(tmp_path / "b.json", "learned", 1.1)
    compare_priors.main([fast, slow, f"--out={tmp_path / 'costs.json'}"])
    out = capsys.readouterr().out
    assert out.startswith("learned against context (wallpapers, 10 epochs") and "| ddcl" not in out
    costs = json.loads((tmp_path / "costs.json").read_text())["costs"]
    assert costs["fsq"]["seeds"] == [1337, 1338] and costs["fsq"]["bd_rate"]["seeds"] == pytest.approx([10.0, 10.0], abs=1e-6)
    assert "| fsq | 2 | +10.0% [+10.0, +10.0] |" in out


@pytest.mark.parametrize("content,match", [(None, "no file at"), ("{", "not a JSON file"), ("[1, 2]", "no 'best' curves"),
                                           ('{"prior": "x", "best": {"vq": {"points": []}}}', "share no bottleneck")])
def test_compare_priors_refuses_what_is_not_a_comparison_in_one_line(tmp_path, content, match):
    import compare_priors

    good = fake_comparison(tmp_path / "good.json", "context", 1.0)
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    with pytest.raises(DataError, match=match):
        compare_priors.main([str(bad), good])
    with pytest.raises(DataError, match="pass two comparison.json files"):
        compare_priors.main([good])
