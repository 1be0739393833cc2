"""A small teacher of the LLaVA-1.5 shape (CLIP vision, Llama LM, SentencePiece-style tokenizer, Vicuna
prompt, 'default' feature selection from layer -2) built with transformers, and a plain PyTorch loop that
trains it on LLaVA-format records. The miniature of LLaVA-1.5-7B that `shapes_kd` distils from."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from bonsai_mlx.core.processing import pad_id_of
from experiments.fit import fit

VICUNA = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def build(
    out: str | Path,
    corpus: list[str],
    hidden: int = 48,
    layers: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    image_size: int = 48,
    patch_size: int = 8,
    vocab_size: int = 200,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    init_std: float = 0.02,
) -> Path:
    """Random-weight teacher saved with save_pretrained. With `tokenizer_from` it takes that model's
    tokenizer and template (a shared vocabulary) instead of training its own Unigram one."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        fast = AutoTokenizer.from_pretrained(str(tokenizer_from))
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(
            [*corpus, "USER: ASSISTANT:"],
            trainers.UnigramTrainer(
                vocab_size=vocab_size,
                special_tokens=["<unk>", "<s>", "</s>", "<image>"],
                unk_token="<unk>",
                show_progress=False,
            ),
        )
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="<unk>",
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<unk>",
            additional_special_tokens=["<image>"],
        )
        fast.chat_template = VICUNA
    fast.save_pretrained(str(out))
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
        "resample": 3,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(processor))
    v = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
        initializer_range=init_std,
    )
    t = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=len(fast),
        max_position_embeddings=1024,
        initializer_range=init_std,
    )
    cfg = LlavaConfig(
        vision_config=v,
        text_config=t,
        image_token_index=fast.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(str(out))
    return out


def encode(teacher, rec: dict, image_root: str | None) -> tuple[list[int], list[int], object]:
    """(ids, labels: -100 outside the answers and their end token, PIL image or None) in the teacher's format."""
    from bonsai_mlx.core.images import load_image
    from bonsai_mlx.core.records import answer_spans, messages_of

    msgs = messages_of(rec)
    if rec.get("image") and not any("<image>" in m["content"] for m in msgs):
        msgs[0] = {**msgs[0], "content": "<image>\n" + msgs[0]["content"]}
    ids, off = teacher.encode(teacher.render(msgs))
    spans = [(a, b) for a, b, _ in answer_spans(teacher.render, msgs)]  # each answer after its own prompt
    eos = teacher.tokenizer.eos_token_id
    labels = [-100] * len(ids)
    for a, b in spans:
        inside = [i for i, (s, e) in enumerate(off) if e > s and s < b and e > a]
        for i in inside:
            labels[i] = ids[i]
        nxt = inside[-1] + 1 if inside else None
        if nxt is not None and nxt < len(ids) and ids[nxt] == eos:
            labels[nxt] = eos
    img = rec.get("image")
    image = load_image(str(Path(image_root) / img) if image_root else img) if img else None
    return ids, labels, image


def _batches(teacher, samples: list, batch_size: int):
    """(ids, labels, mask, pixel values) on the teacher's device (a GPU when there is one)."""
    import torch

    dev = teacher.device
    pad = pad_id_of(teacher.tokenizer)
    L = max(len(s[0]) for s in samples)
    ids = torch.tensor([s[0] + [pad] * (L - len(s[0])) for s in samples], device=dev)
    labels = torch.tensor([s[1] + [-100] * (L - len(s[1])) for s in samples], device=dev)
    mask = torch.tensor([[1] * len(s[0]) + [0] * (L - len(s[0])) for s in samples], device=dev)
    images = [s[2] for s in samples if s[2] is not None]
    pv = None
    if images:
        px = np.concatenate([teacher.pixel_values(im) for im in images])
        pv = torch.tensor(px, device=dev, dtype=teacher.model.dtype)
    return ids, labels, mask, pv


def train(
    model_dir: str | Path,
    records: list[dict],
    image_root: str | None,
    steps: int,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    log=print,
) -> None:
    """Full fine-tuning (everything trains) by experiments.fit (AdamW on the trainers' one curve); saved in place."""
    import torch

    from train_cuda.teacher import Teacher

    torch.manual_seed(seed)
    teacher = Teacher.load(str(model_dir), dtype="float32")  # trained in float32, on the GPU when there is one
    model = teacher.model.train()
    samples = [encode(teacher, r, image_root) for r in records]
    rng = random.Random(seed)
    order: list[int] = []

    def loss_at(step: int):
        nonlocal order
        if len(order) < batch_size:
            order += rng.sample(range(len(samples)), len(samples))
        idx, order = order[:batch_size], order[batch_size:]
        ids, labels, mask, pv = _batches(teacher, [samples[i] for i in idx], batch_size)
        return model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels).loss

    fit(model, loss_at, steps, lr, log_every=100, log=log, name="teacher step")
    model.eval().save_pretrained(str(model_dir))


def accuracy(model_dir: str | Path, records: list[dict], image_root: str | None, batch_size: int = 64) -> float:
    """Exact match of the answer and its end token under teacher forcing, which equals greedy exact match:
    greedy decoding reproduces the answer exactly when, and only when, every one of these argmaxes is right."""
    import torch

    from train_cuda.teacher import Teacher

    teacher = Teacher.load(str(model_dir))
    samples = [encode(teacher, r, image_root) for r in records]
    right = 0
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            ids, labels, mask, pv = _batches(teacher, samples[i : i + batch_size], batch_size)
            pred = teacher.model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits.argmax(-1)
            tgt = labels[:, 1:]
            ok = (pred[:, :-1] == tgt) | (tgt == -100)
            right += int(ok.all(-1).sum())
    return right / max(len(samples), 1)
