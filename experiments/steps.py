"""The one step runner of the experiments: each step logs to its own file, runs once, and fails naming itself.

An experiment is a list of steps (draw data, train a teacher, `python -m bonsai_mlx.train ...`, score). Steps
hold one folder: `ROOT/logs/NAME.log` per step, and ROOT/steps.json (or the file the driver names) recording each
finished step with its wall and CPU seconds and its result. A rerun skips the recorded steps, and a step whose
`done` file exists (made by an earlier version of the driver, or by hand), so a driver cut short resumes
where it stopped. A command step runs `python -m MODULE ARGS` in another process (the MLX side and the PyTorch side
never share one), its stdout and stderr appended to the step's log; the JSON object on the last line of its stdout
is its result. With `worker=True` the commands run one after another in one worker process
(`experiments.worker`): their ~5 s of imports each are paid once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from bonsai_mlx.core.errors import BonsaiError
from bonsai_mlx.core.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]  # the checkout: `experiments` is importable from here, not installed


class StepFailed(BonsaiError):
    """A step or command failed: `detail` says how, `log` is where its output went."""

    def __init__(self, detail: str, log: Path, code: int | None = None):
        super().__init__(f"{detail} (log: {log})")
        self.detail, self.log, self.code = detail, log, code


def _cpu() -> float:
    """CPU seconds of this process and its finished children: the work done, whatever else shares the cores."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _json_object(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def say(tag: str, msg: str, log: Path | None = None) -> None:
    """A progress line `[tag HH:MM:SS] msg` on stdout, and in `log` when given."""
    line = f"[{tag} {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(line + "\n")


def child_env() -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH, so a child finds `experiments` and this
    tree's packages whatever its working directory."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


class Steps:
    """An experiment's steps under `root`; `tag` prefixes its progress lines, `noun` names a step in errors."""

    def __init__(
        self, root: str | Path, tag: str, *, state: str = "steps.json", noun: str = "step", worker: bool = False
    ) -> None:
        self.root = Path(root)
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tag, self.noun, self.use_worker = tag, noun, worker
        self.state_path = self.root / state
        self.state: dict[str, dict] = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.ran: list[str] = []  # steps run (not skipped) by this object
        self.worker_cpu = 0.0  # CPU seconds of the worker's commands (os.times() counts no child still running)
        self._worker: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def say(self, msg: str, log: Path | None = None) -> None:
        say(self.tag, msg, log)

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def step(
        self,
        name: str,
        fn: Callable[[Path], dict | None],
        *,
        done: Path | None = None,
        clear: Sequence[Path] = (),
    ) -> dict:
        """Run `fn(log)` once: skipped when recorded or when `done` exists. `clear`: what an interrupted try of it
        left, removed first. Returns its result (what fn returned, as recorded)."""
        if name in self.state:
            self.say(f"{name}: done already ({self.state[name]['seconds']:.0f} s), skipped")
            return self.state[name]
        if done is not None and done.exists():
            self.say(f"{name}: done already ({done}), skipped")
            return {}
        log = self.log_path(name)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        for p in clear:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self.say(f"{name}: running (log {log})")
        t, c = time.perf_counter(), _cpu() + self.worker_cpu
        try:
            info = fn(log) or {}
        except StepFailed as e:
            raise StepFailed(f"{self.noun} {name} failed: {e.detail}", e.log, e.code) from None
        except Exception as e:
            with open(log, "a") as f:
                traceback.print_exc(file=f)
            raise StepFailed(f"{self.noun} {name} failed: {type(e).__name__}: {e}", log) from None
        record = {"seconds": round(time.perf_counter() - t, 1), "cpu_seconds": round(_cpu() + self.worker_cpu - c, 1)}
        record.update(info)
        with self._lock:
            self.state[name] = record
            self.ran.append(name)
            atomic_write_text(self.state_path, json.dumps(self.state, indent=2))
        self.say(f"{name}: done in {record['seconds']:.0f} s")
        return record

    def run(self, name: str, module: str, *args: str, done: Path | None = None, clear: Sequence[Path] = ()) -> dict:
        """A step that is one command, `python -m module args`; its result is the JSON its stdout ends with."""
        return self.step(name, lambda log: self.command(log, module, *args), done=done, clear=clear)

    def command(self, log: Path, module: str, *args: str) -> dict | None:
        """`python -m module args` in another process, its output appended to `log`; the JSON object on the last
        line of its stdout, or None. A non-zero exit raises StepFailed with the log's last line."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ python -m {module} {' '.join(args)}\n")
        code, last = self._in_worker(module, list(args), log) if self.use_worker else self._spawn(module, args, log)
        if code != 0:
            lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
            detail = f"python -m {module} exited {code}: {lines[-1] if lines else ''}".strip()
            raise StepFailed(detail, log, code)
        return _json_object(last)

    def _spawn(self, module: str, args: Sequence[str], log: Path) -> tuple[int, str]:
        """A child of its own: stderr straight to the log, stdout through here (into the log, its last line kept)."""
        last = ""
        with open(log, "a", buffering=1) as f:
            cmd = [sys.executable, "-m", module, *args]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=child_env())
            assert p.stdout is not None
            for line in p.stdout:
                f.write(line)
                last = line.strip() or last
            return p.wait(), last

    def _in_worker(self, module: str, args: list[str], log: Path) -> tuple[int, str]:
        from experiments.worker import REPLY

        if self._worker is None or self._worker.poll() is not None:
            cmd = [sys.executable, "-m", "experiments.worker"]
            self._worker = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env()
            )
        w = self._worker
        assert w.stdin is not None and w.stdout is not None
        try:
            w.stdin.write(json.dumps({"module": module, "args": args, "log": str(log)}) + "\n")
            w.stdin.flush()
            for line in w.stdout:
                if line.startswith(REPLY + " "):
                    reply = json.loads(line[len(REPLY) + 1 :])
                    self.worker_cpu += reply["cpu"]
                    return reply["code"], reply["last"]
        except BrokenPipeError:
            pass
        code = w.wait()  # it died mid-command (killed, crashed): the next command gets a new one
        with open(log, "a") as f:
            f.write(f"the worker process exited {code} during this command\n")
        return code or 1, ""

    def close(self) -> None:
        """Let the worker process finish (end of its input) and wait for it."""
        if self._worker is not None:
            if self._worker.stdin is not None:
                self._worker.stdin.close()
            self._worker.wait()
            self._worker = None
