"""The one run protocol (bonsai_mlx/core/runs.py) as both trainers use it: the same learning rate at every step,
a resume after `kill -9` in the middle of a checkpoint swap, and one policy for a resume with changed options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import write_describe_data

from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.runs import MetricsLog, RunDir, check_resume, lr_factor, read_state, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_the_curve_warms_up_from_one_percent_and_ends_at_the_floor():
    f = [lr_factor(k, 3, 8) for k in range(8)]
    assert f[0] == pytest.approx(0.01) and f[3] == pytest.approx(1.0)
    assert f[0] < f[1] < f[2] < f[3] > f[4] > f[5] > f[6] > f[7]
    assert lr_factor(8, 3, 8) == pytest.approx(0.05)  # the cosine's floor at `total`
    assert lr_factor(100, 3, 8) == pytest.approx(0.05)  # and past it
    assert lr_factor(0, 50, 10) == pytest.approx(0.01) and lr_factor(9, 50, 10) == pytest.approx(1.0)  # warmup capped


def test_a_swap_killed_at_any_point_leaves_a_complete_checkpoint(tmp_path):
    runs = RunDir(tmp_path / "checkpoints")
    tmp = runs.begin("step-1")
    (tmp / "w").write_text("one")
    runs.commit("step-1", {"step": 1})
    # replacing `step-1` (e.g. Ctrl-C right after a periodic save): killed after `latest` names the new copy and
    # the old one is gone, before the rename
    tmp = runs.begin("step-1")
    (tmp / "w").write_text("two")
    (tmp / "state.json").write_text(json.dumps({"step": 1}))
    runs.latest_file.write_text(tmp.name + "\n")
    import shutil

    shutil.rmtree(runs.root / "step-1")
    assert (resolve_checkpoint(tmp_path) / "w").read_text() == "two"
    runs.begin("step-2")  # the next save finishes the swap first
    assert runs.latest_file.read_text().strip() == "step-1" and (runs.root / "step-1" / "w").read_text() == "two"
    # killed while the files are written: `latest` still names the last complete one
    (runs.tmp("step-2") / "w").write_text("half")
    assert runs.latest().name == "step-1"


def test_resume_policy_names_the_changed_option():
    check_resume("ck", {"lr": 1e-3, "save_every": 2}, {"lr": 1e-3, "save_every": 5})  # free to change
    with pytest.raises(UserError, match=r"--lr was 0.001 .* now 0.5"):
        check_resume("ck", {"lr": 1e-3}, {"lr": 0.5})


def test_metrics_rewind_drops_what_a_resumed_run_logs_again(tmp_path):
    m = MetricsLog(tmp_path / "metrics.jsonl")
    for k in range(1, 6):
        m.write({"step": k})
    m.rewind(3)
    assert [r["step"] for r in m.read()] == [1, 2, 3]


# -- both trainers ---------------------------------------------------------------------------------------------
def _opts(data: Path, out: Path) -> list[str]:
    return [
        "--data", str(data / "d.json"), "--image-root", str(data / "img"), "--out", str(out),
        "--batch-size", "2", "--lr", "1e-3", "--warmup", "3", "--max-steps", "8", "--log-every", "1",
        "--lora-rank", "4", "--lora-dropout", "0.1", "--save-every", "3", "--no-group-by-length",
    ]  # fmt: skip


def _mlx(pico_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["bonsai_mlx.train", "--model", str(pico_dir), *_opts(data, out), "--stage", "instruct", *extra]


def _cuda(pico_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train_cuda.sft", "--student", str(pico_dir), *_opts(data, out), "--no-grad-checkpoint", *extra]


# Runs a trainer's CLI in this process and SIGKILLs it (no cleanup, no atexit) at the moment the second
# checkpoint's temp directory is renamed into place: `latest` then still names the first.
KILLER = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from bonsai_mlx.core import runs
    real, seen = os.replace, []

    class _Os:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if str(src).endswith(".tmp") and os.path.isdir(src):
                seen.append(src)
                if len(seen) == int(os.environ["KILL_AT"]):
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst)

    runs.os = _Os()
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_module(sys.argv[0], run_name="__main__")
    """
)


def _run(args: list[str], cwd: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(kill_at), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", KILLER, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


def _lrs(out: Path) -> list[float]:
    return [r["lr"] for r in MetricsLog(out / "metrics.jsonl").read() if "lr" in r]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs-data")
    write_describe_data(root, n=8)
    return root


@pytest.mark.parametrize("trainer", ["mlx", "cuda"])
def test_killed_mid_checkpoint_resumes_to_the_uninterrupted_run(trainer, pico_dir, data, tmp_path):
    from safetensors.numpy import load_file

    cmd = _mlx if trainer == "mlx" else _cuda
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = _run(cmd(pico_dir, data, whole), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(cmd(pico_dir, data, cut), tmp_path, kill_at=2)  # killed inside the swap of the step-6 checkpoint
    assert r.returncode == -9, r.stderr[-3000:]
    assert read_state(resolve_checkpoint(cut))["step"] == 3  # `latest` still names the complete step-3 copy
    # MLX resumes a run directory with its saved options; the CUDA CLI is given its flags again
    resume = (
        [cmd(pico_dir, data, cut)[0], "--resume", str(cut)]
        if trainer == "mlx"
        else cmd(pico_dir, data, cut, "--resume")
    )
    r = _run(resume, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(whole / "checkpoints" / "final" / "trainable.safetensors"))
    b = load_file(str(cut / "checkpoints" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
    assert _lrs(cut) == _lrs(whole) and len(_lrs(whole)) == 8
    # a resume that would be another run is refused the same way by both trainers: one line naming the option
    r = _run([*resume, "--lr", "0.5"], tmp_path)
    assert r.returncode == 2 and "--lr was 0.001" in r.stderr and "Traceback" not in r.stderr


def test_both_trainers_log_the_same_learning_rate_at_every_step(pico_dir, data, tmp_path):
    ra = _run(_mlx(pico_dir, data, tmp_path / "mlx"), tmp_path)
    rb = _run(_cuda(pico_dir, data, tmp_path / "cuda"), tmp_path)
    assert ra.returncode == 0 and rb.returncode == 0, (ra.stderr + rb.stderr)[-3000:]
    a, b = _lrs(tmp_path / "mlx"), _lrs(tmp_path / "cuda")
    assert len(a) == 8 and a == pytest.approx(b, rel=1e-9)
    assert a == pytest.approx([1e-3 * lr_factor(k, 3, 8) for k in range(8)])  # the rate each step used
