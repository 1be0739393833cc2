"""`convert to-gguf`: a Pico as the two files llama.cpp runs it from, written with the `gguf` package.

* `NAME-TYPE.gguf`: the Qwen2 language model (architecture `qwen2`, the BPE tokenizer, chat template).
* `mmproj-NAME-f16.gguf` (`-f32` with `--type f32`): SigLIP + the 2-layer projector for llama.cpp's
  multimodal loader (`clip` architecture, projector type `mlp`, the checkpoint's image mean/std, the
  feature layer as an index into the encoder's hidden states). SigLIP's post-layernorm is left out:
  Llava reads the last layer's states before it, and llama.cpp would apply any `v.post_ln` it finds.

llama.cpp pads a non-square image to a square (llava-1.5 style) before resizing, where Pico's processor
stretches it; hand llama.cpp square images (or resize them to image_size x image_size first) to get
exactly Pico's pixels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np

from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.hf_files import list_aware, read_image_processor, read_template
from bonsai_mlx.core.io import CheckpointError

TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
# llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M: made by llama.cpp's own quantizer (gguf-py has no k-quant encoder)
LLAMA_FTYPE_Q4_K_M = 15


def _np(v) -> np.ndarray:
    import mlx.core as mx

    return np.array(v.astype(mx.float32))


def _pre_tokenizer(tok: dict, where: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-split regex (it reimplements each one it knows)."""
    from bonsai_mlx.qwen_vocab import QWEN2_PATTERN

    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre.get("type") == "Sequence":
        splits = [p for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if len(splits) == 1 and splits[0].get("pattern", {}).get("Regex") == QWEN2_PATTERN:
            return "qwen2"
    raise CheckpointError(f"{where}: pre-tokenizer {pre.get('type')!r} is not one llama.cpp knows (gpt-2 or qwen2)")


def _tokenizer(writer, d: Path, vocab_size: int, template: str | None) -> None:
    import gguf

    path = d / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (llama.cpp needs the BPE vocabulary and merges)")
    tok = json.loads(path.read_text())
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: model.type {model.get('type')!r}, expected 'BPE'")
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"{path}: token id {max(by_id)} does not fit the model's {vocab_size} embedding rows")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows past the tokenizer (Qwen pads its vocabulary)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok, path))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    ids = {t: i for i, t in enumerate(tokens)}
    cfg = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").is_file() else {}
    eos = cfg.get("eos_token") or "<|im_end|>"
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos in ids:
        writer.add_eos_token_id(ids[eos])
    if "<|im_end|>" in ids:
        writer.add_eot_token_id(ids["<|im_end|>"])
    pad = cfg.get("pad_token") or "<|endoftext|>"
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if pad in ids:
        writer.add_pad_token_id(ids[pad])
    writer.add_add_bos_token(False)
    if template:
        writer.add_chat_template(template)


def _lm_type(name: str, arr: np.ndarray, kind: str):
    """(data, raw dtype) for one LM tensor: 1-D tensors stay f32, matrices take the requested type."""
    import gguf

    if arr.ndim == 1 or kind == "f32":
        return arr.astype(np.float32), None
    if kind == "q8_0" or kind == "q4_0":
        q = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_0
        if arr.shape[-1] % gguf.GGML_QUANT_SIZES[q][0] == 0:
            return gguf.quants.quantize(arr.astype(np.float32), q), q
    return arr.astype(np.float16), None


def write_lm(d: Path, config: PicoConfig, w: dict, out: Path, kind: str) -> None:
    import gguf

    t = config.text
    if t.rope_scaling and t.rope_scaling.get("rope_type", t.rope_scaling.get("type")) not in (None, "default"):
        raise CheckpointError(f"{d / 'config.json'}: rope_scaling {t.rope_scaling} is not exported to GGUF")
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_name(d.name)
    writer.add_context_length(t.max_position_embeddings)
    writer.add_embedding_length(t.hidden_size)
    writer.add_block_count(t.num_hidden_layers)
    writer.add_feed_forward_length(t.intermediate_size)
    writer.add_head_count(t.num_attention_heads)
    writer.add_head_count_kv(t.num_key_value_heads)
    if t.head_dim:  # pruned heads: not hidden_size / heads
        writer.add_key_length(t.head_dim)
        writer.add_value_length(t.head_dim)
    writer.add_rope_freq_base(t.rope_theta)
    writer.add_layer_norm_rms_eps(t.rms_norm_eps)
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
    }[kind]
    writer.add_file_type(ftype)
    template = read_template(d)
    _tokenizer(writer, d, t.vocab_size, list_aware(template) if template else None)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, t.num_hidden_layers)
    prefix = "language_model."
    for k in sorted(k for k in w if k.startswith(prefix)):
        name = names.get_name(k[len(prefix) :], try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"{d}: tensor {k} has no GGUF name for qwen2")
        data, raw = _lm_type(name, _np(w[k]), kind)
        writer.add_tensor(name, data, raw_dtype=raw)
    _finish(writer)


