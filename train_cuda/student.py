"""The student Pico in PyTorch: NF4 (QLoRA) on CUDA, LoRA on the LM's projections only, projector trained."""

from __future__ import annotations

from bonsai_mlx.core.adapters import TARGETS, lm_target_regex


def has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401

        return True
    except ImportError:
        return False


def load_student(
    pico_dir: str,
    rank: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    targets=TARGETS,
    grad_checkpoint: bool = True,
):
    """(peft model, notes). CUDA: LM in NF4 + double quant, bf16 compute, FA2 if installed. CPU: float32."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlavaForConditionalGeneration

    notes = []
    kw: dict = {}
    cuda = torch.cuda.is_available()
    if cuda:
        from transformers import BitsAndBytesConfig

        kw.update(dtype=torch.bfloat16, device_map={"": torch.cuda.current_device()})
        # Naming any skip list drops bitsandbytes' default lm_head exclusion, so name it too; SigLIP stays float.
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["lm_head", "multi_modal_projector", "vision_tower"],
        )
        kw["attn_implementation"] = "flash_attention_2" if has_flash_attn() else "sdpa"
        notes.append(f"NF4 base, bf16 compute, attention: {kw['attn_implementation']}")
    else:
        kw["dtype"] = torch.float32
        notes.append("no CUDA device: float32, no quantization, no FlashAttention-2")
    model = LlavaForConditionalGeneration.from_pretrained(pico_dir, **kw)
    if cuda:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=grad_checkpoint)
    elif grad_checkpoint:
        model.gradient_checkpointing_enable()
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lm_target_regex(list(targets)), bias="none"
    )
    model = get_peft_model(model, cfg)
    base = model.base_model.model
    for p in base.model.multi_modal_projector.parameters():
        p.data = p.data.float()
        p.requires_grad_(True)
    return model, notes


def projector_state(peft_model) -> dict:
    """Projector tensors under the HF Llava key names (what bonsai_mlx and convert fuse read)."""
    proj = peft_model.base_model.model.model.multi_modal_projector
    return {f"multi_modal_projector.{k}": v.detach().float().cpu().contiguous() for k, v in proj.state_dict().items()}
