"""`convert fuse`: a trained adapter (+ projector) merged into its base as one full checkpoint."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from bonsai_mlx import loading, lora
from bonsai_mlx.conversion.sources import DTYPES
from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.quantize import dequantize_weights, quantize_weights
from bonsai_mlx.weights import save_weights


def check_projector(path: Path, proj: dict, model) -> None:
    """A projector file must hold exactly the model's projector tensors, at their shapes (a partial or
    quantised one would otherwise be half-applied and the fused model refused later, or worse, not)."""
    want = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters()) if k.startswith("multi_modal_projector.")}
    got = {k: tuple(v.shape) for k, v in proj.items()}
    for k in sorted(set(want) | set(got)):
        if k not in got:
            raise UserError(f"{path}: lacks {k} {want[k]}; expected the projector's {len(want)} tensors")
        if k not in want:
            raise UserError(f"{path}: {k} is not a tensor of this model's projector (expected {sorted(want)})")
        if got[k] != want[k]:
            raise UserError(f"{path}: {k} has shape {list(got[k])}, this model's projector needs {list(want[k])}")


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
        raise InputNotFound(f"{ad}: no adapter_config.json or projector.safetensors (expected a training checkpoint)")
    model, config = loading.load(base_dir, dtype=mx.float32)
    notes = []
    if has_lora:
        n = lora.load_adapter(model, ad)
        notes.append(f"{lora.fuse_lora(model)} of {n} LoRA layers merged")
    if has_proj:
        path = ad / "projector.safetensors"
        proj = loading.sanitize(mx.load(str(path)), config)
        check_projector(path, proj, model)
        model.load_weights(list(proj.items()), strict=False)  # the projector's tensors only: checked just above
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
