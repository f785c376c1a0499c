"""A run's files belong to that run: every path it writes is decided here, from the folders and
the run name the user chose, and one run at a time owns them.

    outputs/{run}_epoch_{n:03d}.png  {run}_metrics.jsonl  {run}_curves.png  {run}_config.json  {run}_final.json
    checkpoints/{run}_vae_best.pt  {run}_vae_last.pt  {run}_vae_epoch_{n}.pt

- A run name is a plain file name (letters, digits, '.', '_', '-'), wherever it comes from, so no
  path leaves the two folders; a checkpoint never chooses the folders.
- While a run lives it holds an exclusive lock (`flock`) on `.{run}.lock` in both folders: a
  second process of that name, in either folder, is refused before it writes. The kernel drops
  the lock when the process ends however it ends; a finished run removes its lock files.
- Every checkpoint carries its run's `run_id`. A fresh run refuses a name whose folders already
  hold a trained epoch; a resume refuses to write over the files of another run, or over newer
  epochs of its own.
- Temporary files a kill left behind (`.{file}.*.tmp`, utils.atomic_write) are removed at start.
"""
import fcntl
import os
import re
import uuid

import torch

from discrete_ae.errors import CheckpointError, ConfigError, UserError
from discrete_ae.files import ensure_writable_dir, read_jsonl

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
CHECKPOINT_TAGS = r"(best|last|epoch_\d+)"


def check_run_name(name, source="run_name"):
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name):
        raise ConfigError(f"{source}={name!r} is not a plain name: use letters, digits, '.', '_' and '-' (no '/'), "
                          "starting with a letter or digit, e.g. --run_name=fsq_8-5-5-5")
    return name


def new_run_id():
    return uuid.uuid4().hex


