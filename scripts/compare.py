r"""Compare every bottleneck at measured bits, over seeds, on several data sets and under each kind
of rate prior: the README's results, in one command.

    python scripts/make_patches.py /tmp/photos --set=wallpapers       # a data set (a 156 MB download)
    python scripts/compare.py wallpapers=/tmp/photos                   # train, evaluate, write OUT/results/
    python scripts/compare.py wallpapers=/tmp/photos skimage=/tmp/patches --priors="['learned', 'context']" \
        --only="['fsq', 'ddcl']" --results=docs/results --readme=README.md     # the README's answer
    python scripts/compare.py cifar10                                  # CIFAR-10 (downloaded into data/)
    python scripts/compare.py ... --report_only=True                   # re-write the results from the runs
    python scripts/compare.py ... --dry_run=True                       # print the train.py commands

A data set is NAME=DIR (an image folder with train/ and test/, scripts/make_patches.py), a bare DIR
(named after the folder), or cifar10 / cifar10=DIR. A prior family (`--priors`) is how the
integers' rate is modelled, the same kind for every bottleneck:

    fitted    a histogram fitted on the training split after training (FSQ: one joint histogram
              over its whole code; DDCL: one per channel): the cheap baseline
    learned   a factorized prior trained with the model, one per transmitted channel or code
    context   each integer predicted from the integers sent before it, trained with the model

Trains each bottleneck of POINTS at each of its operating points (under learned and context priors
DDCL's knob is rate_weight: its comm_weight is unused there) with train.py's defaults, once per
seed (`--seeds`, from 1337 up), `--jobs` runs at a time, into OUT/{set}_{prior}/. A finished run is
reused only when its saved config is the one asked for; an interrupted one is resumed. Then
evaluates each run's best checkpoint and its checkpoint of epoch `--early` on the whole test split
and writes, per data set and prior, to RESULTS/{set}/{prior}/:

    comparison.md        every point, BD per seed, the ranking at --early
    comparison.json      every run, every point's mean and 95% interval over seeds, and each
                         bottleneck's BD-rate and BD-PSNR against FSQ per seed, with its interval
    {bottleneck}.json    CompressAI's results layout (name, results.bpp, psnr-rgb, ssim-rgb: means)
    rate_distortion.png  the means with their intervals on both axes

and across them RESULTS/summary.json and summary.md: every bottleneck's BD-rate against FSQ per set
and prior, and what holds on every set. RESULTS is OUT/results unless --results is given; the
README's answer and table are regenerated only with --readme=README.md.
Options: --epochs=10 --early=5 --seeds=3 --jobs=2 --priors="['fitted']" --out=compare --results=
--readme=, --only= (every bottleneck of POINTS and the references none and vae unless a list is
given, e.g. --only="['fsq', 'ddcl']") and any train.py knob given as --train="['--key=value']".

Beyond one machine: --executor=slurm hands each run to Slurm through submitit (--slurm="{'slurm_partition':
'gpu', 'timeout_min': 60}" sets the executor's parameters; --jobs runs are in flight at once), with
the same reuse and resume rules; --executor=submitit_local runs them as submitit's local jobs.
"""
import json
import os
import shlex
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from discrete_ae.bjontegaard import bd_pair, interval, verdict
from discrete_ae.errors import ConfigError, DataError, Stop, cli
from discrete_ae.files import atomic_write, read_jsonl, save_json
from discrete_ae.overrides import parse_paths_and_options
from discrete_ae.process import run_logged
from discrete_ae.runs import RunLock, cpu_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(epochs=10, early=5, seeds=3, jobs=2, only=[""], priors=["fitted"], out="compare", results="",
                readme="", dry_run=False, report_only=False, train=[""], executor="local", slurm={"": ""})
