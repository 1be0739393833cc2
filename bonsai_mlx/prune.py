"""python -m bonsai_mlx.prune: structured pruning of Pico's LM that still yields a standard checkpoint.

Removes whole MLP channels (the same rows of gate/up and columns of down) and whole KV groups of
attention heads (a key/value head with all the query heads that share it, so GQA stays valid). The
same number go from every layer, since the config has one `intermediate_size` and one head count;
which ones go is chosen per layer by importance: with calibration data, the energy each channel
or head group sends into the residual stream (E[x_c^2] * ||W_out[:, c]||^2 at the input of
down_proj / o_proj); without it, a weight-norm proxy. The result loads in transformers and
bonsai_mlx, can be LoRA-healed with `bonsai_mlx.train` and quantized with `convert to-mlx`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from tqdm import tqdm

from bonsai_mlx.core.cli import add_options, from_args, opt
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.model import Pico


@dataclass
class PruneConfig:
    mlp_keep: float = opt(0.75, "share of MLP channels kept per layer")
    heads_keep: float = opt(0.75, "share of KV head groups kept per layer")
    # a multiple of the quantization group, where it can be
    multiple_of: int = opt(64, "round the kept MLP width to a multiple of this")
    calib: str | None = opt(None, "LLaVA JSON for activation-based importance (default: weight norms)")
    image_root: str | None = opt(None, "folder the calibration records' images are relative to")
    calib_samples: int = opt(128, "calibration records used")
    batch_size: int = opt(8, "calibration batch size")

    def __post_init__(self) -> None:
        for name, v in (("--mlp-keep", self.mlp_keep), ("--heads-keep", self.heads_keep)):
            if not 0.0 < v <= 1.0:
                raise UserError(f"{name} must be in (0, 1], got {v}")


class _Energy(nn.Module):
    """Wraps a Linear and accumulates sum(x^2) per input channel of what flows into it."""

    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner
        self.sq = mx.zeros((inner.weight.shape[1],))
        self.n = 0

    def __call__(self, x: mx.array) -> mx.array:
        flat = x.reshape(-1, x.shape[-1]).astype(mx.float32)
        self.sq = self.sq + (flat * flat).sum(axis=0)
        self.n += flat.shape[0]
        return self.inner(x)


def kept_counts(cfg: PruneConfig, intermediate: int, n_kv: int) -> tuple[int, int]:
    """(MLP channels, KV groups) to keep per layer; keep 1.0 keeps everything."""
    width = intermediate if cfg.mlp_keep >= 1.0 else round(intermediate * cfg.mlp_keep)
    m = cfg.multiple_of
    if width < intermediate and m and width >= m and max(m, round(width / m) * m) < intermediate:
        width = max(m, round(width / m) * m)  # whole quantization groups, unless that would prune nothing
    groups = n_kv if cfg.heads_keep >= 1.0 else max(1, round(n_kv * cfg.heads_keep))
    return width, groups


def weight_scores(model: Pico) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Calibration-free proxy: a channel matters as |gate_c| |up_c| |down_c|; a head group as |v| |o|."""
    mlp, heads = [], []
    for layer in model.language_model.layers:
        m, a = layer.mlp, layer.self_attn
        norm = lambda w, ax: np.linalg.norm(np.array(w.astype(mx.float32)), axis=ax)  # noqa: E731
        mlp.append((norm(m.gate_proj.weight, 1) * norm(m.up_proj.weight, 1) * norm(m.down_proj.weight, 0)) ** 2)
        v = norm(a.v_proj.weight, 1) ** 2  # per output row
        o = norm(a.o_proj.weight, 0) ** 2  # per input column
        g = a.n_heads // a.n_kv_heads
        hd = a.o_proj.weight.shape[1] // a.n_heads
        heads.append(v.reshape(a.n_kv_heads, hd).sum(1) * o.reshape(a.n_kv_heads, g * hd).sum(1))
    return mlp, heads


def calibration_scores(model: Pico, proc, records: list[dict], image_root: str | None, batch_size: int):
    """Energy into the residual stream per MLP channel and per KV group, measured on real inputs."""
    from bonsai_mlx.core.batching import collate
    from bonsai_mlx.core.records import Dataset
    from bonsai_mlx.loss import forward_states, to_mx

    layers = model.language_model.layers
    for layer in layers:
        layer.mlp.down_proj = _Energy(layer.mlp.down_proj)
        layer.self_attn.o_proj = _Energy(layer.self_attn.o_proj)
    try:
        ds = Dataset.build(records, proc, image_root, max_length=2048)
        if not ds.examples:
            raise UserError("no usable calibration samples (see the skipped ids above)")
        pad = proc.pad_id
        for i in tqdm(range(0, len(ds.examples), batch_size), desc="calibrating", unit="batch"):
            batch = to_mx(collate(ds.examples[i : i + batch_size], proc, pad))
            h, _ = forward_states(model, batch, False, False)
            mx.eval(h, [(la.mlp.down_proj.sq, la.self_attn.o_proj.sq) for la in layers])
        mlp, heads = [], []
        for layer in layers:
            d, o, a = layer.mlp.down_proj, layer.self_attn.o_proj, layer.self_attn
            wd = np.linalg.norm(np.array(d.inner.weight.astype(mx.float32)), axis=0) ** 2
            wo = np.linalg.norm(np.array(o.inner.weight.astype(mx.float32)), axis=0) ** 2
            mlp.append(np.array(d.sq) / max(d.n, 1) * wd)
            heads.append((np.array(o.sq) / max(o.n, 1) * wo).reshape(a.n_kv_heads, -1).sum(1))
    finally:
        for layer in layers:
            if isinstance(layer.mlp.down_proj, _Energy):
                layer.mlp.down_proj = layer.mlp.down_proj.inner
            if isinstance(layer.self_attn.o_proj, _Energy):
                layer.self_attn.o_proj = layer.self_attn.o_proj.inner
    return mlp, heads


