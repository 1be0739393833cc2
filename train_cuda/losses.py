"""The distillation loss in PyTorch: the same definitions and numbers as `bonsai_mlx.distill` (feature loss and
the logit losses of every `--kl-mode`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bonsai_mlx.core.align import FEAT_LOSSES
from bonsai_mlx.core.errors import UserError


class Aligners(nn.Module):
    def __init__(self, pairs: list[tuple[int, int]], d_student: int, d_teacher: int):
        super().__init__()
        self.pairs = pairs
        self.student_layers = [s for _, s in pairs]
        self.proj = nn.ModuleList(nn.Linear(d_student, d_teacher) for _ in pairs)


def distance(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    if kind == "cosine":
        dot = (pred * target).sum(-1)
        norms = torch.sqrt((pred * pred).sum(-1) * (target * target).sum(-1))
        return (1 - dot / norms.clamp_min(1e-8)).mean()
    if kind != "mse":
        raise UserError(f"feature loss must be one of {', '.join(FEAT_LOSSES)}, got {kind!r}")
    return ((pred - target) ** 2).mean()


def feature_loss(aligners: Aligners, states: dict[int, torch.Tensor], d: dict, kind: str = "mse") -> torch.Tensor:
    """Mean over matched layers of MSE (or 1 - cosine) between the teacher and LayerNorm(Proj(h_student)),
    text and image units equally."""
    total = 0.0
    for i, (t_layer, s_layer) in enumerate(aligners.pairs):
        h = states[s_layer].reshape(-1, states[s_layer].shape[-1])
        terms = []
        for part in ("text", "image"):
            pos = d.get(f"{part}_pos")
            if pos is None or pos.numel() == 0:
                continue
            x = aligners.proj[i](h[pos].float())
            pred = F.layer_norm(x, x.shape[-1:], eps=1e-5)
            terms.append(distance(pred, d[f"{part}_{t_layer}"].float(), kind))
        if terms:
            total = total + sum(terms) / len(terms)
    return total / len(aligners.pairs)


def ce_at(logits_fn, h: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy computing the LM head only at supervised positions."""
    hs = h.reshape(-1, h.shape[-1])[positions]
    return F.cross_entropy(logits_fn(hs).float(), targets, reduction="mean")


