import gc
import weakref

import pytest
from helpers import image

from bonsai_mlx.app.chat import MAX_PROMPT_TOKENS, Conversation, Settings, regenerate, stop, submit
from bonsai_mlx.app.registry import Registry, discover


@pytest.fixture(scope="module")
def registry(pico_dir):
    return Registry({"tiny": pico_dir})


@pytest.fixture
def img(tmp_path):
    p = tmp_path / "shapes.png"
    image().save(p)
    return str(p)


def _drain(it):
    hist = None
    for hist in it:  # noqa: B007  (the last yielded history is the result)
        continue
    return hist


def test_new_conversation_streams_answer_with_stats(registry, img):
    conv = Conversation()
    steps = list(submit(conv, registry, "tiny", "what colour is the square?", img, Settings(max_tokens=6)))
    hist = steps[-1]
    assert [m["role"] for m in hist] == ["user", "user", "assistant"]
    assert hist[0]["content"] == {"path": img} and hist[1]["content"] == "what colour is the square?"
    assert len(steps) >= 3 and "TTFT" in conv.stats[-1] and "tok/s" in conv.stats[-1]
    assert hist[-1]["content"].endswith(f"<sub>{conv.stats[-1]}</sub>")  # under the answer it belongs to
    assert "<sub>" not in conv.session.messages[-1]["content"]


def test_follow_up_reuses_the_cache(registry, img):
    conv = Conversation()
    _drain(submit(conv, registry, "tiny", "what colour is the square?", img, Settings(max_tokens=4)))
    session = conv.session
    cached = len(session.cached_ids)
    _drain(submit(conv, registry, "tiny", "and the circle?", None, Settings(max_tokens=4)))
    assert conv.session is session and len(session.images) == 1
    assert session.cached_ids[:cached] == session._ids[:cached]  # earlier turns (image included) not recomputed


def test_stop_ends_the_answer(registry, img):
    conv = Conversation()
    it = submit(conv, registry, "tiny", "describe the image.", img, Settings(max_tokens=200, temperature=1.0))
    next(it)  # user turn shown
    next(it)  # assistant bubble opened
    stop(conv)
    _drain(it)
    assert conv.session.messages[-1]["role"] == "assistant" and len(conv.session._ids) < 200 + 100


def test_regenerate_replaces_the_last_answer(registry, img):
    conv = Conversation()
    first = _drain(submit(conv, registry, "tiny", "where is the star?", img, Settings(max_tokens=5)))[-1]["content"]
    n = len(conv.history)
    again = _drain(regenerate(conv, registry, Settings(max_tokens=5)))
    strip = lambda t: t.split("\n\n<sub>")[0]  # noqa: E731
    assert len(again) == n and strip(again[-1]["content"]) == strip(first)  # greedy: same answer, not appended twice


def test_regenerate_with_nothing_to_regenerate_is_friendly(registry):
    conv = Conversation()
    hist = _drain(regenerate(conv, registry, Settings()))
    assert "no answer to regenerate" in hist[-1]["content"]


def test_bad_upload_empty_message_and_long_prompt_are_friendly(registry, tmp_path, img):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    conv = Conversation()
    hist = _drain(submit(conv, registry, "tiny", "what is this?", str(bad), Settings()))
    assert "can't be used as an image" in hist[-1]["content"] and conv.session is None
    hist = _drain(submit(conv, registry, "tiny", "   ", img, Settings()))
    assert "Please type a question" in hist[-1]["content"]
    hist = _drain(submit(conv, registry, "tiny", "shape " * (MAX_PROMPT_TOKENS + 10), None, Settings()))
    assert "limit is" in hist[-1]["content"]
    # and the conversation still works afterwards
    hist = _drain(submit(conv, registry, "tiny", "what colour is the square?", img, Settings(max_tokens=3)))
    assert hist[-1]["role"] == "assistant" and not hist[-1]["content"].startswith("⚠️")


def test_two_tabs_keep_their_own_conversations(registry, img):
    a, b = Conversation(), Conversation()
    _drain(submit(a, registry, "tiny", "what colour is the square?", img, Settings(max_tokens=3)))
    _drain(submit(b, registry, "tiny", "how many circles are there?", None, Settings(max_tokens=3)))
    assert a.session is not b.session and len(a.session.images) == 1 and not b.session.images
    assert a.history[1]["content"] == "what colour is the square?"


def test_switching_models_frees_the_old_one(pico_dir):
    reg = Registry({"a": pico_dir, "b": pico_dir})
    old = weakref.ref(reg.get("a")[0])
    reg.get("b")
    gc.collect()
    assert old() is None and reg.name == "b"


def test_discover_finds_float_and_quantized_models(pico_dir, tmp_path):
    from bonsai_mlx.convert.__main__ import main as convert

    convert(["to-mlx", str(pico_dir), str(tmp_path / "pico-4bit"), "--quantize", "4", "--group-size", "32"])
    convert(["to-mlx", str(pico_dir), str(tmp_path / "pico-fp16")])
    (tmp_path / "junk").mkdir()
    assert sorted(discover(models_dir=str(tmp_path))) == ["pico-4bit (4-bit)", "pico-fp16"]
