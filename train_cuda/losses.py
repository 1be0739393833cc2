"""The distillation loss in PyTorch: the same definition and numbers as `bonsai_mlx.distill`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bonsai_mlx.core.align import FEAT_LOSSES


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
        raise ValueError(f"feature loss must be one of {', '.join(FEAT_LOSSES)}, got {kind!r}")
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


def distill_loss(
    ce: torch.Tensor, feat: torch.Tensor, alpha: float, alpha_end: float | None, frac: float
) -> torch.Tensor:
    a = alpha if alpha_end is None else alpha + (alpha_end - alpha) * frac
    return (1 - a) * ce + a * feat
