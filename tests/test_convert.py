import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import hf_logits, image, make_hf_pico, make_tokenizer

from bonsai_mlx import loading
from bonsai_mlx.convert.__main__ import main as convert
from bonsai_mlx.core.processing import Processor


def _tensors(d):
    from bonsai_mlx.conversion.sources import read_tensors

    return loading.canonical_weights(read_tensors(d))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_to_mlx_then_to_hf_is_exact(tmp_path, dtype):
    src = make_hf_pico(tmp_path / "src", dtype=dtype, tied=False)
    assert convert(["to-mlx", str(src), str(tmp_path / "mlx"), "--dtype", dtype]) == 0
    assert convert(["to-hf", str(tmp_path / "mlx"), str(tmp_path / "hf")]) == 0
    a, b = _tensors(src), _tensors(tmp_path / "hf")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(
            np.array(a[k].astype(mx.float32)), np.array(b[k].astype(mx.float32))
        ), k
    # transformers reads the result, in the llava-hf key spelling, and agrees with the source
    ids = [3, 4, 5]
    np.testing.assert_array_equal(hf_logits(tmp_path / "hf", ids, None), hf_logits(src, ids, None))
    assert all(
        k.startswith(("language_model.", "vision_tower.vision_model.", "multi_modal_projector."))
        for k in mx.load(str(tmp_path / "hf" / "model.safetensors"))
    )


def test_4bit_stays_close_to_float(tmp_path):
    src = make_hf_pico(tmp_path / "src", hidden=64)
    convert(["to-mlx", str(src), str(tmp_path / "q4"), "--quantize", "4", "--group-size", "32", "--dtype", "float32"])
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 32, "bits": 4}
    w = mx.load(str(tmp_path / "q4" / "model.safetensors"))
    assert "language_model.model.layers.0.mlp.up_proj.scales" in w
    assert "multi_modal_projector.linear_1.scales" not in w
    fm, fcfg = loading.load(src)
    qm, _ = loading.load(tmp_path / "q4")
    proc = Processor(src, fcfg)
    ids = proc.encode([{"role": "user", "content": "<image>\nwhat colour is the square?"}])
    pv = mx.array(proc.pixel_values([image()]))
    f = np.array(fm(mx.array([ids]), pv)[0])
    q = np.array(qm(mx.array([ids]), pv)[0])
    cos = (f * q).sum(-1) / np.linalg.norm(f, axis=-1) / np.linalg.norm(q, axis=-1)
    top1 = (f.argmax(-1) == q.argmax(-1)).mean()
    print(f"4-bit vs float: mean cosine {cos.mean():.4f}, top-1 agreement {top1:.2%}")
    # random tiny weights give near-flat logits, so top-1 is a weak signal here; cosine is the check
    assert cos.mean() > 0.94 and top1 > 0.4
    # and to-hf dequantizes it back into a float checkpoint transformers loads
    convert(["to-hf", str(tmp_path / "q4"), str(tmp_path / "deq")])
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    np.testing.assert_allclose(hf_logits(tmp_path / "deq", ids, np.array(pv)), q, atol=1e-4)


