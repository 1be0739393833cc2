"""LoRA on the LM (mlx-lm's LoRALinear), saved and loaded in the PEFT layout so peft reads it too."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear

from bonsai_mlx.core.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TARGETS, lm_target_regex
from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.io import atomic_write_text
from bonsai_mlx.loading import canonical_key
from bonsai_mlx.weights import atomic_save_safetensors


def apply_lora(model: nn.Module, targets=TARGETS, rank: int = 16, alpha: float = 32, dropout: float = 0.0) -> int:
    """Wrap the LM's target linears (float or quantized) in LoRA. Returns how many were wrapped."""
    n = 0
    for layer in model.language_model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if name in parent:
                    parent[name] = LoRALinear.from_base(parent[name], r=rank, dropout=dropout, scale=alpha / rank)
                    n += 1
    if n == 0:
        raise UserError(f"--lora-targets {','.join(targets)} matched no LM layer (choose from {','.join(TARGETS)})")
    return n


def _peft_key(path: str) -> str:
    """`language_model.model.layers.0.self_attn.q_proj` -> PEFT's key for the transformers model."""
    return "base_model.model." + path.replace("language_model.model.", "model.language_model.", 1)


def adapter_tensors(model: nn.Module) -> dict[str, mx.array]:
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            out[_peft_key(path) + ".lora_A.weight"] = m.lora_a.T
            out[_peft_key(path) + ".lora_B.weight"] = m.lora_b.T
    return out


def save_adapter(
    model: nn.Module, out: str | Path, rank: int, alpha: float, dropout: float, targets, base: str = ""
) -> None:
    out = Path(out)
    atomic_save_safetensors(out / ADAPTER_WEIGHTS, adapter_tensors(model))
    cfg = {
        "peft_type": "LORA",
        "task_type": None,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": lm_target_regex(list(targets)),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base,
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "init_lora_weights": True,
    }
    atomic_write_text(out / ADAPTER_CONFIG, json.dumps(cfg, indent=2) + "\n")


def read_adapter(path: str | Path) -> tuple[dict, dict[str, tuple[mx.array, mx.array, float]]]:
    """(adapter_config, {module path: (lora_a, lora_b, scale)} in mlx-lm orientation).

    The scale is PEFT's for that module: alpha / r, or alpha / sqrt(r) with `use_rslora`, where r and alpha come
    from `rank_pattern` / `alpha_pattern` when a pattern matches the module (peft's own matching rule)."""
    d = Path(path)
    if not (d / ADAPTER_CONFIG).is_file():
        raise InputNotFound(f"{d / ADAPTER_CONFIG}: not found (expected a PEFT LoRA adapter)")
    try:
        cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{d / ADAPTER_CONFIG}: not valid JSON ({e.msg})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("r"), int):
        raise UserError(f"{d / ADAPTER_CONFIG}: expected a PEFT LoRA config with an integer 'r'")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{d / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r}, only LORA is supported")
    for key in ("use_dora", "lora_bias"):
        if cfg.get(key):
            raise UserError(f"{d / ADAPTER_CONFIG}: {key}=true is not supported (plain LoRA only)")
    if not (d / ADAPTER_WEIGHTS).is_file():
        raise InputNotFound(f"{d / ADAPTER_WEIGHTS}: not found")
    raw = mx.load(str(d / ADAPTER_WEIGHTS))
    pairs: dict[str, dict[str, mx.array]] = {}
    for k, v in raw.items():
        m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.default)?\.weight$", k)
        if not m:
            continue
        pairs.setdefault(m.group(1), {})[m.group(2)] = v
    out = {}
    for hf_path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{d / ADAPTER_WEIGHTS}: {hf_path} lacks lora_{'B' if 'A' in ab else 'A'}")
        r, alpha = _rank_alpha(cfg, hf_path)
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise UserError(
                f"{d / ADAPTER_WEIGHTS}: {hf_path} has rank {ab['A'].shape[0]} but adapter_config.json says {r}"
            )
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[canonical_key(hf_path)] = (ab["A"].T, ab["B"].T, scale)
    return cfg, out


def _rank_alpha(cfg: dict, module: str) -> tuple[int, float]:
    """PEFT's r and alpha for one module (peft.utils.other.get_pattern_key: first pattern matching the end)."""

    def pick(pattern: dict | None, default):
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pick(cfg.get("rank_pattern"), cfg["r"])
    return r, pick(cfg.get("alpha_pattern"), cfg.get("lora_alpha", r))


def load_adapter(model: nn.Module, path: str | Path) -> int:
    """Attach a saved PEFT adapter to `model` (creating the LoRA layers). Returns the count."""
    _, pairs = read_adapter(path)
    modules = dict(model.named_modules())
    for p, (a, b, scale) in pairs.items():
        parent_path, name = p.rsplit(".", 1)
        parent = modules.get(parent_path)
        if parent is None or name not in parent:
            raise UserError(f"{path}: adapter targets {p}, which this model does not have (made for another base?)")
        base = parent[name].linear if isinstance(parent[name], LoRALinear) else parent[name]
        out_dims, in_dims = _dims(base)
        if a.shape[0] != in_dims or b.shape[1] != out_dims:
            raise UserError(
                f"{path}: {p} is {in_dims}->{out_dims} in this model but {a.shape[0]}->{b.shape[1]} in the adapter "
                "(made for another base?)"
            )
        lora = LoRALinear.from_base(base, r=a.shape[1], scale=scale)
        lora.lora_a, lora.lora_b = a.astype(mx.float32), b.astype(mx.float32)
        parent[name] = lora
    return len(pairs)


def _dims(linear: nn.Module) -> tuple[int, int]:
    """(out, in) of a float or quantized linear."""
    out_dims, in_dims = linear.weight.shape
    if isinstance(linear, nn.QuantizedLinear):
        in_dims = in_dims * 32 // linear.bits
    return out_dims, in_dims


def fuse_lora(model: nn.Module) -> int:
    """Merge every LoRA layer back into a plain (float) linear."""
    n = 0
    for _, m in model.named_modules():
        for name, child in list(m.children().items()):
            if isinstance(child, LoRALinear):
                m[name] = child.fuse(dequantize=True)
                n += 1
    return n


def trainable_count(model: nn.Module) -> int:
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
