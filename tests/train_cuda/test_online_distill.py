"""`train_cuda.distill --teacher` (the teacher online, inside the step) trains the same student as
`--teacher-cache` on the same teacher; both trainers refuse a cache made from other data; text-only
micro-batches train under DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import image, make_teacher, write_describe_data
from safetensors.numpy import load_file

from train_cuda.distill import main as distill
from train_cuda.extract import main as extract


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pico_dir):
    root = tmp_path_factory.mktemp("online-distill")
    (root / "img").mkdir()
    recs = []
    for i, size in enumerate([(60, 40), (40, 60), (48, 48), (64, 32)]):
        image(i, size=size).save(root / "img" / f"{i}.png")
        conv = [{"from": "human", "value": "<image>\nIs there a red square? Answer A or B."}]
        recs.append(
            {"id": f"s{i}", "image": f"{i}.png", "conversations": [*conv, {"from": "gpt", "value": "AB"[i % 2]}]}
        )
    recs.append({"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    (root / "d.json").write_text(json.dumps(recs))
    teacher = make_teacher(root / "teacher")
    args = ["--teacher", str(teacher), "--data", str(root / "d.json"), "--image-root", str(root / "img"),
            "--student-tokenizer", str(pico_dir), "--layers", "-1,1", "--out", str(root / "cache"),
            "--batch-size", "2", "--dtype", "float32"]  # fmt: skip
    assert extract(args) == 0
    return root, teacher


def _args(pico_dir, root: Path, out: Path) -> list[str]:
    return [
        "--student", str(pico_dir), "--data", str(root / "d.json"), "--image-root", str(root / "img"),
        "--out", str(out), "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--max-steps", "3",
        "--lora-rank", "4", "--lora-dropout", "0", "--no-grad-checkpoint", "--no-group-by-length", "--seed", "1",
    ]  # fmt: skip


def test_online_teacher_trains_the_student_the_cache_trains(setup, pico_dir, tmp_path):
    root, teacher = setup
    assert distill([*_args(pico_dir, root, tmp_path / "cached"), "--teacher-cache", str(root / "cache")]) == 0
    online = [*_args(pico_dir, root, tmp_path / "online"), "--teacher", str(teacher), "--teacher-layers", "-1,1"]
    assert distill(online) == 0
    a = load_file(str(tmp_path / "cached" / "checkpoints" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "online" / "checkpoints" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("aligners.") for k in a)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)
    rows = lambda d: [json.loads(x)["feat"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert rows(tmp_path / "online") == pytest.approx(rows(tmp_path / "cached"), rel=1e-4)


def test_both_trainers_refuse_a_cache_made_from_other_data(setup, pico_dir, tmp_path, capsys):
    from bonsai_mlx.train import main as train

    root, _ = setup
    recs = json.loads((root / "d.json").read_text())
    recs[0]["conversations"][1]["value"] = "B"  # an edited record: its cached targets belong to the old answer
    (tmp_path / "edited.json").write_text(json.dumps(recs))
    cuda = _args(pico_dir, root, tmp_path / "c")
    cuda[cuda.index("--data") + 1] = str(tmp_path / "edited.json")
    with pytest.raises(SystemExit) as e:
        distill([*cuda, "--teacher-cache", str(root / "cache")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "other data" in err and len(err.splitlines()) == 1, err
    mlx = ["--model", str(pico_dir), "--data", str(tmp_path / "edited.json"), "--image-root", str(root / "img")]
    mlx += ["--stage", "distill", "--teacher-cache", str(root / "cache"), "--out", str(tmp_path / "m")]
    with pytest.raises(SystemExit) as e:
        train([*mlx, "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "other data" in err and len(err.splitlines()) == 1, err


def test_text_only_micro_batches_train_under_ddp(pico_dir, tmp_path):
    """LLaVA-665k holds ~40k text-only records: a rank whose micro-batch has no image must still all-reduce."""
    write_describe_data(tmp_path, n=6)
    recs = json.loads((tmp_path / "d.json").read_text())
    say = lambda i: [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]  # noqa: E731
    recs += [{"id": f"t{i}", "conversations": say(i)} for i in range(6)]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    args = _args(pico_dir, tmp_path, tmp_path / "two")
    args[args.index("--batch-size") + 1] = "1"  # so that some micro-batches are text only on one rank
    args[args.index("--max-steps") + 1] = "6"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    r = subprocess.run([*launch, "-m", "train_cuda.sft", *args], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((tmp_path / "two" / "checkpoints" / "final" / "state.json").read_text())
    assert state["step"] == 6 and state["rank_checksums"][0] == state["rank_checksums"][1]
