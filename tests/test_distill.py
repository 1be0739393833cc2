import json

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx.distill import Aligners, alpha_at, feature_loss, parse_layer_map


def _inputs(rng):
    states = {-1: rng.normal(size=(2, 7, 16)).astype(np.float32), 2: rng.normal(size=(2, 7, 16)).astype(np.float32)}
    d = {"text_pos": np.array([1, 3, 9], np.int32), "image_pos": np.array([0, 2, 7, 8], np.int32)}
    for t in (-1, 5):
        d[f"text_{t}"] = rng.normal(size=(3, 24)).astype(np.float32)
        d[f"image_{t}"] = rng.normal(size=(4, 24)).astype(np.float32)
    return states, d


def test_feature_loss_is_the_same_number_in_mlx_and_pytorch():
    import torch

    from train_cuda import losses

    rng = np.random.default_rng(0)
    states, d = _inputs(rng)
    pairs = [(-1, -1), (5, 2)]
    ours = Aligners(pairs, 16, 24)
    theirs = losses.Aligners(pairs, 16, 24)
    with torch.no_grad():
        for i in range(2):
            theirs.proj[i].weight.copy_(torch.tensor(np.array(ours.proj[i].weight)))
            theirs.proj[i].bias.copy_(torch.tensor(np.array(ours.proj[i].bias)))
    a = feature_loss(ours, {k: mx.array(v) for k, v in states.items()}, {k: mx.array(v) for k, v in d.items()})
    b = losses.feature_loss(
        theirs, {k: torch.tensor(v) for k, v in states.items()}, {k: torch.tensor(v) for k, v in d.items()}
    )
    assert abs(a.item() - b.item()) < 1e-5 and a.item() > 0
    ce = 2.5
    assert abs(alpha_at(0.5, 0.1, 0.25) - 0.4) < 1e-9
    t = losses.distill_loss(torch.tensor(ce), b, 0.5, 0.1, 0.25).item()
    assert abs(t - ((1 - 0.4) * ce + 0.4 * a.item())) < 1e-5


def test_layer_map():
    assert parse_layer_map("-1:-1,16:12", [-1, 16], 24) == [(-1, -1), (16, 12)]
    assert parse_layer_map(None, [-1, 16], 24, 32) == [(-1, -1), (16, 12)]
    with pytest.raises(ValueError, match="cache holds"):
        parse_layer_map("8:4", [-1, 16], 24)


def test_distill_run_lowers_feature_loss_and_its_adapter_fuses(pico_dir, tmp_path):
    from helpers import make_teacher, write_describe_data

    from bonsai_mlx import loading
    from bonsai_mlx.train import main as train
    from convert.__main__ import main as convert
    from train_cuda.extract import main as extract

    write_describe_data(tmp_path)
    teacher = make_teacher(tmp_path / "teacher")
    extract(
        [
            "--teacher",
            str(teacher),
            "--data",
            str(tmp_path / "d.json"),
            "--image-root",
            str(tmp_path / "img"),
            "--student-tokenizer",
            str(pico_dir),
            "--layers=-1,1",
            "--out",
            str(tmp_path / "cache"),
        ]
    )
    out = tmp_path / "run"
    assert (
        train(
            [
                "--model",
                str(pico_dir),
                "--data",
                str(tmp_path / "d.json"),
                "--image-root",
                str(tmp_path / "img"),
                "--stage",
                "distill",
                "--teacher-cache",
                str(tmp_path / "cache"),
                "--alpha",
                "1.0",
                "--layer-map",
                "-1:-1,1:1",
                "--max-steps",
                "12",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--warmup",
                "1",
                "--log-every",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    feat = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(feat[-3:]) < 0.8 * np.mean(feat[:3]), feat
    assert convert(["fuse", str(pico_dir), str(out), str(tmp_path / "fused")]) == 0
    model, _ = loading.load(tmp_path / "fused")
    assert "extra" not in str(list(mx.load(str(tmp_path / "fused" / "model.safetensors")).keys()))
    assert np.isfinite(np.array(model(mx.array([[3, 4, 5]])))).all()
