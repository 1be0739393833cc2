import subprocess
import sys

import numpy as np
import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss inheritance across exec is Linux's")
def test_worker_peak_memory_is_its_own_not_its_parents():
    held = np.ones(1_000_000_000 // 8)  # ~1 GB resident in this (parent) process
    code = "from bonsai_mlx.bench import peak_rss_gb; print(peak_rss_gb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert held.sum() > 0 and 0.0 < float(out.strip().splitlines()[-1]) < 0.6


@pytest.mark.parametrize("cuda,mps,expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_the_transformers_reference_runs_on_the_device_mlx_uses(monkeypatch, cuda, mps, expected):
    import torch

    from bonsai_mlx.bench import reference_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert reference_device() == expected


def test_the_cpu_comparison_still_runs_and_names_its_device(pico_dir):
    from bonsai_mlx.bench import table, work_mlx, work_transformers

    ref = work_transformers(str(pico_dir), 4, "float32")
    ours = work_mlx(str(pico_dir), 4)
    assert ref["device"] == "cpu" and ours["device"] == "cpu" and ref["decode_tps"] > 0
    out = table([("bonsai_mlx float", ours), ("transformers fp32", ref)], 32.0)
    assert "| bonsai_mlx float (cpu) |" in out and "| transformers fp32 (cpu) |" in out
    assert "1.00x" in out.splitlines()[-1]  # the reference row is found under its device-tagged name


def test_bench_train_puts_train_cuda_beside_mlx_only_where_cuda_is_present(monkeypatch):
    from bonsai_mlx import bench_train

    monkeypatch.setattr(bench_train, "cuda_present", lambda: False)
    assert bench_train.engines("auto") == ["mlx"]
    monkeypatch.setattr(bench_train, "cuda_present", lambda: True)
    assert bench_train.engines("auto") == ["mlx", "train_cuda"]
    assert bench_train.engines("train_cuda") == ["train_cuda"]
    with pytest.raises(ValueError, match="--engines"):
        bench_train.engines("mlx,llama")


def test_train_cuda_step_time_excludes_the_warm_up_step():
    from bonsai_mlx.bench_train import step_seconds

    # cumulative tokens/s as train_cuda logs it: step 1 took 5 s (warm-up), then 1 s per step
    rows = [{"tokens_per_s": 100 / 5}, {"tokens_per_s": 200 / 6}, {"tokens_per_s": 300 / 7}]
    assert abs(step_seconds(rows, [100, 100, 100]) - 1.0) < 1e-9


def test_bench_train_rows_for_both_trainers_on_the_cpu(pico_dir):
    """Both trainers' workers run end to end on a tiny model (train_cuda in float32 on the CPU)."""
    from bonsai_mlx.bench_train import table, work, work_train_cuda

    rows = [work(1, 48, False, 1, str(pico_dir)), work_train_cuda(1, 48, False, 1, str(pico_dir))]
    assert [(r["engine"], r["device"]) for r in rows] == [("bonsai_mlx", "cpu"), ("train_cuda", "cpu")]
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_gb"] > 0.05 for r in rows)
    out = table(rows)
    assert "| bonsai_mlx (cpu) | 1 | off |" in out and "| train_cuda (cpu) | 1 | off |" in out


def test_decode_profile_counts_the_step_and_the_compiled_step_fuses(pico_dir):
    from bonsai_mlx.bench import profile_table, work_profile

    r = work_profile(str(pico_dir), 6)
    assert r["device"] == "cpu" and 0 < r["nodes_compiled"] < r["nodes"]
    assert all(r[k] > 0 for k in ("build_ms", "eval_ms", "compiled_build_ms", "compiled_eval_ms"))
    assert profile_table([("float", r)]).splitlines()[-1].startswith(f"| float (cpu) | {r['nodes']} |")
