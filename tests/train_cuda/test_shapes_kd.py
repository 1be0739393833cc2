"""The miniature distillation experiment end to end, at smoke-test size (its numbers mean nothing here)."""

import json

from train_cuda.experiments.shapes_kd import main


def test_shapes_kd_quick_runs_end_to_end_and_reports(tmp_path, capsys):
    out = tmp_path / "kd"
    assert main(["--quick", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["teacher"] <= 1.0
    assert [(r["arm"], r["seed"]) for r in res["runs"]] == [("ce", 0), ("distill", 0)]
    assert all("overall" in r for r in res["runs"])
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["teacher_grid"] == 6 and manifest["student_grid"] != 6  # different grids, aligned by pooling
    md = (out / "results.md").read_text()
    assert "| seed | CE only | distilled |" in md and "mean ± sd" in md
    # a second run reuses the teacher and the finished students
    stamp = (out / "teacher" / "trained.json").stat().st_mtime_ns
    assert main(["--quick", "--out", str(out)]) == 0
    assert (out / "teacher" / "trained.json").stat().st_mtime_ns == stamp
