"""Extraction on several GPUs: `accelerate launch -m train_cuda.extract` splits the shards between ranks (each its
own shards and temp files, rank 0 fits the PCA basis and writes the teacher's tokens, the manifest is completed
once every rank is done). Here 2 processes over gloo on the CPU give the cache one process gives."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import make_teacher

from bonsai_mlx.core.teacher_cache import CacheReader
from train_cuda.extract import main as extract

REPO = Path(__file__).resolve().parents[2]


def _args(teacher, pico_dir, root, out) -> list[str]:
    return ["--teacher", str(teacher), "--data", str(root / "d.json"), "--image-root", str(root / "img"),
            "--student-tokenizer", str(pico_dir), "--layers", "-1,1", "--out", str(out), "--per-shard", "2",
            "--batch-size", "2", "--pca", "4", "--logits-topk", "4"]  # fmt: skip


def test_two_ranks_make_the_cache_one_process_makes(pico_dir, tmp_path, monkeypatch):
    import torch
    from helpers import write_describe_data

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on the CPU, as the gloo ranks below
    write_describe_data(tmp_path, n=5)
    recs = json.loads((tmp_path / "d.json").read_text())
    recs.append({"id": "t", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    teacher = make_teacher(tmp_path / "teacher")
    one, two = tmp_path / "one", tmp_path / "two"
    assert extract(_args(teacher, pico_dir, tmp_path, one)) == 0
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])  # this checkout's code
    cmd = [*launch, "-m", "train_cuda.extract", *_args(teacher, pico_dir, tmp_path, two)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # 3 shards of 2: rank 0 made shards 0 and 2, rank 1 shard 1
    assert "extract (rank 0)" in r.stderr and "4/4" in r.stderr and "extract (rank 1)" in r.stderr, r.stderr[-2000:]
    a, b = CacheReader(one), CacheReader(two)
    assert sorted(a.where) == sorted(b.where) == ["s0", "s1", "s2", "s3", "s4", "t"]
    assert b.manifest == a.manifest and b.manifest["samples"] == 6 and b.manifest["shards"] == 3
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # no temp file left
    for sid in a.where:
        x, y = a.get(sid), b.get(sid)
        assert x.text_student_pos == y.text_student_pos and x.kl_student_pos == y.kl_student_pos
        assert x.ids_check == y.ids_check is not None
        for L in a.layers:
            np.testing.assert_allclose(y.text[L], x.text[L], atol=1e-3, err_msg=sid)
            if x.image:
                np.testing.assert_allclose(y.image[L], x.image[L], atol=1e-3, err_msg=sid)
        np.testing.assert_array_equal(y.topk_ids, x.topk_ids)
        np.testing.assert_allclose(y.topk_logits.astype(np.float32), x.topk_logits.astype(np.float32), atol=1e-2)
