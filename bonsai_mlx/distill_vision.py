"""python -m bonsai_mlx.distill_vision: distil a Pico's SigLIP tower into a smaller one on unlabeled images.

The student tower (fewer layers and/or narrower, same image size and patch size, so the same patch grid and
the same number of image tokens) learns to reproduce the teacher tower's features at the layer the projector
reads (`vision_feature_layer`), on images alone: no captions, no labels. Images go through the teacher's own
image processor, so any aspect ratio is fine.

A narrower student learns a linear map (student width -> teacher width) with it, and the map is folded into
the projector's first linear layer (y = A(Ws + c) + b = (AW)s + (Ac + b)): the LM receives exactly what it
received from the map, the written checkpoint is a standard Llava directory whose projector simply reads the
narrower width, and no new projector has to be learned from labelled data.

The student starts from the teacher where shapes allow (--init teacher): evenly spaced teacher layers (the
first and the one the projector reads always among them), patch and position embeddings copied, and when it is
narrower, the residual channels with the most activation energy on the images, whole attention heads (when
the head size matches) and the MLP channels with the largest weights. The result is the teacher's LM and
(folded) projector with the new tower, written atomically as a standard Pico checkpoint; heal it with a short
`python -m bonsai_mlx.train --stage align` run (printed at the end).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from bonsai_mlx.core.cli import add_options, from_args, opt
from bonsai_mlx.core.config import PicoConfig, VisionConfig
from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.io import atomic_write_text
from bonsai_mlx.core.runs import RunDir, check_resume, lr_factor, read_state
from bonsai_mlx.model import select_features
from bonsai_mlx.vision import ACTIVATIONS, VisionTower

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LOSSES = ("mse", "cosine", "mse+cosine")
# vision_config fields a student may change; the rest (image_size, patch_size, channels...) fix the grid
STUDENT_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


@dataclass
class DistillVisionConfig:
    """The options of one run (saved in each checkpoint, so a resumed run is the same run)."""

    teacher: str = opt(help="float Pico directory or hub id whose tower is distilled")
    images: str = opt(help="a folder of images (recursive) or a LLaVA data JSON/JSONL")
    out: str = opt(help="where to write the new checkpoint (checkpoints go to OUT.ckpt/)")
    image_root: str | None = opt(None, "folder the data file's image paths are relative to")
    student_config: str | None = opt(None, "JSON file or inline JSON of vision_config overrides (the flags below win)")
    layers: int | None = opt(None, "student encoder layers (default: as deep as the layer the projector reads)")
    width: int | None = opt(None, "student hidden size (default: the teacher's)")
    heads: int | None = opt(None, "student attention heads (default: keep the teacher's head size)")
    intermediate: int | None = opt(None, "student MLP size (default: keep the teacher's ratio)")
    init: str = opt("teacher", "start from the teacher's weights or random", choices=("teacher", "random"))
    loss: str = opt("mse", "relative MSE, 1 - cosine, or their sum", choices=LOSSES)
    map: str = opt(
        "auto",
        "learned linear map to the teacher's width, folded into the projector (auto: when narrower)",
        choices=("auto", "linear", "none"),
    )
    steps: int = opt(1000, "optimizer steps (0: write the initialised student)")
    batch_size: int = opt(32, "images per step")
    lr: float = opt(1e-3, "peak AdamW learning rate (the trainers' curve: warmup from 1%, cosine to 5%)")
    warmup: int = opt(50, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    seed: int = opt(0, "seed of the held-out split, the order and the init")
    eval_images: int = opt(64, "held out (at most 10%) to measure the feature match")
    save_every: int = opt(200, "checkpoint every N steps (0: never)")
    cache_gb: float = opt(2.0, "memory for processed images (0: decode every time)")

    def __post_init__(self) -> None:
        if self.init not in ("teacher", "random"):
            raise UserError(f"--init must be 'teacher' or 'random', got {self.init!r}")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.map not in ("auto", "linear", "none"):
            raise UserError(f"--map must be auto, linear or none, got {self.map!r}")
        for name in ("steps", "eval_images", "save_every", "warmup"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")


# -- inputs ---------------------------------------------------------------------------------------
def list_images(source: str | Path, image_root: str | Path | None = None) -> list[Path]:
    """The images of a folder (recursively) or of a LLaVA data file (each record's `image`, deduplicated;
    records without one are skipped, missing files counted and reported)."""
    p = Path(source)
    if p.is_dir():
        found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if not found:
            raise UserError(f"{p}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}, recursively)")
        return found
    if not p.exists():
        raise InputNotFound(f"{p}: no such image folder or LLaVA data file")
    from bonsai_mlx.core.records import read_records

    root = Path(image_root) if image_root else None
    seen: dict[str, Path] = {}
    missing: list[str] = []
    for rec in read_records(p):
        imgs = rec.get("image") if isinstance(rec, dict) else None
        for name in [imgs] if isinstance(imgs, str) else imgs or []:
            path = root / name if root else Path(name)
            if str(path) in seen:
                continue
            if path.is_file():
                seen[str(path)] = path
            else:
                missing.append(str(path))
    if missing:
        print(f"skipped {len(missing)} missing image files, e.g. {missing[0]}", file=sys.stderr)
    if not seen:
        hint = "" if root else " (relative image paths? give --image-root)"
        raise UserError(f"{p}: no usable images in its records{hint}")
    return list(seen.values())


def student_vision_config(teacher: VisionConfig, cfg: DistillVisionConfig, depth: int | None = None) -> VisionConfig:
    """The teacher's vision_config with the student's overrides (a JSON of fields, then the flags)."""
    over: dict = {}
    if cfg.student_config:
        src = cfg.student_config
        text = Path(src).read_text() if Path(src).is_file() else src
        try:
            over = json.loads(text)
        except json.JSONDecodeError as e:
            where = src if Path(src).is_file() else "--student-config"
            raise UserError(f"{where}: not valid JSON ({e.msg}); expected an object of vision_config fields") from None
        if not isinstance(over, dict):
            raise UserError("--student-config: expected a JSON object of vision_config fields")
        known = {f.name for f in fields(VisionConfig)}
        for k in over:
            if k not in known:
                raise UserError(
                    f"--student-config: {k!r} is not a vision_config field (e.g. {', '.join(STUDENT_FIELDS)})"
                )
    flags = {
        "num_hidden_layers": cfg.layers,
        "hidden_size": cfg.width,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.intermediate,
    }
    over.update({k: v for k, v in flags.items() if v is not None})
    t = teacher
    for k in ("image_size", "patch_size", "num_channels"):
        if k in over and over[k] != getattr(t, k):
            raise UserError(
                f"student {k} {over[k]} != teacher's {getattr(t, k)}: the student keeps the teacher's patch grid "
                f"({t.grid}x{t.grid} patches of {t.patch_size}px), so the projector's input keeps its meaning"
            )
    width = over.get("hidden_size", t.hidden_size)
    if "hidden_size" in over and "num_attention_heads" not in over:  # keep the teacher's head size
        hd = t.hidden_size // t.num_attention_heads
        if width % hd:
            raise UserError(f"--width {width} is not a multiple of the teacher's head size {hd}: give --heads too")
        over["num_attention_heads"] = width // hd
    if "hidden_size" in over and "intermediate_size" not in over:  # keep the teacher's MLP ratio
        over["intermediate_size"] = t.intermediate_size * width // t.hidden_size
    s = copy.deepcopy(t)
    for k, v in over.items():
        setattr(s, k, v)
    for k in STUDENT_FIELDS:
        if not isinstance(getattr(s, k), int) or getattr(s, k) < 1:
            raise UserError(f"student {k} must be a positive integer, got {getattr(s, k)!r}")
    if s.hidden_size > t.hidden_size:
        raise UserError(f"student hidden_size {s.hidden_size} is wider than the teacher's {t.hidden_size}")
    if s.num_hidden_layers > t.num_hidden_layers:
        raise UserError(f"student has {s.num_hidden_layers} layers, more than the teacher's {t.num_hidden_layers}")
    if depth is not None and s.num_hidden_layers > depth:
        if "num_hidden_layers" not in over:  # the default: as deep as what the projector reads, no deeper
            s.num_hidden_layers = depth
        else:
            raise UserError(
                f"student has {s.num_hidden_layers} layers, but the projector reads the teacher's layer {depth}: "
                f"layers past it would have no teacher layer to learn from (use --layers {depth} or fewer)"
            )
    if s.hidden_size % s.num_attention_heads:
        raise UserError(f"student hidden_size {s.hidden_size} is not divisible by {s.num_attention_heads} heads")
    if s.hidden_act not in ACTIVATIONS:
        raise UserError(f"student hidden_act {s.hidden_act!r} is not one of {', '.join(ACTIVATIONS)}")
    return s


def feature_depth(config: PicoConfig) -> int:
    """The teacher's HF hidden_states index the projector reads (1..layers)."""
    fl = config.vision_feature_layer
    if not isinstance(fl, int):
        raise UserError(f"vision_feature_layer {fl} (several layers) is not supported: distil one feature layer")
    n = config.vision.num_hidden_layers
    depth = fl % (n + 1)
    if depth == 0:
        raise UserError("vision_feature_layer reads the patch embeddings (no encoder layer): nothing to distil")
    return depth


