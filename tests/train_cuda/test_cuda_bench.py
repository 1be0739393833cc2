"""`python -m train_cuda.bench` runs the trainers', the extractor's and the online teacher's code end to end (CPU:
toy sizes), and a part that fails is reported while the others still run."""

import json

import torch

from train_cuda.bench import main, run, table, tiny


def test_bench_reports_every_target(tmp_path, capsys):
    assert main(["--smoke", "--steps", "1", "--out", str(tmp_path / "b.json")]) == 0
    res = json.loads((tmp_path / "b.json").read_text())
    for k in ("sft", "sft_checkpointing", "distill_checkpointing", "distill_online"):
        assert res[k]["tok_per_s"] > 0 and res[k]["step_s"] > 0
        assert (res[k]["peak_gb"] > 0) if torch.cuda.is_available() else res[k]["peak_gb"] != res[k]["peak_gb"]
    assert res["extract"]["samples_per_s"] > 0 and res["teacher_forward"]["step_s"] > 0
    assert res["online_ratio"] > 0 and not res["errors"] and not res["skipped"]
    out = capsys.readouterr().out
    assert "| distill_checkpointing |" in out and "samples/s" in out and "online step / (sft step" in out


def test_a_failing_part_is_reported_and_late_parts_are_skipped(monkeypatch):
    import train_cuda.bench as bench

    def broken(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(bench, "extract_bench", broken)
    cfg = tiny()
    cfg.steps = 1
    res = run(cfg, parts=("sft", "extract"))
    assert res["sft"]["step_s"] > 0 and "out of memory (simulated)" in res["errors"]["extract"]
    assert "FAILED extract: RuntimeError: out of memory (simulated)" in table(res)
    res = run(cfg, parts=("sft",), deadline=0)
    assert res["skipped"] == ["sft"] and "sft" not in res
