"""python -m experiments.worker: run `python -m MODULE ARGS...` commands one after another in this one process,
each with its output appended to its own log file (the step runner's `worker=True`, experiments/steps.py).

Why: a project CLI spends ~5 CPU seconds importing mlx-lm, transformers and torch before it does anything, and a
smoke-sized recipe runs 15 of them (~75 of its ~95 CPU seconds). The recipe keeps every MLX step out of its own
(PyTorch) process and hands them here instead, so the imports are paid once. Each command runs as `python -m`
would run it (`runpy`, `__name__ == "__main__"`, `sys.argv`), and the CLIs seed their own randomness.

Protocol: one JSON object per line on stdin, {"module": str, "args": [str], "log": path}; for each, one line
`cli-worker-exit {"code": N, "cpu": S, "last": LINE}` on stdout (N: the command's exit status, 1 for an uncaught
exception, whose traceback goes to the log; S: the CPU seconds it took; LINE: the last non-empty line it printed
on stdout, its result when that is JSON). Anything else on stdout is not a reply.
"""

from __future__ import annotations

import gc
import io
import json
import os
import runpy
import sys
import traceback
import warnings

REPLY = "cli-worker-exit"


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class _LastLine(io.TextIOWrapper):
    """A command's sys.stdout: writes go to the log, and the last non-empty line is kept (the step's result)."""

    def __init__(self, fd: int):
        super().__init__(io.BufferedWriter(io.FileIO(fd, "w")), encoding="utf-8", line_buffering=True)
        self._last, self._partial = "", ""

    def write(self, s: str) -> int:
        *lines, self._partial = (self._partial + s).split("\n")
        for ln in lines:
            self._last = ln.strip() or self._last
        return super().write(s)

    @property
    def last_line(self) -> str:
        """The last non-empty line written, counting one that no newline ended."""
        return self._partial.strip() or self._last


def run_one(module: str, args: list[str], log: str, last: list[str] | None = None) -> int:
    """Run one command with fds 1 and 2 appended to `log` (so C-level output lands there too); its exit status.
    `last`, when given, receives the last non-empty line the command printed through sys.stdout."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    argv, streams = sys.argv, (sys.stdout, sys.stderr)
    sys.argv = [module, *args]
    # fresh Python streams on the log: a command may close its sys.stdout (json.tool does), not the worker's
    sys.stdout = out = _LastLine(os.dup(fd))
    sys.stderr = open(os.dup(fd), "w", buffering=1)  # noqa: SIM115
    try:
        with warnings.catch_warnings():  # a CLI module already imported by another one: runpy says so, harmlessly
            warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:  # sys.exit("message"), as the interpreter does it
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.argv = argv
        if last is not None:
            last.append(out.last_line)
        for f in (sys.stdout, sys.stderr):
            if not f.closed:
                f.close()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
        gc.collect()
    return code


def main() -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        t0, last = _cpu(), []
        code = run_one(req["module"], list(req["args"]), req["log"], last)
        print(f"{REPLY} " + json.dumps({"code": code, "cpu": round(_cpu() - t0, 3), "last": last[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