def pick_layers(student_layers: int, depth: int) -> list[int]:
    """Evenly spaced teacher layers (0-based) for the student, the first and the feature layer included."""
    return sorted({int(round(x)) for x in np.linspace(0, depth - 1, student_layers)})


# -- the student ----------------------------------------------------------------------------------
class FeatureMap(nn.Module):
    """Student width -> teacher width, folded into the projector when the checkpoint is written."""

    def __init__(self, d_in: int, d_out: int, bias: bool):
        super().__init__()
        self.linear = nn.Linear(d_in, d_out, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x)


class Student(nn.Module):
    def __init__(self, vcfg: VisionConfig, d_teacher: int, use_map: bool, bias: bool):
        super().__init__()
        self.tower = VisionTower(vcfg)
        if use_map:
            self.map = FeatureMap(vcfg.hidden_size, d_teacher, bias)

    def features(self, pixels: mx.array, strategy: str) -> mx.array:
        h = select_features(self.tower.hidden_states(pixels, [-1]), strategy)
        return self.map(h) if "map" in self else h


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def channel_energy(teacher: VisionTower, pixels: mx.array, depth: int) -> np.ndarray:
    """Mean square of each residual channel over the layers up to `depth`, tokens and images."""
    hs = teacher.hidden_states(pixels, list(range(depth + 1)))
    return np.mean([np.mean(_np(h) ** 2, axis=(0, 1)) for h in hs], axis=0)


