"""Training options: the one place their defaults live, read by both trainers and both CLIs."""

from __future__ import annotations

from dataclasses import dataclass, fields

from bonsai_mlx.core.adapters import TARGETS
from bonsai_mlx.core.errors import UserError

STAGES = ("align", "instruct", "full", "distill")


@dataclass
class TrainConfig:
    model: str | None = None
    data: str | None = None
    image_root: str | None = None
    stage: str = "instruct"
    quantize_base: int | None = None
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: str = ",".join(TARGETS)
    train_vision: bool = False
    dtype: str | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int = 20
    max_steps: int | None = None
    epochs: float = 1.0
    max_length: int = 1024
    group_by_length: bool = True  # less padding; off when length gives away the sample's kind
    grad_checkpoint: bool = False
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_data: str | None = None
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    out: str = "runs/pico"
    seed: int = 0
    on_bad_sample: str = "skip"
    # distillation (Phase II)
    teacher_cache: str | None = None
    alpha: float = 0.5
    alpha_end: float | None = None
    feat_loss: str = "mse"  # or "cosine"
    layer_map: str | None = None
    kl: bool = False  # + kl_weight * a logit loss at aligned text units (cache made with --logits-topk)
    kl_mode: str = "auto"  # vocab_map.KL_MODES: auto, same-vocab, uld, shared-vocab (a mode other than auto implies kl)
    kl_weight: float = 1.0
    kl_temperature: float = 1.0

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown training option {unknown[0]!r}")
        return cls(**d)
