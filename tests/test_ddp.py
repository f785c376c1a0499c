"""torchrun with 2 CPU processes (gloo): one checkpoint, loadable in a plain process, equal weights;
a bad config is one line, said once."""
import os
import subprocess
import sys

import torch

from conftest import REPO, same_state, tiny_args
from utils import load_checkpoint

RANK_SCRIPT = """
import os, sys, torch
import train
from config import resolve_config
model, metrics = train.train(*resolve_config(sys.argv[1:], train.DEFAULT_CONFIG))
torch.save(model.state_dict(), os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
"""


def tensors(state):
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def torchrun(script, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=150)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_torchrun_two_cpu_processes_and_resume(tmp_path, image_folder):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT.format(out=str(tmp_path)))
    args = tiny_args(tmp_path, image_folder, quantizer="ddcl", epochs=1, batch_size=8, device="cpu")
    torchrun(script, *args)
    ck = tmp_path / "checkpoints"
    assert sorted(os.listdir(ck)) == ["ddcl_vae_best.pt", "ddcl_vae_last.pt"]
    model, config = load_checkpoint(str(ck / "ddcl_vae_last.pt"))  # a plain, non-distributed process
    state = torch.load(ck / "ddcl_vae_last.pt", weights_only=True)
    assert len(state["rng"]) == 2  # one RNG state per rank, for an exact resume under torchrun
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert same_state(tensors(r0), tensors(r1))  # the same weights; only rank 0 evaluates and fits a rate prior
    assert same_state(r0, model.state_dict())
    rows = open(tmp_path / "outputs" / "ddcl_metrics.jsonl").read().splitlines()
    assert len(rows) == 1  # only rank 0 writes

    torchrun(script, *args, f"--resume={ck / 'ddcl_vae_last.pt'}", "--epochs=2")
    assert torch.load(ck / "ddcl_vae_last.pt", weights_only=True)["epoch"] == 2
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert same_state(tensors(r0), tensors(r1))


def test_a_bad_config_under_torchrun_is_one_line_said_once(tmp_path):
    result = torchrun("train.py", "--epochs=-1", "--device=cpu", check=False)
    line = "error: epochs=-1 must be >= 0"
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert lines.count(line) == 1  # said by rank 0 alone, once
    assert f"traceback : {line}" in result.stderr.split("Root Cause")[1]  # and named in torchrun's summary
    ours = result.stderr.split("Traceback (most recent call last)")[0]  # before torchrun's own launcher traceback
    assert line in ours