EXECUTORS = ("local", "submitit_local", "slurm")  # how each train.py run is started
PRIORS = ("fitted", "learned", "context")
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
# under a trained prior DDCL's rate knob is rate_weight (its comm_weight is not in the loss)
TRAINED_PRIOR_POINTS = {"ddcl": [("rw2e-2", {"rate_weight": 2e-2}), ("rw1e-2", {"rate_weight": 1e-2}),
                                 ("rw5e-3", {"rate_weight": 5e-3})]}
REFERENCES = {"none": {}, "vae": {}}  # one point each: no code length (32-bit floats; a KL)
TABLE_START, TABLE_END = "<!-- results table: scripts/compare.py writes it -->", "<!-- end of results table -->"
ANSWER_START, ANSWER_END = "<!-- answer: scripts/compare.py writes it -->", "<!-- end of answer -->"
# the settings train.py must have used for a finished run to count (compared with its saved config)
MATCHED_KEYS = ("quantizer", "seed", "epochs", "entropy_model", "dataset", "fsq_levels", "codebook_size",
                "ddcl_comm_weight", "rate_weight", "num_quantizers")


def points(method, prior):
    if prior != "fitted" and method in TRAINED_PRIOR_POINTS:
        return TRAINED_PRIOR_POINTS[method]
    return POINTS.get(method, [("ref", REFERENCES.get(method, {}))])


def runs(opts, prior="fitted"):
    """[(bottleneck, label, seed, run name, train.py arguments)] of one data set under one prior."""
    chosen = [m for m in opts["only"] if m] or list(POINTS) + list(REFERENCES)
    unknown = sorted(set(chosen) - set(POINTS) - set(REFERENCES))
    if unknown:
        raise ConfigError(f"--only names unknown bottlenecks {unknown}; choose from {list(POINTS) + list(REFERENCES)}")
    if prior != "fitted":  # the references send no integers: no prior to train
        chosen = [m for m in chosen if m not in REFERENCES]
    out = []
    for method in chosen:
        for label, knobs in points(method, prior):
            for s in range(opts["seeds"]):
                seed = FIRST_SEED + s
                name = f"{method}_{label}_s{seed}"
                args = [f"--quantizer={method}", f"--seed={seed}", f"--run_name={name}",
                        *(f"--{k}={json.dumps(v, separators=(',', ':'))}" for k, v in knobs.items())]
                if prior != "fitted":
                    args.append(f"--entropy_model={prior}")
                out.append((method, label, seed, name, args))
    return out


def parse_set(text):
    """NAME=DIR, DIR or cifar10[=DIR] -> {"name", "dataset", "data_dir"}."""
    name, _, folder = text.partition("=")
    if not folder:
        name, folder = (text, "data") if text == "cifar10" else (os.path.basename(os.path.normpath(text)), text)
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"data set {text!r}: write NAME=DIR with a plain NAME (letters, digits, - and _)")
    return {"name": name, "dataset": "cifar10" if name == "cifar10" else "folder", "data_dir": folder}


def folders(opts, data, prior):
    root = os.path.join(opts["out"], f"{data['name']}_{prior}")
    return {"root": root, "checkpoints": os.path.join(root, "checkpoints"), "outputs": os.path.join(root, "outputs"),
            "logs": os.path.join(root, "logs")}


def train_command(data, where, opts, name, args):
    command = [sys.executable, "train.py", f"--dataset={data['dataset']}", f"--data_dir={os.path.abspath(data['data_dir'])}",
               f"--epochs={opts['epochs']}", f"--checkpoint_dir={os.path.abspath(where['checkpoints'])}",
               f"--output_dir={os.path.abspath(where['outputs'])}", f"--checkpoint_every={opts['early']}",
               *args, *(a for a in opts["train"] if a)]
    last = os.path.join(where["checkpoints"], f"{name}_vae_last.pt")
    return command + ([f"--resume={os.path.abspath(last)}"] if os.path.isfile(last) else [])


