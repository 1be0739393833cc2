"""`convert init`: a fresh Pico from a SigLIP checkpoint and a Qwen2 checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx

from bonsai_mlx import loading
from bonsai_mlx.conversion.sources import cast, read_tensors
from bonsai_mlx.core.config import PicoConfig, TextConfig, VisionConfig, pick_fields
from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.hf_files import read_image_processor, write_engine_files
from bonsai_mlx.core.io import atomic_write_text
from bonsai_mlx.core.processing import IMAGE
from bonsai_mlx.weights import save_weights


def _json(path: Path) -> dict:
    if not path.is_file():
        raise InputNotFound(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from None


def _vision(d: Path) -> tuple[dict, dict[str, mx.array]]:
    cfg = _json(d / "config.json")
    if cfg.get("model_type") == "siglip":
        cfg = cfg.get("vision_config") or {}
    elif cfg.get("model_type") != "siglip_vision_model":
        raise UserError(f"{d / 'config.json'}: model_type {cfg.get('model_type')!r}, expected a SigLIP checkpoint")
    cfg = {**cfg, "model_type": "siglip_vision_model"}
    w = {}
    for k, v in read_tensors(d).items():
        k = k.removeprefix("model.")
        if k.startswith("vision_model."):  # SiglipModel (google/siglip-*), or 4.x SiglipVisionModel
            w["vision_tower." + k] = v
        elif k.startswith(("embeddings.", "encoder.", "post_layernorm.")):  # 5.x SiglipVisionModel
            w["vision_tower.vision_model." + k] = v
    # SigLIP's pooling head (vision_model.head.*) is left out: Llava never uses it (vision_use_head: false).
    w = {k: v for k, v in w.items() if not k.startswith(loading.POOLING_HEAD)}
    if not w:
        raise UserError(f"{d}: no vision_model.* tensors found")
    return cfg, w


def _text(d: Path) -> tuple[dict, dict[str, mx.array]]:
    cfg = _json(d / "config.json")
    if cfg.get("model_type") != "qwen2":
        raise UserError(f"{d / 'config.json'}: model_type {cfg.get('model_type')!r}, expected 'qwen2'")
    w = {}
    for k, v in read_tensors(d).items():
        if k.startswith("model."):
            w["language_model." + k] = v
        elif k == "lm_head.weight":
            w["language_model.lm_head.weight"] = v
    return cfg, w


def assemble(vision: str | Path, text: str | Path, out: str | Path, seed: int = 0, dtype: str | None = None) -> str:
    from transformers import AutoTokenizer

    vdir, tdir, out = loading.resolve(vision), loading.resolve(text), Path(out)
    vcfg, vw = _vision(vdir)
    tcfg, tw = _text(tdir)
    tok = AutoTokenizer.from_pretrained(str(tdir))
    out.mkdir(parents=True, exist_ok=True)
    emb = tw["language_model.model.embed_tokens.weight"]
    note = []
    if IMAGE not in tok.get_vocab():
        tok.add_tokens([IMAGE], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE)
    if image_id >= emb.shape[0]:  # no spare rows: grow embedding (and head) with the mean row
        grow = image_id + 1 - emb.shape[0]
        for k in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
            if k in tw:
                m = tw[k].astype(mx.float32).mean(axis=0, keepdims=True).astype(tw[k].dtype)
                tw[k] = mx.concatenate([tw[k], mx.repeat(m, grow, axis=0)])
        tcfg["vocab_size"] = image_id + 1
        note.append(f"embedding grown to {image_id + 1} rows")
    else:
        note.append(f"<image> = id {image_id}, a spare embedding row (no resize)")
    tok.save_pretrained(str(out))

    text_cfg = TextConfig(
        **pick_fields(
            TextConfig,
            {
                **tcfg,
                **(
                    {"rope_theta": tcfg["rope_parameters"]["rope_theta"]}
                    if "rope_theta" in (tcfg.get("rope_parameters") or {})
                    else {}
                ),
            },
        )
    )
    vision_cfg = VisionConfig(**pick_fields(VisionConfig, vcfg))
    raw = {"model_type": "llava", "vision_config": vcfg, "text_config": tcfg}
    config = PicoConfig(
        vision=vision_cfg,
        text=text_cfg,
        image_token_index=image_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        raw=raw,
    )
    if text_cfg.tie_word_embeddings:
        tw.pop("language_model.lm_head.weight", None)

    mx.random.seed(seed)
    dt = emb.dtype
    dv, dtx = vision_cfg.hidden_size, text_cfg.hidden_size
    proj = {
        "multi_modal_projector.linear_1.weight": (mx.random.normal((dtx, dv)) * 0.02).astype(dt),
        "multi_modal_projector.linear_1.bias": mx.zeros((dtx,), dtype=dt),
        "multi_modal_projector.linear_2.weight": (mx.random.normal((dtx, dtx)) * 0.02).astype(dt),
        "multi_modal_projector.linear_2.bias": mx.zeros((dtx,), dtype=dt),
    }
    weights = cast({**vw, **tw, **proj}, dtype)
    save_weights(out, weights)
    config.save(out)
    pre = read_image_processor(vdir)  # either layout: transformers 4.x's file or 5's nested copy
    if pre is None:
        raise InputNotFound(
            f"{vdir / 'preprocessor_config.json'}: not found, nor an image_processor in processor_config.json "
            "(the SigLIP image processor)"
        )
    atomic_write_text(out / "preprocessor_config.json", json.dumps(pre, indent=2) + "\n")
    if (tdir / "generation_config.json").is_file():
        shutil.copyfile(tdir / "generation_config.json", out / "generation_config.json")
    write_engine_files(out, config)
    return "; ".join(note)
