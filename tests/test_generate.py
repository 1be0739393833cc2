import mlx.core as mx
import numpy as np
import pytest
from helpers import image

from bonsai_mlx import loading
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.generate import ChatSession, Sampling, generate, generate_batch, main


@pytest.fixture(scope="module")
def mp(pico_dir):
    model, cfg = loading.load(pico_dir)
    return model, Processor(pico_dir, cfg)


def _run(it):
    chunks = list(it)
    return "".join(c.text for c in chunks), chunks[-1].stats, [t for c in chunks for t in c.tokens]


def _greedy_without_cache(model, proc, s, n):
    """Recompute the last answer from the session's exact token history with full forwards."""
    ids = list(s._ids[:-n])
    pv = mx.array(proc.pixel_values(s.images))
    out = []
    for _ in range(n):
        logits = np.array(model(mx.array([ids + out]), pv)[0, -1])
        logits[proc.image_token_id] = -np.inf
        out.append(int(logits.argmax()))
    return out


def test_greedy_tokens_match_transformers_generate(pico_dir, mp):
    import torch
    from transformers import LlavaForConditionalGeneration

    model, proc = mp
    text, stats, toks = _run(generate(model, proc, "what colour is the square?", image(), Sampling(max_tokens=32)))
    ids = proc.encode([{"role": "user", "content": "<image>\nwhat colour is the square?"}])
    ref = LlavaForConditionalGeneration.from_pretrained(str(pico_dir)).eval()
    with torch.no_grad():
        out = ref.generate(
            input_ids=torch.tensor([ids]),
            pixel_values=torch.tensor(proc.pixel_values([image()])),
            max_new_tokens=32,
            do_sample=False,
            eos_token_id=sorted(proc.stop_ids),
            pad_token_id=0,
        )
    ref_toks = [t for t in out[0, len(ids) :].tolist() if t not in proc.stop_ids]
    assert toks == ref_toks
    assert stats.generated_tokens == len(toks) and text == proc.decode(toks)
    assert stats.prompt_tokens == len(ids) and stats.ttft_s > 0 and stats.peak_memory_gb > 0


def test_follow_up_prefills_only_the_new_turn_and_matches_a_fresh_run(mp):
    model, proc = mp
    s = ChatSession(model, proc)
    _, stats1, _ = _run(s.ask("what colour is the square?", image(), Sampling(max_tokens=8)))
    _, stats2, toks2 = _run(s.ask("and the circle?", None, Sampling(max_tokens=8)))
    # the image, first question and first answer all come from the cache, as sampled (no re-tokenizing)
    assert stats2.cached_tokens == stats1.prompt_tokens + stats1.generated_tokens - 1
    assert toks2 == _greedy_without_cache(model, proc, s, 8)


def test_new_image_mid_conversation(mp):
    model, proc = mp
    s = ChatSession(model, proc)
    _run(s.ask("describe the image.", image(0), Sampling(max_tokens=4)))
    _, stats, toks = _run(s.ask("and this one?", image(1), Sampling(max_tokens=4)))
    assert stats.prompt_tokens >= model.config.num_image_tokens and len(s.images) == 2
    assert toks == _greedy_without_cache(model, proc, s, 4)


def test_regenerate_with_seed_is_reproducible(mp):
    model, proc = mp
    s = ChatSession(model, proc)
    sp = Sampling(max_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    a = _run(s.ask("where is the star?", image(), sp))[0]
    b = _run(s.regenerate(sp))[0]
    assert a == b and len(s.messages) == 2


def test_stop_request_ends_the_answer(mp):
    model, proc = mp
    s = ChatSession(model, proc)
    it = s.ask("describe the image.", image(), Sampling(max_tokens=50, temperature=1.0, seed=1))
    next(it)
    s.stop_requested = True
    rest = list(it)
    assert rest[-1].stats.finish_reason == "stopped" and rest[-1].stats.generated_tokens <= 3


def test_cli_streams_answer_and_stats(pico_dir, tmp_path, capsys):
    p = tmp_path / "x.png"
    image().save(p)
    assert main(["--model", str(pico_dir), "--image", str(p), "--prompt", "hi", "--max-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "TTFT" in err and "decode" in err


def test_cli_bad_image_is_one_line(pico_dir, tmp_path, capsys):
    p = tmp_path / "x.png"
    p.write_text("not an image")
    with pytest.raises(SystemExit):
        main(["--model", str(pico_dir), "--image", str(p), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert "x.png: not a readable image" in err and len(err.splitlines()) == 1


def test_logits_of_cached_decode_equal_full_forward(mp):
    """KV-cached decoding step == recomputing the whole sequence."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mp
    ids = [3, 9, 12, 40, 7]
    full = np.array(model(mx.array([ids]))[0, -1])
    cache = make_prompt_cache(model.language_model)
    model(mx.array([ids[:-1]]), cache=cache)
    step = np.array(model(mx.array([ids[-1:]]), cache=cache)[0, -1])
    np.testing.assert_allclose(step, full, atol=1e-5)


def test_batched_greedy_equals_one_at_a_time(mp):
    """Left padding must not change any answer: prompts of different lengths, with and without images."""
    model, proc = mp
    prompts = [
        ("what colour is the square?", image(0)),
        ("how many?", image(1)),
        ("is there a small yellow circle on the left of the green square?", image(2)),
        ("describe it", None),
    ]
    one = [_run(generate(model, proc, q, im, Sampling(max_tokens=12)))[0] for q, im in prompts]
    assert generate_batch(model, proc, prompts, max_tokens=12) == one
    assert len({len(proc.encode([{"role": "user", "content": q}])) for q, _ in prompts}) > 1
