"""Phase II in MLX: L = (1 - a) * CE + a * L_feat against a teacher cache (train_cuda.extract).

L_feat = mean over matched layers of the MSE between the cached (LayerNorm-normalised) teacher
states and LayerNorm(Proj_l(h_student)) at the aligned units, image and text units weighted
equally. `train_cuda.losses` computes the same number in PyTorch (tested).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from bonsai_mlx.align import FEAT_LOSSES
from bonsai_mlx.data import Batch
from bonsai_mlx.teacher_cache import CacheReader


def parse_layer_map(
    spec: str | None, teacher_layers: list[int], n_student: int, n_teacher: int | None = None
) -> list[tuple[int, int]]:
    """ "-1:-1,16:12" -> [(-1, -1), (16, 12)]; default: each cached teacher layer to the same relative depth."""
    if spec:
        pairs = [tuple(int(x) for x in p.split(":")) for p in spec.split(",")]
    else:
        pairs = []
        for t in teacher_layers:
            if t < 0 or not n_teacher:
                pairs.append((t, t if t < 0 else min(t, n_student)))
            else:
                pairs.append((t, round(t / n_teacher * n_student)))
    missing = [t for t, _ in pairs if t not in teacher_layers]
    if missing:
        raise ValueError(f"--layer-map names teacher layer {missing[0]}, but the cache holds {teacher_layers}")
    return pairs


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
        raise ValueError(f"feature loss must be one of {', '.join(FEAT_LOSSES)}, got {kind!r}")
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


def gather_targets(
    cache: CacheReader, batch: Batch, image_token_id: int, layers: list[int], kl: bool = False
) -> dict[str, np.ndarray]:
    """Flat batch positions of the aligned units and their teacher targets, for one collated batch."""
    B, L = batch.input_ids.shape
    tpos, ipos, kpos, kids, klog = [], [], [], [], []
    tt = {t: [] for t in layers}
    it = {t: [] for t in layers}
    for b, sid in enumerate(batch.ids):
        e = cache.get(sid)
        keep = [k for k, p in enumerate(e.text_student_pos) if p < L]
        tpos += [b * L + e.text_student_pos[k] for k in keep]
        if kl and e.topk_ids is not None:
            ok = [j for j, k in enumerate(e.kl_units) if e.text_student_pos[k] < L]
            kpos += [b * L + e.text_student_pos[e.kl_units[j]] for j in ok]
            kids.append(e.topk_ids[ok])
            klog.append(e.topk_logits[ok])
        for t in layers:
            tt[t].append(e.text[t][keep])
        if e.image:
            img = np.nonzero(batch.input_ids[b] == image_token_id)[0]
            ipos += list(b * L + img)
            for t in layers:
                it[t].append(e.image[t][: len(img)])
    out = {"text_pos": np.asarray(tpos, np.int32), "image_pos": np.asarray(ipos, np.int32)}
    if kl:
        k = int(cache.manifest.get("kl_topk", 1))
        out["kl_pos"] = np.asarray(kpos, np.int32)
        out["kl_ids"] = np.concatenate(kids).astype(np.int32) if kpos else np.zeros((0, k), np.int32)
        out["kl_logits"] = np.concatenate(klog).astype(np.float32) if kpos else np.zeros((0, k), np.float32)
    for t in layers:
        out[f"text_{t}"] = np.concatenate(tt[t]).astype(np.float32) if tpos else np.zeros((0, 1), np.float32)
        out[f"image_{t}"] = np.concatenate(it[t]).astype(np.float32) if ipos else np.zeros((0, 1), np.float32)
    return out


def check_kl(cache: CacheReader, student_tokenizer) -> None:
    """--kl needs a shared vocabulary and a cache that holds the teacher's logits; say which is missing."""
    from bonsai_mlx.teacher_cache import vocab_fingerprint

    if cache.manifest.get("teacher_vocab") != vocab_fingerprint(student_tokenizer):
        raise ValueError(
            f"--kl: the teacher ({cache.manifest['teacher']}) and the student do not share a vocabulary, so their "
            "next-token distributions cannot be compared; distil with the feature loss alone (drop --kl)"
        )
    if not cache.manifest.get("kl_topk"):
        raise ValueError(f"--kl: {cache.root} holds no teacher logits; re-extract it with --kl-topk K")


def setup_distill(cfg, model, proc, train):
    """(aligners, loss fn, batch augmenter) for the Trainer; drops samples the cache lacks."""
    if not cfg.teacher_cache:
        raise ValueError("--stage distill needs --teacher-cache (made by python -m train_cuda.extract)")
    cache = CacheReader(cfg.teacher_cache, proc.tokenizer)
    missing = [e.id for e in train.examples if e.id not in cache]
    if missing:
        print(
            f"distill: {len(missing)} training samples are not in the cache (e.g. {missing[0]}); training without them"
        )
        train.examples = [e for e in train.examples if e.id in cache]
    if cfg.feat_loss not in FEAT_LOSSES:
        raise ValueError(f"feat_loss must be one of {', '.join(FEAT_LOSSES)}, got {cfg.feat_loss!r}")
    if cfg.kl:
        check_kl(cache, proc.tokenizer)
    n_student = len(model.language_model.model.layers)
    pairs = parse_layer_map(cfg.layer_map, cache.layers, n_student)
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
