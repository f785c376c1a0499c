"""Files written whole or not at all (atomic replace), and one-line errors when they cannot be."""
import errno
import io
import json
import os
import stat
import tempfile
from pathlib import Path

import torch

from discrete_ae.errors import UserError


def ensure_writable_dir(path, key):
    """Create `path` and prove a file can be written there, or stop with one line naming `key`."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise UserError(f"{key}={str(path)!r} is not a writable folder ({err.strerror}); choose another with --{key}=PATH") from None


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_failure(path, err):
    hints = {errno.ENOSPC: "the disk is full; free space", errno.EFBIG: "the file is over the size limit (ulimit -f)",
             errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}
    return UserError(f"could not write {path}: {hints.get(err.errno, err.strerror or str(err))}; "
                     "the previous file, if any, is intact")


def writable_target(path):
    """(the regular file to replace, its mode or None) for `path`: a symbolic link is written through
    to its target; anything but a regular file (a device, a FIFO, a folder) is refused with one line,
    never replaced."""
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path, None
    except OSError as err:
        raise _write_failure(path, err) from None
    if not stat.S_ISREG(st.st_mode):
        kind = {stat.S_ISDIR: "a folder", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
                stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket"}
        what = next((v for test, v in kind.items() if test(st.st_mode)), "not a regular file")
        raise UserError(f"{path} is {what}, not a file: write to a file path instead (it was left as it is)")
    return path, stat.S_IMODE(st.st_mode)


def check_distinct(target, *inputs):
    """Refuse an output that is one of the inputs (it would be lost before it is read)."""
    if os.path.exists(target):
        for source in inputs:
            if os.path.exists(source) and os.path.samefile(target, source):
                raise UserError(f"the output {target} is the input {source}: writing it would destroy the input; "
                                "choose another output path")


def atomic_write(path, write):
    """Write through `write(fileobj)` into a temporary file beside `path`, fsync, then os.replace.

    A crash or kill at any moment leaves either the old file or the new one, never a mix; the
    temporary file is named `.{name}.{random}.tmp` (discrete_ae/runs.py removes those a kill left behind).
    Only regular files are replaced (writable_target); an existing file keeps its mode. Any
    OSError, creating the temporary file included, is one UserError line."""
    path, mode = writable_target(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, mode if mode is not None else 0o666 & ~_umask())  # mkstemp makes 0600 files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _write_failure(path, err) from None
        raise


def save_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_jsonl(path, rows):
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_tensors(path, obj):
    """torch.save `obj` atomically. Serialised in memory first, so a full disk is an OSError of the
    write (one line), never an error from inside torch's zip writer."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
