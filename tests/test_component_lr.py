"""Per-component learning rates (LLaVA-1.5: adapters 2e-4, projector 2e-5): they reach the optimizer of both
trainers, follow the one curve, and survive a resume."""

from __future__ import annotations

import mlx.core as mx
import mlx.optimizers as optim
import pytest
import torch
from helpers import write_describe_data

from bonsai_mlx import loading
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import Dataset, read_records
from bonsai_mlx.core.runs import lr_factor
from bonsai_mlx.core.train_config import TrainConfig
from bonsai_mlx.trainer import Trainer, setup_trainable


def test_defaults_follow_llava_when_adapters_train():
    assert TrainConfig(stage="instruct", lr=2e-4).component_lrs()["projector"] == pytest.approx(2e-5)
    assert TrainConfig(stage="align", lr=1e-3).component_lrs()["projector"] == pytest.approx(1e-3)
    assert TrainConfig(stage="full", lr=1e-3, vision_lr=1e-4).component_lrs() == {
        "projector": 1e-3, "vision": 1e-4, "lm": 1e-3,
    }  # fmt: skip
    assert TrainConfig(stage="instruct", lr=2e-4, projector_lr=1e-3).component_lrs()["projector"] == 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lr-data")
    write_describe_data(root, n=8)
    return root


def _trainer(pico_dir, data, out, **kw) -> Trainer:
    model, pcfg = loading.load(pico_dir)
    proc = Processor(pico_dir, pcfg)
    opts = dict(stage="instruct", lr=1e-3, projector_lr=4e-3, warmup=2, max_steps=5, batch_size=2, lora_rank=4)
    cfg = TrainConfig(**{**opts, "out": str(out), **kw})
    mx.random.seed(0)
    setup_trainable(model, cfg)
    return Trainer(cfg, model, proc, Dataset.build(read_records(data / "d.json"), proc, str(data / "img")))


def _rates(tr: Trainer) -> dict[str, float]:
    """component -> the rate its parameters' AdamW holds now."""
    assert isinstance(tr.optimizer, optim.MultiOptimizer)
    return {peak: float(o.learning_rate) for o, peak in tr.lr_groups}


def test_mlx_groups_reach_the_optimizer_and_survive_resume(pico_dir, data, tmp_path):
    tr = _trainer(pico_dir, data, tmp_path / "run")
    tr.train_step([next(tr.micro_batches(0))])
    assert sorted(p for _, p in tr.lr_groups) == [1e-3, 4e-3]
    f0 = lr_factor(0, 2, 5)
    assert _rates(tr) == pytest.approx({1e-3: 1e-3 * f0, 4e-3: 4e-3 * f0})
    # the projector's parameters are stepped by the 4e-3 optimizer, the LoRA ones by the 1e-3 one
    proj, lm = tr.optimizer.optimizers[0].state, tr.optimizer.optimizers[1].state
    assert "multi_modal_projector" in proj["model"] and "multi_modal_projector" not in lm["model"]
    tr.train_step([next(tr.micro_batches(1))])
    tr.save_checkpoint()
    again = _trainer(pico_dir, data, tmp_path / "run")
    again.load_checkpoint(tmp_path / "run")
    again.train_step([next(again.micro_batches(2))])
    f2 = lr_factor(2, 2, 5)
    assert again.step == 3 and _rates(again) == pytest.approx({1e-3: 1e-3 * f2, 4e-3: 4e-3 * f2})


