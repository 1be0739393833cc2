"""What the teacher cache gives a training batch: the layer map, the aligned units' targets, the KL checks.

Plain numpy, shared by `bonsai_mlx.distill` (MLX) and `train_cuda.trainer` (PyTorch).
"""

from __future__ import annotations

import numpy as np

from bonsai_mlx.core.batching import Batch
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.teacher_cache import CacheReader, vocab_fingerprint


def parse_layer_map(
    spec: str | None, teacher_layers: list[int], n_student: int, n_teacher: int | None = None
) -> list[tuple[int, int]]:
    """ "-1:-1,16:12" -> [(-1, -1), (16, 12)]; default: each cached teacher layer to the same relative depth.

    Indices are `hidden_states` indices (0 = embeddings, n = last layer, negative from the end). Without the
    teacher's depth `n_teacher` (caches from before it was recorded) only -1 can be matched by default."""
    if spec:
        pairs = [tuple(int(x) for x in p.split(":")) for p in spec.split(",")]
    else:
        pairs = []
        for t in teacher_layers:
            if t == -1:
                pairs.append((t, -1))
            elif not n_teacher:
                raise UserError(
                    f"teacher layer {t}: the cache does not record the teacher's depth, so its relative depth is "
                    "unknown; name the pairs with --layer-map (e.g. -1:-1,16:12) or re-extract the cache"
                )
            else:
                at = t if t >= 0 else n_teacher + 1 + t
                pairs.append((t, round(at / n_teacher * n_student)))
    missing = [t for t, _ in pairs if t not in teacher_layers]
    if missing:
        raise UserError(f"--layer-map names teacher layer {missing[0]}, but the cache holds {teacher_layers}")
    return pairs


def cache_layer_map(
    spec: str | None, cache: CacheReader, n_student: int, student_grid: int | None = None
) -> list[tuple[int, int]]:
    """The layer map both trainers use: `spec`, else relative depth from the teacher depth the cache records.
    With `student_grid`, also refuses a cache whose image targets were pooled for another patch grid."""
    made_for = cache.manifest.get("student_grid")
    if student_grid is not None and made_for is not None and made_for != student_grid:
        raise UserError(
            f"{cache.root}: image targets were pooled onto a {made_for}x{made_for} student grid, this student has "
            f"{student_grid}x{student_grid}; re-extract with --student-tokenizer for this model"
        )
    return parse_layer_map(spec, cache.layers, n_student, cache.manifest.get("teacher_layers"))


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
            for t in layers:  # the cache holds every student patch; a "default" student drops patch 0
                it[t].append(e.image[t][len(e.image[t]) - len(img) :])
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
    if cache.manifest.get("teacher_vocab") != vocab_fingerprint(student_tokenizer):
        raise UserError(
            f"--kl: the teacher ({cache.manifest['teacher']}) and the student do not share a vocabulary, so their "
            "next-token distributions cannot be compared; distil with the feature loss alone (drop --kl)"
        )
    if not cache.manifest.get("kl_topk"):
        raise UserError(f"--kl: {cache.root} holds no teacher logits; re-extract it with --kl-topk K")
