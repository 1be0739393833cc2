"""Training options: one dataclass is the source of both trainers' options, defaults and `--help`.

`bonsai_mlx.train` and `train_cuda.sft|distill` build their flags from these fields (`core/cli.py`) and hand the
trainers a `TrainConfig`, never a parsed namespace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from bonsai_mlx.core.adapters import TARGETS
from bonsai_mlx.core.align import FEAT_LOSSES
from bonsai_mlx.core.cli import opt
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.vocab_map import KL_MODES

STAGES = ("align", "instruct", "full", "distill")
DTYPES = ("float32", "float16", "bfloat16")
# LLaVA-1.5's LoRA recipe trains the adapters at 2e-4 and the projector at 2e-5 (`--mm_projector_lr`)
PROJECTOR_LR_RATIO = 0.1

DISTILL = "distill: "
# the online teacher is a PyTorch model: only train_cuda.distill runs it (MLX distils from a cache)
CUDA_ONLY = ("teacher", "teacher_4bit", "teacher_layers", "logits_topk")


@dataclass
class TrainConfig:
    model: str | None = opt(None, "Pico directory or hub id to fine-tune", flags=("--student",))
    data: str | None = opt(None, "LLaVA conversation JSON/JSONL, or a datasets directory / hub id")
    image_root: str | None = opt(None, "folder the records' image paths are relative to")
    stage: str = opt(
        "instruct",
        "align: projector only; instruct: projector + LoRA; full: everything; distill: + teacher loss",
        choices=STAGES,
    )
    quantize_base: int | None = opt(None, "freeze the LM in 4/8 bits (QLoRA; NF4 on CUDA)", choices=(4, 8))
    lora_rank: int = opt(16, "LoRA rank")
    lora_alpha: float = opt(32.0, "LoRA alpha (scale = alpha / rank)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    lora_targets: str = opt(",".join(TARGETS), "comma list of LM projections LoRA wraps")
    train_vision: bool = opt(False, "also train the SigLIP tower")
    dtype: str | None = opt(
        None,
        "frozen-weight/compute dtype (default: float32 on a CPU, bfloat16 on a GPU); trainables stay float32",
        choices=DTYPES,
    )
    batch_size: int = opt(4, "samples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(
        2e-4, "peak learning rate of the LM (LoRA adapters or weights); linear warmup from 1%, cosine to 5%"
    )
    projector_lr: float | None = opt(
        None,
        f"projector learning rate (default: --lr, or {PROJECTOR_LR_RATIO} x --lr when LoRA adapters train, "
        "LLaVA-1.5's ratio); 0 freezes the projector (LoRA only)",
    )
    vision_lr: float | None = opt(None, "vision tower learning rate when it trains (default: --lr)")
    warmup: int = opt(20, "linear warmup steps, then cosine decay")
    max_steps: int | None = opt(None, "optimizer steps (default: from --epochs)")
    epochs: float = opt(1.0, "passes over the data when --max-steps is not given")
    max_length: int = opt(1024, "tokens per sample (longer ones are truncated, counted)")
    group_by_length: bool = opt(True, "batch similar lengths together (less padding)")
    grad_checkpoint: bool | None = opt(
        None, "recompute layers in backward: less memory, 20-30% more time (default: on with CUDA, off in MLX)"
    )
    compile: bool = opt(True, "MLX: compile the training step (mx.compile); --no-compile runs it eagerly")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0: off)")
    eval_data: str | None = opt(None, "held-out conversations for the eval loss")
    eval_every: int = opt(0, "evaluate every N steps (0: never)")
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    log_every: int = opt(10, "write metrics.jsonl every N steps")
    out: str = opt("runs/pico", "run directory (checkpoints, metrics.jsonl, final outputs)")
    seed: int = opt(0, "seed of the data order, LoRA init and dropout")
    on_bad_sample: str = opt(
        "skip", "a sample that cannot be used: skip and count it, or stop", choices=("skip", "error")
    )
    # distillation (Phase II)
    teacher_cache: str | None = opt(
        None, "teacher hidden-state cache (train_cuda.extract): --stage distill, or any stage plus the teacher loss"
    )
    teacher: str | None = opt(
        None,
        DISTILL + "CUDA: run this Llava teacher (directory or hub id) online, a no-grad forward inside each step, "
        "instead of reading --teacher-cache",
    )
    teacher_4bit: bool = opt(False, DISTILL + "CUDA, online teacher: its LM in NF4 (bitsandbytes)")
    teacher_layers: str = opt("-1", DISTILL + "online teacher: its hidden_states indices to distil, e.g. -1,16")
    logits_topk: int = opt(0, DISTILL + "online teacher: its top-K logits per unit, for --kl (a cache stores them)")
    alpha: float = opt(0.5, DISTILL + "weight of the feature loss")
    alpha_end: float | None = opt(None, DISTILL + "alpha decays linearly to this")
    feat_loss: str = opt("mse", DISTILL + "distance to the teacher states", choices=FEAT_LOSSES)
    layer_map: str | None = opt(None, DISTILL + "teacher:student layer pairs, e.g. -1:-1,16:12 (default: by depth)")
    kl: bool = opt(
        False,
        DISTILL + "add a logit loss at aligned text units (cache made with --logits-topk); across vocabularies it "
        "picks a cross-tokenizer --kl-mode and says which",
    )
    kl_mode: str = opt(
        "auto",
        DISTILL + "same-vocab (KL on token ids), uld (sorted-probability L1, any tokenizers), shared-vocab (KL "
        "over tokens with equal strings), auto (pick from the cache); a mode other than auto implies --kl",
        choices=KL_MODES,
    )
    kl_weight: float = opt(1.0, DISTILL + "weight of the logit term")
    kl_temperature: float = opt(1.0, DISTILL + "softmax temperature of the logit term")

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise UserError(f"--stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "projector_lr", "vision_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 or (name == "projector_lr" and v == 0)):
                more = " (0 freezes it)" if name == "projector_lr" else ""
                raise UserError(f"--{name.replace('_', '-')} must be > 0{more}, got {v}")
        if self.stage == "align" and not self.projector_trains:
            raise UserError("--projector-lr 0 with --stage align leaves nothing to train")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be >= 1, got {self.max_steps}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown training option {unknown[0]!r}")
        return cls(**d)

    @property
    def adapters_train(self) -> bool:
        return self.stage in ("instruct", "distill")

    @property
    def projector_trains(self) -> bool:
        """False with --projector-lr 0: the projector stays as loaded (TinyLLaVA's frozen connector)."""
        return self.projector_lr != 0

    def component_lrs(self) -> dict[str, float]:
        """Peak learning rate per trainable component: "projector", "vision", "lm" (LoRA or weights; also the
        distillation aligners)."""
        proj = self.projector_lr
        if proj is None:
            proj = self.lr * PROJECTOR_LR_RATIO if self.adapters_train else self.lr
        return {"projector": proj, "vision": self.vision_lr if self.vision_lr is not None else self.lr, "lm": self.lr}

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: --max-steps, else --epochs over the data (both trainers count the same)."""
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil(batches_per_epoch * self.epochs / self.grad_accum))

    def checkpointing(self, cuda: bool) -> bool:
        return cuda if self.grad_checkpoint is None else self.grad_checkpoint


def component_of(name: str) -> str:
    """Which learning-rate group a trainable belongs to, from its parameter path (MLX or PyTorch spelling)."""
    if "multi_modal_projector" in name:
        return "projector"
    if "vision_tower" in name:
        return "vision"
    return "lm"
