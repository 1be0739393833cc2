"""Command-line helpers: one-line errors instead of tracebacks; negative-number lists as values."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def friendly(prog: str = "error") -> Iterator[None]:
    """Turn expected failures (bad files, bad config, bad input) into `error: ...` and exit 2."""
    try:
        yield
    except (ValueError, FileNotFoundError, KeyError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"{prog}: {msg}", file=sys.stderr)
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
