"""The project's error types, and command-line helpers: one-line errors for those only; negative-number lists.

A one-line error is a promise that the input, not the program, is at fault. So `friendly()` turns only the
project's own error types into `prog: message` (and OS errors on a named file: missing, unreadable, disk full);
anything else is a programming error and keeps its traceback. `BONSAI_DEBUG=1` prints the traceback always.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator


class BonsaiError(Exception):
    """Base of the errors that describe bad input (files, flags, data); shown as one line by CLIs."""


class UserError(BonsaiError, ValueError):
    """Bad input in general (a flag, a file's content, a request). A ValueError too, for older callers."""


class InputNotFound(BonsaiError, FileNotFoundError):
    """A file or directory the user named does not exist."""


class OutputExists(BonsaiError, FileExistsError):
    """An output path that is there already and must not be overwritten."""


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, BonsaiError):  # ConfigError, ImageError, CheckpointError, BadSample, UserError, ...
        return True
    return isinstance(e, OSError) and e.filename is not None  # the environment: a named file missing/unreadable


def message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None and not isinstance(e, BonsaiError) and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


@contextlib.contextmanager
def friendly(prog: str = "error") -> Iterator[None]:
    """Turn bad-input errors into `prog: ...` on one line and exit 2; everything else propagates."""
    try:
        yield
    except Exception as e:
        if not is_user_error(e):
            raise
        if os.environ.get("BONSAI_DEBUG"):
            traceback.print_exc()
        print(f"{prog}: {message(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def glue_negative_lists(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """Let `--layers -1,16` through argparse, which would read "-1,16" as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags and i + 1 < len(argv):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out
