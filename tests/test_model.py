import os

import mlx.core as mx
import numpy as np
import pytest
from helpers import hf_logits, image, make_hf_pico

from bonsai_mlx import loading
from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.processing import Processor

# Exactness checks compare float32 with float32: MLX's CUDA backend would do float32 matmuls in TF32 (~1e-3
# relative) unless told not to. MLX reads this once per process, at its first matmul, after collection.
os.environ["MLX_ENABLE_TF32"] = "0"

CONFIGS = {
    "tied-last-32px": dict(tied=True, feature_layer=-1, image_size=32, patch_size=8),
    "untied-penultimate-48px": dict(tied=False, feature_layer=-2, image_size=48, patch_size=16),
    "tied-default-strategy-28px": dict(tied=True, feature_layer=-2, image_size=28, patch_size=7, strategy="default"),
}


def _inputs(d, prompt="what colour is the square?"):
    model, cfg = loading.load(d)
    proc = Processor(d, cfg)
    ids = proc.encode([{"role": "user", "content": f"<image>\n{prompt}"}])
    return model, proc, ids, proc.pixel_values([image()])


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    d = make_hf_pico(tmp_path, **CONFIGS[name])
    model, proc, ids, pv = _inputs(d)
    assert ids.count(proc.image_token_id) == model.config.num_image_tokens
    ours = np.array(model(mx.array([ids]), mx.array(pv))[0])
    ref = hf_logits(d, ids, pv)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_text_only_prompt_matches_transformers(pico_dir):
    model, cfg = loading.load(pico_dir)
    ids = Processor(pico_dir, cfg).encode([{"role": "user", "content": "how many circles are there?"}])
    ours = np.array(model(mx.array([ids]))[0])
    assert np.abs(ours - hf_logits(pico_dir, ids, None)).max() <= 1e-4


def test_attention_is_causal(pico_dir):
    """Changing a later token must not change any earlier position's logits."""
    model, _ = loading.load(pico_dir)
    a = mx.array([[5, 6, 7, 8, 9, 10]])
    b = mx.array([[5, 6, 7, 8, 9, 42]])
    la, lb = np.array(model(a)), np.array(model(b))
    np.testing.assert_allclose(la[0, :5], lb[0, :5], atol=1e-6)
    assert np.abs(la[0, 5] - lb[0, 5]).max() > 1e-4


def test_image_token_count_mismatch_is_a_clear_error(pico_dir):
    model, proc, ids, pv = _inputs(pico_dir)
    short = [t for t in ids if t != proc.image_token_id][:5] + [proc.image_token_id] * 3
    with pytest.raises(ValueError, match="<image> tokens"):
        model(mx.array([short]), mx.array(pv))


def test_rope_theta_read_from_either_spelling():
    base = {"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}}
    v5 = PicoConfig.from_dict(
        {**base, "text_config": {"model_type": "qwen2", "rope_parameters": {"rope_theta": 777.0}}}
    )
    v4 = PicoConfig.from_dict({**base, "text_config": {"model_type": "qwen2", "rope_theta": 555.0}})
    assert v5.text.rope_theta == 777.0 and v4.text.rope_theta == 555.0
    out = v5.to_dict()["text_config"]
    assert out["rope_theta"] == 777.0 and out["rope_parameters"]["rope_theta"] == 777.0


def test_hidden_states_follow_hf_indexing(pico_dir):
    import torch
    from transformers import LlavaForConditionalGeneration

    model, proc, ids, pv = _inputs(pico_dir)
    h0 = model.embed(mx.array([ids]), model.image_features(mx.array(pv)))
    _, kept = model.run_layers(h0, keep=(1, -1))
    ref = LlavaForConditionalGeneration.from_pretrained(str(pico_dir)).eval()
    with torch.no_grad():
        hs = ref(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(pv), output_hidden_states=True).hidden_states
    for k in (1, -1):
        assert np.abs(np.array(kept[k][0]) - hs[k][0].numpy()).max() < 1e-4
