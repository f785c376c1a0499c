"""The errors a user can cause, and the one wrapper every entry script exits through.

Every script runs `main` under `cli(main, __doc__)`: `--help` prints the script's docstring and
exits 0; a `UserError` prints its message (one line that says what was wrong and how to fix it)
and exits with its `code` instead of showing a traceback. This module imports only the standard
library, so it sits at the bottom of the import graph.
"""
import json
import os
import sys
import time


class UserError(Exception):
    """Bad input from the user: a setting, data, a checkpoint or a path. Exit code 2."""

    code = 2
    prefix = "error: "


class ConfigError(UserError, ValueError):
    """A bad config value."""


class DataError(UserError):
    """A dataset that is missing or cannot be read."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, foreign or refused."""


class BitstreamError(UserError, ValueError):
    """A byte string that is not what model.compress wrote (truncated, corrupted or foreign)."""


class Stop(UserError):
    """A run that stopped on purpose (a signal: 128 + its number) or could not go on (3)."""

    prefix = ""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def _is_quiet_rank():
    """Under torchrun only rank 0 speaks, so one error is printed once, not once per process. Only
    under torchrun (it sets TORCHELASTIC_RUN_ID): a RANK left in a shell's environment silences nothing."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    try:
        return int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def _report_to_torchrun(message):
    """torchrun prints each failed process's error file in its summary; without one it says
    "<N/A>" beside a link. Writing the one line there puts it in the summary too."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": {"message": message, "extraInfo": {"py_callstack": message,
                                                                         "timestamp": str(int(time.time()))}}}, f)
        except OSError:
            pass


def cli(main, doc, argv=None):
    """Run main(argv) as an entry script: --help/-h prints `doc` and exits 0; a UserError prints
    one line to stderr and exits with its code; Ctrl-C before main handles it exits 130; a closed
    pipe on stdout exits 141 without a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if any(a in ("-h", "--help") for a in argv):
            print(doc.strip())
            return
        main(argv)
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        sys.exit(141)
    except UserError as err:
        line = f"{err.prefix}{err}"
        if not _is_quiet_rank():
            print(("\n" if isinstance(err, Stop) else "") + line, file=sys.stderr)
        _report_to_torchrun(line)
        sys.exit(err.code)
    except KeyboardInterrupt:
        if not _is_quiet_rank():
            print("\ninterrupted; nothing was written by this step", file=sys.stderr)
        sys.exit(130)