def wanted_config(data, opts, args):
    """What a run's saved config must hold for it to count: the keys of MATCHED_KEYS it was given."""
    given = dict(a[2:].split("=", 1) for a in args + [a for a in opts["train"] if a])
    want = {"epochs": opts["epochs"], "dataset": data["dataset"], "entropy_model": given.pop("entropy_model", "fitted")}
    want.update({k: json.loads(v) if k != "quantizer" else v for k, v in given.items() if k in MATCHED_KEYS})
    return want


def finished(where, name, want=None):
    """A run counts as finished when it wrote final.json and (given `want`) its config matches."""
    if not os.path.isfile(os.path.join(where["outputs"], f"{name}_final.json")):
        return False
    if want is None:
        return True
    try:
        with open(os.path.join(where["outputs"], f"{name}_config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in want.items())


def launcher(opts):
    """command, env, log -> exit code: a local process, or a job of submitit's local or Slurm
    executor (`--slurm` holds the executor's parameters, e.g. {'slurm_partition': 'gpu', 'timeout_min': 60})."""
    if opts["executor"] == "local":
        return lambda command, env, log: run_logged(command, REPO, env, log)
    import submitit

    folder = os.path.join(opts["out"], "submitit")
    executor = submitit.AutoExecutor(folder=folder, cluster="local" if opts["executor"] == "submitit_local" else "slurm")
    executor.update_parameters(**{k: v for k, v in opts["slurm"].items() if k})
    return lambda command, env, log: executor.submit(run_logged, command, REPO, env, log).result()


def train_all(jobs, opts):
    """Train every (data set, folders, run) in `jobs`, `--jobs` at a time."""
    threads = max(1, (os.cpu_count() or 1) // opts["jobs"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    launch = launcher(opts)
    stopping = threading.Event()

    def one(job):
        data, where, (_, _, _, name, args) = job
        if stopping.is_set() or finished(where, name, wanted_config(data, opts, args)):
            return
        os.makedirs(where["logs"], exist_ok=True)
        log = os.path.join(where["logs"], f"{name}.log")
        code = launch(train_command(data, where, opts, name, args), env, log)
        if code:
            stopping.set()  # here, before this worker takes the next job
            raise ConfigError(f"{name} failed (exit {code}); see {log}")
        print(f"trained {data['name']}/{name}", flush=True)

    pool = ThreadPoolExecutor(opts["jobs"])
    try:
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()
    except BaseException as err:  # a failed run or Ctrl-C (which reached the runs in flight too): start no other
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
        if isinstance(err, KeyboardInterrupt):
            raise Stop("interrupted: the runs in flight stopped at their last epoch; run the same command again to "
                       "resume them", code=130) from None
        raise
    pool.shutdown()


def evaluate_all(data, where, opts, plan):
    """{run name: {"best": metrics, "early": metrics, "seconds": training seconds}}. The best
    checkpoint's metrics on the whole test split are train.py's own ({run}_final.json); the
    early checkpoint is evaluated here, cached in evaluations.json by path and modification time."""
    import torch

    from discrete_ae.data import load_dataset
    from evaluate import evaluate
    from utils import load_checkpoint

    cache_path = os.path.join(where["root"], "evaluations.json")
    cache = read_json(cache_path, "delete it: it is a cache of evaluations, rebuilt on the next report") \
        if os.path.isfile(cache_path) else {}
    splits = None
    found = {}
    for method, label, seed, name, args in plan:
        if not finished(where, name, wanted_config(data, opts, args)):
            continue
        entry = {}
        for key, tag in (("best", "best"), ("early", f"epoch_{opts['early']}")):
            path = os.path.join(where["checkpoints"], f"{name}_vae_{tag}.pt")
            if not os.path.isfile(path):
                continue
            stamp = f"{path}@{os.path.getmtime(path)}"
            if stamp not in cache:
                model, config = load_checkpoint(path)
                if key == "best":
                    metrics = read_json(os.path.join(where["outputs"], f"{name}_final.json"),
                                        "delete the run's files to train it again")
                else:
                    if splits is None:
                        splits = load_dataset(data["dataset"], data["data_dir"])
                    torch.manual_seed(0)
                    metrics = evaluate(model, splits[1], splits[0])
                cache[stamp] = {"epoch": torch.load(path, weights_only=True)["epoch"], "settings": model.quantizer.settings(),
                                **{k: metrics[k] for k in ("psnr", "ssim", "bits", "bpp", "rate_source", "bits_fixed",
                                                           "codebook_usage", "bits_per_image_coded") if k in metrics}}
                save_json(cache_path, cache)
            entry[key] = cache[stamp]
        try:
            rows = read_jsonl(os.path.join(where["outputs"], f"{name}_metrics.jsonl"))
        except ValueError:
            raise DataError(f"{name}_metrics.jsonl in {where['outputs']} is truncated or not JSON lines: delete the "
                            f"run's files to train it again") from None
        entry["seconds"] = sum(r["seconds"] for r in rows)
        found[name] = entry
    return found


def read_json(path, fix):
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        raise DataError(f"{path} is truncated or not JSON: {fix}") from None


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
        entry["bd_vs_fsq"] = bd_per_seed(entry["points"], anchor["points"], seeds)
    return out


def bd_per_seed(points, reference, seeds):
    """{"bd_rate", "bd_psnr"}: each {"mean", "interval", "seeds" (one value per seed), "overlap",
    "verdict"} of one curve's points (comparison.json's "points") against another's, seed by seed;
    a seed with fewer than 2 points on either curve is left out."""
    per_seed = {"bd_rate": [], "bd_psnr": []}
    for seed in seeds:
        a = [(p["bits"]["seeds"][p["seeds"].index(seed)], p["psnr"]["seeds"][p["seeds"].index(seed)])
             for p in points if seed in p["seeds"]]
        b = [(p["bits"]["seeds"][p["seeds"].index(seed)], p["psnr"]["seeds"][p["seeds"].index(seed)])
             for p in reference if seed in p["seeds"]]
        if len(a) < 2 or len(b) < 2:
            continue
        rate, psnr = bd_pair(a, b)
        per_seed["bd_rate"].append(rate)
        per_seed["bd_psnr"].append(psnr)
    out = {}
    for k, values in per_seed.items():
        mean, lo, hi = interval(values)
        overlap = all(v is not None for v in values) and bool(values)
        out[k] = {"mean": mean, "interval": None if lo is None else [lo, hi], "seeds": values, "overlap": overlap,
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
            reading = {**OTHER_WORDS, "level": "level"}.get(verdict_of(bd), verdict_of(bd))
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


def replace_between(text, start, end, body, path):
    if start not in text or end not in text:
        raise ConfigError(f"{path} has no markers {start} ... {end}")
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def write_readme(path, summary):
    """The README's answer and table, between their markers, from summary.json (written atomically)."""
    with open(path) as f:
        text = f.read()
    text = replace_between(text, ANSWER_START, ANSWER_END, answer_text(summary), path)
    text = replace_between(text, TABLE_START, TABLE_END, summary_table(summary, README_PRIORS), path)
    atomic_write(path, lambda f: f.write(text.encode()))


def draw_comparison(path, summary):
    """rate_distortion.png of one set and prior, from its comparison.json's summary."""
    from discrete_ae.plots import plot_comparison

    methods = {m: [(p["bits"]["mean"], p["bits"]["interval"], p["psnr"]["mean"], p["psnr"]["interval"]) for p in e["points"]]
               for m, e in summary["best"].items() if m not in REFERENCES}
    refs = [(f"{m}: {e['points'][0]['psnr']['mean']:.2f} dB ({e['points'][0]['rate_source']}, no code length)",
             e["points"][0]["psnr"]["mean"]) for m, e in summary["best"].items() if m in REFERENCES]
    name = summary.get("set") or os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))
    prior = summary.get("prior", "fitted")
    plot_comparison(path, methods, refs, f"{name}: held-out PSNR at measured bits, {PRIOR_WORDS[prior]},\n"
                                         f"{summary['epochs']} epochs, {len(summary['seeds'])} seeds")


def report(data, where, opts, plan, prior, results):
    """Evaluate one data set's runs under one prior and write RESULTS/{set}/{prior}/."""
    evals = evaluate_all(data, where, opts, plan)
    if not evals:
        print(f"{data['name']} / {prior}: no finished run yet")
        return None
    seeds = [FIRST_SEED + s for s in range(opts["seeds"])]
    total, wall = cpu_minutes(evals, opts["jobs"])
    summary = {"command": command_line(opts, [data], [prior]), "cpu": cpu_name(), "set": data["name"], "data": data["data_dir"],
               "dataset": data["dataset"], "prior": prior, "epochs": opts["epochs"], "early_epoch": opts["early"],
               "seeds": seeds, "runs": len([e for e in evals.values() if "best" in e]),
               "training_cpu_minutes": round(total, 1), "jobs": opts["jobs"], "approx_wall_minutes": round(wall, 1),
               "best": summarise(plan, evals, "best", seeds), "early": summarise(plan, evals, "early", seeds),
               "runs_detail": evals}
    out = os.path.join(results, data["name"], prior)
    os.makedirs(out, exist_ok=True)
    save_json(os.path.join(out, "comparison.json"), summary)
    for method, entry in summary["best"].items():
        save_json(os.path.join(out, f"{method}.json"), compressai_file(method, entry, summary))
    draw_comparison(os.path.join(out, "rate_distortion.png"), summary)
    atomic_write(os.path.join(out, "comparison.md"), lambda f: f.write(details_markdown(summary).encode()))
    print(f"# {data['name']}, {prior} prior\n" + results_table(summary))
    print(f"{summary['runs']} runs, {total:.0f} CPU-minutes of training; wrote {out}/")
    return summary


PRIOR_WORDS = {"fitted": "fitted histogram (FSQ joint over its code, DDCL per channel)",
               "learned": "factorized prior trained in (one per channel or code)",
               "context": "context prior trained in (earlier positions)"}
HEADLINE_ORDER = ("context", "learned", "fitted")  # the strongest family that ran leads
README_PRIORS = ("context",)  # the README's table: the headline family (the others: docs/results/summary.md)


def command_line(opts, sets, priors):
    text = "python scripts/compare.py " + " ".join(f"{d['name']}={d['data_dir']}" for d in sets)
    text += f" --epochs={opts['epochs']} --seeds={opts['seeds']} --priors=\"{list(priors)}\""
    if any(opts["only"]):
        text += f' --only="{[m for m in opts["only"] if m]}"'
    return text


def cross_summary(results):
    """Every RESULTS/{set}/{prior}/comparison.json -> summary.json's dict: per prior and set, each
    bottleneck's BD against FSQ, and per prior what holds on every set."""
    found = {}
    for set_name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        for prior in PRIORS:
            path = os.path.join(results, set_name, prior, "comparison.json")
            if os.path.isfile(path):
                with open(path) as f:
                    found.setdefault(prior, {})[set_name] = json.load(f)
    out = {"priors": {}, "holds": {}}
    for prior, per_set in found.items():
        out["priors"][prior] = {}
        for set_name, comp in per_set.items():
            methods = {}
            for m, e in comp["best"].items():
                methods[m] = {"points": [{"label": p["label"], "settings": p["settings"], "bits": p["bits"]["mean"],
                                          "psnr": p["psnr"]["mean"]} for p in e["points"]],
                              "bd_vs_fsq": e.get("bd_vs_fsq")}
            out["priors"][prior][set_name] = {"epochs": comp["epochs"], "seeds": comp["seeds"], "runs": comp["runs"],
                                              "cpu": comp.get("cpu", "a 2-core CPU (model not recorded)"),
                                              "training_cpu_minutes": comp["training_cpu_minutes"],
                                              "command": comp["command"], "methods": methods}
        verdicts = {}
        for set_name, entry in out["priors"][prior].items():
            for m, e in entry["methods"].items():
                if e["bd_vs_fsq"]:
                    verdicts.setdefault(m, {})[set_name] = verdict_of(e["bd_vs_fsq"])
        out["holds"][prior] = {m: {"sets": v, "on_every_set": next(iter(set(v.values()))) if len(set(v.values())) == 1
                                   else "differs between sets"} for m, v in verdicts.items()}
    out["headline_prior"] = next((p for p in HEADLINE_ORDER if p in out["priors"]), None)
    return out


def verdict_of(bd):
    """better / worse / level against FSQ: by BD-rate where the PSNR ranges overlap, else by BD-PSNR
    where the rates do (a higher PSNR at equal bits is better too); "no overlap" where neither does."""
    for key in ("bd_rate", "bd_psnr"):
        if bd[key]["overlap"]:
            return bd[key]["verdict"]
    return "no overlap"


def _bd_words(bd, digits=1):
    """"-7.3% [-9.0, -5.6]" (BD-rate), else "+0.24 dB [+0.13, +0.35] at equal bits" (BD-PSNR)."""
    for key, unit, d, tail in (("bd_rate", "%", digits, ""), ("bd_psnr", " dB", 2, " at equal bits")):
        stat = bd[key]
        if stat["overlap"]:
            iv = f" [{stat['interval'][0]:+.{d}f}, {stat['interval'][1]:+.{d}f}]" if stat["interval"] else ""
            return f"{stat['mean']:+.{d}f}{unit}{iv}{tail}"
    return "no overlap"


def answer_text(summary):
    """The README's answer: DDCL against FSQ under the headline prior on every set, then the other
    priors, each with its terms (prior, data sets, epochs, seeds)."""
    lines, others_said = [], False
    for prior in [summary["headline_prior"]] + [p for p in HEADLINE_ORDER if p != summary["headline_prior"]]:
        per_set = summary["priors"].get(prior)
        if not per_set:
            continue
        ddcl = {s: e["methods"]["ddcl"]["bd_vs_fsq"] for s, e in per_set.items()
                if e["methods"].get("ddcl", {}).get("bd_vs_fsq")}
        if not ddcl:
            continue
        holds = summary["holds"][prior]["ddcl"]["on_every_set"]
        reading = {"better": "DDCL is ahead of FSQ on every set",  # fewer bits at equal PSNR, or more PSNR at equal bits
                   "worse": "FSQ is ahead of DDCL on every set",
                   "level": "DDCL and FSQ are level on every set"}.get(holds, "the verdict differs between sets")
        terms = ", ".join(f"{s} {_bd_words(bd)}" for s, bd in ddcl.items())  # BD-rate, or BD-PSNR where no equal PSNR
        any_set = next(iter(per_set.values()))
        text = (f"under a {PRIOR_WORDS[prior]}, {len(ddcl)} set{'s' if len(ddcl) > 1 else ''}, {any_set['epochs']} "
                f"epochs, {len(any_set['seeds'])} seeds: **{reading}** (DDCL against FSQ, 95% intervals: {terms})")
        if prior != summary["headline_prior"] and not others_said:
            lines += ["", "The other prior families, the same question:"]
            others_said = True
        lines.append(("**The answer**, " if prior == summary["headline_prior"] else "- ") + text + ".")
        if prior == summary["headline_prior"]:
            lines += others_text(per_set)
    return "\n".join(lines)


OTHER_WORDS = {"better": "ahead of FSQ", "worse": "behind FSQ", "level": "level with FSQ"}


def others_text(per_set):
    """The library's other bottlenecks against FSQ under the headline prior, on the sets they ran on,
    best first (an empty list when none did): a paragraph after the answer."""
    found = []
    for set_name, entry in per_set.items():
        for m, e in entry["methods"].items():
            if m not in (ANCHOR, "ddcl") and m not in REFERENCES and e["bd_vs_fsq"]:
                found.append((m, set_name, e))
    if not found:
        return []
    sets = sorted({s for _, s, _ in found})
    where = (lambda s: f", {s}") if len(sets) > 1 else (lambda s: "")  # noqa: E731

    def words(m, set_name, e):
        bd = e["bd_vs_fsq"]
        if verdict_of(bd) in OTHER_WORDS:
            return f"{m} {OTHER_WORDS[verdict_of(bd)]} ({_bd_words(bd)}{where(set_name)})"
        bits, psnr = [p["bits"] for p in e["points"]], [p["psnr"] for p in e["points"]]
        return (f"{m} outside FSQ's range ({min(bits):.0f}-{max(bits):.0f} bits at {min(psnr):.1f}-{max(psnr):.1f} dB"
                f"{where(set_name)})")

    def order(item):  # BD-rate where there is one, then BD-PSNR (higher is better), then no overlap
        bd = item[2]["bd_vs_fsq"]
        for rank, (key, sign) in enumerate((("bd_rate", 1), ("bd_psnr", -1))):
            if bd[key]["overlap"]:
                return rank, sign * bd[key]["mean"]
        return 2, 0.0

    parts = [words(*item) for item in sorted(found, key=order)]
    terms = sorted({(per_set[s]["epochs"], len(per_set[s]["seeds"])) for s in sets})
    runs = " or ".join(f"{e} epochs, {n} seeds" for e, n in terms)
    return ["", f"The library's other bottlenecks under the same prior ({' and '.join(sets)} only, {runs}; each curve "
                f"against FSQ's): {'; '.join(parts)}."]


def summary_table(summary, priors=HEADLINE_ORDER):
    """Every bottleneck against FSQ, per prior (of `priors`) and data set, with its points' settings."""
    lines = ["| prior | data set | bottleneck | operating points (settings) | bits per image | PSNR (dB) | "
             "BD-rate vs FSQ [95%] | BD-PSNR vs FSQ |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    shown = [p for p in priors if p in summary["priors"]]
    for prior in shown:
        for set_name, entry in summary["priors"].get(prior, {}).items():
            order = sorted(entry["methods"], key=lambda m: (m in REFERENCES, m != ANCHOR, m))
            for m in order:
                e = entry["methods"][m]
                labels = " / ".join(p["label"] for p in e["points"])
                bits = " / ".join(f"{p['bits']:.0f}" for p in e["points"])
                psnr = " / ".join(f"{p['psnr']:.2f}" for p in e["points"])
                bd = e["bd_vs_fsq"]
                if m == ANCHOR:
                    rate, dpsnr = "the reference", ""
                elif bd is None:
                    rate, dpsnr = "-", "-"
                else:
                    rate = fmt_interval(bd["bd_rate"], "%", 1) if bd["bd_rate"]["overlap"] else "no overlap (PSNR)"
                    dpsnr = fmt_interval(bd["bd_psnr"], " dB", 2) if bd["bd_psnr"]["overlap"] else "no overlap (bits)"
                lines.append(f"| {prior} | {set_name} | {m} | {labels} | {bits} | {psnr} | {rate} | {dpsnr} |")
    runs = sum(e["runs"] for p in shown for e in summary["priors"][p].values())
    minutes = sum(e["training_cpu_minutes"] for p in shown for e in summary["priors"][p].values())
    left_out = [p for p in summary["priors"] if p not in shown]
    tables = "priors' tables" if len(left_out) > 1 else "prior's table"
    lines += ["", f"{runs} runs, {minutes:.0f} CPU-minutes of training (the CPU and command of each set"
                  + (f", and the {' and '.join(left_out)} {tables}" if left_out else "")
                  + ": docs/results/summary.md). Bits are range-coded bits per image on held-out crops; intervals "
                  "are 95% over the seeds."]
    return "\n".join(lines)


def summary_markdown(summary):
    out = ["# Every bottleneck against FSQ, per prior family and data set (generated by scripts/compare.py)", "",
           summary_table(summary), "", "## What holds on every set", "",
           "| prior | bottleneck | verdict per set | on every set |", "| --- | --- | --- | --- |"]
    for prior, holds in summary["holds"].items():
        for m, h in holds.items():
            out.append(f"| {prior} | {m} | {', '.join(f'{s}: {v}' for s, v in h['sets'].items())} | {h['on_every_set']} |")
    out += ["", "## Commands", ""]
    for prior, per_set in summary["priors"].items():
        for set_name, entry in per_set.items():
            out.append(f"- {prior}, {set_name}: `{entry['command']}` ({entry['runs']} runs, "
                       f"{entry['training_cpu_minutes']:.0f} CPU-minutes on {entry['cpu']})")
    return "\n".join(out) + "\n"


USAGE = ("usage: python scripts/compare.py NAME=DIR [NAME=DIR ...] [--priors=\"['fitted', 'learned', 'context']\"] "
         "[--epochs=10] [--seeds=3] [--jobs=2] (see --help)")


def main(argv):
    paths, opts = parse_paths_and_options(argv, DEFAULTS, USAGE)
    if opts["seeds"] < 1 or opts["jobs"] < 1 or not 0 < opts["early"] <= opts["epochs"]:
        raise ConfigError("--seeds and --jobs must be >= 1, and 0 < --early <= --epochs")
    if opts["executor"] not in EXECUTORS:
        raise ConfigError(f"--executor={opts['executor']!r}; choose one of {', '.join(EXECUTORS)}")
    priors = [p for p in opts["priors"] if p] or ["fitted"]
    unknown = sorted(set(priors) - set(PRIORS))
    if unknown:
        raise ConfigError(f"--priors names unknown prior families {unknown}; choose from {list(PRIORS)}")
    sets = [parse_set(p) for p in paths]
    if len({d["name"] for d in sets}) != len(sets):
        raise ConfigError("two data sets have the same name: write NAME=DIR with different names")
    results = opts["results"] or os.path.join(opts["out"], "results")
    if opts["readme"] and not os.path.isfile(opts["readme"]):
        raise ConfigError(f"--readme={opts['readme']!r} is not a file; run from the repo root or give its path")
    plans = [(d, prior, folders(opts, d, prior), runs(opts, prior)) for d in sets for prior in priors]
    if opts["dry_run"]:
        for data, _, where, plan in plans:
            for _, _, _, name, args in plan:
                print(shlex.join(["python", *train_command(data, where, opts, name, args)[1:]]))
        return
    t0 = time.time()
    os.makedirs(opts["out"], exist_ok=True)
    with RunLock(os.path.join(opts["out"], ".compare.lock"), f"compare.py's runs in {opts['out']!r}"):  # one at a time
        if not opts["report_only"]:
            train_all([(data, where, run) for data, _, where, plan in plans for run in plan], opts)
        for data, prior, where, plan in plans:
            report(data, where, opts, plan, prior, results)
    summary = cross_summary(results)
    save_json(os.path.join(results, "summary.json"), summary)
    atomic_write(os.path.join(results, "summary.md"), lambda f: f.write(summary_markdown(summary).encode()))
    if opts["readme"] and summary["headline_prior"]:
        write_readme(opts["readme"], summary)
        print(f"updated {opts['readme']}")
    print(f"wrote {results}/summary.json and summary.md ({(time.time() - t0) / 60:.1f} minutes)")


if __name__ == "__main__":
    cli(main, __doc__)
