"""4/8-bit weight quantization as the MLX ecosystem writes it (`.scales`/`.biases`, config block)."""

from __future__ import annotations

import re
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from bonsai_mlx import device

DEQUANT_ROWS = 8  # above this many rows, dequantize + GEMM beats quantized_matmul on the CPU


def dequantized(m: nn.Module) -> mx.array:
    """The float weight of a quantized layer."""
    return mx.dequantize(m.weight, m.scales, m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode)


_LM = re.compile(
    r"^language_model\.(model\.embed_tokens|model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj|lm_head)\.weight$"
)
_VISION = re.compile(r"^vision_tower\.vision_model\.encoder\.layers\.\d+\.(self_attn\.\w+_proj|mlp\.fc\d)\.weight$")


def quantizable(key: str, vision: bool = False) -> bool:
    """LM linears and embedding always; the vision tower's linears on request; projector never."""
    return bool(_LM.match(key) or (vision and _VISION.match(key)))


def quantize_weights(
    weights: dict[str, mx.array], bits: int = 4, group_size: int = 64, vision: bool = False
) -> tuple[dict[str, mx.array], int]:
    """Quantize the eligible tensors of an HF-layout dict. Returns (weights, number quantized)."""
    out, n = {}, 0
    for k, v in weights.items():
        if quantizable(k, vision) and v.ndim == 2 and v.shape[-1] % group_size == 0:
            q, s, b = mx.quantize(
                v.astype(mx.float32) if v.dtype == mx.bfloat16 else v, group_size=group_size, bits=bits
            )
            base = k[: -len(".weight")]
            out[k], out[f"{base}.scales"], out[f"{base}.biases"] = q, s.astype(v.dtype), b.astype(v.dtype)
            n += 1
        else:
            out[k] = v
    return out, n


def dequantize_weights(weights: dict[str, mx.array], qcfg: dict) -> dict[str, mx.array]:
    out = {}
    for k, v in weights.items():
        if k.endswith((".scales", ".biases")):
            continue
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base and f"{base}.scales" in weights:
            s, b = weights[f"{base}.scales"], weights[f"{base}.biases"]
            v = mx.dequantize(v, s, b, group_size=qcfg["group_size"], bits=qcfg["bits"]).astype(s.dtype)
        out[k] = v
    return out


class HybridQuantizedLinear(nn.QuantizedLinear):
    """Dequantize + GEMM for many rows (prefill, training) on the CPU; quantized_matmul for decode.

    On MLX's CPU backend a 256-row 4-bit matmul is ~40x slower than dequantizing and calling BLAS,
    while for a single row quantized_matmul wins. Metal/CUDA keep the fused kernel throughout.
    """

    def __call__(self, x: mx.array) -> mx.array:
        if x.size // x.shape[-1] <= DEQUANT_ROWS:
            return super().__call__(x)
        y = x @ dequantized(self).astype(x.dtype).T
        return y + self.bias if "bias" in self else y


def quantize_modules(model: nn.Module, group_size: int, bits: int, predicate: Callable[[str, nn.Module], bool]) -> None:
    """nn.quantize, then (on the CPU backend) the hybrid prefill/decode path for the linears."""
    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    if device.is_cpu():
        for _, m in model.named_modules():
            if type(m) is nn.QuantizedLinear:
                m.__class__ = HybridQuantizedLinear


def apply_quantization(model: nn.Module, qcfg: dict, has_scales: Callable[[str], bool]) -> None:
    """Turn the layers that carry scales into quantized layers, before loading weights."""
    quantize_modules(model, qcfg["group_size"], qcfg["bits"], lambda p, m: has_scales(p))


def quantize_base(model: nn.Module, bits: int, group_size: int = 64) -> None:
    """QLoRA: freeze the LM's linears and embedding in `bits` (those whose width the group size divides)."""

    def pred(path: str, m: nn.Module) -> bool:
        ok = isinstance(m, (nn.Linear, nn.Embedding)) and quantizable(path + ".weight")
        return ok and m.weight.shape[-1] % group_size == 0

    quantize_modules(model, group_size, bits, pred)
