"""Process helpers for train.py: torchrun/DDP, signals, and the lock that keeps two runs apart."""
import fcntl
import os
import signal

import torch
import torch.distributed as dist

from errors import UserError
from utils import pick_device


# ----------------------------------------------------------------------------- distributed

def setup_distributed(device_name):
    """(rank, world_size, device). DDP is on when torchrun sets RANK (as in nanoGPT)."""
    if int(os.environ.get("RANK", -1)) < 0:
        return 0, 1, pick_device(device_name)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
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


# ----------------------------------------------------------------------------- one run per name

class RunLock:
    """An exclusive lock on `path` for as long as the run lives.

    flock is released by the kernel when the process ends, however it ends (SIGKILL, a crash, a
    lost machine), so a dead run never leaves the lock stuck; the file stays and is reused."""

    def __init__(self, path, what):
        self.path, self.what, self.file = path, what, None

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise UserError(f"{self.what} is already being trained by {holder} (lock {self.path}); "
                            "wait for it to finish, or choose another --run_name or --checkpoint_dir") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
