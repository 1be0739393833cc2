import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import hf_logits, image, make_hf_pico, write_describe_data

from bonsai_mlx import loading
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.loading import canonical_weights
from bonsai_mlx.prune import PruneConfig, kept_counts, lm_parameters, main, prune
from bonsai_mlx.weights import load_weights


def _logits(d, model=None):
    model = model or loading.load(d)[0]
    proc = Processor(d, model.config)
    ids = proc.encode([{"role": "user", "content": "<image>\nwhat colour is the square?"}])
    pv = proc.pixel_values([image()])
    return np.array(model(mx.array([ids]), mx.array(pv))[0]), ids, pv


def _kill(d) -> None:
    """In every layer, zero a quarter of the MLP channels (down_proj columns) and KV group 1's o_proj columns."""
    w = load_weights(d)
    for k in list(w):
        a = np.array(w[k])
        if k.endswith("mlp.down_proj.weight"):
            a[:, 1::4] = 0
        elif k.endswith("self_attn.o_proj.weight"):
            a[:, a.shape[1] // 2 :] = 0
        else:
            continue
        w[k] = mx.array(a)
    mx.save_safetensors(str(d / "model.safetensors"), w, metadata={"format": "pt"})


def test_keep_one_leaves_the_checkpoint_unchanged(pico_dir, tmp_path):
    assert main(["--model", str(pico_dir), "--out", str(tmp_path / "p"), "--mlp-keep", "1", "--heads-keep", "1"]) == 0
    a, b = canonical_weights(load_weights(pico_dir)), canonical_weights(load_weights(tmp_path / "p"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["text_config"]["intermediate_size"] == 128


@pytest.mark.parametrize("calibrated", [True, False])
def test_importance_finds_dead_channels_and_heads(tmp_path, calibrated):
    """Zeroed-out channels and a zeroed-out head group must rank last: pruning exactly them changes nothing."""
    d = make_hf_pico(tmp_path / "m")
    _kill(d)
    model, _ = loading.load(d)
    before, _, _ = _logits(d, model)
    recs = json.loads(write_describe_data(tmp_path / "calib", n=4)[0].read_text()) if calibrated else None
    cfg = PruneConfig(mlp_keep=0.75, heads_keep=0.5, multiple_of=0, image_root=str(tmp_path / "calib" / "img"))
    info = prune(model, cfg, Processor(d, model.config), recs)
    assert info["importance"].startswith("calibration" if calibrated else "weight")
    assert model.config.text.intermediate_size == 96 and model.config.text.num_key_value_heads == 1
    after, _, _ = _logits(d, model)
    assert np.abs(after - before).max() <= 1e-5


def test_pruned_checkpoint_loads_in_transformers_with_the_same_logits(tmp_path):
    d = make_hf_pico(tmp_path / "m")
    data, img = write_describe_data(tmp_path / "calib", n=4)
    out = tmp_path / "pruned"
    args = ["--model", str(d), "--out", str(out), "--mlp-keep", "0.75", "--heads-keep", "0.5"]
    assert main([*args, "--calib", str(data), "--image-root", str(img), "--multiple-of", "32"]) == 0
    t = json.loads((out / "config.json").read_text())["text_config"]
    assert (t["intermediate_size"], t["num_attention_heads"], t["num_key_value_heads"], t["head_dim"]) == (96, 2, 1, 16)

    full, pruned = loading.load(d)[0], loading.load(out)[0]
    hidden, hd, layers = 64, 16, 3
    removed = layers * (3 * hidden * 32 + 2 * hd * (hidden + 1) + 2 * hd * (hidden + 1) + hidden * 2 * hd)
    assert lm_parameters(full) - lm_parameters(pruned) == removed  # 32 MLP channels, 1 KV group (2 q heads)

    ours, ids, pv = _logits(out, pruned)
    ref = hf_logits(out, ids, pv)
    assert np.abs(ours - ref).max() <= 1e-4


def test_pruned_checkpoint_quantizes(tmp_path, capsys):
    from bonsai_mlx.conversion.hf_mlx import to_mlx

    d = make_hf_pico(tmp_path / "m")
    out = tmp_path / "pruned"
    assert main(["--model", str(d), "--out", str(out), "--mlp-keep", "0.75", "--heads-keep", "0.5"]) == 0
    to_mlx(out, tmp_path / "q4", bits=4, group_size=32)
    model, cfg = loading.load(tmp_path / "q4")
    assert cfg.quantization and cfg.text.head_dim == 16
    logits, _, _ = _logits(tmp_path / "q4", model)
    assert np.isfinite(logits).all()
    with pytest.raises(SystemExit):  # quantized weights are not pruned: prune the float checkpoint first
        main(["--model", str(tmp_path / "q4"), "--out", str(tmp_path / "again")])
    assert "prune the float checkpoint" in capsys.readouterr().err


def test_kept_counts():
    assert kept_counts(PruneConfig(mlp_keep=0.75, heads_keep=0.75), 4864, 2) == (3648, 2)
    assert kept_counts(PruneConfig(mlp_keep=0.5, heads_keep=0.5), 4864, 2) == (2432, 1)
    assert kept_counts(PruneConfig(mlp_keep=0.75, multiple_of=64), 128, 2)[0] == 96  # 64-rounding would keep 128
    with pytest.raises(ValueError, match="--mlp-keep"):
        PruneConfig(mlp_keep=1.5)


def test_bad_keep_is_a_one_line_error(pico_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", str(pico_dir), "--out", str(tmp_path / "p"), "--mlp-keep", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--mlp-keep must be in (0, 1]" in err and "Traceback" not in err


def test_pruned_checkpoint_heals_with_lora_training(pico_dir, tmp_path):
    from bonsai_mlx.train import main as train

    out = tmp_path / "p"
    assert main(["--model", str(pico_dir), "--out", str(out), "--mlp-keep", "0.5", "--heads-keep", "0.5"]) == 0
    data, img = write_describe_data(tmp_path / "d", n=4)
    run = tmp_path / "heal"
    args = ["--model", str(out), "--data", str(data), "--image-root", str(img), "--out", str(run)]
    extra = ["--stage", "instruct", "--max-steps", "8", "--batch-size", "4", "--lr", "3e-3", "--log-every", "1"]
    assert train([*args, *extra]) == 0
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0]
    # the healed adapter merges into the pruned base: a standard checkpoint again
    from bonsai_mlx.convert.__main__ import main as convert

    assert convert(["fuse", str(out), str(run / "checkpoints" / "final"), str(tmp_path / "healed")]) == 0
    healed, cfg = loading.load(tmp_path / "healed")
    assert cfg.text.intermediate_size == loading.load(out)[1].text.intermediate_size
