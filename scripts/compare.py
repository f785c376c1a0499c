"""Compare every bottleneck at measured bits, over seeds: the README's results, in one command.

    python scripts/make_patches.py /tmp/photos --set=wallpapers      # the data (a 156 MB download)
    python scripts/compare.py /tmp/photos                             # train, evaluate, write docs/results/
    python scripts/compare.py /tmp/photos --report_only=True          # re-write the results from the runs
    python scripts/compare.py /tmp/photos --dry_run=True              # print the train.py commands

Trains each bottleneck of POINTS at each of its operating points with train.py's defaults, once
per seed (`--seeds`, from 1337 up), `--jobs` runs at a time, into `--out` (a run already finished
is not trained again; an interrupted one is resumed). Then evaluates each run's best checkpoint
and its checkpoint of epoch `--early` on the whole test split, the rate prior fitted on the whole
training split, and writes to `--results`:

    comparison.md        the same as tables: every point, BD per seed, the ranking at --early
    comparison.json      every run, every point's mean and 95% interval over seeds, and each
                         bottleneck's BD-rate and BD-PSNR against FSQ per seed, with its interval;
                         the same at epoch --early, to show where the ranking settles
    {bottleneck}.json    CompressAI's results layout (name, results.bpp, psnr-rgb, ssim-rgb: means)
                         plus the intervals and the per-seed values
    rate_distortion.png  the means with their intervals on both axes

and regenerates the README's results table from comparison.json (between its markers).
Options: --epochs=10 --early=5 --seeds=3 --jobs=2 --only="['fsq', 'ddcl']" --out=compare
--results=docs/results --readme=README.md, and any train.py knob given as --train="['--key=value']".
"""
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from discrete_ae.bjontegaard import bd_pair, interval, verdict
from discrete_ae.errors import ConfigError, cli
from discrete_ae.files import save_json
from discrete_ae.overrides import parse_paths_and_options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(epochs=10, early=5, seeds=3, jobs=2, only=[""], out="compare", results="docs/results",
                readme="README.md", dry_run=False, report_only=False, train=[""])
FIRST_SEED = 1337
ANCHOR = "fsq"  # every BD number is against this bottleneck's curve
# bottleneck -> [(label, train.py knobs)]: three or more operating points in the same measured range
POINTS = {
    "fsq": [("8-6-5", {"fsq_levels": [8, 6, 5]}), ("8-5-5-5", {"fsq_levels": [8, 5, 5, 5]}),
            ("7-5-5-5-5", {"fsq_levels": [7, 5, 5, 5, 5]})],
    "ddcl": [("w3e-3", {"ddcl_comm_weight": 3e-3}), ("w1e-3", {"ddcl_comm_weight": 1e-3}),
             ("w3e-4", {"ddcl_comm_weight": 3e-4})],
    "vq": [("K256", {"codebook_size": 256}), ("K1024", {"codebook_size": 1024}), ("K2048", {"codebook_size": 2048})],
    "simvq": [("K1024", {"codebook_size": 1024}), ("K4096", {"codebook_size": 4096}), ("K16384", {"codebook_size": 16384})],
    "lfq": [("K256", {"codebook_size": 256}), ("K512", {"codebook_size": 512}), ("K1024", {"codebook_size": 1024})],
    "fsp": [("8-6-5", {"fsq_levels": [8, 6, 5]}), ("8-5-5-5", {"fsq_levels": [8, 5, 5, 5]}),
            ("7-5-5-5-5", {"fsq_levels": [7, 5, 5, 5, 5]})],
    "rfsq": [("3-3-3x2", {"fsq_levels": [3, 3, 3]}), ("4-4-4x2", {"fsq_levels": [4, 4, 4]}),
             ("5-5-5x2", {"fsq_levels": [5, 5, 5]})],
}
REFERENCES = {"none": {}, "vae": {}}  # one point each: no code length (32-bit floats; a KL)
TABLE_START, TABLE_END = "<!-- results table: scripts/compare.py writes it -->", "<!-- end of results table -->"


