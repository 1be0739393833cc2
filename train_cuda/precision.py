"""How the PyTorch side computes on a GPU: which modules are NF4, which attention kernel, which dtypes.

One place for the decisions, so the tests can check them on a CPU with transformers' own matching rules.
"""

from __future__ import annotations

# Only the language model's linears are NF4. transformers matches these names from the start of a module's
# full name (or as its suffix), and Llava's modules are `model.vision_tower.*`, `model.multi_modal_projector.*`,
# `model.language_model.*`, `lm_head`: bare "vision_tower" would match nothing. Naming any list also drops
# bitsandbytes' default lm_head exclusion, so lm_head is named too.
SKIP_NF4 = ["lm_head", "model.vision_tower", "model.multi_modal_projector"]


def has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except ImportError:
        return False


def attn_implementation(cuda: bool) -> str:
    """FlashAttention-2 when installed on a GPU; else SDPA, whose flash kernel runs for bf16 inputs with no
    dense mask (the trainers pass none: right padding under a causal mask needs none)."""
    return "flash_attention_2" if cuda and has_flash_attn() else "sdpa"


def nf4_config(compute_dtype):
    """bitsandbytes NF4 + double quantisation for the LM's linears only (see SKIP_NF4)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(SKIP_NF4),
    )


def nf4_module_names(model, config) -> list[str]:
    """The Linear modules `config` would replace with 4-bit ones in `model` (which may live on `meta`), by
    transformers' own rules: its skip list plus the model's keep-in-fp32 modules, matched as it matches them."""
    from torch import nn
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(
        model, config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
    )
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and should_convert_module(n, skip)]
