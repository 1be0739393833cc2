"""The student Pico in PyTorch: NF4 (QLoRA) LM on CUDA, LoRA on the LM's projections only, projector trained.

Precision on a GPU: the frozen weights are bf16 (the LM's linears NF4 with bf16 compute), the trainables
(LoRA, projector) and their optimizer state fp32, and the forward runs under bf16 autocast, so attention
gets bf16 inputs (FlashAttention-2, or SDPA's flash kernel). peft's `prepare_model_for_kbit_training` is not
used: it upcasts the embeddings and norms to fp32, which made the whole activation path fp32 (SDPA's unfused
math kernel). On the CPU everything is fp32 unless `bf16=True` (used by the tests to check the GPU path).
"""

from __future__ import annotations

from bonsai_mlx.core.adapters import TARGETS, lm_target_regex
from train_cuda.precision import attn_implementation, nf4_config


def compute_dtype(cuda: bool | None = None):
    import torch

    cuda = torch.cuda.is_available() if cuda is None else cuda
    return torch.bfloat16 if cuda else torch.float32


def load_student(
    pico_dir: str,
    rank: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    targets=TARGETS,
    grad_checkpoint: bool = True,
    bf16: bool | None = None,
    train_projector: bool = True,
):
    """(peft model, notes). CUDA: LM in NF4 + double quant, bf16 frozen weights, FA2 if installed, else SDPA.
    CPU: float32 (or bf16 frozen weights with `bf16=True`, no NF4: bitsandbytes needs a GPU). `train_projector=False`:
    the projector stays frozen (--projector-lr 0)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    notes = []
    cuda = torch.cuda.is_available()
    bf16 = cuda if bf16 is None else bf16
    kw: dict = {"dtype": torch.bfloat16 if bf16 else torch.float32, "attn_implementation": attn_implementation(cuda)}
    if cuda:
        kw["device_map"] = {"": torch.cuda.current_device()}
        kw["quantization_config"] = nf4_config(torch.bfloat16)
        notes.append(f"NF4 language model, bf16 compute, attention: {kw['attn_implementation']}")
    elif bf16:
        notes.append("no CUDA device: bf16 frozen weights on the CPU (no NF4), attention: sdpa")
    else:
        notes.append("no CUDA device: float32, no quantization, no FlashAttention-2")
    model = LlavaForConditionalGeneration.from_pretrained(pico_dir, **kw)
    for p in model.parameters():
        p.requires_grad_(False)
    if grad_checkpoint:
        # non-reentrant checkpointing needs no input that requires grad (what kbit preparation forced)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lm_target_regex(list(targets)), bias="none"
    )
    model = get_peft_model(model, cfg)
    for p in model.parameters():
        if p.requires_grad:  # LoRA: trained (and stepped by the optimizer) in fp32
            p.data = p.data.float()
    for n, p in model.base_model.model.model.multi_modal_projector.named_parameters():
        if not p.is_floating_point() or p.dtype == torch.uint8:
            raise TypeError(f"multi_modal_projector.{n} is {p.dtype}: it was quantised (see precision.SKIP_NF4)")
        p.data = p.data.float()
        p.requires_grad_(train_projector)
    return model, notes


def projector_state(peft_model) -> dict:
    """Projector tensors under the HF Llava key names (what bonsai_mlx and convert fuse read)."""
    proj = peft_model.base_model.model.model.multi_modal_projector
    return {f"multi_modal_projector.{k}": v.detach().float().cpu().contiguous() for k, v in proj.state_dict().items()}
