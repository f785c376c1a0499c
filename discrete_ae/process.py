"""Process helpers for train.py: torchrun/DDP (as in nanoGPT: on when torchrun sets RANK) and signals."""
import os
import signal

import torch
import torch.distributed as dist

from discrete_ae.device import pick_device
from discrete_ae.errors import ConfigError, Stop

# ----------------------------------------------------------------------------- distributed

def setup_distributed(device_name):
    """(rank, world_size, device). DDP is on when torchrun sets RANK (as in nanoGPT)."""
    try:
        rank = int(os.environ.get("RANK", -1))
        if rank < 0:
            return 0, 1, pick_device(device_name)
        world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ConfigError("RANK is set but WORLD_SIZE is missing or not a number: start several processes with "
                          "torchrun --standalone --nproc_per_node=N train.py, or unset RANK for one process") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} with WORLD_SIZE={world}: start the processes with torchrun, or unset RANK")
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def teardown_distributed(world):
    if world > 1:
        dist.destroy_process_group()


def all_reduce_mean(value, world):
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value


def gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier(world):
    if world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- signals

def stop_on_sigterm():
    """Before the training loop takes over: SIGTERM stops with one line, as Ctrl-C does."""
    def handler(signum, frame):
        raise Stop("SIGTERM: stopped before training started; nothing was saved", code=128 + signum)

    signal.signal(signal.SIGTERM, handler)


class SignalFlag:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second one
    falls back to the default behaviour (stop at once)."""

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        self.signum = signum
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def run_logged(command, cwd, env, log):
    """Run `command` in `cwd` with its output appended to the file `log` -> its exit code. A plain
    function of plain arguments, importable anywhere: what compare.py hands a scheduler (submitit)."""
    import subprocess

    with open(log, "a") as f:
        return subprocess.run(command, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env,
                              preexec_fn=die_with_parent).returncode


def die_with_parent():
    """In a child process: end (SIGTERM, which train.py turns into a clean stop) when the process
    that started it dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