def init_from_teacher(student: VisionTower, teacher: VisionTower, depth: int, energy: np.ndarray | None) -> list[str]:
    """Copy what fits from the teacher into `student` in place; returns a description of what was copied."""
    t_cfg, s_cfg = teacher.config, student.config
    layers = pick_layers(s_cfg.num_hidden_layers, depth)
    C = s_cfg.hidden_size
    if C == t_cfg.hidden_size:
        ch = np.arange(C)
    else:
        ch = np.sort(np.argsort(-(energy if energy is not None else np.ones(t_cfg.hidden_size)), kind="stable")[:C])
    ci = mx.array(ch)
    hd_t, hd_s = t_cfg.hidden_size // t_cfg.num_attention_heads, C // s_cfg.num_attention_heads
    heads_fit = hd_t == hd_s and s_cfg.num_attention_heads <= t_cfg.num_attention_heads
    I_s = s_cfg.intermediate_size
    mlp_fits = I_s <= t_cfg.intermediate_size
    new: list[tuple[str, mx.array]] = []
    tv, sv = teacher.vision_model, "vision_model."

    def vec(v: mx.array) -> mx.array:
        return mx.take(v, ci, axis=-1)

    emb = tv.embeddings
    new.append((sv + "embeddings.patch_embedding.weight", mx.take(emb.patch_embedding.weight, ci, axis=0)))
    new.append((sv + "embeddings.patch_embedding.bias", vec(emb.patch_embedding.bias)))
    new.append((sv + "embeddings.position_embedding.weight", vec(emb.position_embedding.weight)))
    new.append((sv + "post_layernorm.weight", vec(tv.post_layernorm.weight)))
    new.append((sv + "post_layernorm.bias", vec(tv.post_layernorm.bias)))
    for j, i in enumerate(layers):
        L, p = tv.encoder.layers[i], f"{sv}encoder.layers.{j}."
        for ln in ("layer_norm1", "layer_norm2"):
            new += [(p + ln + ".weight", vec(getattr(L, ln).weight)), (p + ln + ".bias", vec(getattr(L, ln).bias))]
        a = L.self_attn
        if heads_fit:
            # whole heads by |V rows| * |O columns| (what a head can write into the residual stream)
            v = np.linalg.norm(_np(a.v_proj.weight), axis=1) ** 2
            o = np.linalg.norm(_np(a.out_proj.weight), axis=0) ** 2
            score = (v.reshape(t_cfg.num_attention_heads, hd_t) * o.reshape(t_cfg.num_attention_heads, hd_t)).sum(1)
            keep = np.sort(np.argsort(-score, kind="stable")[: s_cfg.num_attention_heads])
            rows = mx.array((keep[:, None] * hd_t + np.arange(hd_t)).reshape(-1))
            for name in ("q_proj", "k_proj", "v_proj"):
                lin = getattr(a, name)
                w = mx.take(mx.take(lin.weight, rows, axis=0), ci, axis=1)
                new += [(p + f"self_attn.{name}.weight", w), (p + f"self_attn.{name}.bias", mx.take(lin.bias, rows))]
            w = mx.take(mx.take(a.out_proj.weight, ci, axis=0), rows, axis=1)
            new += [(p + "self_attn.out_proj.weight", w), (p + "self_attn.out_proj.bias", vec(a.out_proj.bias))]
        if mlp_fits:
            m = L.mlp
            f1 = np.linalg.norm(_np(m.fc1.weight)[:, ch], axis=1)
            f2 = np.linalg.norm(_np(m.fc2.weight)[ch], axis=0)
            keep = mx.array(np.sort(np.argsort(-(f1 * f2), kind="stable")[:I_s]))
            new.append((p + "mlp.fc1.weight", mx.take(mx.take(m.fc1.weight, keep, axis=0), ci, axis=1)))
            new.append((p + "mlp.fc1.bias", mx.take(m.fc1.bias, keep)))
            new.append((p + "mlp.fc2.weight", mx.take(mx.take(m.fc2.weight, ci, axis=0), keep, axis=1)))
            new.append((p + "mlp.fc2.bias", vec(m.fc2.bias)))
    student.load_weights([(k, v.astype(mx.float32)) for k, v in new], strict=False)
    notes = [f"layers {[i + 1 for i in layers]} of {t_cfg.num_hidden_layers}"]
    if C < t_cfg.hidden_size:
        notes.append(f"{C} of {t_cfg.hidden_size} channels (by activation energy)")
    if not heads_fit:
        notes.append(f"attention random (head size {hd_s} vs the teacher's {hd_t})")
    if not mlp_fits:
        notes.append("MLP random (wider than the teacher's)")
    return notes


