"""Phase II in MLX: L = (1 - a) * CE + a * L_feat against a teacher cache (train_cuda.extract).

L_feat = mean over matched layers of the MSE between the cached (LayerNorm-normalised) teacher
states and LayerNorm(Proj_l(h_student)) at the aligned units, image and text units weighted
equally. `train_cuda.losses` computes the same number in PyTorch (tested).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from bonsai_mlx.core.align import FEAT_LOSSES
from bonsai_mlx.core.batching import Batch
from bonsai_mlx.core.distill_targets import cache_layer_map, check_kl, gather_targets
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.teacher_cache import CacheReader


def ln(x: mx.array, eps: float = 1e-5) -> mx.array:
    mu = x.mean(-1, keepdims=True)
    return (x - mu) * mx.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)


class Aligners(nn.Module):
    """One learnable projector per matched layer (student hidden -> teacher hidden); not exported."""

    def __init__(self, pairs: list[tuple[int, int]], d_student: int, d_teacher: int):
        super().__init__()
        self.pairs = pairs
        self.student_layers = [s for _, s in pairs]
        self.proj = [nn.Linear(d_student, d_teacher) for _ in pairs]


def distance(pred: mx.array, target: mx.array, kind: str = "mse") -> mx.array:
    """MSE, or 1 - cosine similarity per unit (scale-free: only the direction of the states is matched)."""
    if kind == "cosine":
        dot = (pred * target).sum(-1)
        norms = mx.sqrt((pred * pred).sum(-1) * (target * target).sum(-1))
        return (1 - dot / mx.maximum(norms, 1e-8)).mean()
    if kind != "mse":
        raise UserError(f"feature loss must be one of {', '.join(FEAT_LOSSES)}, got {kind!r}")
    return ((pred - target) ** 2).mean()


def feature_loss(aligners: Aligners, states: dict[int, mx.array], d: dict, kind: str = "mse") -> mx.array:
    total = mx.array(0.0)
    for i, (t_layer, s_layer) in enumerate(aligners.pairs):
        h = states[s_layer].reshape(-1, states[s_layer].shape[-1])
        terms = []
        for part in ("text", "image"):
            pos = d.get(f"{part}_pos")
            if pos is None or pos.size == 0:
                continue
            pred = ln(aligners.proj[i](h[pos].astype(mx.float32)))
            terms.append(distance(pred, d[f"{part}_{t_layer}"], kind))
        if terms:
            total = total + sum(terms) / len(terms)
    return total / len(aligners.pairs)


def kl_loss(student_logits: mx.array, topk_logits: mx.array, topk_ids: mx.array, temperature: float = 1.0) -> mx.array:
    """Mean over units of KL(teacher || student) on the teacher's top-k tokens (teacher renormalised over
    them, student's full softmax), times T^2 so gradients keep their scale across temperatures."""
    if topk_ids.size == 0:
        return mx.array(0.0)
    t = topk_logits.astype(mx.float32) / temperature
    log_p = t - mx.logsumexp(t, axis=-1, keepdims=True)
    s = student_logits.astype(mx.float32) / temperature
    log_q = mx.take_along_axis(s - mx.logsumexp(s, axis=-1, keepdims=True), topk_ids, axis=-1)
    return (mx.exp(log_p) * (log_p - log_q)).sum(-1).mean() * temperature**2


def alpha_at(alpha: float, alpha_end: float | None, frac: mx.array | float) -> mx.array | float:
    return alpha if alpha_end is None else alpha + (alpha_end - alpha) * frac


def setup_distill(cfg, model, proc, train):
    """(aligners, loss fn, batch augmenter) for the Trainer; drops samples the cache lacks."""
    if not cfg.teacher_cache:
        raise UserError("--stage distill needs --teacher-cache (made by python -m train_cuda.extract)")
    cache = CacheReader(cfg.teacher_cache, proc.tokenizer, proc.chat_template)
    missing = [e.id for e in train.examples if e.id not in cache]
    if missing:
        print(
            f"distill: {len(missing)} training samples are not in the cache (e.g. {missing[0]}); training without them"
        )
        train.examples = [e for e in train.examples if e.id in cache]
    if cfg.feat_loss not in FEAT_LOSSES:
        raise UserError(f"feat_loss must be one of {', '.join(FEAT_LOSSES)}, got {cfg.feat_loss!r}")
    if cfg.kl:
        check_kl(cache, proc.tokenizer)
    n_student = len(model.language_model.model.layers)
    pairs = cache_layer_map(cfg.layer_map, cache, n_student, model.config.vision.grid)
    aligners = Aligners(pairs, model.config.text.hidden_size, cache.manifest["hidden_size"])
    layers = [t for t, _ in pairs]

    def augment(batch: Batch) -> dict:
        return {
            "distill": {
                k: mx.array(v) for k, v in gather_targets(cache, batch, proc.image_token_id, layers, cfg.kl).items()
            }
        }

    def loss(ce, kept, batch, frac):
        d = batch["distill"]
        feat = feature_loss(aligners, kept, d, cfg.feat_loss)
        a = alpha_at(cfg.alpha, cfg.alpha_end, frac)
        total = (1 - a) * ce + a * feat
        if cfg.kl:
            h = kept["final"].reshape(-1, kept["final"].shape[-1])[d["kl_pos"]]
            total = total + cfg.kl_weight * kl_loss(model.lm_head(h), d["kl_logits"], d["kl_ids"], cfg.kl_temperature)
        return total, ce

    return aligners, loss, augment
