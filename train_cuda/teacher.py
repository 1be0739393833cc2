"""The teacher (a Llava checkpoint, e.g. llava-hf/llava-1.5-7b-hf): loading, prompts with offsets, forward."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from bonsai_mlx.core.align import pad_to_square
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.processing import pad_id_of

IMAGE = "<image>"


def device_and_dtype(dtype: str | None = None, device: str | None = None):
    """(device, compute dtype): the given device (a rank's "cuda:N") or cuda:0 when there is a GPU, in bfloat16
    unless told; the CPU in float32."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        return str(device), getattr(torch, dtype or "bfloat16")
    return "cpu", torch.float32


@dataclass
class Teacher:
    model: object  # None until `load_model`: prompts, ids and the manifest need only the tokenizer and config
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
    config: object = None
    path: str | None = None  # as the user named it (a directory or hub id)
    dtype: object = None
    load_4bit: bool = False
    dir: str | None = None  # where its files are

    @classmethod
    def load(
        cls,
        path: str,
        dtype: str | None = None,
        load_4bit: bool = False,
        device: str | None = None,
        weights: bool = True,
    ) -> Teacher:
        """The teacher's tokenizer, template, image processor and config; its weights too unless `weights=False`
        (then `load_model` later: inputs can be checked and planned before gigabytes load)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        from bonsai_mlx.core.hub import resolve

        d = resolve(path)
        device, torch_dtype = device_and_dtype(dtype, device)
        cfg = AutoConfig.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        ip = AutoImageProcessor.from_pretrained(str(d), backend="pil")
        template = tok.chat_template
        if not template and (d / "chat_template.json").is_file():
            template = json.loads((d / "chat_template.json").read_text())["chat_template"]
        if not template and (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text()
        n_img, grid, offset = image_tokens_of_config(cfg)
        t = cls(None, tok, ip, template, cfg.image_token_index, n_img, grid, device, offset, cfg, str(path))
        t.dtype, t.load_4bit, t.dir = torch_dtype, load_4bit, str(d)
        if weights:
            t.load_model()
        return t

    def load_model(self) -> Teacher:
        """The weights, in eval mode, on this teacher's device (NF4 LM with `load_4bit` on CUDA; SDPA or
        FlashAttention-2 there). Checks that the tower makes as many image tokens as the config promised."""
        from transformers import LlavaForConditionalGeneration

        if self.model is not None:
            return self
        kw: dict = {"dtype": self.dtype}
        if self.device.startswith("cuda"):
            from train_cuda.precision import attn_implementation, nf4_config

            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            kw["device_map"] = {"": index}
            kw["attn_implementation"] = attn_implementation(True)
            if self.load_4bit:  # the LM only: the vision tower and projector stay in the compute dtype
                kw["quantization_config"] = nf4_config(self.dtype)
        model = LlavaForConditionalGeneration.from_pretrained(self.dir, **kw).eval()
        got = image_tokens(model)
        if got != (self.num_image_tokens, self.grid, self.patch_offset):
            raise UserError(f"{self.path}: the vision tower gives {got} image tokens/grid/offset, config said "
                             f"{(self.num_image_tokens, self.grid, self.patch_offset)}")  # fmt: skip
        self.model = model
        return self

    def render(self, msgs: list[dict], add_generation_prompt: bool = False) -> str:
        """The teacher's own prompt format; <image> expanded to its image-token count."""
        conv = []
        for m in msgs:
            text = m["content"]
            if IMAGE in text:
                parts = [{"type": "image"}, {"type": "text", "text": text.replace(IMAGE, "").lstrip("\n")}]
            else:
                parts = [{"type": "text", "text": text}]
            conv.append({"role": m["role"], "content": parts})
        kw = {"chat_template": self.chat_template, "tokenize": False, "add_generation_prompt": add_generation_prompt}
        try:
            text = self.tokenizer.apply_chat_template(conv, **kw)
        except TypeError:  # a template that wants plain-string content (<image> stays in the text)
            text = self.tokenizer.apply_chat_template(msgs, **kw)
        return text.replace(IMAGE, IMAGE * self.num_image_tokens)

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets as the teacher's own processor makes them: its tokenizer's special tokens
        (Llama's BOS) added unless the template already wrote them (as `ProcessorMixin.apply_chat_template`)."""
        bos = self.tokenizer.bos_token
        add = not (bos and text.startswith(bos))
        enc = self.tokenizer(text, add_special_tokens=add, return_offsets_mapping=True)
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

    def forward(self, ids: list[list[int]], pixels: np.ndarray | None, layers: list[int], topk: int = 0, at=None):
        """As `hidden_states`, as float32 tensors on the teacher's device (so pooling can run there). With `at`
        (positions per row), the top-k come as one (values, ids, lse) per row at those positions only: the LM
        head then runs there alone, not over every position and the whole vocabulary."""
        import torch
        import torch.nn.functional as F

        L = max(len(x) for x in ids)
        pad = pad_id_of(self.tokenizer)
        inp = torch.tensor([x + [pad] * (L - len(x)) for x in ids], device=self.device)
        kw = {}
        if pixels is not None:
            kw["pixel_values"] = torch.as_tensor(pixels).to(self.device, self.model.dtype)
        with torch.no_grad():
            # no attention mask: with right padding the causal mask alone gives every real position the same
            # states, and without a dense mask SDPA can use its flash kernel (padded positions are never read)
            if at is None:
                out = self.model(input_ids=inp, output_hidden_states=True, **kw)
            else:
                out = self.model.model(input_ids=inp, output_hidden_states=True, **kw)
            hs = out.hidden_states
            states = [F.layer_norm(hs[k].float(), hs[k].shape[-1:]) for k in layers]
            if not topk:
                return states, None
            if at is None:
                logits = out.logits.float()
                values, idx = logits.topk(min(topk, logits.shape[-1]), dim=-1)
                return states, (values, idx, torch.logsumexp(logits, dim=-1))
            rows = []
            for b, pos in enumerate(at):
                logits = self.model.lm_head(out.last_hidden_state[b, list(pos)]).float()
                values, idx = logits.topk(min(topk, logits.shape[-1]), dim=-1)
                rows.append((values, idx, torch.logsumexp(logits, dim=-1)))
            return states, rows


def image_tokens_of_config(cfg) -> tuple[int, int, int]:
    """`image_tokens` from the config alone (no weights): CLIP towers have a CLS position, SigLIP none."""
    vc = cfg.vision_config
    grid = vc.image_size // vc.patch_size
    extra = 0 if "siglip" in str(getattr(vc, "model_type", "")) else 1
    drop = 1 if cfg.vision_feature_select_strategy == "default" else 0
    return grid * grid + extra - drop, grid, extra - drop


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


def student_image_positions(ids: list[int], image_token_id: int) -> list[int]:
    return [i for i, t in enumerate(ids) if t == image_token_id]
