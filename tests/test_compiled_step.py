"""The compiled MLX training step equals the eager one, and the arithmetic-op SiLU it runs on the CPU backend is
at least as exact as MLX's own (checked against float64 NumPy, not against itself)."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from helpers import image
from mlx.utils import tree_flatten

from bonsai_mlx import fastmath, loading
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import Dataset, read_records
from bonsai_mlx.core.train_config import TrainConfig
from bonsai_mlx.trainer import Trainer, setup_trainable


def test_exp_and_silu_are_as_exact_as_mlx_against_float64():
    x = mx.concatenate([mx.linspace(-87.0, 88.0, 400_001), mx.random.normal((100_000,)) * 6])
    x64 = np.array(x).astype(np.float64)
    ref = np.exp(x64)
    ours = np.abs(np.array(fastmath.exp(x)) - ref) / ref
    theirs = np.abs(np.array(mx.exp(x)) - ref) / ref
    assert ours.max() < 2e-7 and ours.max() <= theirs.max()
    s_ref = x64 / (1 + np.exp(-x64))
    rel = lambda y: np.max(np.abs(np.array(y) - s_ref) / (np.abs(s_ref) + 1e-30))  # noqa: E731
    assert rel(fastmath.silu(x)) < 5e-7 and rel(fastmath.silu(x)) <= rel(nn.silu(x))
    g = np.array(mx.grad(lambda v: fastmath.silu(v).sum())(x)).astype(np.float64)
    sig = 1 / (1 + np.exp(-x64))
    np.testing.assert_allclose(g, sig * (1 + x64 * (1 - sig)), rtol=1e-5, atol=1e-6)
    assert float(fastmath.exp(mx.array([-200.0]))[0]) >= 0 and np.isfinite(float(fastmath.exp(mx.array([200.0]))[0]))


@pytest.fixture
def data(tmp_path):
    """Records of different lengths (so the compiled step pads), one text-only, non-square images."""
    (tmp_path / "img").mkdir()
    recs = []
    for i in range(8):
        image(i, [(40, 40), (64, 32), (32, 64)][i % 3]).save(tmp_path / "img" / f"{i}.png")
        q = "What colour is it?" + " Look closely." * (i % 4)
        recs.append(
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{q}"},
                    {"from": "gpt", "value": "red" * (1 + i % 3)},
                ],
            }
        )
    recs.append({"conversations": [{"from": "human", "value": "Say no."}, {"from": "gpt", "value": "no"}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    return tmp_path


@pytest.mark.parametrize("stage", ["instruct", "full"])
def test_compiled_and_eager_steps_give_the_same_losses_and_weights(pico_dir, data, tmp_path, stage):
    """(No dropout: the compiled step pads the batch, so dropout would draw its masks over another shape.)"""
    runs = {}
    for compiled in (False, True):
        model, pcfg = loading.load(pico_dir)
        proc = Processor(pico_dir, pcfg)
        cfg = TrainConfig(
            stage=stage, lora_rank=4, lora_dropout=0.0, batch_size=3, grad_accum=2, max_steps=4, lr=5e-3, warmup=1,
            out=str(tmp_path / str(compiled)), compile=compiled, group_by_length=False,
        )  # fmt: skip
        mx.random.seed(0)
        setup_trainable(model, cfg)
        tr = Trainer(cfg, model, proc, Dataset.build(read_records(data / "d.json"), proc, str(data / "img")))
        assert tr.compiled == compiled
        losses = []
        for k in range(4):
            loss, _, _ = tr.train_step([next(tr.micro_batches(2 * k + j)) for j in range(2)])
            losses.append(loss)
        runs[compiled] = losses, dict(tree_flatten(model.trainable_parameters()))
    (le, we), (lc, wc) = runs[False], runs[True]
    np.testing.assert_allclose(lc, le, rtol=1e-5)
    assert le[-1] < le[0]  # it learns
    for k in we:
        np.testing.assert_allclose(np.array(wc[k]), np.array(we[k]), atol=2e-5, err_msg=k)