def kl_loss(
    student_logits: torch.Tensor, topk_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(teacher top-k renormalised || student full softmax) at the same ids, mean over units, times T^2."""
    if topk_ids.numel() == 0:
        return student_logits.sum() * 0.0
    log_p = F.log_softmax(topk_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, topk_ids.long())
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature**2


def uld_loss(student_logits: torch.Tensor, topk_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ULD: mean L1 between the teacher's top-k probabilities (renormalised over its k) and the student's k largest
    (full softmax), each sorted in decreasing order (Wasserstein-1 of sorted distributions)."""
    if topk_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    k = topk_logits.shape[-1]
    p = F.softmax(topk_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    q = F.softmax(student_logits.float() / temperature, dim=-1)
    qk = q.topk(min(k, q.shape[-1]), dim=-1).values  # sorted, differentiable
    if qk.shape[-1] < k:  # a student vocabulary smaller than k: its missing ranks hold no probability
        qk = F.pad(qk, (0, k - qk.shape[-1]))
    return (p - qk).abs().sum(-1).mean()


def shared_kl_loss(
    student_logits: torch.Tensor,
    topk_logits: torch.Tensor,
    student_ids: torch.Tensor,
    shared_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL over the shared sub-vocabulary: teacher top-k renormalised over its tokens the student has
    (`student_ids` >= 0), student softmax renormalised over all shared tokens (`shared_ids`); mean, times T^2."""
    if student_ids.shape[0] == 0:
        return student_logits.sum() * 0.0
    valid = student_ids >= 0
    t = torch.where(valid, topk_logits.float() / temperature, torch.full_like(topk_logits.float(), -1e9))
    log_p = F.log_softmax(t, dim=-1)
    s = student_logits.float() / temperature
    lse = torch.logsumexp(s.index_select(-1, shared_ids.long()), dim=-1, keepdim=True)
    log_q = s.gather(-1, student_ids.long().clamp_min(0)) - lse
    kl = torch.where(valid, log_p.exp() * (log_p - log_q), torch.zeros_like(log_p))
    return kl.sum(-1).mean() * temperature**2


def logit_loss(
    mode: str, student_logits: torch.Tensor, d: dict, temperature: float = 1.0, shared_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """The logit term of `mode` (a `LogitPlan.mode`) on the units `gather_targets` gave (`d`)."""
    if mode == "uld":
        return uld_loss(student_logits, d["kl_logits"], temperature)
    if mode == "shared-vocab":
        return shared_kl_loss(student_logits, d["kl_logits"], d["kl_sids"], shared_ids, temperature)
    return kl_loss(student_logits, d["kl_logits"], d["kl_ids"], temperature)


def distill_loss(
    ce: torch.Tensor, feat: torch.Tensor, alpha: float, alpha_end: float | None, frac: float
) -> torch.Tensor:
    a = alpha if alpha_end is None else alpha + (alpha_end - alpha) * frac
    return (1 - a) * ce + a * feat


class StudentStep(nn.Module):
    """The student (peft model) and its aligners as one module whose forward returns the losses: what
    accelerate prepares, so DDP sees (and all-reduces) every trainable, aligners included."""

    def __init__(self, model, aligners, cfg, image_token_id: int, cache, plan=None):
        """`cfg`: the run's TrainConfig (its distillation options), or None for plain SFT."""
        super().__init__()
        self.model, self.aligners = model, aligners
        self.a, self.image_token_id, self.cache = cfg, image_token_id, cache
        self.keep = sorted({s for _, s in aligners.pairs}) if aligners is not None else []
        if plan is None and cfg is not None and cfg.kl:
            from bonsai_mlx.core.distill_targets import LogitPlan

            plan = LogitPlan("same-vocab", "the vocabularies are shared")
        self.plan = plan  # the logit loss (bonsai_mlx.core.distill_targets.LogitPlan), None: no logit term
        shared = plan.normaliser_ids if plan is not None and plan.shared is not None else np.zeros(0, np.int64)
        self.register_buffer("shared_ids", torch.tensor(shared, dtype=torch.long), persistent=False)

    def forward(self, input_ids, positions, targets, batch, frac: float = 0.0, pixel_values=None, cache=None) -> dict:
        """`cache`: this batch's targets from an online teacher (train_cuda.online_teacher), else the run's cache."""
        from bonsai_mlx.core.distill_targets import gather_targets

        llava = self.model.base_model.model  # LlavaForConditionalGeneration (LoRA layers inside)
        kw = {"pixel_values": pixel_values.to(llava.dtype)} if pixel_values is not None else {}
        # no attention mask: right padding under the causal mask needs none (and SDPA keeps its flash kernel)
        o = llava.model(input_ids=input_ids, output_hidden_states=bool(self.keep), **kw)
        h = o.last_hidden_state
        ce = ce_at(llava.lm_head, h, positions, targets)
        if pixel_values is None:
            # a text-only micro-batch: the projector is in the graph with zero gradient, as DDP expects every
            # trainable to get one (LLaVA-665k holds ~40k text-only records)
            ce = ce + 0.0 * sum(p.sum() for p in llava.model.multi_modal_projector.parameters())
        parts = {"loss": ce, "ce": ce}
        if self.aligners is None:
            return parts
        a, dev = self.a, input_ids.device
        layers = [t for t, _ in self.aligners.pairs]
        d = {
            k: torch.tensor(v, device=dev)
            for k, v in gather_targets(cache or self.cache, batch, self.image_token_id, layers, self.plan).items()
        }
        for k in ("text_pos", "image_pos", "kl_pos"):
            if k in d:
                d[k] = d[k].long()
        feat = feature_loss(self.aligners, {s: o.hidden_states[s] for s in self.keep}, d, a.feat_loss)
        # every aligner in the graph even when a batch has no units for it (DDP expects all gradients)
        feat = feat + 0.0 * sum(p.sum() for p in self.aligners.parameters())
        loss = distill_loss(ce, feat, a.alpha, a.alpha_end, frac)
        parts["feat"] = feat
        if self.plan is not None:
            hk = h.reshape(-1, h.shape[-1])[d["kl_pos"]]
            kl = logit_loss(self.plan.mode, llava.lm_head(hk), d, a.kl_temperature, self.shared_ids)
            loss = loss + a.kl_weight * kl
            parts["kl"] = kl
            if "kl_coverage" in d:
                parts["kl_coverage"] = d["kl_coverage"]
        parts["loss"] = loss
        return parts
