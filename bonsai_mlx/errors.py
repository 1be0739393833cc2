"""One-line errors for command-line users instead of tracebacks."""

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
