"""What the GPU path quantises and computes in, checked on the CPU with transformers' own rules."""

import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bonsai_mlx.core.config import PicoConfig
from train_cuda.precision import SKIP_NF4, attn_implementation, nf4_config, nf4_module_names


def _meta_llava(cfg: dict):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(LlavaConfig(**cfg))


def test_only_the_full_size_picos_language_model_is_nf4():
    model = _meta_llava(PicoConfig().to_dict())  # SigLIP-B/16 + Qwen2.5-0.5B, real module names, no memory
    names = nf4_module_names(model, nf4_config(torch.bfloat16))
    assert len(names) == 24 * 7 and all(n.startswith("model.language_model.layers.") for n in names)
    # the old skip list (bare names) left the vision tower and the projector to bitsandbytes
    old = nf4_config(torch.bfloat16)
    old.llm_int8_skip_modules = ["lm_head", "multi_modal_projector", "vision_tower"]
    # (244 on the H100 run, whose Pico still had SigLIP's pooling head; Picos are written without it now)
    assert len(nf4_module_names(model, old)) == 24 * 7 + 12 * 6 + 2


def test_the_teachers_vision_tower_and_projector_stay_float_in_4bit():
    from transformers import CLIPVisionConfig, LlamaConfig

    cfg = {
        "vision_config": CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        ).to_dict(),
        "text_config": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32).to_dict(),
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
    }
    cfg["vision_config"]["model_type"] = "clip_vision_model"
    cfg["text_config"]["model_type"] = "llama"
    names = nf4_module_names(_meta_llava(cfg), nf4_config(torch.bfloat16))  # LLaVA-1.5-7B's shape and names
    assert len(names) == 32 * 7 and all(n.startswith("model.language_model.layers.") for n in names)
    assert SKIP_NF4[0] == "lm_head"


def test_flash_attention_when_installed_else_sdpa(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert attn_implementation(True) == "flash_attention_2"
    assert attn_implementation(False) == "sdpa"
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails
    assert attn_implementation(True) == "sdpa"


def test_bf16_reaches_attention_with_no_dense_mask_and_trainables_stay_fp32(pico_dir, monkeypatch):
    """The GPU recipe on the CPU: bf16 frozen weights, fp32 LoRA/projector, bf16 autocast. Every attention
    call must get bf16 q/k/v; the LM's must be plain causal (no mask tensor), which SDPA's flash kernel needs."""
    from train_cuda.losses import StudentStep
    from train_cuda.student import load_student

    model, _ = load_student(str(pico_dir), rank=4, dropout=0.0, grad_checkpoint=False, bf16=True)
    assert model.base_model.model.config._attn_implementation == "sdpa"
    for n, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), n
    assert any("multi_modal_projector" in n for n, p in model.named_parameters() if p.requires_grad)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((q.dtype, k.dtype, attn_mask is None, is_causal, q.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    cfg = PicoConfig.load(pico_dir)
    n_img = cfg.num_image_tokens
    ids = torch.tensor([[5] + [cfg.image_token_index] * n_img + [6, 7, 8, 9]] * 2)
    px = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
    step = StudentStep(model, None, None, cfg.image_token_index, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = step(ids, torch.tensor([n_img + 1, n_img + 2]), torch.tensor([7, 8]), None, pixel_values=px)
    parts["loss"].backward()
    vision = [c for c in calls if c[4] == cfg.vision.grid**2]
    lm = [c for c in calls if c[4] == ids.shape[1]]
    assert len(vision) == cfg.vision.num_hidden_layers and len(lm) == cfg.text.num_hidden_layers
    assert all(c[0] == c[1] == torch.bfloat16 for c in calls)
    assert all(c[2] and c[3] for c in lm)  # no dense mask, is_causal: the flash kernel's conditions
    lora = [p for n, p in model.named_parameters() if "lora_A" in n]
    assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)


def test_saved_projector_loads_strictly_into_transformers_projector(pico_dir):
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from train_cuda.student import load_student, projector_state

    model, _ = load_student(str(pico_dir), rank=4, grad_checkpoint=False)
    state = projector_state(model)
    ref = LlavaMultiModalProjector(LlavaConfig.from_pretrained(str(pico_dir)))
    ref.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in state.items()}, strict=True)
    x = torch.randn(3, ref.linear_1.in_features)
    with torch.no_grad():
        ours = model.base_model.model.model.multi_modal_projector(x)
        np.testing.assert_allclose(ref(x).numpy(), ours.numpy(), atol=1e-6)


@pytest.mark.parametrize("bad", ["packed", "missing", "extra"])
def test_fuse_refuses_a_projector_that_does_not_fit(pico_dir, tmp_path, capsys, bad):
    from bonsai_mlx.convert.__main__ import main as convert
    from train_cuda.student import load_student, projector_state

    model, _ = load_student(str(pico_dir), rank=4, grad_checkpoint=False)
    state = projector_state(model)
    if bad == "packed":  # what NF4 made of it: packed bytes, plus bitsandbytes' quant state
        state["multi_modal_projector.linear_1.weight"] = torch.zeros(2048, 1)
        state["multi_modal_projector.linear_1.weight.absmax"] = torch.zeros(64)
    elif bad == "missing":
        state.pop("multi_modal_projector.linear_2.bias")
    else:
        state["multi_modal_projector.linear_3.weight"] = torch.zeros(2, 2)
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file(state, str(ck / "projector.safetensors"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert(["fuse", str(pico_dir), str(ck), str(tmp_path / "fused")])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "projector.safetensors" in err
    assert not (tmp_path / "fused" / "config.json").exists()
