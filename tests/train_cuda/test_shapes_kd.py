"""The miniature distillation experiment end to end, at smoke-test size (its numbers mean nothing here)."""

import json

import numpy as np
import pytest

from experiments.shapes_kd import main


def test_shapes_kd_quick_runs_end_to_end_and_reports(tmp_path, capsys):
    out = tmp_path / "kd"
    assert main(["--quick", "--out", str(out), "--arms", "ce"]) == 0  # a cache without logits
    assert "logits" not in json.loads((out / "cache" / "manifest.json").read_text())
    capsys.readouterr()
    assert main(["--quick", "--out", str(out)]) == 0  # a logit arm added: the cache is extracted again, with them
    assert "extracting again" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["teacher"] <= 1.0
    # the quick arms: CE only and hidden states + the shared-vocab logit loss (the cross-tokenizer path end to end)
    assert [(r["arm"], r["seed"]) for r in res["runs"]] == [("ce", 0), ("feat+shared", 0)]
    assert all("overall" in r and "colour" in r for r in res["runs"])
    assert set(res["feat+shared"]["by_type"]) >= {"colour", "count", "shape"}
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["teacher_grid"] == 6 and manifest["student_grid"] != 6  # different grids, aligned by pooling
    assert manifest["logits"]["topk"] == 8 and manifest["teacher_vocab"] != manifest["student_tokenizer"]
    assert "top-k probability mass" in res["logits"]
    rows = [json.loads(x) for x in (out / "feat+shared-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(rows[-1]["kl"]) and 0 < rows[-1]["kl_coverage"] <= 1
    md = (out / "results.md").read_text()
    assert "| seed | CE only | + shared-vocab KL |" in md and "mean ± sd" in md and "| colour |" in md
    # a second run reuses the teacher and the finished students
    stamp = (out / "teacher" / "trained.json").stat().st_mtime_ns
    assert main(["--quick", "--out", str(out)]) == 0
    assert (out / "teacher" / "trained.json").stat().st_mtime_ns == stamp


def test_arms_are_named_and_distill_stays_the_old_name_of_feat():
    from experiments.shapes_kd import parse_arms

    assert parse_arms("ce,distill,feat+uld") == ["ce", "feat", "feat+uld"]
    with pytest.raises(ValueError, match="unknown arm 'kl'; choose from ce, feat, feat\\+uld, feat\\+shared"):
        parse_arms("ce,kl")


def test_phase_two_arms_train_the_same_student_from_the_cache_and_online(tmp_path):
    """The kd arms continue the CE student in train_cuda.distill: targets from the cache and from the teacher run
    inside each step are the same targets, so the two students end with the same weights."""
    from safetensors.numpy import load_file

    from bonsai_mlx.core.errors import UserError
    from experiments.shapes_kd import parse_arms

    with pytest.raises(UserError, match="add ce"):
        parse_arms("kd-online")
    assert parse_arms("kd-cache,ce,feat") == ["ce", "feat", "kd-cache"]  # after the students they continue
    out = tmp_path / "kd"
    assert main(["--quick", "--arms", "ce,kd-cache,kd-online", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["arm"] for r in res["runs"]] == ["ce", "kd-cache", "kd-online"]
    final = lambda arm: load_file(
        str(out / f"{arm}-seed0" / "train" / "checkpoints" / "final" / "trainable.safetensors")
    )  # noqa: E731
    a, b = final("kd-cache"), final("kd-online")
    assert a.keys() == b.keys() and any("lora" in k for k in a)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-5, err_msg=k)
    assert (out / "kd-online-seed0" / "model" / "config.json").is_file()  # fused, then scored in MLX
    assert (
        "| seed | CE only | CE, then KD from the cache | CE, then KD, teacher online |"
        in (out / "results.md").read_text()
    )
