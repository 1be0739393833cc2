"""python -m train_cuda.gpu_check: what a lent H100/H200 must show, in one call of at most ~8 minutes.

1. The machine: torch/CUDA/transformers versions, the GPU, which optional packages are there (bitsandbytes,
   flash-attn, mlx: the lent machine has none unless carried; see ../shared/GPU.md).
2. `pytest tests/train_cuda` on CUDA (tests that need MLX are left out when mlx is missing), time-boxed.
3. `train_cuda.bench`: sft with and without checkpointing, distillation from a cache, extraction with a
   7B-shaped teacher, the teacher's forward alone and distillation with it online; each part time-boxed.
4. One report: OUT/report.md and OUT/report.json (plus the pytest log), with the issue's targets checked.

`--smoke` (or GPU_CHECK_SMOKE=1) runs the same steps at toy sizes on a CPU, to prove the script before the GPU's
minutes are spent; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# tests that drive the MLX side (its trainer in a worker process): left out where mlx is not installed
NEEDS_MLX = [
    "tests/train_cuda/test_recipe.py",
    "tests/train_cuda/test_shapes_kd.py::test_shapes_kd_quick_runs_end_to_end_and_reports",
]
# the targets on one H100/H200 (full-size Pico, batch 8 x 512, one 224px image each)
TARGETS = {"sft_tok_per_s": 2 * 12828, "online_ratio": 1.2, "online_peak_gb": 24.0, "extract_samples_per_s": 12.0}


def environment() -> dict:
    import torch
    import transformers

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    env["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)"
    else:
        env["gpu"] = None
    for mod in ("bitsandbytes", "flash_attn", "mlx", "accelerate", "peft", "datasets"):
        env[mod] = importlib.util.find_spec(mod) is not None
    return env


def run_tests(out: Path, paths: list[str], timeout: float) -> dict:
    """pytest in its own process (this checkout's code on PYTHONPATH, for the tests' own subprocesses too)."""
    xml = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *paths]
    if importlib.util.find_spec("mlx") is None:
        for t in NEEDS_MLX:
            cmd += ["--deselect" if "::" in t else "--ignore", t]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.time()
    # its own process group: at the time limit pytest goes with the processes its tests started (accelerate ranks)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        log, rc = (log or "") + f"\n[gpu_check] pytest stopped after {timeout:.0f} s", None
    (out / "tests.log").write_text(log[-200_000:])
    res = {"seconds": round(time.time() - t0, 1), "returncode": rc, "timed_out": rc is None, "paths": paths}
    res["left_out"] = NEEDS_MLX if importlib.util.find_spec("mlx") is None else []
    if xml.is_file():
        res.update(junit_summary(xml))
        xml.unlink()  # summarised in the report (the folder that comes back holds few files)
    else:
        res["summary"] = log.strip().splitlines()[-1] if log.strip() else "no output"
    return res


def junit_summary(path: Path) -> dict:
    """Counts, the slowest tests, and each failure's name with the first line of its message."""
    root = ET.parse(path).getroot()
    cases = list(root.iter("testcase"))
    failed, skipped, slow = [], 0, []
    for c in cases:
        name = f"{c.get('classname', '')}::{c.get('name')}"
        slow.append((float(c.get("time") or 0), name))
        for tag in ("failure", "error"):
            for f in c.findall(tag):
                first = (f.get("message") or tag).splitlines() or [tag]
                failed.append({"test": name, "message": first[0][:300]})
        skipped += len(c.findall("skipped"))
    slow.sort(reverse=True)
    return {
        "tests": len(cases),
        "failed": len(failed),
        "skipped": skipped,
        "passed": len(cases) - len(failed) - skipped,
        "failures": failed[:30],
        "slowest": [{"test": n, "s": round(t, 1)} for t, n in slow[:8]],
    }


