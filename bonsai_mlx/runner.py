"""Wires a training run together: model, data, trainer, final outputs (and the embedded default)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from bonsai_mlx import loading, lora
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.io import atomic_write_text
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import Dataset, read_records
from bonsai_mlx.core.train_config import TrainConfig
from bonsai_mlx.embedded import DEFAULT_DATA, accuracy, make_default_model
from bonsai_mlx.trainer import Trainer, seed_everything, setup_trainable


def default_dtype(cfg: TrainConfig) -> mx.Dtype:
    """The frozen weights' and activations' dtype (trainables stay float32): `--dtype`, else per backend.

    CPU: float32 (half precision is emulated there, 20-100x slower). Metal and CUDA: bfloat16, not float16.
    Qwen2's residual stream leaves float16's range (max 65504) once LoRA and the projector move fast: at
    lr 3e-2 with --kl it reached 5.9e4 after one layer and inf after two (tests/test_precision.py), where
    bfloat16 keeps float32's exponent range. MLX has bfloat16 kernels on both GPU backends (native on
    Apple M2+ and NVIDIA sm_80+, emulated but correct on M1).
    """
    if cfg.dtype == "float16":
        print("note: --dtype float16 can overflow the residual stream (max 65504); bfloat16 cannot", file=sys.stderr)
    if cfg.dtype:
        return {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}[cfg.dtype]
    from bonsai_mlx import device

    return mx.float32 if device.is_cpu() else mx.bfloat16


def run(cfg: TrainConfig, resume: str | None = None, quick: bool = False) -> list[str]:
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    embedded = cfg.model is None and cfg.data is None
    if embedded:
        from bonsai_mlx.core import synthetic

        data_dir = out / "data"
        if not (data_dir / "train.json").is_file():
            n_train = 600 if quick else DEFAULT_DATA["n_train"]
            print(
                f"drawing the synthetic shapes task ({n_train} train / {DEFAULT_DATA['n_eval']} held-out) in {data_dir}"
            )
            synthetic.export(
                data_dir,
                n_train,
                DEFAULT_DATA["n_eval"],
                seed=cfg.seed,
                size=DEFAULT_DATA["image_size"],
                caption_share=DEFAULT_DATA["caption_share"],
                questions=DEFAULT_DATA["questions"],
            )
        cfg.model = str(make_default_model(out / "init", seed=cfg.seed))
        cfg.data, cfg.eval_data, cfg.image_root = (
            str(data_dir / "train.json"),
            str(data_dir / "eval.json"),
            str(data_dir / "images"),
        )
    if not cfg.model or not cfg.data:
        raise UserError("--model and --data go together (or give neither for the embedded default)")

    model_dir = loading.resolve(cfg.model)
    model, pcfg = loading.load(model_dir, dtype=default_dtype(cfg))
    proc = Processor(model_dir, pcfg)
    if cfg.quantize_base:
        from bonsai_mlx.quantize import quantize_base

        quantize_base(model, cfg.quantize_base)
    setup_trainable(model, cfg)
    from bonsai_mlx import _blas

    blas = f"; OpenBLAS on {_blas.chosen} of {_blas.cores()} cores" if _blas.chosen else ""
    print(f"trainable parameters: {lora.trainable_count(model):,} ({cfg.stage}){blas}")

    train = Dataset.build(read_records(cfg.data), proc, cfg.image_root, cfg.max_length, cfg.on_bad_sample)
    print(f"train data: {train.summary()}")
    evaluate = None
    if cfg.eval_data:
        evaluate = Dataset.build(read_records(cfg.eval_data), proc, cfg.image_root, cfg.max_length, "skip")

    extra = extra_loss = augment = None
    if cfg.stage == "distill" or cfg.teacher_cache:  # any stage distils when given a teacher cache
        from bonsai_mlx.distill import setup_distill

        extra, extra_loss, augment = setup_distill(cfg, model, proc, train)
    on_eval = (lambda tr: accuracy(tr.model, proc, cfg.eval_data, cfg.image_root, limit=100)) if embedded else None
    trainer = Trainer(cfg, model, proc, train, evaluate, extra_loss, extra, on_eval, augment)
    if embedded:  # so that --resume runs the embedded default again (its accuracy checks and final report)
        trainer.run_info = {"embedded": True, "quick": quick}
    if resume:
        trainer.load_checkpoint(resume)
        print(f"resumed at step {trainer.step} of {trainer.total_steps}")
    atomic_write_text(out / "training_config.json", json.dumps(asdict(cfg), indent=2))
    last = trainer.run()
    lines = [
        f"final train loss {last.get('loss', float('nan')):.4f} at step {trainer.step}; "
        f"{last.get('tokens_per_s', 0):.0f} tok/s; peak {last.get('peak_gb', 0):.2f} GB"
    ]
    if trainer.skipped:
        first = "; ".join(f"{k}: {v}" for k, v in list(trainer.skipped.items())[:5])
        lines.append(f"skipped {len(trainer.skipped)} bad samples ({first})")
    if trainer.rank != 0:
        return lines
    final = out / "checkpoints" / "final"
    if cfg.stage == "full" or cfg.train_vision:
        loading.save(model, out / "model", extra_files_from=model_dir)
        lines.append(f"model: {out / 'model'}")
    else:
        merge = f"python -m bonsai_mlx.convert fuse {cfg.model} {final} OUT"
        lines.append(f"adapter + projector: {final}  (merge: {merge})")
    if embedded:
        acc = accuracy(model, proc, cfg.eval_data, cfg.image_root, limit=100 if quick else None)
        lines.append("held-out exact match: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))
        atomic_write_text(out / "heldout_accuracy.json", json.dumps(acc, indent=2))
        img = sorted((Path(cfg.image_root)).glob("*.png"))[-1]
        lines += [
            "chat with it:",
            f"  python -m bonsai_mlx.generate --model {out / 'model'} --image {img} "
            "--prompt 'What colour is the shape at the top left?'",
            f"  python -m bonsai_mlx.app --model {out / 'model'}",
        ]
    return lines