def write_mmproj(d: Path, config: PicoConfig, w: dict, out: Path, f32: bool = False) -> None:
    import gguf

    v = config.vision
    if config.vision_feature_select_strategy != "full":
        raise CheckpointError(
            f"{d / 'config.json'}: vision_feature_select_strategy {config.vision_feature_select_strategy!r}; "
            "llama.cpp's mlp projector keeps every SigLIP patch ('full')"
        )
    if not isinstance(config.vision_feature_layer, int):
        raise CheckpointError(f"{d / 'config.json'}: a list vision_feature_layer is not exported to GGUF")
    pp = read_image_processor(d)
    if pp is None:
        raise CheckpointError(
            f"{d}: no image processor (preprocessor_config.json, or processor_config.json's image_processor); "
            "llama.cpp needs the image mean and std"
        )
    writer = gguf.GGUFWriter(str(out), "clip")
    writer.add_name(d.name)
    writer.add_description("Pico vision tower (SigLIP) + projector")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type("mlp")  # clip-impl.h PROJECTOR_TYPE_MLP: linear, gelu, linear
    writer.add_vision_projection_dim(config.text.hidden_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_block_count(v.num_hidden_layers)
    writer.add_vision_head_count(v.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_image_mean([float(x) for x in pp.get("image_mean", [0.5, 0.5, 0.5])])
    writer.add_vision_image_std([float(x) for x in pp.get("image_std", [0.5, 0.5, 0.5])])
    writer.add_vision_use_gelu(True)  # SigLIP's gelu_pytorch_tanh is ggml's gelu
    # hidden_states index: 0 = embeddings, n = last layer (HF's -1), as llama.cpp counts them
    writer.add_array("clip.vision.feature_layer", [config.vision_feature_layer % (v.num_hidden_layers + 1)])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, v.num_hidden_layers)
    mm = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.V_MMPROJ]
    for k in sorted(w):
        if k.startswith("language_model.") or k.startswith("vision_tower.vision_model.post_layernorm."):
            continue
        if k.startswith("multi_modal_projector.linear_"):  # llama.cpp's llava MLP is mm.0 -> gelu -> mm.2
            i = {"1": 0, "2": 2}[k.split(".")[1].removeprefix("linear_")]
            name = mm.format(bid=i) + "." + k.rsplit(".", 1)[1]
        else:
            name = names.get_name(k, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"{d}: tensor {k} has no GGUF name for llama.cpp's clip loader")
        arr = _np(w[k])
        keep32 = f32 or arr.ndim == 1 or name == "v.position_embd.weight"
        writer.add_tensor(name, arr.astype(np.float32 if keep32 else np.float16))
    _finish(writer)


def _finish(writer) -> None:
    """Write to a temp name, then rename: a crash never leaves half a GGUF under the real name."""
    final = Path(writer.path)
    tmp = final.with_name(f".{final.name}.tmp")
    writer.path = tmp
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(final)


def llama_quantize(src: Path, dst: Path, ftype: int = LLAMA_FTYPE_Q4_K_M, quantizer: str | None = None) -> None:
    """llama.cpp's own k-quant quantizer: llama-cpp-python's binding, else a `llama-quantize` binary."""
    if quantizer:
        subprocess.run([quantizer, str(src), str(dst), "Q4_K_M"], check=True, capture_output=True)
        return
    try:
        import llama_cpp
    except ImportError:
        exe = shutil.which("llama-quantize")
        if exe is None:
            raise CheckpointError(
                "q4_k_m is made by llama.cpp's quantizer: pip install llama-cpp-python, put llama-quantize on "
                "PATH, or pass --quantizer; gguf alone offers f32, f16, q8_0 and q4_0"
            ) from None
        subprocess.run([exe, str(src), str(dst), "Q4_K_M"], check=True, capture_output=True)
        return
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise CheckpointError(f"{src}: llama.cpp's quantizer failed")


def _require_gguf() -> None:
    """The `gguf` package, or one line saying how to get it. Without it, a folder named gguf/ in the working
    directory (the docs' output folder) imports as an empty namespace package: checked by what it lacks."""
    try:
        import gguf
    except ImportError:
        gguf = None
    if not hasattr(gguf, "GGUFWriter"):
        raise UserError("to-gguf needs the gguf package: pip install -e '.[gguf]' (or '.[llama]')")


def to_gguf(src: str | Path, out_dir: str | Path, kind: str = "f16", quantizer: str | None = None) -> str:
    """Write the LM GGUF and the mmproj GGUF of a Pico directory (float or MLX-quantized) into `out_dir`."""
    from bonsai_mlx.conversion.hf_mlx import read_float

    if kind not in TYPES:
        raise UserError(f"--type {kind!r}: expected one of {', '.join(TYPES)}")
    _require_gguf()
    d, config, w = read_float(src)
    if config.text.tie_word_embeddings:
        w.pop("language_model.lm_head.weight", None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = d.name
    lm = out / f"{name}-{kind}.gguf"
    mmproj = out / f"mmproj-{name}-{'f32' if kind == 'f32' else 'f16'}.gguf"
    if kind == "q4_k_m":
        f16 = out / f".{name}-f16-for-q4_k_m.gguf"
        write_lm(d, config, w, f16, "f16")
        try:
            llama_quantize(f16, lm, quantizer=quantizer)
        finally:
            f16.unlink(missing_ok=True)
    else:
        write_lm(d, config, w, lm, kind)
    write_mmproj(d, config, w, mmproj, f32=kind == "f32")
    return f"{lm.name} + {mmproj.name}"