def runs(opts):
    """[(bottleneck, label, seed, run name, train.py arguments)] of the whole comparison."""
    chosen = [m for m in opts["only"] if m] or list(POINTS) + list(REFERENCES)
    unknown = sorted(set(chosen) - set(POINTS) - set(REFERENCES))
    if unknown:
        raise ConfigError(f"--only names unknown bottlenecks {unknown}; choose from {list(POINTS) + list(REFERENCES)}")
    out = []
    for method in chosen:
        for label, knobs in POINTS.get(method, [("ref", REFERENCES.get(method, {}))]):
            for s in range(opts["seeds"]):
                seed = FIRST_SEED + s
                name = f"{method}_{label}_s{seed}"
                args = [f"--quantizer={method}", f"--seed={seed}", f"--run_name={name}",
                        *(f"--{k}={json.dumps(v, separators=(',', ':'))}" for k, v in knobs.items())]
                out.append((method, label, seed, name, args))
    return out


def train_command(data_dir, opts, name, args):
    folders = os.path.join(opts["out"], "checkpoints"), os.path.join(opts["out"], "outputs")
    command = [sys.executable, "train.py", "--dataset=folder", f"--data_dir={data_dir}", f"--epochs={opts['epochs']}",
               f"--checkpoint_dir={folders[0]}", f"--output_dir={folders[1]}", f"--checkpoint_every={opts['early']}",
               *args, *(a for a in opts["train"] if a)]
    last = os.path.join(folders[0], f"{name}_vae_last.pt")
    return command + ([f"--resume={last}"] if os.path.isfile(last) else [])


def finished(opts, name):
    return os.path.isfile(os.path.join(opts["out"], "outputs", f"{name}_final.json"))