def targets_met(bench: dict, smoke: bool) -> dict:
    """Each of the issue's targets: measured value, target, met? (never 'met' on a CPU smoke run)."""
    got = {
        "sft_tok_per_s": (bench.get("sft") or {}).get("tok_per_s"),
        "online_ratio": bench.get("online_ratio"),
        "online_peak_gb": (bench.get("distill_online") or {}).get("peak_gb"),
        "extract_samples_per_s": (bench.get("extract") or {}).get("samples_per_s"),
    }
    out = {}
    for k, v in got.items():
        ok = None
        if v is not None and v == v and not smoke:
            ok = v <= TARGETS[k] if k in ("online_ratio", "online_peak_gb") else v >= TARGETS[k]
        out[k] = {"value": v, "target": TARGETS[k], "met": ok}
    return out


def markdown(rep: dict) -> str:
    from train_cuda.bench import table

    e, t = rep["environment"], rep["tests"]
    lines = [f"# GPU check ({'CPU smoke run: numbers mean nothing' if rep['smoke'] else e['gpu']})", ""]
    lines.append(f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(rep['started']))} UTC, {rep['seconds']:.0f} s in all")
    lines.append("")
    lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in e.items()))
    lines += ["", "## tests/train_cuda", ""]
    if "tests" in t:
        lines.append(
            f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped of {t['tests']} in {t['seconds']} s"
        )
    else:
        lines.append(f"{t.get('summary')} ({t['seconds']} s)")
    if t.get("timed_out"):
        lines.append(f"**pytest stopped at its time limit** ({t['seconds']} s)")
    if t.get("left_out"):
        lines.append("left out (mlx not installed): " + ", ".join(t["left_out"]))
    for f in t.get("failures", []):
        lines.append(f"- FAILED `{f['test']}`: {f['message']}")
    lines += ["", "## train_cuda.bench", "", table(rep["bench"]) if "config" in rep["bench"] else str(rep["bench"])]
    lines += ["", "## Targets", "", "| target | measured | goal | met |", "|---|---|---|---|"]
    for k, v in rep["targets"].items():
        val = "n/a" if v["value"] is None or v["value"] != v["value"] else f"{v['value']:,.2f}"
        met = {True: "yes", False: "**no**", None: "not judged"}[v["met"]]
        goal = ("<= " if k in ("online_ratio", "online_peak_gb") else ">= ") + f"{v['target']:,}"
        lines.append(f"| {k} | {val} | {goal} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m train_cuda.gpu_check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check"), help="report folder (default $OUT)")
    ap.add_argument("--smoke", action="store_true", default=bool(os.environ.get("GPU_CHECK_SMOKE")))
    ap.add_argument("--budget-s", type=float, default=480, help="the whole check's time; late bench parts skipped")
    ap.add_argument("--tests-s", type=float, default=240, help="pytest's share of the budget")
    ap.add_argument("--tests", default=None, help="pytest paths (default tests/train_cuda; --smoke: one file)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per bench part")
    a = ap.parse_args(argv)
    import torch

    from bonsai_mlx.core.io import atomic_write_text
    from train_cuda import bench

    start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[gpu_check {time.time() - start:5.0f} s] {msg}", flush=True)  # noqa: E731
    rep: dict = {"started": start, "smoke": a.smoke or not torch.cuda.is_available(), "environment": environment()}
    log(json.dumps(rep["environment"]))
    paths = (a.tests or ("tests/train_cuda/test_cuda_precision.py" if rep["smoke"] else "tests/train_cuda")).split()
    rep["tests"] = run_tests(out, paths, min(a.tests_s, a.budget_s * 0.6))
    log(f"tests: {rep['tests'].get('passed', '?')} passed, {rep['tests'].get('failed', '?')} failed")
    cfg = bench.tiny() if rep["smoke"] else bench.BenchConfig(steps=5)
    if a.steps:
        cfg.steps = a.steps
    deadline = start + a.budget_s - 60  # a part started after this could overrun the budget
    try:
        rep["bench"] = bench.run(cfg, bench.PARTS, deadline=deadline, log=log)
    except Exception as e:  # the report still gets written
        import traceback

        rep["bench"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    rep["targets"] = targets_met(rep["bench"], rep["smoke"])
    rep["seconds"] = time.time() - start
    atomic_write_text(out / "report.json", json.dumps(rep, indent=2, default=str))
    atomic_write_text(out / "report.md", markdown(rep))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
