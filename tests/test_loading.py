import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from helpers import make_hf_pico

from bonsai_mlx import loading
from bonsai_mlx.core.config import ConfigError
from bonsai_mlx.core.io import CheckpointError
from bonsai_mlx.weights import save_weights


def _logits(d):
    model, _ = loading.load(d)
    return np.array(model(mx.array([[3, 4, 5, 6]])))


def _respell(src, dst, rename):
    shutil.copytree(src, dst)
    w = mx.load(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    save_weights(dst, {rename(k): v for k, v in w.items()})


def test_transformers_4_and_5_key_spellings_load_the_same(pico_dir, tmp_path):
    def v5(k):
        k = k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head", "lm_head")
        return ("model." + k) if k.startswith(("vision_tower", "multi_modal_projector")) else k

    def llava_hf(k):
        return k.replace("vision_tower.", "vision_tower.vision_model.") if k.startswith("vision_tower.") else k

    _respell(pico_dir, tmp_path / "v5", v5)
    _respell(pico_dir, tmp_path / "v4", llava_hf)
    ref = _logits(pico_dir)
    np.testing.assert_array_equal(_logits(tmp_path / "v5"), ref)
    np.testing.assert_array_equal(_logits(tmp_path / "v4"), ref)


def test_sharded_checkpoint_with_index(pico_dir, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(pico_dir, d)
    w = mx.load(str(d / "model.safetensors"))
    save_weights(d, w, shard_bytes=50_000)
    assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
    assert len(list(d.glob("model-*.safetensors"))) > 1
    np.testing.assert_array_equal(_logits(d), _logits(pico_dir))


def test_bfloat16_and_float16_checkpoints_load(tmp_path):
    for dt in ("bfloat16", "float16"):
        d = make_hf_pico(tmp_path / dt, dtype=dt)
        assert np.isfinite(_logits(d)).all()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").unlink(), "config.json: not found"),
        (lambda d: (d / "config.json").write_text("{oops"), "config.json: not valid JSON"),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "bert"})), "expected 'llava'"),
        (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 10), "not a readable safetensors file"),
        (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "PyTorch pickle weights only"),
    ],
)
def test_bad_checkpoints_give_one_line_errors(pico_dir, tmp_path, damage, message):
    d = tmp_path / "bad"
    shutil.copytree(pico_dir, d)
    damage(d)
    with pytest.raises((ConfigError, CheckpointError, ValueError, FileNotFoundError), match=message) as e:
        loading.load(d)
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_missing_tensor_is_named(pico_dir, tmp_path):
    d = tmp_path / "missing"
    shutil.copytree(pico_dir, d)
    w = mx.load(str(d / "model.safetensors"))
    w.pop("multi_modal_projector.linear_2.bias")
    save_weights(d, w)
    with pytest.raises(ValueError, match="multi_modal_projector.linear_2.bias"):
        loading.load(d)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        loading.resolve(tmp_path / "nope")


def test_missing_directory_with_a_trailing_slash_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "pico/" as the docs write it, before any pico/ exists
    with pytest.raises(FileNotFoundError, match="pico/: no such model directory"):
        loading.resolve("pico/")