def random_init(module: nn.Module, seed: int) -> None:
    """N(0, 1/sqrt(fan-in)) matrices, zero biases, unit LayerNorm (see tiny.TinyRecipe on the scale)."""
    mx.random.seed(seed)
    new = []
    for k, v in tree_flatten(module.parameters()):
        if "layer_norm" in k or "layernorm" in k:
            new.append((k, mx.ones(v.shape) if k.endswith("weight") else mx.zeros(v.shape)))
        elif v.ndim == 1:
            new.append((k, mx.zeros(v.shape)))
        else:
            fan_in = int(np.prod(v.shape[1:])) if "patch_embedding" in k else v.shape[-1]
            if "position_embedding" in k:
                fan_in = v.shape[-1]
            new.append((k, mx.random.normal(v.shape) * fan_in**-0.5))
    module.load_weights(new)


def fit_map(feats: np.ndarray, target: np.ndarray, bias: bool, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares W, c with target ~ feats @ W.T + c: the best linear read-out of the initial student."""
    x = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    y = target.reshape(-1, target.shape[-1]).astype(np.float64)
    mx_, my = (x.mean(0), y.mean(0)) if bias else (np.zeros(x.shape[1]), np.zeros(y.shape[1]))
    xc, yc = x - mx_, y - my
    gram = xc.T @ xc
    gram += ridge * (np.trace(gram) / len(gram) + 1e-12) * np.eye(len(gram))
    w = np.linalg.solve(gram, xc.T @ yc).T
    return w.astype(np.float32), (my - w @ mx_).astype(np.float32)


# -- losses ---------------------------------------------------------------------------------------
def feature_losses(s: mx.array, t: mx.array, t_var: float) -> dict[str, mx.array]:
    """Relative MSE (MSE over the teacher features' variance: 1 = no better than their mean) and 1 - cosine."""
    s, t = s.astype(mx.float32), t.astype(mx.float32)
    rel = mx.mean((s - t) ** 2) / t_var
    cos = mx.sum(s * t, axis=-1) / (mx.linalg.norm(s, axis=-1) * mx.linalg.norm(t, axis=-1) + 1e-8)
    return {"mse": rel, "cosine": 1.0 - mx.mean(cos)}


def objective(losses: dict[str, mx.array], kind: str) -> mx.array:
    return sum(losses[k] for k in kind.split("+"))


# -- the run --------------------------------------------------------------------------------------
class Run:
    """Teacher, student, images and optimizer of one distillation; `train()` then `write()`."""

    def __init__(self, cfg: DistillVisionConfig):
        from bonsai_mlx import loading
        from bonsai_mlx.core.processing import Processor

        self.cfg = cfg
        self.teacher_dir = loading.resolve(cfg.teacher)
        self.model, self.pcfg = loading.load(self.teacher_dir)
        if self.pcfg.quantization:
            raise UserError(
                f"{self.teacher_dir}: is quantized; distil from the float checkpoint "
                "(python -m bonsai_mlx.convert to-hf first)"
            )
        self.depth = feature_depth(self.pcfg)
        self.strategy = self.pcfg.vision_feature_select_strategy
        self.scfg = student_vision_config(self.pcfg.vision, cfg, self.depth)
        self.proc = Processor(self.teacher_dir, self.pcfg)
        images = list_images(cfg.images, cfg.image_root)
        rng = np.random.default_rng(cfg.seed)
        order = rng.permutation(len(images))
        n_eval = min(cfg.eval_images, len(images) // 10)
        self.eval_images = [images[i] for i in order[:n_eval]] or [images[i] for i in order[: cfg.eval_images]]
        self.train_images = [images[i] for i in order[n_eval:]]
        d_t, d_s = self.pcfg.vision.hidden_size, self.scfg.hidden_size
        use_map = cfg.map == "linear" or (cfg.map == "auto" and d_s != d_t)
        if cfg.map == "none" and d_s != d_t:
            raise UserError(f"--map none needs the teacher's width {d_t}; the student's is {d_s}")
        self.bias = self.pcfg.multimodal_projector_bias
        self.student = Student(self.scfg, d_t, use_map, self.bias)
        self.init_notes: list[str] = []
        self.t_var = 1.0
        self.step = 0
        self.optimizer = optim.AdamW(learning_rate=cfg.lr, weight_decay=cfg.weight_decay)  # rate set per step
        self.history: list[dict] = []
        self._cache: dict[Path, np.ndarray] = {}
        self._cached_bytes = 0

    # -- data
    def pixels(self, paths: list[Path]) -> mx.array:
        """Processed pixels, kept in memory up to --cache-gb: from the second epoch on no image is decoded again."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._cache]
        if todo:
            fresh = self.proc.pixel_values([str(p) for p in todo])
            for p, a in zip(todo, fresh, strict=True):
                if self._cached_bytes + a.nbytes <= self.cfg.cache_gb * 1e9:
                    self._cache[p] = a
                    self._cached_bytes += a.nbytes
            got = dict(zip(todo, fresh, strict=True))
        else:
            got = {}
        return mx.array(np.stack([self._cache[p] if p in self._cache else got[p] for p in paths]))

    def teacher_features(self, px: mx.array) -> mx.array:
        return self.model.vision_features(px, tower_grad=False)  # the teacher's projector input

    def batch_paths(self, step: int) -> list[Path]:
        """Batch `step` of a seeded reshuffle per epoch: the same order after a resume."""
        n, b = len(self.train_images), self.cfg.batch_size
        out = []
        for pos in range(step * b, step * b + b):
            epoch = pos // n
            if getattr(self, "_perm_epoch", None) != epoch:
                self._perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(n)
                self._perm_epoch = epoch
            out.append(self.train_images[self._perm[pos % n]])
        return out

    # -- init
    def initialise(self) -> None:
        cfg = self.cfg
        calib = self.pixels(self.train_images[: max(cfg.batch_size, 16)] or self.eval_images)
        target = self.teacher_features(calib)
        t = _np(target)
        self.t_var = float(np.mean(np.var(t.reshape(-1, t.shape[-1]), axis=0))) or 1.0
        random_init(self.student, cfg.seed)
        if cfg.init == "teacher":
            energy = channel_energy(self.model.vision_tower, calib, self.depth)
            self.init_notes = init_from_teacher(self.student.tower, self.model.vision_tower, self.depth, energy)
        else:
            self.init_notes = ["random"]
        if "map" in self.student:  # start from the best linear read-out of the initial student
            (h,) = self.student.tower.hidden_states(calib, [-1])
            w, c = fit_map(_np(select_features([h], self.strategy)), t, self.bias)
            self.student.map.linear.weight = mx.array(w)
            if self.bias:
                self.student.map.linear.bias = mx.array(c)
        mx.eval(self.student.parameters())

    # -- evaluation
    def measure(self) -> dict[str, float]:
        """Relative MSE and mean cosine of the student's (mapped) features on the held-out images."""
        tot = {"mse": 0.0, "cosine": 0.0}
        n = 0
        for i in range(0, len(self.eval_images), self.cfg.batch_size):
            px = self.pixels(self.eval_images[i : i + self.cfg.batch_size])
            ls = feature_losses(self.student.features(px, self.strategy), self.teacher_features(px), self.t_var)
            k = px.shape[0]
            tot = {key: tot[key] + k * float(ls[key].item()) for key in tot}
            n += k
        return {"rel_mse": tot["mse"] / n, "cosine": 1.0 - tot["cosine"] / n}

    # -- training
    def train(self, ckpt_dir: Path | None = None) -> None:
        from tqdm import tqdm

        from bonsai_mlx.core.batching import prefetch

        cfg = self.cfg
        if self.step >= cfg.steps:
            return

        def loss_fn(student: Student, px: mx.array, target: mx.array) -> mx.array:
            return objective(feature_losses(student.features(px, self.strategy), target, self.t_var), cfg.loss)

        step_fn = nn.value_and_grad(self.student, loss_fn)

        def batches():
            for s in range(self.step, cfg.steps):
                yield self.pixels(self.batch_paths(s))

        bar = tqdm(total=cfg.steps, initial=self.step, desc="distilling the vision tower", unit="step")
        t0 = time.perf_counter()
        try:
            for px in prefetch(batches()):
                loss, grads = step_fn(self.student, px, self.teacher_features(px))
                self.optimizer.learning_rate = cfg.lr * lr_factor(self.step, cfg.warmup, max(1, cfg.steps))
                self.optimizer.update(self.student, grads)
                mx.eval(loss, self.student.parameters(), self.optimizer.state)
                self.step += 1
                self.history.append({"step": self.step, "loss": float(loss.item())})
                bar.update(1)
                bar.set_postfix(loss=f"{self.history[-1]['loss']:.4f}")
                if (
                    ckpt_dir is not None
                    and cfg.save_every
                    and self.step % cfg.save_every == 0
                    and self.step < cfg.steps
                ):
                    self.save_checkpoint(ckpt_dir)
        finally:
            bar.close()
        self.train_seconds = time.perf_counter() - t0

    # -- checkpoints (resumable)
    def save_checkpoint(self, root: Path) -> Path:
        """`root/step-N` via a temp dir, then `root/latest` names it: a kill never leaves a half checkpoint."""
        from bonsai_mlx.weights import atomic_save_safetensors

        name = f"step-{self.step:07d}"
        runs = RunDir(root)
        tmp = runs.begin(name)
        atomic_save_safetensors(tmp / "student.safetensors", dict(tree_flatten(self.student.parameters())))
        opt = {k: v for k, v in tree_flatten(self.optimizer.state) if isinstance(v, mx.array)}
        atomic_save_safetensors(tmp / "optimizer.safetensors", opt)
        state = {
            "step": self.step,
            "config": asdict(self.cfg),
            "student_vision_config": asdict(self.scfg),
            "t_var": self.t_var,
            "init_notes": self.init_notes,
            "history": self.history,
        }
        return runs.commit(name, state, keep_only_latest=True)

    def load_checkpoint(self, root: Path) -> bool:
        """Continue from `root/latest` if there is one (same student and options, else a one-line error)."""
        from mlx.utils import tree_unflatten

        ck = RunDir(root).latest()
        if ck is None:
            return False
        state = read_state(ck)
        if state["student_vision_config"] != asdict(self.scfg):
            raise UserError(
                f"{ck}: was written for another student ({state['student_vision_config']}); use a new --out"
            )
        check_resume(ck, state["config"], asdict(self.cfg))  # the one resume policy (core/runs.py)
        self.student.load_weights(list(mx.load(str(ck / "student.safetensors")).items()), strict=True)
        self.optimizer.init(self.student.trainable_parameters())
        self.optimizer.state = tree_unflatten(list(mx.load(str(ck / "optimizer.safetensors")).items()))
        self.step, self.t_var = state["step"], state["t_var"]
        self.init_notes, self.history = state["init_notes"], state["history"]
        mx.eval(self.student.parameters(), self.optimizer.state)
        return True

    # -- output
    def write(self, out: Path) -> None:
        """The teacher's LM + the (folded) projector + the student tower, as one standard checkpoint, atomically."""
        from bonsai_mlx import loading

        model, cfg = self.model, copy.deepcopy(self.pcfg)
        cfg.vision = copy.deepcopy(self.scfg)
        cfg.vision_feature_layer = -1  # the student's last layer is the distilled one
        proj = model.multi_modal_projector.linear_1
        if "map" in self.student:
            a = proj.weight.astype(mx.float32)
            m = self.student.map.linear
            folded = nn.Linear(self.scfg.hidden_size, a.shape[0], bias=self.bias)
            folded.weight = a @ m.weight
            if self.bias:
                folded.bias = proj.bias.astype(mx.float32) + a @ m.bias
            model.multi_modal_projector.linear_1 = folded
        model.vision_tower = self.student.tower
        model.vision_tower.config = cfg.vision
        model.config = cfg
        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        loading.save(model, tmp, dtype=loading.stored_dtype(self.teacher_dir), extra_files_from=self.teacher_dir)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)


def tower_parameters(cfg: VisionConfig) -> int:
    return sum(v.size for _, v in tree_flatten(VisionTower(cfg).parameters()))


def distill(cfg: DistillVisionConfig, resume: bool = False) -> dict:
    """Run one distillation and write the checkpoint; returns the report (also written as distill_vision.json)."""
    out = Path(cfg.out)
    ckpt_dir = out.with_name(out.name + ".ckpt")
    run = Run(cfg)
    resumed = resume and run.load_checkpoint(ckpt_dir)
    if resume and not resumed:
        print(f"no checkpoint in {ckpt_dir}: starting afresh", file=sys.stderr)
    if not resumed:
        run.initialise()
    print(f"student init: {'; '.join(run.init_notes)}" + (f" (resumed at step {run.step})" if resumed else ""))
    before = run.measure() if not resumed else None
    run.train(ckpt_dir if cfg.save_every else None)
    after = run.measure()
    n_t, n_s = tower_parameters(run.pcfg.vision), tower_parameters(run.scfg)
    report = {
        "teacher": str(run.teacher_dir),
        "images": {"train": len(run.train_images), "held_out": len(run.eval_images)},
        "teacher_tower_parameters": n_t,
        "student_tower_parameters": n_s,
        "student_vision_config": {k: getattr(run.scfg, k) for k in STUDENT_FIELDS},
        "init": run.init_notes,
        "feature_match_at_init": before,
        "feature_match_final": after,
        "steps": run.step,
        "first_loss": run.history[0]["loss"] if run.history else None,
        "last_loss": run.history[-1]["loss"] if run.history else None,
    }
    run.write(out)
    atomic_write_text(out / "distill_vision.json", json.dumps(report, indent=2) + "\n")
    return report


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bonsai_mlx.distill_vision",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n"
        "  python -m bonsai_mlx.distill_vision --teacher pico/ --images photos/ --layers 6 --out pico-v6/\n"
        "  python -m bonsai_mlx.distill_vision --teacher pico/ --images train.json --image-root img/ \\\n"
        "      --width 512 --steps 2000 --out pico-w512/\n"
        "  python -m bonsai_mlx.distill_vision --teacher pico/ --images img/ \\\n"
        '      --student-config \'{"num_hidden_layers": 6, "hidden_size": 512}\' --out o/\n'
        "Then heal it: python -m bonsai_mlx.train --model pico-v6/ --data train.json --image-root img/ --stage align "
        "--max-steps 300 --out runs/heal && python -m bonsai_mlx.convert fuse pico-v6/ runs/heal pico-v6-healed/",
    )
    add_options(ap, DistillVisionConfig, required=("teacher", "images", "out"))
    ap.add_argument("--resume", action="store_true", help="continue from OUT.ckpt/latest")
    return ap


def main(argv: list[str] | None = None) -> int:
    from bonsai_mlx.core.errors import friendly

    args = parser().parse_args(argv)
    with friendly("distill_vision"):
        cfg = from_args(DistillVisionConfig, args)
        r = distill(cfg, resume=args.resume)
        b, a = r["feature_match_at_init"], r["feature_match_final"]
        print(
            f"vision tower parameters {r['teacher_tower_parameters']:,} -> {r['student_tower_parameters']:,} "
            f"({r['student_tower_parameters'] / r['teacher_tower_parameters']:.1%})"
        )
        if b:
            print(f"held-out feature match at init: relative MSE {b['rel_mse']:.4f}, cosine {b['cosine']:.4f}")
        print(f"held-out feature match now:     relative MSE {a['rel_mse']:.4f}, cosine {a['cosine']:.4f}")
        print(f"wrote {cfg.out}")
        healed = str(cfg.out).rstrip("/") + "-healed/"  # --out pico-v6/ -> pico-v6-healed/, not pico-v6/-healed
        print(
            f"heal it: python -m bonsai_mlx.train --model {cfg.out} --data TRAIN.json --stage align "
            f"--max-steps 300 --out runs/heal && python -m bonsai_mlx.convert fuse {cfg.out} runs/heal {healed}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
