"""`to-mlx` and `to-hf`: same HF Llava layout on both sides; MLX adds optional quantization."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from bonsai_mlx import loading
from bonsai_mlx.conversion.sources import cast, read_tensors
from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.errors import OutputExists, UserError
from bonsai_mlx.quantize import dequantize_weights, quantize_weights
from bonsai_mlx.weights import save_weights


def _hf_conv(w: dict[str, mx.array], config: PicoConfig) -> dict[str, mx.array]:
    """Conv weights in PyTorch layout, whichever layout a source (e.g. an mlx-vlm export) used."""
    v = w.get(loading.CONV)
    c = config.vision.num_channels
    if v is not None and v.shape[-1] == c and v.shape[1] != c:
        w[loading.CONV] = v.transpose(0, 3, 1, 2)
    return w


def read_float(src: str | Path) -> tuple[Path, PicoConfig, dict[str, mx.array]]:
    """Config and float tensors (dequantized if the source is quantized), canonical key names."""
    d = loading.resolve(src)
    config = PicoConfig.load(d)
    w = loading.canonical_weights(read_tensors(d))
    if config.quantization:
        w = dequantize_weights(w, config.quantization)
        config.quantization = None
    if config.text.tie_word_embeddings:
        w.pop("language_model.lm_head.weight", None)
    return d, config, _hf_conv(w, config)


def to_mlx(
    src: str | Path,
    out: str | Path,
    dtype: str | None = "float16",
    bits: int | None = None,
    group_size: int = 64,
    quantize_vision: bool = False,
) -> str:
    d, config, w = read_float(src)
    w = cast(w, dtype)
    note = f"dtype {dtype or 'as stored'}"
    if bits:
        w, n = quantize_weights(w, bits=bits, group_size=group_size, vision=quantize_vision)
        if n == 0:
            raise UserError(f"{src}: no tensor has an input size divisible by group size {group_size}")
        config.quantization = {"group_size": group_size, "bits": bits}
        note += f", {n} tensors quantized to {bits} bits (group {group_size})"
    _write(d, config, w, out)
    return note


def to_hf(src: str | Path, out: str | Path, dtype: str | None = None) -> str:
    d, config, w = read_float(src)
    _write(d, config, cast(w, dtype), out)
    return f"dtype {dtype or 'as stored'}"


def _write(src_dir: Path, config: PicoConfig, w: dict[str, mx.array], out: str | Path) -> None:
    out = Path(out)
    if out.exists() and any(out.iterdir()) and out.resolve() != src_dir.resolve():
        if not (out / "config.json").is_file():
            raise OutputExists(f"{out}: exists and is not a model directory; refusing to write into it")
    save_weights(out, w)
    config.save(out)
    loading.copy_processor_files(src_dir, out, config)