def test_cuda_groups_reach_the_optimizer_and_survive_resume(pico_dir, data, tmp_path):
    from train_cuda.sft import main as sft

    args = [
        "--student", str(pico_dir), "--data", str(data / "d.json"), "--image-root", str(data / "img"),
        "--out", str(tmp_path / "c"), "--batch-size", "2", "--lr", "1e-3", "--projector-lr", "4e-3", "--warmup", "2",
        "--max-steps", "4", "--save-every", "2", "--lora-rank", "4", "--no-grad-checkpoint",
    ]  # fmt: skip
    assert sft(args) == 0
    for name, step in (("step-000002", 2), ("final", 4)):
        groups = torch.load(tmp_path / "c" / "checkpoints" / name / "optimizer.pt", weights_only=True)["param_groups"]
        peaks = {g["name"]: g["initial_lr"] for g in groups}
        assert peaks == pytest.approx({"lm": 1e-3, "projector": 4e-3})
        assert {g["name"]: g["lr"] for g in groups} == pytest.approx(
            {k: v * lr_factor(step, 2, 4) for k, v in peaks.items()}
        )  # the rate the next step would use
    (tmp_path / "c" / "checkpoints" / "latest").write_text("step-000002\n")
    assert sft([*args, "--resume"]) == 0  # continues with the saved groups and rates
    groups = torch.load(tmp_path / "c" / "checkpoints" / "final" / "optimizer.pt", weights_only=True)["param_groups"]
    assert {g["name"]: g["initial_lr"] for g in groups} == pytest.approx({"lm": 1e-3, "projector": 4e-3})


def test_projector_lr_zero_freezes_the_projector_and_nothing_else():
    cfg = TrainConfig(stage="instruct", lr=2e-4, projector_lr=0)
    assert not cfg.projector_trains and TrainConfig(stage="instruct").projector_trains
    with pytest.raises(UserError, match="projector-lr must be > 0 \\(0 freezes it\\), got -1"):
        TrainConfig(projector_lr=-1)
    with pytest.raises(UserError, match="--stage align leaves nothing to train"):
        TrainConfig(stage="align", projector_lr=0)
    with pytest.raises(UserError, match="--vision-lr must be > 0, got 0"):
        TrainConfig(vision_lr=0)


def _projector(path) -> dict:
    from safetensors.numpy import load_file

    return {k: v for k, v in load_file(str(path)).items() if k.startswith("multi_modal_projector.")}


def test_mlx_projector_lr_zero_trains_lora_only(pico_dir, data, tmp_path):
    import numpy as np
    from mlx.utils import tree_flatten

    tr = _trainer(pico_dir, data, tmp_path / "run")
    assert any("multi_modal_projector" in k for k, _ in tree_flatten(tr.model.trainable_parameters()))
    tr = _trainer(pico_dir, data, tmp_path / "run0", projector_lr=0)
    names = [k for k, _ in tree_flatten(tr.model.trainable_parameters())]
    assert names and all("lora" in k for k in names)  # LoRA only
    lora_before = {k: np.array(v) for k, v in tree_flatten(tr.model.trainable_parameters())}
    for i in range(2):
        tr.train_step([next(tr.micro_batches(i))])
    tr.save_checkpoint()
    after = dict(tree_flatten(tr.model.trainable_parameters()))
    assert any(not np.array_equal(lora_before[k], np.array(after[k])) for k in lora_before)  # LoRA learned
    saved = _projector(next((tmp_path / "run0" / "checkpoints").glob("step-*")) / "projector.safetensors")
    base = {k: v for f in pico_dir.glob("*.safetensors") for k, v in _projector(f).items()}
    assert saved.keys() == base.keys() and all(np.array_equal(saved[k], base[k]) for k in base)


def test_cuda_projector_lr_zero_trains_lora_only(pico_dir, data, tmp_path):
    import numpy as np

    from train_cuda.sft import main as sft

    args = [
        "--student", str(pico_dir), "--data", str(data / "d.json"), "--image-root", str(data / "img"),
        "--out", str(tmp_path / "c"), "--batch-size", "2", "--lr", "1e-3", "--projector-lr", "0", "--warmup", "1",
        "--max-steps", "2", "--lora-rank", "4", "--no-grad-checkpoint",
    ]  # fmt: skip
    assert sft(args) == 0
    final = tmp_path / "c" / "checkpoints" / "final"
    groups = torch.load(final / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["name"] for g in groups] == ["lm"]
    saved = _projector(final / "projector.safetensors")
    base = {k: v for f in pico_dir.glob("*.safetensors") for k, v in _projector(f).items()}
    assert saved.keys() == base.keys() and all(np.allclose(saved[k], base[k], atol=0) for k in base)
