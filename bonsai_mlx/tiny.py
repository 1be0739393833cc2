"""Build small Pico checkpoints from scratch, offline: a BPE tokenizer trained on given text,
a SigLIP image-processor config and randomly initialised weights, all in the HF Llava layout."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from bonsai_mlx.core.config import PicoConfig, TextConfig, VisionConfig
from bonsai_mlx.core.io import atomic_write_text

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]

# ChatML as Qwen2.5 writes it, minus tool calling; a system turn only when one is given.
CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(corpus: Iterable[str], out: str | Path, vocab_size: int = 512, image_token: bool = True) -> None:
    """Byte-level BPE (lossless on any text) with Qwen's special tokens (and <image>)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS if image_token else SPECIALS[:3],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<image>"] if image_token else ["<|im_start|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))


def write_image_processor(out: str | Path, image_size: int) -> None:
    cfg = {
        "image_processor_type": "SiglipImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
    }
    atomic_write_text(Path(out) / "preprocessor_config.json", json.dumps(cfg, indent=2) + "\n")


def pico_config(vision: VisionConfig, text: TextConfig, image_token_index: int, **kw) -> PicoConfig:
    raw = {"model_type": "llava", "vision_config": asdict(vision), "text_config": asdict(text)}
    return PicoConfig(vision=vision, text=text, image_token_index=image_token_index, raw=raw, **kw)


def init_weights(model, seed: int = 0, std: float = 0.02) -> None:
    """transformers-style init: N(0, std) matrices, zero biases, unit norms."""
    from mlx.utils import tree_flatten

    mx.random.seed(seed)
    new = []
    for k, v in tree_flatten(model.parameters()):
        if (
            k.endswith("norm.weight")
            or k.endswith("layernorm.weight")
            or k.endswith("layer_norm1.weight")
            or k.endswith("layer_norm2.weight")
        ):
            new.append((k, mx.ones(v.shape)))
        elif v.ndim == 1:
            new.append((k, mx.zeros(v.shape)))
        else:
            new.append((k, mx.random.normal(v.shape) * std))
    model.load_weights(new)
    mx.eval(model.parameters())


def make_pico(
    out: str | Path,
    corpus: Iterable[str],
    vision: VisionConfig,
    text: TextConfig,
    vocab_size: int = 512,
    seed: int = 0,
    init_std: float = 0.02,
    **kw,
):
    """A complete, randomly initialised Pico directory. Returns (model, config)."""
    from transformers import AutoTokenizer

    from bonsai_mlx import loading
    from bonsai_mlx.model import Pico

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(corpus, out, vocab_size)
    tok = AutoTokenizer.from_pretrained(str(out))
    text.vocab_size = len(tok)
    write_image_processor(out, vision.image_size)
    config = pico_config(vision, text, tok.convert_tokens_to_ids("<image>"), **kw)
    model = Pico(config)
    init_weights(model, seed, init_std)
    loading.save(model, out)
    return model, config
