"""What the teacher cache gives a training batch: the layer map, the aligned units' targets, and which logit
loss a run uses (`plan_logits`: same-vocab KL, ULD or shared-vocab KL, with the token map and its coverage).

Plain numpy, shared by `bonsai_mlx.distill` (MLX) and `train_cuda.trainer` (PyTorch).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bonsai_mlx.core.batching import Batch
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.teacher_cache import CacheReader, vocab_fingerprint
from bonsai_mlx.core.vocab_map import SharedVocab, build_shared_vocab, choose_kl_mode, fallback_ids, token_bytes


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
    cache: CacheReader,
    batch: Batch,
    image_token_id: int,
    layers: list[int],
    kl: bool | LogitPlan = False,
) -> dict[str, np.ndarray]:
    """Flat batch positions of the aligned units and their teacher targets, for one collated batch.

    With `kl` (a `LogitPlan`; True means same-vocab): the teacher's top-k at the units that mode uses ("kl_pos",
    "kl_ids", "kl_logits"); shared-vocab adds the student ids of the teacher's tokens ("kl_sids", -1: not
    shared), keeps only units with some shared mass, and "kl_coverage" (mean top-k mass kept)."""
    plan = LogitPlan("same-vocab", "") if kl is True else (kl or None)
    B, L = batch.input_ids.shape
    tpos, ipos, kpos, kids, klog, kstrip = [], [], [], [], [], []
    tt = {t: [] for t in layers}
    it = {t: [] for t in layers}
    for b, sid in enumerate(batch.ids):
        e = cache.get(sid)
        keep = [k for k, p in enumerate(e.text_student_pos) if p < L]
        tpos += [b * L + e.text_student_pos[k] for k in keep]
        if plan is not None and e.topk_ids is not None:
            at = e.logit_student_pos()
            use = range(len(at))
            if plan.mode == "same-vocab" and e.same_next is not None:
                use = e.same_next  # ids compare only where the next token is the same in both tokenizations
            ok = [j for j in use if at[j] < L]
            kpos += [b * L + at[j] for j in ok]
            strip = set(e.strip_space)
            kstrip += [j in strip for j in ok]
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
    if plan is not None:
        k = max(cache.logits_topk, 1)
        out["kl_pos"] = np.asarray(kpos, np.int32)
        out["kl_ids"] = np.concatenate(kids).astype(np.int32) if kpos else np.zeros((0, k), np.int32)
        out["kl_logits"] = np.concatenate(klog).astype(np.float32) if kpos else np.zeros((0, k), np.float32)
        if plan.mode == "shared-vocab":
            sids = plan.student_ids(out["kl_ids"], np.asarray(kstrip, bool))
            p = np.exp(out["kl_logits"] - out["kl_logits"].max(-1, keepdims=True))
            kept = (p * (sids >= 0)).sum(-1) / p.sum(-1)
            out["kl_coverage"] = np.asarray(kept.mean() if len(kept) else 0.0, np.float32)
            rows = kept > 0  # a unit none of whose top-k tokens the student has tells the student nothing here
            for key in ("kl_pos", "kl_ids", "kl_logits"):
                out[key] = out[key][rows]
            out["kl_sids"] = sids[rows]
    for t in layers:
        out[f"text_{t}"] = np.concatenate(tt[t]).astype(np.float32) if tpos else np.zeros((0, 1), np.float32)
        out[f"image_{t}"] = np.concatenate(it[t]).astype(np.float32) if ipos else np.zeros((0, 1), np.float32)
    return out


@dataclass
class LogitPlan:
    """Which logit loss a run uses, why, and for shared-vocab the token map and its coverage."""

    mode: str  # one of vocab_map.KL_MODES other than "auto"
    why: str
    shared: SharedVocab | None = None
    coverage: float | None = None  # teacher top-k mass on shared tokens, mean over the cache's first units
    topk_mass: float | None = None  # teacher probability mass its stored top-k hold (format-3 caches)
    # at answer starts whose teacher token carries the template's space: teacher strings less that space
    shared_strip: SharedVocab | None = None

    def student_ids(self, teacher_ids: np.ndarray, strip: np.ndarray | None = None) -> np.ndarray:
        """Student ids of the teacher's top-k tokens (-1: not shared); rows flagged `strip` compare the teacher's
        strings without their leading space."""
        out = self.shared.student_of(teacher_ids)
        if strip is not None and strip.any() and self.shared_strip is not None:
            out[strip] = self.shared_strip.student_of(teacher_ids[strip])
        return out

    @property
    def normaliser_ids(self) -> np.ndarray:
        """The student tokens its distribution is renormalised over: every shared one."""
        parts = [v.student_ids for v in (self.shared, self.shared_strip) if v is not None]
        return np.unique(np.concatenate(parts)).astype(np.int32) if parts else np.zeros(0, np.int32)

    def describe(self) -> str:
        line = f"logit loss: {self.mode} ({self.why})"
        if self.shared is not None:
            line += (
                f"; {len(self.shared):,} shared tokens ({self.shared.coverage:.1%} of the teacher's text tokens), "
                f"coverage {self.coverage:.1%} of the teacher's top-k mass"
            )
            if self.topk_mass is not None:
                line += f" (the top-k hold {self.topk_mass:.1%} of its whole distribution)"
        return line


def plan_logits(cache: CacheReader, student_tokenizer, requested: str = "auto", sample: int = 64) -> LogitPlan:
    """The logit loss for `--kl-mode requested` on this cache and student: refuses what cannot work (no logits in
    the cache; same-vocab ids across two vocabularies), and for `auto` picks one, saying why."""
    if not cache.logits_topk:
        if str(cache.root).startswith("online teacher"):  # train_cuda.online_teacher: nothing was extracted
            raise UserError(f"--kl: the {cache.root} keeps no logits; add --logits-topk K")
        raise UserError(f"--kl: {cache.root} holds no teacher logits; re-extract it with --logits-topk K")
    same = cache.manifest.get("teacher_vocab") == vocab_fingerprint(student_tokenizer)
    vocab = cache.teacher_tokens()
    plan = LogitPlan("uld", "")
    if vocab is not None and (not same or requested == "shared-vocab"):
        tokens, fallback = vocab
        s_tokens, s_fallback = token_bytes(student_tokenizer), fallback_ids(student_tokenizer)
        plan.shared = build_shared_vocab(tokens, s_tokens, fallback, s_fallback)
        stripped = [b[1:] if b is not None and b.startswith(b" ") else None for b in tokens]
        plan.shared_strip = build_shared_vocab(stripped, s_tokens, fallback, s_fallback)
        end = (cache.manifest.get("logits") or {}).get("end_of_turn")
        if end and tokens[end[0]] is None and s_tokens[end[1]] is None:  # both templates' end of an answer
            plan.shared = plan.shared.with_pair(end[0], end[1])
        plan.coverage, plan.topk_mass = _coverage(cache, plan, sample)
    plan.mode, plan.why = choose_kl_mode(requested, same, plan.coverage)
    if plan.mode != "shared-vocab":
        plan.shared = plan.shared_strip = None
    return plan


def _coverage(cache: CacheReader, plan: LogitPlan, sample: int) -> tuple[float, float | None]:
    """(mean top-k mass on shared tokens, mean share of the whole distribution the top-k hold) over the logit
    units of the first `sample` cached samples."""
    ids, logits, lse, strip = [], [], [], []
    for sid in list(cache.where)[:sample]:
        e = cache.get(sid)
        if e.topk_ids is not None and len(e.topk_ids):
            ids.append(e.topk_ids)
            logits.append(e.topk_logits.astype(np.float64))
            lse.append(e.topk_lse)
            strip.append(np.isin(np.arange(len(e.topk_ids)), e.strip_space))
    if not ids:
        return 0.0, None
    ids, logits = np.concatenate(ids), np.concatenate(logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    kept = float(((p * (plan.student_ids(ids, np.concatenate(strip)) >= 0)).sum(-1) / p.sum(-1)).mean())
    mass = None
    if all(x is not None for x in lse):
        mass = float(np.exp(logits - np.concatenate(lse)[:, None]).sum(-1).mean())
    return kept, mass


def open_teacher_cache(cfg, proc, examples: list, log=print):
    """Both trainers' way into a cache: open it, refuse one made from other data, another image root or edited
    records (one line), and keep only the samples it holds. Returns (cache, the examples to train on)."""
    from bonsai_mlx.core.teacher_cache import CacheReader

    cache = CacheReader(cfg.teacher_cache, proc.tokenizer, proc.chat_template)
    note = cache.check_data(cfg.data, cfg.image_root)
    if note:
        log("distill: " + note)
    cache.check_samples((e.id, e.ids) for e in examples)
    missing = [e.id for e in examples if e.id not in cache]
    if missing:
        log(f"distill: {len(missing)} training samples are not in the cache (e.g. {missing[0]}); training without them")
    return cache, [e for e in examples if e.id in cache]
