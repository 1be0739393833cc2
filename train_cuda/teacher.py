"""The teacher (a Llava checkpoint, e.g. llava-hf/llava-1.5-7b-hf): loading, prompts with offsets, forward."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from bonsai_mlx.core.align import pad_to_square

IMAGE = "<image>"


def device_and_dtype(dtype: str | None = None):
    import torch

    if torch.cuda.is_available():
        return "cuda", getattr(torch, dtype or "bfloat16")
    return "cpu", torch.float32


@dataclass
class Teacher:
    model: object
    tokenizer: object
    image_processor: object
    chat_template: str
    image_token_id: int
    num_image_tokens: int
    grid: int
    device: str
    # image token j shows patch j - patch_offset: 1 for a CLS the teacher keeps ("full" on CLIP), 0 for CLIP
    # "default", -1 for SigLIP "default" (no CLS, so dropping the first token drops patch 0)
    patch_offset: int = 0

    @classmethod
    def load(cls, path: str, dtype: str | None = None, load_4bit: bool = False) -> Teacher:
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        from bonsai_mlx.core.hub import resolve

        d = resolve(path)
        device, torch_dtype = device_and_dtype(dtype)
        kw: dict = {"dtype": torch_dtype}
        if device == "cuda":
            from train_cuda.precision import attn_implementation, nf4_config

            kw["device_map"] = {"": 0}
            kw["attn_implementation"] = attn_implementation(True)
            if load_4bit:  # the LM only: the vision tower and projector stay in torch_dtype
                kw["quantization_config"] = nf4_config(torch_dtype)
        model = LlavaForConditionalGeneration.from_pretrained(str(d), **kw).eval()
        tok = AutoTokenizer.from_pretrained(str(d))
        ip = AutoImageProcessor.from_pretrained(str(d), backend="pil")
        template = tok.chat_template
        if not template and (d / "chat_template.json").is_file():
            template = json.loads((d / "chat_template.json").read_text())["chat_template"]
        if not template and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        n_img, grid, offset = image_tokens(model)
        return cls(model, tok, ip, template, model.config.image_token_index, n_img, grid, device, offset)

    def render(self, msgs: list[dict]) -> str:
        """The teacher's own prompt format; <image> expanded to its image-token count."""
        conv = []
        for m in msgs:
            text = m["content"]
            if IMAGE in text:
                parts = [{"type": "image"}, {"type": "text", "text": text.replace(IMAGE, "").lstrip("\n")}]
            else:
                parts = [{"type": "text", "text": text}]
            conv.append({"role": m["role"], "content": parts})
        try:
            text = self.tokenizer.apply_chat_template(conv, chat_template=self.chat_template, tokenize=False)
        except TypeError:  # a template that wants plain-string content (<image> stays in the text)
            text = self.tokenizer.apply_chat_template(msgs, chat_template=self.chat_template, tokenize=False)
        return text.replace(IMAGE, IMAGE * self.num_image_tokens)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def pixel_values(self, image) -> np.ndarray:
        return np.asarray(self.image_processor([pad_to_square(image)], return_tensors="np")["pixel_values"], np.float32)

    def hidden_states(
        self, ids: list[list[int]], pixels: np.ndarray | None, layers: list[int], topk: int = 0
    ) -> tuple[list[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
        """LayerNorm-normalised (parameter-free) states of `layers`, (B, L, D) float32 each, right-padded batch;
        with `topk`, also the top-k next-token logits at every position: (values, ids), each (B, L, k), and the
        logsumexp over the whole vocabulary (B, L) (what the top-k's probabilities are relative to)."""
        states, top = self.forward(ids, pixels, layers, topk)
        if top is not None:
            top = (top[0].cpu().numpy(), top[1].cpu().numpy().astype(np.int32), top[2].cpu().numpy())
        return [s.cpu().numpy() for s in states], top

    def patch_states(self, image_states):
        """(..., num_image_tokens, D) -> (..., grid*grid, D) in patch order: a kept CLS dropped, and a patch
        the strategy dropped (SigLIP "default": patch 0) filled with its neighbour."""
        import torch

        if self.patch_offset >= 0:
            return image_states[..., self.patch_offset : self.patch_offset + self.grid * self.grid, :]
        first = image_states[..., :1, :]
        return torch.cat([first] * -self.patch_offset + [image_states], dim=-2)

    def forward(self, ids: list[list[int]], pixels: np.ndarray | None, layers: list[int], topk: int = 0):
        """As `hidden_states`, as float32 tensors on the teacher's device (so pooling can run there)."""
        import torch
        import torch.nn.functional as F

        L = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id or 0
        inp = torch.tensor([x + [pad] * (L - len(x)) for x in ids], device=self.device)
        kw = {}
        if pixels is not None:
            kw["pixel_values"] = torch.tensor(pixels, device=self.device, dtype=self.model.dtype)
        with torch.no_grad():
            # no attention mask: with right padding the causal mask alone gives every real position the same
            # states, and without a dense mask SDPA can use its flash kernel (padded positions are never read)
            out = self.model(input_ids=inp, output_hidden_states=True, **kw)
        hs = out.hidden_states
        states = [F.layer_norm(hs[k].float(), hs[k].shape[-1:]) for k in layers]
        if not topk:
            return states, None
        logits = out.logits.float()
        values, ids = logits.topk(min(topk, logits.shape[-1]), dim=-1)
        return states, (values, ids, torch.logsumexp(logits, dim=-1))


def image_tokens(model) -> tuple[int, int, int]:
    """(image tokens per image, patch grid side, patch offset) from the teacher's own vision tower and
    config: the tower's positions (patches, plus 1 for a CLIP CLS; SigLIP has none) less the token the
    "default" strategy drops. What its processor expands <image> to, for CLIP and SigLIP towers alike."""
    cfg = model.config
    vc = cfg.vision_config
    grid = vc.image_size // vc.patch_size
    emb = [m for m in model.model.vision_tower.modules() if hasattr(m, "num_positions") and hasattr(m, "patch_size")]
    positions = int(emb[0].num_positions) if emb else grid * grid
    extra = positions - grid * grid  # leading non-patch tokens (CLS)
    drop = 1 if cfg.vision_feature_select_strategy == "default" else 0
    return positions - drop, grid, extra - drop


def answer_spans(text: str, answers: list[str]) -> list[tuple[int, int]]:
    """Character spans of each answer, found in order in a rendered conversation."""
    spans, at = [], 0
    for a in answers:
        i = text.find(a, at)
        if i < 0:
            raise ValueError(f"answer {a[:40]!r} not found in the rendered prompt")
        spans.append((i, i + len(a)))
        at = i + len(a)
    return spans


def student_image_positions(ids: list[int], image_token_id: int) -> list[int]:
    return [i for i, t in enumerate(ids) if t == image_token_id]
