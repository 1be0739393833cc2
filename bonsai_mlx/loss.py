"""The training forward pass and the cross-entropy at supervised positions only (chunked LM head)."""

from __future__ import annotations

import mlx.core as mx

from bonsai_mlx.core.batching import Batch
from bonsai_mlx.model import Pico


def ce_at(model: Pico, h: mx.array, positions: mx.array, targets: mx.array, chunk: int = 1024) -> mx.array:
    """Summed cross-entropy, computing the LM head only at supervised positions, in chunks."""
    hs = h.reshape(-1, h.shape[-1])[positions]
    # a quantized head is dequantized once per loss (CPU), or run as the fused quantized matmul (GPUs)
    w = model.head_dequantized(min(chunk, hs.shape[0]))
    total = mx.array(0.0)
    for i in range(0, hs.shape[0], chunk):
        logits = model.lm_head(hs[i : i + chunk], w).astype(mx.float32)
        t = targets[i : i + chunk]
        total = total + (mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, t[:, None], axis=-1)[:, 0]).sum()
    return total


def forward_states(model: Pico, batch: dict, train_vision: bool, checkpoint: bool, keep=()) -> tuple[mx.array, dict]:
    feats = None
    if batch.get("pixel_values") is not None:
        pv = batch["pixel_values"]
        if train_vision:
            feats = model.image_features(pv)
        else:
            cfg = model.config
            layers = (
                [cfg.vision_feature_layer]
                if isinstance(cfg.vision_feature_layer, int)
                else list(cfg.vision_feature_layer)
            )
            hs = [mx.stop_gradient(x) for x in model.vision_tower.hidden_states(pv, layers)]
            if cfg.vision_feature_select_strategy == "default":
                hs = [x[:, 1:] for x in hs]
            feats = model.multi_modal_projector(hs[0] if len(hs) == 1 else mx.concatenate(hs, axis=-1))
    return model.run_layers(model.embed(batch["input_ids"], feats), checkpoint=checkpoint, keep=keep)


def to_mx(b: Batch) -> dict:
    return {
        "input_ids": mx.array(b.input_ids),
        "positions": mx.array(b.positions),
        "targets": mx.array(b.targets),
        "pixel_values": mx.array(b.pixel_values) if b.pixel_values is not None else None,
    }
