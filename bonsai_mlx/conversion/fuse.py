"""`convert fuse`: a trained adapter (+ projector) merged into its base as one full checkpoint."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from bonsai_mlx import loading, lora
from bonsai_mlx.conversion.sources import DTYPES
from bonsai_mlx.quantize import dequantize_weights, quantize_weights
from bonsai_mlx.weights import save_weights


def fuse(
    base: str | Path,
    adapter: str | Path,
    out: str | Path,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
) -> str:
    base_dir = loading.resolve(base)
    ad = Path(adapter)
    if (ad / "checkpoints" / "latest").is_file():  # a run directory: use its latest checkpoint
        ad = ad / "checkpoints" / (ad / "checkpoints" / "latest").read_text().strip()
    has_lora = (ad / lora.ADAPTER_CONFIG).is_file()
    has_proj = (ad / "projector.safetensors").is_file()
    if not has_lora and not has_proj:
        raise FileNotFoundError(
            f"{ad}: no adapter_config.json or projector.safetensors (expected a training checkpoint)"
        )
    model, config = loading.load(base_dir, dtype=mx.float32)
    notes = []
    if has_lora:
        n = lora.load_adapter(model, ad)
        notes.append(f"{lora.fuse_lora(model)} of {n} LoRA layers merged")
    if has_proj:
        proj = loading.sanitize(mx.load(str(ad / "projector.safetensors")), config)
        model.load_weights(list(proj.items()), strict=False)
        notes.append("projector replaced")
    out_dtype = DTYPES[dtype] if dtype else loading.stored_dtype(base_dir)
    w = loading.hf_state(model, out_dtype)
    if config.quantization:  # base was quantized: the fused linears are float now, so re-derive all
        w = dequantize_weights(w, config.quantization)
        config.quantization = None
    if bits:
        w, _ = quantize_weights(w, bits=bits, group_size=group_size)
        config.quantization = {"group_size": group_size, "bits": bits}
        notes.append(f"{bits}-bit")
    save_weights(out, w)
    config.save(out)
    loading.copy_processor_files(base_dir, out)
    return "; ".join(notes)
