"""The training forward pass and the cross-entropy at supervised positions only (chunked LM head)."""

from __future__ import annotations

import mlx.core as mx

from bonsai_mlx.core.batching import Batch
from bonsai_mlx.model import Pico


def ce_at(
    model: Pico,
    h: mx.array,
    positions: mx.array,
    targets: mx.array,
    chunk: int = 1024,
    weights: mx.array | None = None,
) -> mx.array:
    """Summed cross-entropy, computing the LM head only at supervised positions, in chunks. `weights` (0 or 1 per
    position) lets a compiled step pad the positions to a fixed count."""
    hs = h.reshape(-1, h.shape[-1])[positions]
    # a quantized head is dequantized once per loss (CPU), or run as the fused quantized matmul (GPUs)
    w = model.head_dequantized(min(chunk, hs.shape[0]))
    total = mx.array(0.0)
    for i in range(0, hs.shape[0], chunk):
        logits = model.lm_head(hs[i : i + chunk], w).astype(mx.float32)
        t = targets[i : i + chunk]
        nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        total = total + (nll if weights is None else nll * weights[i : i + chunk]).sum()
    return total


def forward_states(
    model: Pico, batch: dict, train_vision: bool, checkpoint: bool, keep=(), check: bool = True
) -> tuple[mx.array, dict]:
    pv = batch.get("pixel_values")
    feats = model.image_features(pv, tower_grad=train_vision) if pv is not None else None
    return model.run_layers(model.embed(batch["input_ids"], feats, check), checkpoint=checkpoint, keep=keep)


def to_mx(b: Batch) -> dict:
    return {
        "input_ids": mx.array(b.input_ids),
        "positions": mx.array(b.positions),
        "targets": mx.array(b.targets),
        "pixel_values": mx.array(b.pixel_values) if b.pixel_values is not None else None,
    }
