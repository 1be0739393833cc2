"""Phase II in MLX: L = (1 - a) * CE + a * L_feat (+ kl_weight * L_logit) against a teacher cache.

L_feat = mean over matched layers of the MSE between the cached (LayerNorm-normalised) teacher
states and LayerNorm(Proj_l(h_student)) at the aligned units, image and text units weighted
equally. L_logit compares next-token distributions at aligned text units and answer starts in one
of the modes of `bonsai_mlx.core.vocab_map` (same-vocab KL, ULD, shared-vocab KL). `train_cuda.losses`
computes the same numbers in PyTorch (tested).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from bonsai_mlx.core.align import FEAT_LOSSES
from bonsai_mlx.core.batching import Batch
from bonsai_mlx.core.distill_targets import LogitPlan, cache_layer_map, gather_targets, open_teacher_cache, plan_logits
from bonsai_mlx.core.errors import UserError


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


def uld_loss(student_logits: mx.array, topk_logits: mx.array, temperature: float = 1.0) -> mx.array:
    """Universal Logit Distillation: mean over units of the L1 distance (Wasserstein-1 between sorted
    distributions) between the teacher's top-k probabilities (renormalised over its k tokens) and the student's
    k largest probabilities (its full softmax), each sorted in decreasing order. Needs no shared tokens."""
    if topk_logits.shape[0] == 0:
        return mx.array(0.0)
    k = topk_logits.shape[-1]
    p = mx.softmax(topk_logits.astype(mx.float32) / temperature, axis=-1)
    p = -mx.sort(-p, axis=-1)  # the teacher is a constant: no gradient through the sort
    q = mx.softmax(student_logits.astype(mx.float32) / temperature, axis=-1)
    kk = min(k, q.shape[-1])
    top = mx.stop_gradient(mx.argpartition(-q, kth=kk - 1, axis=-1)[:, :kk])
    qk = mx.take_along_axis(q, top, axis=-1)
    qk = mx.take_along_axis(qk, mx.stop_gradient(mx.argsort(-qk, axis=-1)), axis=-1)
    if kk < k:  # a student vocabulary smaller than k: its missing ranks hold no probability
        qk = mx.concatenate([qk, mx.zeros((qk.shape[0], k - kk), qk.dtype)], axis=-1)
    return mx.abs(p - qk).sum(-1).mean()


def shared_kl_loss(
    student_logits: mx.array,
    topk_logits: mx.array,
    student_ids: mx.array,
    shared_ids: mx.array,
    temperature: float = 1.0,
) -> mx.array:
    """KL over the shared sub-vocabulary: the teacher's top-k renormalised over those of its tokens the student
    has (`student_ids` >= 0: their student ids), the student's softmax renormalised over every shared token
    (`shared_ids`); mean over units, times T^2. Units must keep at least one shared token (gather_targets)."""
    if student_ids.shape[0] == 0:
        return mx.array(0.0)
    valid = student_ids >= 0
    t = mx.where(valid, topk_logits.astype(mx.float32) / temperature, -1e9)
    log_p = t - mx.logsumexp(t, axis=-1, keepdims=True)
    s = student_logits.astype(mx.float32) / temperature
    lse = mx.logsumexp(mx.take(s, shared_ids, axis=-1), axis=-1, keepdims=True)
    log_q = mx.take_along_axis(s, mx.maximum(student_ids, 0), axis=-1) - lse
    return mx.where(valid, mx.exp(log_p) * (log_p - log_q), 0.0).sum(-1).mean() * temperature**2


def logit_loss(
    plan: LogitPlan, student_logits: mx.array, d: dict, temperature: float = 1.0, shared_ids: mx.array | None = None
) -> mx.array:
    """The logit term of `plan.mode` on the units `gather_targets` gave (`d`)."""
    if plan.mode == "uld":
        return uld_loss(student_logits, d["kl_logits"], temperature)
    if plan.mode == "shared-vocab":
        return shared_kl_loss(student_logits, d["kl_logits"], d["kl_sids"], shared_ids, temperature)
    return kl_loss(student_logits, d["kl_logits"], d["kl_ids"], temperature)


def alpha_at(alpha: float, alpha_end: float | None, frac: mx.array | float) -> mx.array | float:
    return alpha if alpha_end is None else alpha + (alpha_end - alpha) * frac


def setup_distill(cfg, model, proc, train):
    """(aligners, loss fn, batch augmenter) for the Trainer; drops samples the cache lacks."""
    if not cfg.teacher_cache:
        raise UserError("--stage distill needs --teacher-cache (made by python -m train_cuda.extract)")
    cache, train.examples = open_teacher_cache(cfg, proc, train.examples)
    if cfg.feat_loss not in FEAT_LOSSES:
        raise UserError(f"feat_loss must be one of {', '.join(FEAT_LOSSES)}, got {cfg.feat_loss!r}")
    plan = None
    if cfg.kl or cfg.kl_mode != "auto":  # naming a mode asks for the logit term too
        plan = plan_logits(cache, proc.tokenizer, cfg.kl_mode)
        print("distill: " + plan.describe())
    shared_ids = mx.array(plan.normaliser_ids) if plan is not None and plan.shared is not None else None
    n_student = len(model.language_model.model.layers)
    pairs = cache_layer_map(cfg.layer_map, cache, n_student, model.config.vision.grid)
    aligners = Aligners(pairs, model.config.text.hidden_size, cache.manifest["hidden_size"])
    layers = [t for t, _ in pairs]

    def augment(batch: Batch) -> dict:
        return {
            "distill": {
                k: mx.array(v) for k, v in gather_targets(cache, batch, proc.image_token_id, layers, plan).items()
            }
        }

    def loss(ce, kept, batch, frac):
        d = batch["distill"]
        feat = feature_loss(aligners, kept, d, cfg.feat_loss)
        a = alpha_at(cfg.alpha, cfg.alpha_end, frac)
        total = (1 - a) * ce + a * feat
        parts = {"ce": ce, "feat": feat}
        if plan is not None:
            h = kept["final"].reshape(-1, kept["final"].shape[-1])[d["kl_pos"]]
            kl = logit_loss(plan, model.lm_head(h), d, cfg.kl_temperature, shared_ids)
            total = total + cfg.kl_weight * kl
            parts["kl"] = kl
            if "kl_coverage" in d:
                parts["kl_coverage"] = d["kl_coverage"]
        return total, parts

    return aligners, loss, augment
