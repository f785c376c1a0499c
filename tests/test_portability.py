"""The same file on every CPU this machine can pretend to be: a photo encoded under each of
ATEN_CPU_CAPABILITY default, avx2 and avx512 (those this CPU has) is the same bytes, and decodes to
the same pixels under each of them and with 1 or 2 threads, for a fitted and a context prior. The
context coder's numba kernels run compiled for a generic x86-64 on one thread in the first of these
processes (NUMBA_CPU_NAME=generic: no vector unit beyond SSE2; NUMBA_NUM_THREADS=1, where the test's
own process splits their rows among all cores) and by the Python interpreter in the last
(NUMBA_DISABLE_JIT=1: each operation rounded as IEEE 754 says, no fused multiply-add). (Files
moving between a CPU and CUDA are not tested here: no GPU; docs/codec.md.)"""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import codec
from conftest import REPO

WORKER = """
import json, sys, torch
from discrete_ae.codec_file import decode_photo, encode_photo, read_photo
from utils import load_checkpoint
jobs = json.loads(sys.argv[1])
out = {"capability": torch.backends.cpu.get_cpu_capability(), "files": {}, "pixels": {}, "threads": []}
for ck, photo in jobs:
    model, _ = load_checkpoint(ck)
    torch.set_num_threads(1)
    blob = encode_photo(model, read_photo(photo))
    out["threads"].append(torch.get_num_threads())  # coding (numba's first threads) left the count as it was
    out["files"][ck] = blob.hex()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out["pixels"][f"{ck} {threads}"] = decode_photo(model, open(ck + ".bin", "rb").read()).tobytes().hex()
print(json.dumps(out))
"""


def capabilities():
    best = torch.backends.cpu.get_cpu_capability()
    return ["default"] + (["avx2"] if best in ("AVX2", "AVX512") else []) + (["avx512"] if best == "AVX512" else [])


def test_files_and_pixels_are_the_same_under_every_cpu_capability_and_thread_count(run_train, tmp_path):
    rng = np.random.default_rng(0)
    photo = tmp_path / "p.png"
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(photo)
    jobs = []
    for knobs in (dict(quantizer="fsq", run_name="fitted"), dict(quantizer="ddcl", entropy_model="context", run_name="ctx")):
        run_train(**knobs)
        ck = str(tmp_path / "checkpoints" / f"{knobs['run_name']}_vae_best.pt")
        codec.compress_file(ck, photo, ck + ".bin")  # encoded here, in the test's own process
        jobs.append((ck, str(photo)))
    here = {ck: codec.decode_photo(codec.load_checkpoint(ck)[0], open(ck + ".bin", "rb").read()).tobytes().hex()
            for ck, _ in jobs}
    settings = [{"ATEN_CPU_CAPABILITY": cap} for cap in capabilities()]
    settings[0].update(NUMBA_CPU_NAME="generic", NUMBA_NUM_THREADS="1")  # the most portable of both in one process
    if len(settings) > 1:
        settings[-1]["NUMBA_DISABLE_JIT"] = "1"
    else:
        settings.append({"NUMBA_DISABLE_JIT": "1"})
    seen = []
    for setting in settings:
        done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(jobs)], capture_output=True, text=True,
                              cwd=REPO, timeout=300, env={**os.environ, **setting})
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        seen.append(out["capability"])
        assert out["threads"] == [1] * len(jobs), setting
        for ck, _ in jobs:
            assert out["files"][ck] == open(ck + ".bin", "rb").read().hex(), (setting, ck)  # the same bytes encoded
            assert out["pixels"][f"{ck} 1"] == out["pixels"][f"{ck} 2"] == here[ck], (setting, ck)  # the same pixels
    assert seen[:len(capabilities())] == [c.upper() for c in capabilities()]  # each capability was really in force
