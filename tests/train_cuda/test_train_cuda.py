"""train_cuda.sft / distill on the CPU (float32, no NF4/FA2), and their outputs read by bonsai_mlx."""

import json
import os

import mlx.core as mx
import numpy as np
import pytest
import torch
from helpers import make_teacher, write_describe_data

from bonsai_mlx import loading
from bonsai_mlx.convert.__main__ import main as convert

# Exactness checks compare float32 with float32: MLX's CUDA backend would do float32 matmuls in TF32 (~1e-3
# relative) unless told not to. MLX reads this once per process, at its first matmul, after collection.
os.environ["MLX_ENABLE_TF32"] = "0"


@pytest.fixture(scope="module")
def setup(pico_dir, tmp_path_factory):
    from train_cuda.extract import main as extract

    root = tmp_path_factory.mktemp("cuda")
    write_describe_data(root)
    extract(
        [
            "--teacher",
            str(make_teacher(root / "teacher")),
            "--data",
            str(root / "d.json"),
            "--image-root",
            str(root / "img"),
            "--student-tokenizer",
            str(pico_dir),
            "--layers",
            "-1,1",
            "--out",
            str(root / "cache"),
        ]
    )
    return root


def _common(pico_dir, root, out):
    return [
        "--student",
        str(pico_dir),
        "--data",
        str(root / "d.json"),
        "--image-root",
        str(root / "img"),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--lora-rank",
        "4",
        "--lora-dropout",
        "0",
        "--no-grad-checkpoint",
    ]


