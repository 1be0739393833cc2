"""Prompts and pixels from the checkpoint's own tokenizer, chat template and image processor."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from bonsai_mlx.core.config import ConfigError, PicoConfig
from bonsai_mlx.core.images import load_image

IMAGE = "<image>"
Message = dict[str, Any]
# a message's content stands in the rendered template as one of these, so template text and content are known apart
_MARK = "\ue000{}\ue001"
_MARK_RE = re.compile("\ue000(\\d+)\ue001")


def _text_of(content: str | list) -> str:
    """LLaVA-style string content, from either a string or HF's list of typed parts: every image first, then
    the text parts, as the written chat template (core.hf_files) and llava-hf's templates render it."""
    if isinstance(content, str):
        return content
    images = [IMAGE + "\n" for part in content if part.get("type") in ("image", "image_url")]
    return "".join(images + [part.get("text", "") for part in content if part.get("type") == "text"])


def pad_id_of(tokenizer) -> int:
    """What batches are padded with (never attended to, never a label): the tokenizer's pad token, else 0. The
    one spelling of it, for the student's processor and the teacher's tokenizer alike."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class Processor:
    """Tokenizer + image processor + chat template of one model directory."""

    def __init__(self, model_dir: str | Path, config: PicoConfig):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.dir = Path(model_dir)
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.dir))
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(str(self.dir), backend="pil")
        except TypeError:  # transformers 4.x
            self.image_processor = AutoImageProcessor.from_pretrained(str(self.dir), use_fast=False)
        self.image_token_id = config.image_token_index
        tok_id = self.tokenizer.convert_tokens_to_ids(IMAGE)
        if tok_id != self.image_token_id:
            raise ConfigError(
                f"{self.dir}: tokenizer maps {IMAGE} to {tok_id}, "
                f"config.json says image_token_index={self.image_token_id}"
            )
        self.chat_template = self.tokenizer.chat_template or self._processor_template()
        if not self.chat_template:
            raise ConfigError(f"{self.dir}: no chat template in tokenizer_config.json or chat_template.jinja/json")
        self.stop_ids = self._stop_ids()
        # what batches are padded with (never attended to, never a label): the tokenizer's pad token, else 0
        self.pad_id: int = pad_id_of(self.tokenizer)

    def _processor_template(self) -> str | None:
        if (self.dir / "chat_template.jinja").is_file():
            return (self.dir / "chat_template.jinja").read_text()
        if (self.dir / "chat_template.json").is_file():
            return json.loads((self.dir / "chat_template.json").read_text()).get("chat_template")
        return None

    def _stop_ids(self) -> set[int]:
        ids = set()
        for tok in ("<|im_end|>", "<|endoftext|>", self.tokenizer.eos_token):
            i = self.tokenizer.convert_tokens_to_ids(tok) if tok else None
            if isinstance(i, int) and i != self.tokenizer.unk_token_id:
                ids.add(i)
        gen = self.dir / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
        return ids

    # -- text ---------------------------------------------------------------------------------
    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """Chat-template text with each <image> expanded to the model's image-token count."""
        msgs = [{"role": m["role"], "content": _text_of(m["content"])} for m in messages]
        text = self.tokenizer.apply_chat_template(
            msgs, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text.replace(IMAGE, IMAGE * self.config.num_image_tokens)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        return self.encode_text(self.render(messages, add_generation_prompt))

    def encode_literal(self, text: str) -> list[int]:
        """Text typed by a user: `<image>` or `<|im_end|>` in it are plain characters, never special tokens."""
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_content(self, content: str | list) -> list[int]:
        """A message's content as ids. A string is LLaVA data, where `<image>` tags mark the image slots; a list
        of typed parts (HF style) is what a chat builds, where only {"type": "image"} parts make image slots.
        Text is always literal: it can never produce control tokens."""
        image = [self.image_token_id] * self.config.num_image_tokens
        if isinstance(content, str):
            pieces = content.split(IMAGE)
            ids = self.encode_literal(pieces[0]) if pieces[0] else []
            for piece in pieces[1:]:
                ids += image + (self.encode_literal(piece) if piece else [])
            return ids
        ids, text = [], ""
        for part in content:
            if part.get("type") == "image":
                ids += self.encode_literal(text) if text else []
                ids += image
                text = "\n"
            elif part.get("type") == "text":
                text += part.get("text", "")
        return ids + (self.encode_literal(text) if text else [])

    def render_marked(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The chat template with each message's content replaced by a marker (see `encode_marked`)."""
        msgs = [{"role": m["role"], "content": _MARK.format(i)} for i, m in enumerate(messages)]
        return self.tokenizer.apply_chat_template(
            msgs, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_marked(self, marked: str, messages: list[Message]) -> list[int]:
        """Ids of a marked rendering: the template's own text keeps its special tokens, contents are literal."""
        ids: list[int] = []
        pos = 0
        for m in _MARK_RE.finditer(marked):
            ids += self.encode_text(marked[pos : m.start()]) if m.start() > pos else []
            ids += self.encode_content(messages[int(m.group(1))]["content"])
            pos = m.end()
        return ids + (self.encode_text(marked[pos:]) if pos < len(marked) else [])

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation whose contents come from users: only image parts make image slots and only the
        template makes control tokens."""
        return self.encode_marked(self.render_marked(messages, add_generation_prompt), messages)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- images -------------------------------------------------------------------------------
    def pixel_values(self, images: list) -> np.ndarray:
        """(N, 3, H, W) float32 from paths, bytes or PIL images; a (3, H, W) array (this method's output for one
        image, kept by a caller so the original need not be) is taken as it is."""
        done = {i: im for i, im in enumerate(images) if isinstance(im, np.ndarray)}
        if not done:
            pil = [load_image(im) for im in images]
            return np.asarray(self.image_processor(pil, return_tensors="np")["pixel_values"], dtype=np.float32)
        todo = [i for i in range(len(images)) if i not in done]
        if todo:
            made = self.pixel_values([images[i] for i in todo])
            done.update(zip(todo, made, strict=True))
        return np.stack([np.asarray(done[i], dtype=np.float32) for i in range(len(images))])