class RunLock:
    """An exclusive, non-blocking flock on `path` for as long as the holder lives.

    After locking, the path is checked to still name the locked file: a holder that finished
    removed it, and a lock on an unlinked file protects nothing, so the lock is taken again."""

    def __init__(self, path, what):
        self.path, self.what, self.file = path, what, None

    def __enter__(self):
        while True:
            f = open(self.path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise UserError(f"{self.what} is in use by {holder} (lock {self.path}); wait for it to finish, "
                                "or choose another --run_name") from None
            try:
                same = os.path.samestat(os.fstat(f.fileno()), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()
        f.truncate(0)
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)  # still locked: nobody can take it between the unlink and the unlock
        except OSError:
            pass
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


class RunFiles:
    """The paths of run `name` in `output_dir` and `checkpoint_dir`, and (as a context manager)
    the run's ownership of them: folders created, locks held, stale temporaries removed; on exit
    the locks are released and folders it created are removed again if nothing was written."""

    def __init__(self, output_dir, checkpoint_dir, name):
        self.output_dir, self.checkpoint_dir, self.name = output_dir, checkpoint_dir, check_run_name(name)
        self.locks, self.created = [], []

    # paths ---------------------------------------------------------------------------------
    def checkpoint(self, tag):
        return os.path.join(self.checkpoint_dir, f"{self.name}_vae_{tag}.pt")

    def output(self, suffix):
        return os.path.join(self.output_dir, f"{self.name}_{suffix}")

    def grid(self, epoch):
        return self.output(f"epoch_{epoch:03d}.png")

    @property
    def metrics(self):
        return self.output("metrics.jsonl")

    def _patterns(self):
        name = re.escape(self.name)
        return {self.checkpoint_dir: rf"{name}_vae_{CHECKPOINT_TAGS}\.pt",
                self.output_dir: rf"{name}_(epoch_\d{{3}}\.png|metrics\.jsonl|curves\.png|config\.json|final\.json)"}

    def existing(self):
        """This run's files that exist now, folder by folder."""
        found = []
        for folder, pattern in self._patterns().items():
            if os.path.isdir(folder):
                found += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if re.fullmatch(pattern, f)]
        return found

    # ownership -----------------------------------------------------------------------------
    def __enter__(self):
        try:
            locked = set()
            for key, folder in (("checkpoint_dir", self.checkpoint_dir), ("output_dir", self.output_dir)):
                if not os.path.isdir(folder):
                    self.created.append(folder)
                ensure_writable_dir(folder, key)
                if os.path.realpath(folder) in locked:  # both folders are one: one lock
                    continue
                locked.add(os.path.realpath(folder))
                lock = RunLock(os.path.join(folder, f".{self.name}.lock"), f"run {self.name!r} in {folder!r}")
                self.locks.append(lock.__enter__())
            self._remove_temporaries()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for lock in reversed(self.locks):
            lock.__exit__()
        self.locks = []
        for folder in reversed(self.created):
            try:
                os.rmdir(folder)  # only if empty: nothing of any run was written there
            except OSError:
                pass

    def _remove_temporaries(self):
        for folder, pattern in self._patterns().items():
            for f in os.listdir(folder):
                if re.fullmatch(rf"\.{pattern}\.[^.]+\.tmp", f):
                    os.unlink(os.path.join(folder, f))

    def trained(self):
        """(run_id, epoch, path) of the newest trained state here, or None: the last checkpoint, else
        any checkpoint, else a metrics file (its run_id from the config file beside it)."""
        checkpoints = sorted((p for p in self.existing() if p.endswith(".pt")), key=lambda p: (not p.endswith("_last.pt"), p))
        if checkpoints:
            try:
                state = torch.load(checkpoints[0], map_location="cpu", weights_only=True)
                return state.get("run_id"), int(state.get("epoch", 0)), checkpoints[0]
            except Exception:  # an unreadable file still marks the name as taken
                return None, None, checkpoints[0]
        rows = read_jsonl(self.metrics) if os.path.isfile(self.metrics) else []
        if rows:
            return None, rows[-1].get("epoch"), self.metrics
        return None

    def claim_fresh(self):
        """A fresh run may take this name only where no epoch of any run was written."""
        found = self.trained()
        if found:
            _, epoch, path = found
            at = f" (epoch {epoch})" if epoch is not None else ""
            raise UserError(f"run {self.name!r} already has trained files: {path}{at}; continue it with "
                            f"--resume={self.checkpoint('last')}, choose another --run_name, or delete its files")

    def claim_resume(self, run_id, epoch, source):
        """Resuming `source` (of run `run_id`, at `epoch`) may write here only over its own run's
        files, and only where they are not newer than it."""
        found = self.trained()
        if not found:
            return
        their_id, their_epoch, path = found
        if their_id != run_id:
            raise CheckpointError(f"{path} belongs to another run than {source}; resuming would overwrite it: "
                                  "choose another --run_name or --checkpoint_dir and --output_dir")
        if their_epoch is not None and their_epoch > epoch:
            raise CheckpointError(f"{path} is at epoch {their_epoch}, newer than {source} (epoch {epoch}); resuming would "
                                  f"overwrite epochs {epoch + 1}-{their_epoch}: resume {path}, or choose another --run_name")


def run_label(config):
    """The name of a run's files: run_name, or the quantizer's name when that is empty."""
    return config.get("run_name") or config["quantizer"]


def curve_name(config, q):
    """The curve a checkpoint belongs to: the bottleneck, then its prior unless fitted ("ddcl_context"),
    then "_posthoc" for a context prior fitted after training (scripts/fit_context_prior.py)."""
    entropy_model = q.entropy_model if q.has_indices else "fitted"
    return (config["quantizer"] + ("" if entropy_model == "fitted" else "_" + entropy_model)
            + ("_posthoc" if config.get("context_prior_fitted_to") else ""))


def cpu_name():
    """This machine's CPU, as /proc/cpuinfo names it: every time this repo quotes names its machine."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{os.cpu_count()}-core {model or 'unknown CPU'}"