def train_all(data_dir, opts, plan):
    threads = max(1, (os.cpu_count() or 1) // opts["jobs"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    os.makedirs(os.path.join(opts["out"], "logs"), exist_ok=True)

    def one(run):
        _, _, _, name, args = run
        if finished(opts, name):
            return
        log = os.path.join(opts["out"], "logs", f"{name}.log")
        with open(log, "a") as f:
            done = subprocess.run(train_command(data_dir, opts, name, args), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        if done.returncode:
            raise ConfigError(f"{name} failed (exit {done.returncode}); see {log}")
        print(f"trained {name}", flush=True)

    with ThreadPoolExecutor(opts["jobs"]) as pool:
        list(pool.map(one, plan))


def evaluate_all(data_dir, opts, plan):
    """{run name: {"best": metrics, "early": metrics, "seconds": training seconds}}, cached in
    OUT/evaluations.json by checkpoint path and modification time."""
    import torch

    from discrete_ae.data import load_dataset
    from discrete_ae.files import read_jsonl
    from evaluate import evaluate
    from utils import load_checkpoint

    cache_path = os.path.join(opts["out"], "evaluations.json")
    cache = json.load(open(cache_path)) if os.path.isfile(cache_path) else {}
    train_u8, val_u8 = load_dataset("folder", data_dir)
    found = {}
    for method, label, seed, name, _ in plan:
        entry = {}
        for key, tag in (("best", "best"), ("early", f"epoch_{opts['early']}")):
            path = os.path.join(opts["out"], "checkpoints", f"{name}_vae_{tag}.pt")
            if not os.path.isfile(path):
                continue
            stamp = f"{path}@{os.path.getmtime(path)}"
            if stamp not in cache:
                model, config = load_checkpoint(path)
                torch.manual_seed(0)
                metrics = evaluate(model, val_u8, train_u8)
                cache[stamp] = {"epoch": torch.load(path, weights_only=True)["epoch"], "settings": model.quantizer.settings(),
                                **{k: metrics[k] for k in ("psnr", "ssim", "bits", "bpp", "rate_source", "bits_fixed",
                                                           "codebook_usage", "bits_per_image_coded") if k in metrics}}
                save_json(cache_path, cache)
            entry[key] = cache[stamp]
        rows = read_jsonl(os.path.join(opts["out"], "outputs", f"{name}_metrics.jsonl"))
        entry["seconds"] = sum(r["seconds"] for r in rows)
        found[name] = entry
    return found


def point_summary(values):
    mean, lo, hi = interval(values)
    return {"mean": mean, "interval": None if lo is None else [lo, hi], "seeds": values}


def summarise(plan, evals, key, seeds):
    """{bottleneck: {"points": [...], "bd_vs_fsq": {...}}} at checkpoint `key` ("best" or "early")."""
    methods = {}
    for method, label, seed, name, _ in plan:
        got = evals.get(name, {}).get(key)
        if got is None:
            continue
        point = methods.setdefault(method, {}).setdefault(label, {"label": label, "runs": {}})
        point["runs"][seed] = got
    out = {}
    for method, points in methods.items():
        rows = []
        for label, point in points.items():
            ordered = [point["runs"][s] for s in sorted(point["runs"])]
            rows.append({"label": label, "settings": ordered[0]["settings"], "rate_source": ordered[0]["rate_source"],
                         "seeds": sorted(point["runs"]), **{k: point_summary([r[k] for r in ordered])
                                                          for k in ("psnr", "bits", "ssim")}})
        rows.sort(key=lambda r: r["bits"]["mean"])
        out[method] = {"points": rows}
    anchor = out.get(ANCHOR)
    for method, entry in out.items():
        if method == ANCHOR or anchor is None or method in REFERENCES:
            continue
        per_seed = {"bd_rate": [], "bd_psnr": []}
        for seed in seeds:
            a = [(p["bits"]["seeds"][p["seeds"].index(seed)], p["psnr"]["seeds"][p["seeds"].index(seed)])
                 for p in entry["points"] if seed in p["seeds"]]
            b = [(p["bits"]["seeds"][p["seeds"].index(seed)], p["psnr"]["seeds"][p["seeds"].index(seed)])
                 for p in anchor["points"] if seed in p["seeds"]]
            if len(a) < 2 or len(b) < 2:
                continue
            rate, psnr = bd_pair(a, b)
            per_seed["bd_rate"].append(rate)
            per_seed["bd_psnr"].append(psnr)
        entry["bd_vs_fsq"] = {}
        for k, values in per_seed.items():
            mean, lo, hi = interval(values)
            overlap = all(v is not None for v in values) and bool(values)
            entry["bd_vs_fsq"][k] = {"mean": mean, "interval": None if lo is None else [lo, hi], "seeds": values,
                                     "overlap": overlap,
                                     "verdict": verdict(lo, hi, k == "bd_rate") if overlap else "no overlap"}
    return out


def cpu_minutes(evals, jobs):
    seconds = sum(e.get("seconds", 0.0) for e in evals.values())
    return seconds / 60.0, seconds / 60.0 / jobs


def compressai_file(method, entry, meta):
    pts = entry["points"]
    return {"name": method, "description": f"{meta['command']}; means over seeds, 95% t-intervals",
            "results": {"bpp": [p["bits"]["mean"] / 1024 for p in pts], "psnr-rgb": [p["psnr"]["mean"] for p in pts],
                        "ssim-rgb": [p["ssim"]["mean"] for p in pts], "bits": [p["bits"]["mean"] for p in pts],
                        "settings": [p["settings"] for p in pts]},
            "intervals": {k: [p[k]["interval"] for p in pts] for k in ("bits", "psnr", "ssim")},
            "per_seed": {k: [p[k]["seeds"] for p in pts] for k in ("bits", "psnr", "ssim")},
            "seeds": pts[0]["seeds"] if pts else [], "bd_vs_fsq": entry.get("bd_vs_fsq")}


def fmt_interval(stat, unit, digits):
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:+.{digits}f}{unit}"
    return text + (f" [{stat['interval'][0]:+.{digits}f}, {stat['interval'][1]:+.{digits}f}]" if stat["interval"] else "")


def results_table(summary):
    """The README's table, from comparison.json's "best" summary."""
    best = summary["best"]
    lines = ["| bottleneck | measured bits per image | PSNR (dB) | BD-rate vs FSQ (95% interval) | BD-PSNR vs FSQ | reading |",
             "| --- | --- | --- | --- | --- | --- |"]
    def bd_mean(m):  # None where the curve does not overlap FSQ's
        return (best[m].get("bd_vs_fsq") or {}).get("bd_rate", {}).get("mean")

    order = sorted(best, key=lambda m: (m in REFERENCES, m != ANCHOR, bd_mean(m) is None, bd_mean(m) or 0))
    for m in order:
        pts = best[m]["points"]
        bits = " / ".join(f"{p['bits']['mean']:.0f}" for p in pts)
        psnr = " / ".join(f"{p['psnr']['mean']:.2f}" for p in pts)
        source = pts[0]["rate_source"]
        if m == ANCHOR:
            lines.append(f"| **{m}** | {bits} | {psnr} | the reference | | |")
        elif m in REFERENCES:
            lines.append(f"| {m} | {bits} ({source}, not a code length) | {psnr} | - | - | reference |")
        else:
            bd = best[m]["bd_vs_fsq"]
            rate = fmt_interval(bd["bd_rate"], "%", 1) if bd["bd_rate"]["overlap"] else "no overlap"
            psnr_bd = fmt_interval(bd["bd_psnr"], " dB", 2) if bd["bd_psnr"]["overlap"] else "no overlap"
            reading = {"better": "fewer bits than FSQ", "worse": "more bits than FSQ"}.get(bd["bd_rate"]["verdict"],
                                                                                        bd["bd_rate"]["verdict"])
            lines.append(f"| {m} | {bits} | {psnr} | {rate} | {psnr_bd} | {reading} |")
    if "runs" in summary:  # the whole summary: say what stands behind the table
        lines += ["", f"{summary['runs']} runs: {len(summary['seeds'])} seeds of every point, {summary['epochs']} epochs "
                      f"each, {summary['training_cpu_minutes']:.0f} CPU-minutes of training. Bits are range-coded "
                      "bits per image on held-out crops; intervals are 95% over the seeds. `" + summary["command"] + "`"]
    return "\n".join(lines)


def details_markdown(summary):
    """Every point with its intervals, each bottleneck's BD numbers per seed, and the ranking at the
    early epoch beside the final one: docs/results/comparison.md."""
    def iv(stat, digits):
        lo_hi = f" [{stat['interval'][0]:.{digits}f}, {stat['interval'][1]:.{digits}f}]" if stat["interval"] else ""
        return f"{stat['mean']:.{digits}f}{lo_hi}"

    out = [f"# The comparison, point by point (generated by `{summary['command']}`)", "",
           f"{summary['runs']} runs: each point trained once per seed ({', '.join(map(str, summary['seeds']))}) for "
           f"{summary['epochs']} epochs; {summary['training_cpu_minutes']:.0f} CPU-minutes of training. Means and 95% "
           "t-intervals over the seeds; bits are range-coded bits per image on the held-out crops.", "",
           "| bottleneck | point | settings | bits per image | PSNR (dB) | SSIM |", "| --- | --- | --- | --- | --- | --- |"]
    for m, e in summary["best"].items():
        for p in e["points"]:
            out.append(f"| {m} | {p['label']} | {p['settings'].replace(' | ', ', ')} | {iv(p['bits'], 1)} | {iv(p['psnr'], 2)} | {iv(p['ssim'], 3)} |")
    out += ["", "## BD-rate and BD-PSNR against FSQ, seed by seed", "",
            "| bottleneck | BD-rate per seed (%) | BD-PSNR per seed (dB) |", "| --- | --- | --- |"]
    for m, e in summary["best"].items():
        bd = e.get("bd_vs_fsq")
        if bd:
            fmt = lambda vals, d: ", ".join("no overlap" if v is None else f"{v:+.{d}f}" for v in vals) or "-"  # noqa: E731
            out.append(f"| {m} | {fmt(bd['bd_rate']['seeds'], 1)} | {fmt(bd['bd_psnr']['seeds'], 2)} |")
    out += ["", f"## Where the ranking settles: epoch {summary['early_epoch']} against epoch {summary['epochs']}", "",
            f"| bottleneck | BD-rate vs FSQ at epoch {summary['early_epoch']} | at epoch {summary['epochs']} (best checkpoint) |",
            "| --- | --- | --- |"]
    for m, e in summary["best"].items():
        late, early = e.get("bd_vs_fsq"), summary["early"].get(m, {}).get("bd_vs_fsq")
        if late and early:
            cell = lambda s: fmt_interval(s, "%", 1) if s["overlap"] else "no overlap"  # noqa: E731
            out.append(f"| {m} | {cell(early['bd_rate'])} | {cell(late['bd_rate'])} |")
    return "\n".join(out) + "\n"


def write_readme(path, summary):
    with open(path) as f:
        text = f.read()
    if TABLE_START not in text or TABLE_END not in text:
        raise ConfigError(f"{path} has no results markers ({TABLE_START} ... {TABLE_END})")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    with open(path, "w") as f:
        f.write(head + TABLE_START + "\n" + results_table(summary) + "\n" + TABLE_END + tail)


def report(data_dir, opts, plan):
    from discrete_ae.plots import plot_comparison

    evals = evaluate_all(data_dir, opts, plan)
    seeds = [FIRST_SEED + s for s in range(opts["seeds"])]
    total, wall = cpu_minutes(evals, opts["jobs"])
    command = f"python scripts/compare.py {data_dir} --epochs={opts['epochs']} --seeds={opts['seeds']}"
    if any(opts["only"]):
        command += f' --only="{[m for m in opts["only"] if m]}"'
    summary = {"command": command, "data": data_dir, "epochs": opts["epochs"], "early_epoch": opts["early"],
               "seeds": seeds, "runs": len([e for e in evals.values() if "best" in e]),
               "training_cpu_minutes": round(total, 1), "jobs": opts["jobs"], "approx_wall_minutes": round(wall, 1),
               "best": summarise(plan, evals, "best", seeds), "early": summarise(plan, evals, "early", seeds),
               "runs_detail": evals}
    os.makedirs(opts["results"], exist_ok=True)
    save_json(os.path.join(opts["results"], "comparison.json"), summary)
    for method, entry in summary["best"].items():
        save_json(os.path.join(opts["results"], f"{method}.json"), compressai_file(method, entry, summary))
    methods = {m: [(p["bits"]["mean"], p["bits"]["interval"], p["psnr"]["mean"], p["psnr"]["interval"]) for p in e["points"]]
               for m, e in summary["best"].items() if m not in REFERENCES}
    refs = [(f"{m}: {e['points'][0]['psnr']['mean']:.2f} dB ({e['points'][0]['rate_source']}, no code length)",
             e["points"][0]["psnr"]["mean"]) for m, e in summary["best"].items() if m in REFERENCES]
    plot_comparison(os.path.join(opts["results"], "rate_distortion.png"), methods, refs,
                    f"Held-out PSNR at measured bits, {opts['epochs']} epochs, {len(seeds)} seeds each")
    with open(os.path.join(opts["results"], "comparison.md"), "w") as f:
        f.write(details_markdown(summary))
    if opts["readme"]:
        write_readme(opts["readme"], summary)
    print(results_table(summary))
    print(f"{summary['runs']} runs, {total:.0f} CPU-minutes of training; wrote {opts['results']}/comparison.json, "
          f"one {{bottleneck}}.json each and rate_distortion.png" + (f"; updated {opts['readme']}" if opts["readme"] else ""))


def main(argv):
    paths, opts = parse_paths_and_options(argv, DEFAULTS, "usage: python scripts/compare.py DATA_DIR [--epochs=20] "
                                          "[--seeds=3] [--jobs=2] (see --help)", count=1)
    if opts["seeds"] < 1 or opts["jobs"] < 1 or not 0 < opts["early"] <= opts["epochs"]:
        raise ConfigError("--seeds and --jobs must be >= 1, and 0 < --early <= --epochs")
    plan = runs(opts)
    if opts["dry_run"]:
        for _, _, _, name, args in plan:
            print(shlex.join(["python", *train_command(paths[0], opts, name, args)[1:]]))
        return
    t0 = time.time()
    if not opts["report_only"]:
        train_all(paths[0], opts, plan)
    report(paths[0], opts, plan)
    print(f"({(time.time() - t0) / 60:.1f} minutes)")


if __name__ == "__main__":
    cli(main, __doc__)