def _sources(tmp_path, spare_rows: int, tied: bool, nested: bool = False):
    """A SigLIP and a Qwen2 checkpoint (+ tokenizer without <image>) saved by transformers. `nested`: the SigLIP's
    processor saved by `SiglipProcessor.save_pretrained` (transformers 5: no preprocessor_config.json)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from bonsai_mlx.tiny import write_image_processor

    sig = tmp_path / "siglip"
    vcfg = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    SiglipVisionModel(vcfg).save_pretrained(str(sig))
    write_image_processor(sig, 32)
    if nested:
        from transformers import AutoImageProcessor, SiglipProcessor

        ip = AutoImageProcessor.from_pretrained(str(sig), backend="pil")
        (sig / "preprocessor_config.json").unlink()
        SiglipProcessor(image_processor=ip, tokenizer=make_tokenizer(tmp_path / "sigtok")).save_pretrained(str(sig))
        assert not (sig / "preprocessor_config.json").exists()
    qwen = tmp_path / "qwen"
    tok = make_tokenizer(qwen, image_token=False)
    torch.manual_seed(0)
    tcfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok) + spare_rows,
        tie_word_embeddings=tied,
        rope_theta=5000.0,
    )
    Qwen2ForCausalLM(tcfg).save_pretrained(str(qwen))
    return sig, qwen, tok


def test_init_assembles_a_pico_transformers_and_mlx_agree_on(tmp_path):
    sig, qwen, tok = _sources(tmp_path, spare_rows=8, tied=True)
    out = tmp_path / "pico"
    assert convert(["init", "--vision", str(sig), "--text", str(qwen), str(out), "--seed", "3"]) == 0
    model, cfg = loading.load(out)
    assert cfg.text.vocab_size == len(tok) + 8  # <image> took a spare row, no resize
    assert cfg.text.rope_theta == 5000.0
    proc = Processor(out, cfg)
    ids = proc.encode([{"role": "user", "content": "<image>\nwhere is the star?"}])
    pv = proc.pixel_values([image()])
    ours = np.array(model(mx.array([ids]), mx.array(pv))[0])
    assert np.abs(ours - hf_logits(out, ids, pv)).max() <= 1e-4


def test_init_reads_a_siglip_processor_saved_by_transformers_5(tmp_path):
    """(issue 26) SiglipProcessor.save_pretrained nests the image processor in processor_config.json."""
    sig, qwen, _ = _sources(tmp_path, spare_rows=8, tied=True, nested=True)
    out = tmp_path / "pico"
    assert convert(["init", "--vision", str(sig), "--text", str(qwen), str(out)]) == 0
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 32, "width": 32}
    assert json.loads((out / "processor_config.json").read_text())["image_processor"] == pre
    model, cfg = loading.load(out)
    assert Processor(out, cfg).pixel_values([image()]).shape == (1, 3, 32, 32)


def _transformers_greedy(model_dir, img, n: int) -> str:
    """transformers' own greedy answer from a directory as it saved it (its AutoProcessor, its model), with
    bonsai_mlx's stop ids and <image> never sampled."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from bonsai_mlx.core.config import PicoConfig

    ours = Processor(model_dir, PicoConfig.load(model_dir))
    proc = AutoProcessor.from_pretrained(str(model_dir))
    msgs = [{"role": "user", "content": "<image>\nDescribe the image."}]
    text = proc.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inputs = proc(images=img, text=text, return_tensors="pt")
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    stop = sorted(ours.stop_ids)
    out = model.generate(
        **inputs, max_new_tokens=n, do_sample=False, eos_token_id=stop, suppress_tokens=[ours.image_token_id]
    )
    return proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_checkpoint_saved_by_transformers_5_converts_and_answers_like_transformers(pico5_dir, tmp_path):
    """(issue 26) model + LlavaProcessor saved by this transformers (image processor nested, no
    preprocessor_config.json): to-mlx keeps the image processor in both layouts, and the converted model gives
    transformers' greedy text on the source."""
    from bonsai_mlx.generate import Sampling, generate, load

    assert not (pico5_dir / "preprocessor_config.json").exists()
    out = tmp_path / "mlx"
    assert convert(["to-mlx", str(pico5_dir), str(out), "--dtype", "float32"]) == 0
    nested = json.loads((pico5_dir / "processor_config.json").read_text())["image_processor"]
    pre = json.loads((out / "preprocessor_config.json").read_text())
    assert json.loads((out / "processor_config.json").read_text())["image_processor"] == pre
    assert {k: pre[k] for k in ("size", "image_mean", "image_std", "resample")} == {
        k: nested[k] for k in ("size", "image_mean", "image_std", "resample")
    }
    model, proc = load(str(out))
    for img in (image(1, (64, 32)), image(2, (32, 64))):
        ours = "".join(c.text for c in generate(model, proc, "Describe the image.", img, Sampling(max_tokens=12)))
        assert ours and ours == _transformers_greedy(pico5_dir, img, 12)
    assert convert(["to-hf", str(out), str(tmp_path / "hf")]) == 0  # and back: still both layouts
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()
    assert "image_processor" in json.loads((tmp_path / "hf" / "processor_config.json").read_text())


