"""`convert to-gguf`: the LM and mmproj GGUF files hold what llama.cpp's loaders read, checked with the gguf
reader (llama.cpp itself is exercised by scripts/llama_cpp_proof.py: compiling it does not fit CI)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bonsai_mlx import loading
from bonsai_mlx.convert.__main__ import main as convert
from bonsai_mlx.weights import load_weights

gguf = pytest.importorskip("gguf")


def _fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _tensors(reader) -> dict:
    return {t.name: t for t in reader.tensors}


def _float(t) -> np.ndarray:
    """A tensor's values in HF (row-major, PyTorch) shape, dequantized."""
    data = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))


@pytest.fixture(scope="module")
def files(pico_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    for kind in ("f32", "f16", "q8_0"):
        assert convert(["to-gguf", str(pico_dir), str(out), "--type", kind]) == 0
    return out, pico_dir.name


def test_mmproj_has_what_llama_cpp_clip_loader_reads(files, pico_dir):
    out, name = files
    r = gguf.GGUFReader(out / f"mmproj-{name}-f16.gguf")
    f = _fields(r)
    cfg = json.loads((pico_dir / "config.json").read_text())
    v, pp = cfg["vision_config"], json.loads((pico_dir / "preprocessor_config.json").read_text())
    assert f["general.architecture"] == "clip" and f["clip.projector_type"] == "mlp"
    assert f["clip.has_vision_encoder"] is True and f["clip.use_gelu"] is True
    assert f["clip.vision.image_size"] == v["image_size"] and f["clip.vision.patch_size"] == v["patch_size"]
    assert f["clip.vision.block_count"] == v["num_hidden_layers"]
    assert f["clip.vision.embedding_length"] == v["hidden_size"]
    assert f["clip.vision.feed_forward_length"] == v["intermediate_size"]
    assert f["clip.vision.attention.head_count"] == v["num_attention_heads"]
    assert f["clip.vision.projection_dim"] == cfg["text_config"]["hidden_size"]
    assert f["clip.vision.image_mean"] == pytest.approx(pp["image_mean"])
    assert f["clip.vision.image_std"] == pytest.approx(pp["image_std"])
    assert f["clip.vision.feature_layer"] == [v["num_hidden_layers"]]  # HF's -1: the last layer's output

    t = _tensors(r)
    n = v["num_hidden_layers"]
    expected = {"mm.0.weight", "mm.0.bias", "mm.2.weight", "mm.2.bias", "v.patch_embd.weight", "v.patch_embd.bias"}
    expected |= {"v.position_embd.weight"}
    for i in range(n):
        for part in ("attn_q", "attn_k", "attn_v", "attn_out", "ln1", "ln2", "ffn_up", "ffn_down"):
            expected |= {f"v.blk.{i}.{part}.weight", f"v.blk.{i}.{part}.bias"}
    assert set(t) == expected  # no post_ln (Llava reads states before it), no pooling head, no LM
    src = loading.canonical_weights(load_weights(pico_dir))
    pairs = {
        "mm.0.weight": "multi_modal_projector.linear_1.weight",
        "mm.2.bias": "multi_modal_projector.linear_2.bias",
        "v.patch_embd.weight": "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "v.blk.1.ffn_up.weight": "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
        "v.blk.2.ffn_down.weight": "vision_tower.vision_model.encoder.layers.2.mlp.fc2.weight",
        "v.blk.0.attn_out.bias": "vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.bias",
        "v.position_embd.weight": "vision_tower.vision_model.embeddings.position_embedding.weight",
    }
    for g, h in pairs.items():
        np.testing.assert_allclose(_float(t[g]), np.array(src[h]), atol=2e-3, rtol=1e-3)
    exact = _tensors(gguf.GGUFReader(out / f"mmproj-{name}-f32.gguf"))  # --type f32: the vision side too
    assert {x.tensor_type.name for x in exact.values()} == {"F32"}
    for g, h in pairs.items():
        np.testing.assert_array_equal(_float(exact[g]), np.array(src[h]))


@pytest.mark.parametrize("kind, atol", [("f32", 0.0), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_lm_gguf_holds_the_qwen2_weights_and_tokenizer(files, pico_dir, kind, atol):
    from transformers import AutoTokenizer

    out, name = files
    r = gguf.GGUFReader(out / f"{name}-{kind}.gguf")
    f = _fields(r)
    t = json.loads((pico_dir / "config.json").read_text())["text_config"]
    assert f["general.architecture"] == "qwen2"
    assert f["qwen2.block_count"] == t["num_hidden_layers"]
    assert f["qwen2.embedding_length"] == t["hidden_size"]
    assert f["qwen2.attention.head_count_kv"] == t["num_key_value_heads"]
    assert f["qwen2.rope.freq_base"] == pytest.approx(12345.0)
    tok = AutoTokenizer.from_pretrained(str(pico_dir))
    tokens = f["tokenizer.ggml.tokens"]
    assert len(tokens) == t["vocab_size"]
    assert [tokens[i] for i in tok.encode("what colour is the square? red")] == tok.tokenize(
        "what colour is the square? red"
    )
    assert tokens[f["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert f["tokenizer.ggml.pre"] == "gpt-2" and f["tokenizer.ggml.add_bos_token"] is False
    assert "list-of-parts" in f["tokenizer.chat_template"]

    tensors = _tensors(r)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert not [n for n in tensors if n.startswith(("v.", "mm."))]
    src = loading.canonical_weights(load_weights(pico_dir))
    for g, h in {
        "token_embd.weight": "language_model.model.embed_tokens.weight",
        "blk.0.attn_q.weight": "language_model.model.layers.0.self_attn.q_proj.weight",
        "blk.2.attn_k.bias": "language_model.model.layers.2.self_attn.k_proj.bias",
        "blk.1.ffn_gate.weight": "language_model.model.layers.1.mlp.gate_proj.weight",
        "output_norm.weight": "language_model.model.norm.weight",
    }.items():
        want = np.array(src[h])
        assert _float(tensors[g]).shape == want.shape
        np.testing.assert_allclose(_float(tensors[g]), want, atol=atol + 1e-7, rtol=0 if kind == "f32" else 1e-3)
    quantized = {t.tensor_type.name for n, t in tensors.items() if n.endswith("attn_q.weight")}
    assert quantized == {kind.upper()}


def test_to_gguf_of_a_checkpoint_saved_by_transformers_5(pico5_dir, tmp_path):
    """(issue 26) no preprocessor_config.json: the image mean and std come from processor_config.json."""
    assert not (pico5_dir / "preprocessor_config.json").exists()
    assert convert(["to-gguf", str(pico5_dir), str(tmp_path)]) == 0
    f = _fields(gguf.GGUFReader(tmp_path / f"mmproj-{pico5_dir.name}-f16.gguf"))
    pp = json.loads((pico5_dir / "processor_config.json").read_text())["image_processor"]
    assert f["clip.vision.image_mean"] == pytest.approx(pp["image_mean"])
    assert f["clip.vision.image_std"] == pytest.approx(pp["image_std"])
    assert (tmp_path / f"{pico5_dir.name}-f16.gguf").is_file()


def test_to_gguf_refuses_what_llama_cpp_cannot_run_with_one_line(pico_dir, tmp_path, capsys):
    from bonsai_mlx.core.config import PicoConfig

    d = tmp_path / "default"
    assert convert(["to-hf", str(pico_dir), str(d)]) == 0
    cfg = PicoConfig.load(d)
    cfg.vision_feature_select_strategy = "default"
    cfg.save(d)
    with pytest.raises(SystemExit):
        convert(["to-gguf", str(d), str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert "vision_feature_select_strategy" in err and len(err.splitlines()) == 1


def test_q4_k_m_without_llama_cpp_says_how_to_get_it(pico_dir, tmp_path, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed: q4_k_m would be made")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit):
        convert(["to-gguf", str(pico_dir), str(tmp_path / "g"), "--type", "q4_k_m"])
    assert "llama.cpp's quantizer" in capsys.readouterr().err
    assert not list((tmp_path / "g").glob("*.gguf"))  # no half-written or temporary file left


@pytest.mark.parametrize("module", [None, "shadow"], ids=["not-installed", "gguf-folder-in-cwd"])
def test_to_gguf_without_the_gguf_package_says_how_to_get_it(module, tmp_path, capsys, monkeypatch):
    import sys
    import types

    # None: `import gguf` fails; "shadow": what a gguf/ folder in the working directory imports as without it
    monkeypatch.setitem(sys.modules, "gguf", module and types.ModuleType("gguf"))
    with pytest.raises(SystemExit):
        convert(["to-gguf", str(tmp_path / "pico"), str(tmp_path / "g")])
    err = capsys.readouterr().err.strip()
    assert "pip install -e '.[gguf]'" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "g").exists()
