"""The files beside the weights that other engines read: processor_config.json, a chat template that
takes both content forms, and a `crop_size` in the image processor's config.

The image processor's settings come in two layouts: transformers 4.x wrote `preprocessor_config.json`;
transformers 5 writes them nested in `processor_config.json` (`"image_processor": {...}`) and no
preprocessor_config.json. Readers accept either (`read_image_processor`); writers keep the nested copy and
write preprocessor_config.json beside it, which older tools (and llama.cpp's converters) read.

transformers' `LlavaProcessor` needs `patch_size` (else the first image raises), vLLM builds on it, and
transformers' processors, mlx-vlm and vLLM send message content as a list of typed parts
(`{"type": "image"}`, `{"type": "text", "text": ...}`) where Qwen's template only accepts a string.
`LlavaProcessor` counts an image's tokens from `image_processor.crop_size` (`_get_num_multimodal_tokens`,
which vLLM calls), and SigLIP's processor has none, so that count raised a TypeError.
"""

from __future__ import annotations

import json
from pathlib import Path

from bonsai_mlx.core.config import ConfigError, PicoConfig
from bonsai_mlx.core.io import atomic_write_text

TEMPLATE_FILE = "chat_template.jinja"
PREPROCESSOR = "preprocessor_config.json"
PROCESSOR = "processor_config.json"
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


def _json(p: Path) -> dict | None:
    try:
        v = json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{p}: not readable JSON ({e})") from None
    if not isinstance(v, dict):
        raise ConfigError(f"{p}: expected a JSON object")
    return v


def read_image_processor(model_dir: str | Path) -> dict | None:
    """The image processor's settings: preprocessor_config.json (transformers 4.x), else the `image_processor`
    nested in processor_config.json (transformers 5); None when the directory has neither."""
    d = Path(model_dir)
    pre = _json(d / PREPROCESSOR)
    if pre is not None:
        return pre
    nested = (_json(d / PROCESSOR) or {}).get("image_processor")
    return nested if isinstance(nested, dict) else None


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


def write_engine_files(model_dir: str | Path, config: PicoConfig, image_processor: dict | None = None) -> None:
    """Write processor_config.json (the image processor nested, as transformers 5 writes it) and
    preprocessor_config.json (the same settings, for older readers), give the image processor its `crop_size`,
    and make every copy of the chat template list-aware.

    The template goes to chat_template.jinja (where both AutoTokenizer and AutoProcessor look); a copy
    left in tokenizer_config.json or chat_template.json is rewritten too, so no reader sees the old one.
    `image_processor`: the settings to write (default: what the directory holds, in either layout).
    """
    d = Path(model_dir)
    pre = image_processor if image_processor is not None else read_image_processor(d)
    proc = processor_config(config)
    if pre is not None:
        pre = with_crop_size(pre)
        proc["image_processor"] = pre
        atomic_write_text(d / PREPROCESSOR, json.dumps(pre, indent=2) + "\n")
    atomic_write_text(d / PROCESSOR, json.dumps(proc, indent=2) + "\n")
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
