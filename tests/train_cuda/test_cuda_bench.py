"""`python -m train_cuda.bench` runs the trainers' and the extractor's code end to end (CPU: toy sizes)."""

import json

import torch

from train_cuda.bench import main


def test_bench_reports_every_target(tmp_path, capsys):
    assert main(["--smoke", "--steps", "1", "--out", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    for k in ("sft", "sft_checkpointing", "distill_checkpointing"):
        assert res[k]["tok_per_s"] > 0
        assert (res[k]["peak_gb"] > 0) if torch.cuda.is_available() else res[k]["peak_gb"] != res[k]["peak_gb"]
    assert res["extract"]["samples_per_s"] > 0
    out = capsys.readouterr().out
    assert "| distill_checkpointing |" in out and "samples/s" in out