def test_distill_on_cpu_lowers_feature_loss_and_exports_for_mlx(pico_dir, setup, tmp_path, capsys):
    from train_cuda.distill import main as distill

    out = tmp_path / "run"
    assert (
        distill(
            [
                *_common(pico_dir, setup, out),
                "--teacher-cache",
                str(setup / "cache"),
                "--alpha",
                "0.9",
                "--layer-map",
                "-1:-1,1:1",
                "--max-steps",
                "12",
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert ("NF4 language model, bf16 compute" in said) if torch.cuda.is_available() else ("no CUDA device" in said)
    assert "layer map (teacher:student): -1:-1,1:1" in said
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean([r["feat"] for r in rows[-3:]]) < 0.8 * np.mean([r["feat"] for r in rows[:3]])
    final = out / "checkpoints" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "projector.safetensors").is_file()
    assert convert(["fuse", str(pico_dir), str(out), str(tmp_path / "fused")]) == 0
    fused, _ = loading.load(tmp_path / "fused")
    assert np.isfinite(np.array(fused(mx.array([[3, 4, 5]])))).all()


def test_sft_adapter_gives_the_same_logits_in_pytorch_and_mlx(pico_dir, setup, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    from bonsai_mlx.lora import load_adapter
    from train_cuda.sft import main as sft

    out = tmp_path / "sft"
    assert sft([*_common(pico_dir, setup, out), "--max-steps", "3"]) == 0
    final = out / "checkpoints" / "final"
    ref = LlavaForConditionalGeneration.from_pretrained(str(pico_dir), dtype=torch.float32)
    proj = load_file(str(final / "projector.safetensors"))
    ref.model.multi_modal_projector.load_state_dict(
        {k.removeprefix("multi_modal_projector."): v for k, v in proj.items()}, strict=True
    )
    ref = PeftModel.from_pretrained(ref, str(final)).eval()
    ids = [[3, 4, 5, 6, 7]]
    with torch.no_grad():
        theirs = ref(input_ids=torch.tensor(ids)).logits[0].numpy()
    model, _ = loading.load(pico_dir)
    load_adapter(model, final)
    model.eval()
    ours = np.array(model(mx.array(ids))[0])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_distill_kl_runs_with_a_shared_vocabulary_and_needs_logits_in_the_cache(pico_dir, setup, tmp_path, capsys):
    from train_cuda.distill import main as distill
    from train_cuda.extract import main as extract

    common = [*_common(pico_dir, setup, tmp_path / "run"), "--max-steps", "3", "--kl"]
    with pytest.raises(SystemExit):
        distill([*common, "--teacher-cache", str(setup / "cache")])
    assert "holds no teacher logits; re-extract it with --logits-topk K" in capsys.readouterr().err
    teacher = make_teacher(tmp_path / "same", tokenizer_from=pico_dir)
    args = ["--teacher", str(teacher), "--data", str(setup / "d.json"), "--image-root", str(setup / "img")]
    args += ["--student-tokenizer", str(pico_dir), "--layers", "-1", "--out", str(tmp_path / "cache")]
    assert extract([*args, "--logits-topk", "8"]) == 0
    cache = str(tmp_path / "cache")
    assert distill([*common, "--teacher-cache", cache, "--layer-map", "-1:-1", "--feat-loss", "cosine"]) == 0
    assert "logit loss: same-vocab (the teacher and the student share one vocabulary)" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["kl"]) and r["kl"] > 0 for r in rows)
    assert all(0 < r["feat"] < 2 for r in rows)  # 1 - cosine: bounded, unlike the MSE


@pytest.mark.parametrize("mode", ["uld", "shared-vocab"])
def test_distill_with_a_cross_tokenizer_logit_loss_on_cpu(pico_dir, setup, tmp_path, mode, capsys):
    """The teacher with its own tokenizer: each cross-tokenizer mode trains, its term logged (and shared-vocab's
    coverage with it)."""
    from train_cuda.distill import main as distill
    from train_cuda.extract import main as extract

    args = ["--teacher", str(setup / "teacher"), "--data", str(setup / "d.json"), "--image-root", str(setup / "img")]
    args += ["--student-tokenizer", str(pico_dir), "--layers", "-1", "--out", str(tmp_path / "cache")]
    assert extract([*args, "--logits-topk", "8"]) == 0
    run = [*_common(pico_dir, setup, tmp_path / "run"), "--max-steps", "3", "--kl-mode", mode, "--layer-map", "-1:-1"]
    assert distill([*run, "--teacher-cache", str(tmp_path / "cache")]) == 0
    assert f"logit loss: {mode} (as asked)" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(np.isfinite(r["kl"]) and r["kl"] > 0 for r in rows)
    assert all(0 < r.get("kl_coverage", 0) <= 1 for r in rows) == (mode == "shared-vocab")


def test_interrupted_and_resumed_distill_equals_an_uninterrupted_run(pico_dir, setup, tmp_path, monkeypatch):
    """Adapter, projector, aligners, optimizer, scheduler, step, data position and RNG (LoRA dropout on) all
    come back: the resumed run ends with the same weights and logs the same losses."""
    from safetensors.numpy import load_file

    from train_cuda import trainer
    from train_cuda.distill import main as distill

    def args(out):
        a = _common(pico_dir, setup, out)
        a[a.index("--lora-dropout") + 1] = "0.2"
        return [*a, "--teacher-cache", str(setup / "cache"), "--max-steps", "4", "--save-every", "2"]

    assert distill(args(tmp_path / "whole")) == 0
    real = trainer.save_checkpoint

    def crash_after_first(out, name, *rest):
        ck = real(out, name, *rest)
        if name.startswith("step-"):
            raise KeyboardInterrupt  # the machine went away right after the step-2 checkpoint
        return ck

    monkeypatch.setattr(trainer, "save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        distill(args(tmp_path / "cut"))
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert distill([*args(tmp_path / "cut"), "--resume"]) == 0
    a = load_file(str(tmp_path / "whole" / "checkpoints" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoints" / "final" / "trainable.safetensors"))
    assert any(k.startswith("aligners.") for k in a)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=1e-6, err_msg=k)
    rows = lambda d: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
        for x in (d / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows(tmp_path / "cut") == rows(tmp_path / "whole") and len(rows(tmp_path / "whole")) == 4
    with pytest.raises(SystemExit):  # a resume that would be another run is refused
        distill([*args(tmp_path / "cut"), "--resume", "--lr", "0.5"])
