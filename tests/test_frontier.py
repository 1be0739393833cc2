import json

import pytest
from helpers import make_hf_pico, write_describe_data

from bonsai_mlx.frontier import _lm_params, main, pareto, parse_variant


def test_pareto_marks_the_undominated():
    pts = [(1.0, 0.9), (2.0, 0.8), (1.5, 0.7), (2.0, 0.8), (0.5, 0.95)]
    assert pareto(pts) == [True, True, False, True, True]


def test_parse_variant():
    assert parse_variant("fp16") == (None, None)
    assert parse_variant("prune0.75+4bit") == (0.75, 4)
    with pytest.raises(ValueError, match="unknown part '3bit'"):
        parse_variant("3bit")
    with pytest.raises(ValueError, match="keep ratio"):
        parse_variant("prune")


def test_lm_params_from_config_equals_the_weights(pico_dir):
    from mlx.utils import tree_flatten

    from bonsai_mlx import loading

    model, _ = loading.load(pico_dir)
    assert _lm_params(pico_dir) == sum(v.size for _, v in tree_flatten(model.language_model.parameters()))


def test_frontier_report(tmp_path, capsys):
    d = make_hf_pico(tmp_path / "m")
    data, img = write_describe_data(tmp_path / "data", n=3)
    out = tmp_path / "report"
    args = ["--model", str(d), "--data", str(data), "--image-root", str(img), "--out", str(out)]
    assert main([*args, "--variants", "fp16,4bit,prune0.5,prune0.5+4bit", "--max-tokens", "3", "--tokens", "4"]) == 0
    rows = json.loads((out / "frontier.json").read_text())
    assert [r["variant"] for r in rows] == ["fp16", "4bit", "prune0.5", "prune0.5+4bit"]
    full, pruned = rows[0]["lm_params"], rows[2]["lm_params"]
    assert pruned < full and rows[3]["lm_params"] == pruned
    assert all(r["decode_tps"] > 0 and r["peak_gb"] > 0 and 0 <= r["quality"] <= 1 for r in rows)
    assert any(r["pareto_speed"] for r in rows) and any(r["pareto_memory"] for r in rows)
    for png in ("quality_vs_decode.png", "quality_vs_memory.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "frontier.md").read_text()
    assert "| prune0.5+4bit |" in md and "quality_vs_decode.png" in md
    assert len((out / "preds-4bit.jsonl").read_text().splitlines()) == 1 + 3  # the header, then a row per record


def test_unknown_variant_fails_before_any_work(pico_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(pico_dir), "--data", "x.json", "--out", str(tmp_path / "r"), "--variants", "fp16,2bit"])
    assert "unknown part '2bit'" in capsys.readouterr().err
    assert not (tmp_path / "r" / "variants").exists()
