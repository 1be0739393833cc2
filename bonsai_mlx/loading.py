"""Load and save Pico model directories (Hugging Face Llava layout, optional MLX quantization)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.hf_files import read_image_processor, write_engine_files
from bonsai_mlx.core.hub import resolve
from bonsai_mlx.model import Pico
from bonsai_mlx.weights import load_weights, save_weights

CONV = "vision_tower.vision_model.embeddings.patch_embedding.weight"
POOLING_HEAD = "vision_tower.vision_model.head."  # SigLIP's attention-pooling head: unused by Llava


def canonical_key(k: str) -> str:
    """Map transformers 4.x/5.x and bare spellings to the llava-hf one used everywhere here."""
    if k.startswith("model.language_model."):
        k = "language_model.model." + k[len("model.language_model.") :]
    elif k.startswith("lm_head."):
        k = "language_model." + k
    elif k.startswith("model.vision_tower."):
        k = k[len("model.") :]
    elif k.startswith("model.multi_modal_projector."):
        k = k[len("model.") :]
    if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
        k = "vision_tower.vision_model." + k[len("vision_tower.") :]
    return k


def canonical_weights(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Canonical names, minus buffers and the SigLIP pooling head (read from old checkpoints, never kept)."""
    out = {canonical_key(k): v for k, v in weights.items()}
    return {
        k: v
        for k, v in out.items()
        if "position_ids" not in k and "rotary_emb" not in k and not k.startswith(POOLING_HEAD)
    }


def sanitize(weights: dict[str, mx.array], config: PicoConfig) -> dict[str, mx.array]:
    """HF-layout tensors -> this module's parameters (conv to channels-last, tied head dropped)."""
    w = canonical_weights(weights)
    if CONV in w and w[CONV].shape[1] == config.vision.num_channels:
        w[CONV] = w[CONV].transpose(0, 2, 3, 1)
    if config.text.tie_word_embeddings:
        w.pop("language_model.lm_head.weight", None)
    return w


def to_hf(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """The inverse of `sanitize`'s layout change: module parameters -> HF-layout tensors."""
    w = dict(weights)
    if CONV in w:
        w[CONV] = w[CONV].transpose(0, 3, 1, 2)
    return w


def compute_dtype() -> mx.Dtype | None:
    """On the CPU backend half-precision math is 20-100x slower than fp32, so compute in fp32 there."""
    return mx.float32 if mx.default_device() == mx.cpu else None


def load(path: str | Path, dtype: mx.Dtype | None = None, lazy: bool = False) -> tuple[Pico, PicoConfig]:
    """Load a Pico directory. Quantized layers are restored from `.scales`/`.biases` as MLX writes them."""
    d = resolve(path)
    config = PicoConfig.load(d)
    weights = sanitize(load_weights(d), config)
    model = Pico(config)
    if config.quantization:
        from bonsai_mlx.quantize import apply_quantization

        scaled = {k.removesuffix(".scales") for k in weights if k.endswith(".scales")}
        apply_quantization(model, config.quantization, has_scales=scaled.__contains__)
    check_weights(model, weights, d)
    model.load_weights(list(weights.items()), strict=True)
    del weights  # the file's arrays now live only in the (lazy) graph: each is freed once cast
    dtype = dtype or compute_dtype()
    if dtype is not None:
        cast_floats(model, dtype)
    if not lazy:
        mx.eval(model.parameters())
        mx.clear_cache()  # load-time buffers back to the system
    model.eval()
    return model, config


def check_weights(model: Pico, weights: dict[str, mx.array], where: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise UserError(f"{where}: weights lack {len(missing)} tensors the config needs, e.g. {missing[0]}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise UserError(f"{where}: weights have {len(extra)} tensors the config does not describe, e.g. {extra[0]}")
    for k, v in expected.items():
        if weights[k].shape != v.shape:
            raise UserError(f"{where}: tensor {k} has shape {tuple(weights[k].shape)}, config implies {tuple(v.shape)}")


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    params = tree_flatten(model.parameters())
    model.load_weights([(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in params])


def hf_state(model: Pico, dtype: mx.Dtype | None = None) -> dict[str, mx.array]:
    w = dict(tree_flatten(model.parameters()))
    if dtype is not None:
        w = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in w.items()}
    return to_hf(w)


def stored_dtype(model_dir: str | Path) -> mx.Dtype:
    """The precision a checkpoint's float weights are stored in (read from its projector)."""
    w = load_weights(model_dir)
    v = w.get("multi_modal_projector.linear_1.weight", w.get("model.multi_modal_projector.linear_1.weight"))
    return v.dtype if v is not None else mx.float16


def save(
    model: Pico, out: str | Path, dtype: mx.Dtype | None = None, extra_files_from: str | Path | None = None
) -> None:
    """Write an HF Llava directory: config.json + safetensors (+ tokenizer/processor files copied), with the
    processor_config.json and list-aware chat template other engines need."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out, hf_state(model, dtype))
    model.config.save(out)
    if extra_files_from is not None:
        copy_processor_files(extra_files_from, out, model.config)
    else:
        write_engine_files(out, model.config)


PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def copy_processor_files(src: str | Path, dst: str | Path, config: PicoConfig | None = None) -> None:
    """Tokenizer/processor files from `src` to `dst`, then the engine files for `dst`'s config (read from
    `dst/config.json` when not given, so write the config first)."""
    import shutil

    src, dst = Path(src), Path(dst)
    pre = read_image_processor(src)  # the source's, in either layout (not a stale file already in dst)
    if src.resolve() != dst.resolve():
        for name in PROCESSOR_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dst / name)
    write_engine_files(dst, config or PicoConfig.load(dst), pre)
