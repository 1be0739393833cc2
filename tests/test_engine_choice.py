"""The engine choice (`auto`), the GGUF cache's fingerprint and the pixels llama.cpp is handed: no llama.cpp needed."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from helpers import image

from bonsai_mlx import engines
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.engines import gguf_cache


@pytest.mark.parametrize(
    "gpu, llama, engine, words",
    [
        ("metal", True, "mlx", "Apple silicon"),
        ("metal", False, "mlx", "Apple silicon"),
        ("cuda", True, "mlx", "CUDA"),
        (None, True, "llama.cpp", "CPU"),
        (None, False, "mlx", "no llama-cpp-python"),
    ],
)
def test_auto_picks_mlx_on_apple_silicon_and_cuda_else_llama_cpp_when_installed(monkeypatch, gpu, llama, engine, words):
    monkeypatch.setattr(engines, "mlx_gpu", lambda: gpu)
    monkeypatch.setattr(engines, "llama_available", lambda: llama)
    c = engines.choose("auto")
    assert c.engine == engine
    assert words in c.reason and c.line().startswith(f"engine: {engine} (auto: ")
    assert "\n" not in c.line()
    if engine == "mlx" and gpu is None:
        assert "pip install -e '.[llama]'" in c.reason  # says how to get the faster engine


def test_the_platform_probe_itself(monkeypatch):
    monkeypatch.setattr(engines.sys, "platform", "darwin")
    monkeypatch.setattr(engines.platform, "machine", lambda: "arm64")
    assert engines.mlx_gpu() == "metal"
    monkeypatch.setattr(engines.sys, "platform", "linux")
    monkeypatch.setattr(engines.platform, "machine", lambda: "aarch64")
    import mlx.core as mx

    monkeypatch.setattr(mx.cuda, "is_available", lambda: True)
    assert engines.mlx_gpu() == "cuda"
    monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert engines.mlx_gpu() is None


def test_asking_for_an_engine_is_obeyed_or_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(engines, "mlx_gpu", lambda: None)
    monkeypatch.setattr(engines, "llama_available", lambda: False)
    assert engines.choose("mlx") == engines.Choice("mlx", "asked for")
    with pytest.raises(UserError, match=r"llama-cpp-python is not installed; pip install -e '\.\[llama\]'"):
        engines.choose("llama.cpp")
    with pytest.raises(UserError, match="expected one of auto, mlx, llama.cpp"):
        engines.choose("vllm")
    monkeypatch.setattr(engines, "mlx_gpu", lambda: "metal")
    monkeypatch.setattr(engines, "llama_available", lambda: True)
    assert engines.choose("llama.cpp").engine == "llama.cpp"  # asked for: even where MLX has a GPU


# -- the pixels llama.cpp reads -----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(40, 40), (80, 40), (40, 80), (33, 97)])
def test_pixels_handed_to_llama_cpp_are_the_ones_pico_reads(pico_dir, size):
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.processing import Processor
    from bonsai_mlx.engines.llama_cpp import pico_pixels

    proc = Processor(pico_dir, PicoConfig.load(pico_dir))
    im = image(3, size)
    px = pico_pixels(proc, im)
    n = PicoConfig.load(pico_dir).vision.image_size
    assert px.shape == (n, n, 3) and px.dtype == np.uint8  # stretched to the square, not letterboxed
    ours = proc.pixel_values([im])
    from PIL import Image

    # llama.cpp normalises these uint8 values itself, with the same mean and std
    np.testing.assert_array_equal(proc.pixel_values([Image.fromarray(px)]), ours)
    # the server keeps the processor's output, not the image: it maps back to the same uint8 pixels
    np.testing.assert_array_equal(pico_pixels(proc, ours[0]), px)


def test_top_p_keeps_the_tokens_mlx_lm_keeps():
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_p

    from bonsai_mlx.engines.llama_cpp import make_picker
    from bonsai_mlx.generate import Sampling

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32) * 3
    masked = logits.astype(np.float64)
    masked[49] = -np.inf  # as the MLX engine: <image> is out before the distribution is made
    logprobs = masked - np.logaddexp.reduce(masked)

    class P:  # the picker only reads the image token id
        image_token_id = 49

    for top_p in (0.3, 0.6, 0.9):
        kept_mlx = set(np.flatnonzero(np.isfinite(np.array(apply_top_p(mx.array(logprobs[None]), top_p))[0])))
        pick = make_picker(None, P, Sampling(temperature=1.0, top_p=top_p, seed=1))
        drawn = {pick(logits) for _ in range(400)}
        assert drawn <= kept_mlx and len(drawn) >= min(len(kept_mlx), 2)
    greedy = make_picker(None, P, Sampling())
    logits[49] = 100.0  # <image> is never sampled
    assert greedy(logits) != 49


# -- the GGUF cache -----------------------------------------------------------------------------------------------
def _weights_file(d):
    return next(d.glob("*.safetensors"))


def test_the_gguf_pair_is_made_once_and_remade_only_when_the_weights_change(pico_dir, tmp_path):
    d = tmp_path / "pico"
    shutil.copytree(pico_dir, d)
    logs: list[str] = []
    first = gguf_cache.ensure(d, "f32", log=logs.append)
    assert first.made and first.lm.is_file() and first.mmproj.is_file()
    assert first.lm.parent == d / ".gguf" / "f32"  # beside the model
    assert len(logs) == 1 and "making the llama.cpp files (f32)" in logs[0]
    again = gguf_cache.ensure(d, "f32", log=logs.append)
    assert not again.made and again.lm == first.lm and len(logs) == 1

    # a touch (or a copy) changes the stats, not the contents: reused, and the record refreshed
    w = _weights_file(d)
    st = w.stat()
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    touched = gguf_cache.ensure(d, "f32")
    assert not touched.made
    rec = gguf_cache._read_record(first.lm.parent)
    assert rec["stat"] == gguf_cache.stat_key(d)

    # new weights: made again
    from safetensors.numpy import load_file, save_file

    t = load_file(w)
    k = next(k for k in t if "multi_modal_projector" in k and k.endswith("weight"))
    t[k] = t[k] + 1.0
    save_file(t, w, metadata={"format": "pt"})
    remade = gguf_cache.ensure(d, "f32")
    assert remade.made
    import gguf

    r = gguf.GGUFReader(remade.mmproj)
    mm = {x.name: x for x in r.tensors}["mm.0.weight"]
    got = np.asarray(mm.data, dtype=np.float32).reshape(tuple(int(s) for s in reversed(mm.shape)))
    np.testing.assert_allclose(got, t[k], rtol=1e-6)
    assert not any(p.name.endswith(".tmp") for p in remade.lm.parent.iterdir())


def test_a_read_only_model_directory_caches_under_bonsai_cache(pico_dir, tmp_path, monkeypatch):
    d = tmp_path / "ro"
    shutil.copytree(pico_dir, d)
    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_cache.os, "access", lambda p, mode: False)
    root = gguf_cache.cache_root(d)
    assert root.parent == tmp_path / "cache" / "gguf"


def test_an_unknown_gguf_type_is_refused(pico_dir):
    with pytest.raises(UserError, match="--gguf-type 'q2_k'"):
        gguf_cache.ensure(pico_dir, "q2_k")
