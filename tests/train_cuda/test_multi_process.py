"""Several processes train one model: a 2-process `accelerate launch` (gloo, CPU) equals one process that
accumulates the same global batch, on every rank, with the learning-rate schedule of the single process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import write_describe_data
from safetensors.numpy import load_file


def _args(pico_dir, root, out, batch: int, accum: int) -> list[str]:
    return [
        "--student", str(pico_dir), "--data", str(root / "d.json"), "--image-root", str(root / "img"),
        "--out", str(out), "--batch-size", str(batch), "--grad-accum", str(accum), "--lr", "1e-2",
        "--warmup", "1", "--max-steps", "3", "--log-every", "1", "--lora-rank", "4", "--lora-dropout", "0",
        "--no-grad-checkpoint",
    ]  # fmt: skip


def _run(cmd: list[str], tmp: Path) -> None:
    # ACCELERATE_USE_CPU: accelerate's multi-process launcher then runs DDP over gloo on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_train_the_same_model_as_one_with_accumulation(pico_dir, tmp_path):
    write_describe_data(tmp_path, n=12)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "train_cuda.sft", *_args(pico_dir, tmp_path, one, 2, 2)], tmp_path)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    _run([*launch, "-m", "train_cuda.sft", *_args(pico_dir, tmp_path, two, 2, 1)], tmp_path)
    a = load_file(str(one / "checkpoints" / "final" / "trainable.safetensors"))
    b = load_file(str(two / "checkpoints" / "final" / "trainable.safetensors"))
    assert set(a) == set(b) and any("aligners" not in k for k in a)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=2e-5, err_msg=k)
    state = json.loads((two / "checkpoints" / "final" / "state.json").read_text())
    sums = state["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # both ranks hold the same weights
    lr = lambda d: [json.loads(x)["lr"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(lr(two)) == 3 and np.allclose(lr(two), lr(one))  # once per optimizer step, not per process
    # the rate each step used, on the one curve (core/runs.py): one warmup step from 1%, the peak, then the cosine
    assert lr(one)[0] < lr(one)[1] > lr(one)[2]
