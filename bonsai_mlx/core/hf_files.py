"""The files beside the weights that other engines read: processor_config.json, a chat template that
takes both content forms, and a `crop_size` in the image processor's config.

transformers' `LlavaProcessor` needs `patch_size` (else the first image raises), vLLM builds on it, and
transformers' processors, mlx-vlm and vLLM send message content as a list of typed parts
(`{"type": "image"}`, `{"type": "text", "text": ...}`) where Qwen's template only accepts a string.
`LlavaProcessor` counts an image's tokens from `image_processor.crop_size` (`_get_num_multimodal_tokens`,
which vLLM calls), and SigLIP's processor has none, so that count raised a TypeError.
"""

from __future__ import annotations

import json
from pathlib import Path

from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.io import atomic_write_text

TEMPLATE_FILE = "chat_template.jinja"
MARK = "{#- bonsai: list-of-parts content accepted -#}"

# Prepended to a string-only template: list content becomes the string LLaVA prompts use, all images
# first ('<image>\n' each) then the text parts, as llava-hf's own templates render it; string content is
# untouched, so the original template (default system turn, tool calls...) renders exactly as before.
LIST_PRELUDE = (
    MARK + "{%- set bonsai_ns = namespace(msgs=[]) -%}"
    "{%- for bonsai_m in messages -%}"
    "{%- if bonsai_m['content'] is string or bonsai_m['content'] is none -%}"
    "{%- set bonsai_ns.msgs = bonsai_ns.msgs + [bonsai_m] -%}"
    "{%- else -%}"
    "{%- set bonsai_t = namespace(s='') -%}"
    "{%- for p in bonsai_m['content'] if p['type'] in ('image', 'image_url') -%}"
    "{%- set bonsai_t.s = bonsai_t.s + '<image>\\n' -%}"
    "{%- endfor -%}"
    "{%- for p in bonsai_m['content'] if p['type'] == 'text' -%}"
    "{%- set bonsai_t.s = bonsai_t.s + p['text'] -%}"
    "{%- endfor -%}"
    "{%- set bonsai_ns.msgs = bonsai_ns.msgs + [dict(bonsai_m, content=bonsai_t.s)] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = bonsai_ns.msgs -%}"
)


def list_aware(template: str) -> str:
    """`template` that also accepts list-of-parts content (idempotent)."""
    return template if template.startswith(MARK) else LIST_PRELUDE + template


def processor_config(config: PicoConfig) -> dict:
    """`LlavaProcessor`'s settings as llava-hf writes them. SigLIP has no CLS token: no additional tokens."""
    return {
        "processor_class": "LlavaProcessor",
        "image_token": "<image>",
        "patch_size": config.vision.patch_size,
        "vision_feature_select_strategy": config.vision_feature_select_strategy,
        "num_additional_image_tokens": 0,
    }


def with_crop_size(preprocessor: dict) -> dict:
    """The image-processor config with `crop_size` equal to its fixed `size`, when it resizes to a fixed
    height x width and never crops (SigLIP): the token count then reads the real input size, and no pixel
    changes. A processor that crops, or resizes by shortest edge, is returned as is."""
    size = preprocessor.get("size")
    if "crop_size" in preprocessor or preprocessor.get("do_center_crop") or not isinstance(size, dict):
        return preprocessor
    if not {"height", "width"} <= size.keys():
        return preprocessor
    return {**preprocessor, "crop_size": {"height": size["height"], "width": size["width"]}}


def read_template(d: Path) -> str | None:
    if (d / TEMPLATE_FILE).is_file():
        return (d / TEMPLATE_FILE).read_text()
    for name in ("tokenizer_config.json", "chat_template.json"):
        p = d / name
        if p.is_file():
            t = json.loads(p.read_text()).get("chat_template")
            if isinstance(t, str):
                return t
    return None


def write_engine_files(model_dir: str | Path, config: PicoConfig) -> None:
    """Write processor_config.json, give the image processor its `crop_size`, and make every copy of the
    chat template list-aware.

    The template goes to chat_template.jinja (where both AutoTokenizer and AutoProcessor look); a copy
    left in tokenizer_config.json or chat_template.json is rewritten too, so no reader sees the old one.
    """
    d = Path(model_dir)
    atomic_write_text(d / "processor_config.json", json.dumps(processor_config(config), indent=2) + "\n")
    pp = d / "preprocessor_config.json"
    if pp.is_file():
        pre = json.loads(pp.read_text())
        if (fixed := with_crop_size(pre)) is not pre:
            atomic_write_text(pp, json.dumps(fixed, indent=2) + "\n")
    template = read_template(d)
    if template is None:
        return
    atomic_write_text(d / TEMPLATE_FILE, list_aware(template))
    for name in ("tokenizer_config.json", "chat_template.json"):
        p = d / name
        if p.is_file():
            cfg = json.loads(p.read_text())
            if isinstance(cfg.get("chat_template"), str):
                cfg["chat_template"] = list_aware(cfg["chat_template"])
                atomic_write_text(p, json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