def test_init_grows_embedding_when_no_spare_rows(tmp_path):
    sig, qwen, tok = _sources(tmp_path, spare_rows=0, tied=False)
    convert(["init", "--vision", str(sig), "--text", str(qwen), str(tmp_path / "p")])
    model, cfg = loading.load(tmp_path / "p")
    assert cfg.text.vocab_size == len(tok) + 1 and cfg.image_token_index == len(tok)


@pytest.mark.parametrize(
    "args, message",
    [
        (["to-mlx", "{tmp}/nope", "{tmp}/out"], "no such model directory"),
        (["to-hf", "{tmp}/empty", "{tmp}/out"], "config.json: not found"),
        (["init", "--vision", "{tmp}/empty", "--text", "{tmp}/empty", "{tmp}/out"], "config.json: not found"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        convert([a.format(tmp=tmp_path) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_pytorch_bin_source_is_read_with_weights_only(tmp_path):
    import torch
    from transformers import LlavaForConditionalGeneration

    src = make_hf_pico(tmp_path / "src")
    model = LlavaForConditionalGeneration.from_pretrained(str(src))
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    assert convert(["to-mlx", str(src), str(tmp_path / "mlx"), "--dtype", "float32"]) == 0
    assert np.isfinite(np.array(loading.load(tmp_path / "mlx")[0](mx.array([[3, 4]])))).all()


def test_fuse_merges_adapter_and_projector_into_a_checkpoint_transformers_loads(pico_dir, tmp_path):
    from mlx.utils import tree_flatten

    from bonsai_mlx.core.train_config import TrainConfig
    from bonsai_mlx.trainer import setup_trainable

    model, cfg = loading.load(pico_dir)
    setup_trainable(model, TrainConfig(stage="instruct", lora_rank=4, lora_alpha=8))
    model.eval()
    mx.random.seed(3)
    for k, v in tree_flatten(model.trainable_parameters()):
        model.load_weights([(k, v + mx.random.normal(v.shape) * 0.05)], strict=False)
    from bonsai_mlx import lora
    from bonsai_mlx.weights import atomic_save_safetensors

    ck = tmp_path / "ck"
    lora.save_adapter(model, ck, 4, 8, 0.0, lora.TARGETS)
    proj = {k: v for k, v in loading.hf_state(model).items() if k.startswith("multi_modal_projector.")}
    atomic_save_safetensors(ck / "projector.safetensors", proj)
    proc = Processor(pico_dir, cfg)
    ids = proc.encode([{"role": "user", "content": "<image>\nwhere is the star?"}])
    pv = proc.pixel_values([image()])
    expected = np.array(model(mx.array([ids]), mx.array(pv))[0])
    assert convert(["fuse", str(pico_dir), str(ck), str(tmp_path / "fused")]) == 0
    fused, _ = loading.load(tmp_path / "fused")
    np.testing.assert_allclose(np.array(fused(mx.array([ids]), mx.array(pv))[0]), expected, atol=1e-4)
    np.testing.assert_allclose(hf_logits(tmp_path / "fused", ids, pv), expected, atol=1e-4)
    assert (
        convert(["fuse", str(pico_dir), str(ck), str(tmp_path / "fused4"), "--quantize", "4", "--group-size", "32"])
        == 0
    )
    assert json.loads((tmp_path / "fused4" / "config.json").read_text())["quantization"]["bits"] == 4
