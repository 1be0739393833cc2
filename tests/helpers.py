"""Tiny random checkpoints built with transformers, saved with save_pretrained (no hub needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from bonsai_mlx.tiny import train_tokenizer, write_image_processor

CORPUS = [
    "what colour is the square? red",
    "how many circles are there? three",
    "is there a blue triangle? yes",
    "describe the image. a green circle on the left and a small yellow square.",
    "where is the star? top right",
] * 4


def make_tokenizer(out: Path, image_token: bool = True):
    from transformers import AutoTokenizer

    train_tokenizer(CORPUS, out, vocab_size=300, image_token=image_token)
    return AutoTokenizer.from_pretrained(str(out))


def make_hf_pico(
    out: Path,
    tied: bool = True,
    feature_layer: int = -1,
    image_size: int = 32,
    patch_size: int = 8,
    strategy: str = "full",
    dtype: str = "float32",
    seed: int = 0,
    hidden: int = 64,
    max_positions: int = 4096,
) -> Path:
    """A Pico-shaped LlavaForConditionalGeneration with random weights, saved by transformers."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

    out = Path(out)
    tok = make_tokenizer(out)
    write_image_processor(out, image_size)
    v = SiglipVisionConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.1,
    )
    t = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        rope_theta=12345.0,
        tie_word_embeddings=tied,
        initializer_range=0.1,
        max_position_embeddings=max_positions,
    )
    cfg = LlavaConfig(
        vision_config=v,
        text_config=t,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy=strategy,
        vision_feature_layer=feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).to(getattr(torch, dtype)).eval()
    model.save_pretrained(str(out))
    return out


def make_hf5_pico(out: Path, image_size: int = 32, patch_size: int = 8, **kw) -> Path:
    """A Pico saved the way today's transformers saves one: `LlavaForConditionalGeneration.save_pretrained` and
    `LlavaProcessor.save_pretrained`, which nests the image processor in processor_config.json and writes no
    preprocessor_config.json (nothing in it is written by hand)."""
    import tempfile

    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        make_hf_pico(Path(tmp), image_size=image_size, patch_size=patch_size, **kw)
        model = LlavaForConditionalGeneration.from_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
        ip = AutoImageProcessor.from_pretrained(tmp, backend="pil")
    proc = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=tok.chat_template,
    )
    model.save_pretrained(str(out))
    proc.save_pretrained(str(out))
    assert not (out / "preprocessor_config.json").exists()  # the layout under test
    return out


def image(seed: int = 0, size: tuple[int, int] = (50, 40)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype(np.uint8))


def hf_logits(model_dir: Path, ids: list[int], pixel_values: np.ndarray | None) -> np.ndarray:
    import torch
    from transformers import LlavaForConditionalGeneration

    ref = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        kw = {"pixel_values": torch.tensor(pixel_values)} if pixel_values is not None else {}
        return ref(input_ids=torch.tensor([ids]), **kw).logits[0].numpy()


def make_teacher(
    out: Path,
    hidden: int = 48,
    image_size: int = 48,
    patch_size: int = 8,
    seed: int = 0,
    tokenizer_from: Path | None = None,
) -> Path:
    """A tiny random teacher of the LLaVA-1.5 shape (CLIP vision, Llama LM, Unigram tokenizer, Vicuna prompt,
    'default' strategy, feature layer -2, its own grid); `tokenizer_from` shares that model's vocabulary."""
    from experiments.tiny_teacher import build

    return build(
        out, CORPUS, hidden, image_size=image_size, patch_size=patch_size, seed=seed, tokenizer_from=tokenizer_from
    )


def write_describe_data(root: Path, n: int = 8) -> tuple[Path, Path]:
    """n LLaVA records asking to describe a random image, with PNGs: (json path, image dir)."""
    import json

    (root / "img").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        image(i).save(root / "img" / f"{i}.png")
        recs.append(
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nDescribe the image."},
                    {"from": "gpt", "value": "a green circle on the left and a small yellow square."},
                ],
            }
        )
    (root / "d.json").write_text(json.dumps(recs))
    return root / "d.json", root / "img"