def _take(lin: nn.Linear, idx: np.ndarray, axis: int) -> None:
    i = mx.array(idx)
    lin.weight = mx.take(lin.weight, i, axis=axis)
    if axis == 0 and "bias" in lin:
        lin.bias = mx.take(lin.bias, i, axis=0)


def prune(model: Pico, cfg: PruneConfig, proc=None, records: list[dict] | None = None) -> dict:
    """Prune `model` in place and update its config. Returns what was kept."""
    if model.config.quantization:
        raise UserError("prune the float checkpoint, then quantize it (convert to-mlx --quantize 4)")
    t = model.config.text
    head_dim = t.attention_head_dim
    width, groups = kept_counts(cfg, t.intermediate_size, t.num_key_value_heads)
    if width == t.intermediate_size and groups == t.num_key_value_heads:
        return {"intermediate_size": width, "kv_groups": groups, "importance": "none (nothing to remove)"}
    if records:
        mlp_s, head_s = calibration_scores(model, proc, records, cfg.image_root, cfg.batch_size)
        how = f"calibration ({len(records)} samples)"
    else:
        mlp_s, head_s = weight_scores(model)
        how = "weight norms"
    rep = t.num_attention_heads // t.num_key_value_heads
    for layer, ms, hs in zip(model.language_model.layers, mlp_s, head_s, strict=True):
        keep_c = np.sort(np.argsort(-ms, kind="stable")[:width])
        _take(layer.mlp.gate_proj, keep_c, 0)
        _take(layer.mlp.up_proj, keep_c, 0)
        _take(layer.mlp.down_proj, keep_c, 1)
        keep_g = np.sort(np.argsort(-hs, kind="stable")[:groups])
        kv_rows = (keep_g[:, None] * head_dim + np.arange(head_dim)).reshape(-1)
        q_rows = (keep_g[:, None] * rep * head_dim + np.arange(rep * head_dim)).reshape(-1)
        a = layer.self_attn
        _take(a.q_proj, q_rows, 0)
        _take(a.k_proj, kv_rows, 0)
        _take(a.v_proj, kv_rows, 0)
        _take(a.o_proj, q_rows, 1)
        a.n_heads, a.n_kv_heads = groups * rep, groups
    t.intermediate_size, t.num_key_value_heads, t.num_attention_heads = width, groups, groups * rep
    t.head_dim = head_dim
    mx.eval(model.parameters())
    return {"intermediate_size": width, "kv_groups": groups, "importance": how}


def lm_parameters(model: Pico) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.language_model.parameters()))


def main(argv: list[str] | None = None) -> int:
    from bonsai_mlx.core.errors import friendly

    ap = argparse.ArgumentParser(
        prog="python -m bonsai_mlx.prune",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example:\n  python -m bonsai_mlx.prune --model pico/ --out p75/ --calib train.json --image-root img/"
        "\n"
        "Then heal it: python -m bonsai_mlx.train --model pico-p75/ --data train.json --stage instruct ...",
    )
    ap.add_argument("--model", required=True, help="float Pico directory or hub id")
    ap.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    add_options(ap, PruneConfig)
    args = ap.parse_args(argv)
    with friendly("prune"):
        cfg = from_args(PruneConfig, args)
        from bonsai_mlx import loading
        from bonsai_mlx.core.processing import Processor
        from bonsai_mlx.core.records import read_records

        src = loading.resolve(args.model)
        model, pcfg = loading.load(src, dtype=mx.float32)
        before = lm_parameters(model)
        t = pcfg.text
        was = (t.intermediate_size, t.num_attention_heads, t.num_key_value_heads)
        records = read_records(cfg.calib)[: cfg.calib_samples] if cfg.calib else None
        info = prune(model, cfg, Processor(src, pcfg) if records else None, records)
        after = lm_parameters(model)
        loading.save(model, args.out, dtype=loading.stored_dtype(src), extra_files_from=src)
        print(
            f"MLP width {was[0]} -> {t.intermediate_size}, heads {was[1]}/{was[2]} KV -> "
            f"{t.num_attention_heads}/{t.num_key_value_heads} KV; LM parameters {before:,} -> {after:,} "
            f"({after / before:.1%}); importance: {info['importance']}"
        )
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
