"""The llama.cpp engine itself (llama-cpp-python, built by `scripts/setup.sh --dev`): the same answers, turns,
stop, sampling and stats as the MLX engine, on a tiny random Pico and on the trained embedded model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import image
from PIL import Image

from bonsai_mlx.core.errors import UserError
from bonsai_mlx.generate import ChatSession, Sampling


def _need_llama():
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: scripts/setup.sh --dev (or pip install -e '.[llama]')")


def _answer(chunks) -> tuple[list[int], object]:
    toks, stats = [], None
    for c in chunks:
        toks += c.tokens
        stats = c.stats or stats
    return toks, stats


@pytest.fixture(scope="module")
def tiny_dir(pico_dir, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("llama") / "pico"
    shutil.copytree(pico_dir, d)  # the GGUF cache goes beside the model: keep the shared fixture clean
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    _need_llama()
    from bonsai_mlx.engines.llama_cpp import LlamaOptions, load

    model, proc = load(tiny_dir, LlamaOptions("f32", threads=2))
    yield model, proc
    model.close()


@pytest.fixture(scope="module")
def tiny_mlx(tiny_dir):
    from bonsai_mlx.generate import load

    return load(str(tiny_dir))


def _session(model, proc, **kw):
    from bonsai_mlx.generate import new_session

    return new_session(model, proc, **kw)


def _uncached_copy(s):
    """The same conversation and token ids as `s` (earlier answers keep their sampled tokens), no KV cache."""
    c = _session(s.model, s.processor, system=s.system)
    c.messages, c.images = [dict(m) for m in s.messages], list(s.images)
    c._text, c._msgs, c._ids = s._text, list(s._msgs), list(s._ids)
    return c


def test_tiny_follow_up_reuses_the_cache_and_answers_as_a_full_prefill(tiny):
    model, proc = tiny
    img = image(1, (40, 40))
    s = _session(model, proc)
    t1, st1 = _answer(s.ask("what colour is the square?", img, Sampling(max_tokens=6, ignore_stop=True)))
    assert len(t1) == 6 and st1.cached_tokens == 0 and st1.finish_reason == "length"
    first_prompt = st1.prompt_tokens
    full = _uncached_copy(s)
    t2, st2 = _answer(s.ask("and the circle?", None, Sampling(max_tokens=6, ignore_stop=True)))
    # the follow-up prefills only its own turn (and the answer's last token, never fed): no image encoded again
    assert st2.cached_tokens == first_prompt + len(t1) - 1
    assert st2.prompt_tokens < first_prompt - model.config.num_image_tokens
    assert "TTFT" in st2.line() and f"+{st2.cached_tokens} cached" in st2.line()
    # the same token ids prefilled at once (image included) give the same answer
    t2b, st2b = _answer(full.ask("and the circle?", None, Sampling(max_tokens=6, ignore_stop=True)))
    assert t2b == t2 and st2b.cached_tokens == 0 and st2b.prompt_tokens == st2.prompt_tokens + st2.cached_tokens
    assert s.messages[-1] == {"role": "assistant", "content": proc.decode(t2)}


def test_sessions_take_turns_on_one_context_and_keep_their_caches(tiny):
    model, proc = tiny
    a, b = _session(model, proc), _session(model, proc)
    greedy = Sampling(max_tokens=5, ignore_stop=True)
    _, st = _answer(a.ask("where is the star?", image(2, (30, 50)), greedy))
    full = _uncached_copy(a)
    _answer(b.ask("describe the image.", image(3, (50, 30)), greedy))
    ta, sta = _answer(a.ask("is there a blue triangle?", None, greedy))  # a's cache comes back after b's turn
    assert sta.cached_tokens == st.prompt_tokens + 5 - 1
    assert _answer(full.ask("is there a blue triangle?", None, greedy))[0] == ta


def test_stop_ends_the_answer_and_keeps_what_was_shown(tiny):
    model, proc = tiny
    s = _session(model, proc)
    seen = []
    for c in s.ask("describe the image.", image(4), Sampling(max_tokens=30, ignore_stop=True)):
        seen += c.tokens
        if len(seen) >= 3 and c.stats is None:
            s.stop_requested = True
        if c.stats:
            stats = c.stats
    assert stats.finish_reason == "stopped" and stats.generated_tokens == len(seen) < 30
    assert s.messages[-1] == {"role": "assistant", "content": proc.decode(seen)}
    _, st = _answer(s.ask("and?", None, Sampling(max_tokens=3)))  # the cache agrees with the kept answer
    assert st.cached_tokens > 0


def test_each_chunk_is_shown_before_llama_cpp_decodes_the_next_token(tiny, monkeypatch):
    """llama.cpp steps synchronously: a chunk that waited for the next decode would reach the user a step late."""
    model, proc = tiny
    steps = []
    real = type(model).step
    monkeypatch.setattr(model, "step", lambda tok, pos: steps.append(pos) or real(model, tok, pos))
    s, shown, at = _session(model, proc), 0, []
    for c in s.ask("describe the image.", image(5), Sampling(max_tokens=6, ignore_stop=True)):
        if c.stats is None:
            shown += len(c.tokens)
            at.append((shown, len(steps)))  # tokens shown so far, decode steps run when this chunk arrived
    # a chunk arrives before its last token is fed to the model (the first token came from the prefill)
    assert at and all(n_steps == n_shown - 1 for n_shown, n_steps in at) and len(steps) == 5


def test_sampling_settings_are_applied_and_a_seed_repeats(tiny):
    model, proc = tiny
    hot = Sampling(max_tokens=12, temperature=1.5, top_p=0.95, seed=7, ignore_stop=True)
    runs = [_answer(_session(model, proc).ask("describe the image.", image(5), hot))[0] for _ in range(2)]
    assert runs[0] == runs[1]
    other = _answer(_session(model, proc).ask("describe the image.", image(5), Sampling(**{**hot.__dict__, "seed": 8})))
    greedy = _answer(_session(model, proc).ask("describe the image.", image(5), Sampling(12, ignore_stop=True)))
    assert runs[0] != other[0] or runs[0] != greedy[0]
    assert proc.image_token_id not in runs[0] + other[0]


def test_a_prompt_over_the_context_is_refused_and_the_session_stays(tiny_dir):
    _need_llama()
    from bonsai_mlx.engines.llama_cpp import LlamaOptions, load

    model, proc = load(tiny_dir, LlamaOptions("f32", n_ctx=64, threads=1))
    try:
        assert model.config.text.max_position_embeddings == 64
        s = _session(model, proc)
        with pytest.raises(UserError, match="64"):
            _answer(s.ask("describe the image. " * 30, image(6), Sampling(max_tokens=4)))
        assert s.messages == [] and s.images == []
    finally:
        model.close()


def test_tiny_greedy_tokens_equal_mlx(tiny, tiny_mlx):
    """f32 GGUF vs MLX float32 on a random tiny Pico: the first tokens agree (later ones may flip on near-ties:
    llama.cpp's projector GELU is the tanh form, Llava's the erf form)."""
    model, proc = tiny
    m, p = tiny_mlx
    for size in ((32, 32), (64, 32), (32, 64)):
        greedy = Sampling(max_tokens=4, ignore_stop=True)
        ours = _answer(ChatSession(m, p).ask("what colour is the square?", image(7, size), greedy))[0]
        theirs = _answer(_session(model, proc).ask("what colour is the square?", image(7, size), greedy))[0]
        assert theirs[:2] == ours[:2]


# -- the trained embedded model -----------------------------------------------------------------------------------
def _trained_dir(root: Path) -> Path:
    """The embedded default trained for 300 steps (where random weights give near-tied, degenerate answers).
    BONSAI_TRAINED_PICO may name such a model directory already made, to skip the few minutes of training."""
    given = os.environ.get("BONSAI_TRAINED_PICO")
    if given:
        return Path(given)
    out = root / "shapes300"
    cmd = [sys.executable, "-m", "bonsai_mlx.train", "--max-steps", "300", "--eval-every", "0", "--save-every", "0"]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True)
    return out / "model"


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    src = _trained_dir(tmp_path_factory.mktemp("trained"))
    d = tmp_path_factory.mktemp("trained-copy") / "shapes"
    shutil.copytree(src, d, ignore=shutil.ignore_patterns(".gguf"))
    return d


def _held_out(n: int):
    from bonsai_mlx.core.synthetic import sample

    return [sample(10_000_000 + i, 0, 48) for i in range(n)]


@pytest.mark.parametrize("shape", ["square", "2:1", "1:2"])
def test_generate_llama_cpp_equals_mlx_greedy_on_the_trained_model(trained, tmp_path, shape, capsys):
    _need_llama()
    from bonsai_mlx.generate import main as generate

    for i, s in enumerate(_held_out(3)):
        im = s["image"]
        w, h = im.size
        if shape != "square":  # the scene stretched to 2:1 or 1:2; Pico squeezes it back to its square input
            im = im.resize((2 * w, h) if shape == "2:1" else (w, 2 * h), Image.BICUBIC)
        path = tmp_path / f"{i}.png"
        im.save(path)
        q = s["turns"][0][0]
        out = {}
        for engine, extra in (("mlx", []), ("llama.cpp", ["--gguf-type", "f32"])):
            args = ["--model", str(trained), "--image", str(path), "--prompt", q, "--max-tokens", "8"]
            assert generate([*args, "--engine", engine, *extra]) == 0
            r = capsys.readouterr()
            assert "TTFT" in r.err.splitlines()[-1] and "engine:" not in r.err  # asked for by name: not announced
            out[engine] = r.out
        assert out["llama.cpp"] == out["mlx"], (shape, q, out)
        assert out["mlx"].strip()


def test_generate_auto_says_which_engine_and_why_in_one_line(trained, tmp_path, capsys, monkeypatch):
    _need_llama()
    from bonsai_mlx import engines
    from bonsai_mlx.generate import main as generate

    monkeypatch.setattr(engines, "mlx_gpu", lambda: None)  # a CPU-only machine, even where this runs on a GPU box
    path = tmp_path / "a.png"
    _held_out(1)[0]["image"].save(path)
    args = ["--model", str(trained), "--image", str(path), "--prompt", "What colour?", "--max-tokens", "2"]
    assert generate([*args, "--engine", "auto", "--gguf-type", "f32"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("engine: llama.cpp (auto: ") and "CPU" in err[0]
    monkeypatch.setattr(engines, "mlx_gpu", lambda: "metal")
    assert generate([*args, "--engine", "auto"]) == 0
    assert capsys.readouterr().err.splitlines()[0] == "engine: mlx (auto: Apple silicon, MLX runs on Metal)"


def test_terminal_chat_runs_on_llama_cpp_and_answers_as_mlx(trained, tmp_path, capsys, monkeypatch):
    """`bonsai chat --engine llama.cpp`: the same two turns (the image kept for the follow-up) as on MLX."""
    _need_llama()
    import io

    from bonsai_mlx.chat import main as chat

    path = tmp_path / "a.png"
    _held_out(1)[0]["image"].save(path)
    args = ["--model", str(trained), "--image", str(path), "--max-tokens", "4", "--gguf-type", "f32"]
    out = {}
    for engine in ("mlx", "llama.cpp"):
        typed = "What colour is the shape at the top left?\nHow many shapes are there?\n/quit\n"
        monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
        assert chat([*args, "--engine", engine]) == 0
        out[engine] = capsys.readouterr().out.splitlines()[1:]
    assert len(out["mlx"]) == 2 and all(a.strip() for a in out["mlx"])
    assert out["llama.cpp"] == out["mlx"]


def test_an_amx_build_loads_without_the_extra_buffers_and_says_so(tiny_dir, monkeypatch):
    """A llama.cpp compiled with AMX crashes on its first matmul here (llama.cpp#20824): the engine must load it
    with use_extra_bufts off and say why, and still answer as the repacking build does."""
    _need_llama()
    import llama_cpp

    from bonsai_mlx.engines import llama_cpp as eng

    greedy = Sampling(max_tokens=4, ignore_stop=True)
    model, proc = eng.load(tiny_dir, eng.LlamaOptions("f32", threads=2))
    try:
        plain = _answer(_session(model, proc).ask("what colour is the square?", image(7), greedy))[0]
    finally:
        model.close()
    seen = []
    real = llama_cpp.llama_model_load_from_file

    def spy(path, params):
        seen.append(bool(params.use_extra_bufts))
        return real(path, params)

    monkeypatch.setattr(eng, "amx_build", lambda _lib: True)
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", spy)
    logged: list[str] = []
    model, proc = eng.load(tiny_dir, eng.LlamaOptions("f32", threads=2), log=logged.append)
    try:
        assert seen == [False]
        assert eng.AMX_NOTE in logged
        assert _answer(_session(model, proc).ask("what colour is the square?", image(7), greedy))[0][:2] == plain[:2]
    finally:
        model.close()


def test_pixels_of_a_letterboxed_llama_cpp_would_differ(trained):
    """Why the engine stretches first: llama.cpp's own preprocessing pads a 2:1 image to a square."""
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.processing import Processor
    from bonsai_mlx.engines.llama_cpp import pico_pixels

    proc = Processor(trained, PicoConfig.load(trained))
    im = _held_out(1)[0]["image"].resize((96, 48), Image.BICUBIC)
    ours = pico_pixels(proc, im)
    pad = Image.new("RGB", (96, 96), (127, 127, 127))
    pad.paste(im, (0, 24))
    letterboxed = np.asarray(pad.resize((48, 48), Image.BICUBIC))
    assert np.abs(ours.astype(int) - letterboxed.astype(int)).mean() > 10


# -- the app and the server on llama.cpp ---------------------------------------------------------------------------
def test_the_app_streams_and_follows_up_on_llama_cpp(tiny_dir, tmp_path):
    _need_llama()
    from bonsai_mlx.app.chat import Conversation, Settings, submit
    from bonsai_mlx.app.registry import Registry
    from bonsai_mlx.engines import EngineConfig

    reg = Registry({"tiny": tiny_dir}, EngineConfig(engine="llama.cpp", gguf_type="f32"))
    assert reg.engine_line().startswith("llama.cpp, f32 GGUF (asked for)")
    img = tmp_path / "a.png"
    image(8, (60, 30)).save(img)
    conv = Conversation()
    turn = submit(conv, reg, "tiny", "describe the image.", str(img), Settings(max_tokens=12))
    seen = [h[-1]["content"] for h in turn if h[-1]["role"] == "assistant"]
    partial = [t for t in seen if "TTFT" not in t]
    grown = [b for a, b in zip(partial, partial[1:], strict=False) if b != a]
    assert len(grown) >= 3 and all(b.startswith(a) for a, b in zip(partial, partial[1:], strict=False))  # streamed
    assert "TTFT" in seen[-1] and conv.session.model is reg.model
    assert type(conv.session).__name__ == "LlamaChatSession"
    list(submit(conv, reg, "tiny", "and the circle?", None, Settings(max_tokens=4)))
    assert conv.session.cached_ids and len(conv.session.images) == 1  # the image kept for the follow-up


def _data_uri(path: Path) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def llama_server(trained, tmp_path_factory):
    _need_llama()
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    cmd = [sys.executable, "-m", "bonsai_mlx.server", "--model", str(trained), "--port", "0"]
    cmd += ["--engine", "llama.cpp", "--gguf-type", "f32"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = proc.stdout.readline()
    assert "serving" in line, (line, log.read_text()[-2000:])
    yield line.strip().rsplit(" ", 1)[-1], log
    proc.terminate()
    proc.wait(timeout=10)


def test_the_server_answers_an_openai_client_on_llama_cpp_as_mlx_does(llama_server, trained, tmp_path):
    openai = pytest.importorskip("openai")
    from bonsai_mlx.generate import load

    url, log = llama_server
    assert log.read_text().splitlines()[0] == "engine: llama.cpp (asked for)"
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    model, proc = load(str(trained))  # MLX, float32: the reference
    for i, s in enumerate(_held_out(3)):
        path = tmp_path / f"{i}.png"
        s["image"].resize((96, 48), Image.BICUBIC).save(path)  # 2:1: the server must stretch as Pico does
        q = s["turns"][0][0]
        want = "".join(c.text for c in ChatSession(model, proc).ask(q, str(path), Sampling(max_tokens=8)))
        msgs = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": _data_uri(path)}}, {"type": "text", "text": q}],
            }
        ]
        r = client.chat.completions.create(model="pico", messages=msgs, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want, (q, want)
        streamed = client.chat.completions.create(model="pico", messages=msgs, max_tokens=8, temperature=0, stream=True)
        pieces = [c.choices[0].delta.content for c in streamed if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == want
    # a follow-up continues the conversation's cache: the image is not encoded again
    follow = [*msgs, {"role": "assistant", "content": want}, {"role": "user", "content": "How many shapes are there?"}]
    r2 = client.chat.completions.create(model="pico", messages=follow, max_tokens=4, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens > model.config.num_image_tokens


def test_bench_compares_llama_cpp_through_the_engine(tiny_dir, capsys):
    _need_llama()
    from bonsai_mlx.bench import main as bench

    args = ["--model", str(tiny_dir), "--compare", "llama.cpp-raw", "--llama-types", "f32", "--tokens", "6"]
    assert bench([*args, "--llama-threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "llama.cpp f32 (cpu, 1 threads)" in rows and "llama-cpp-python handler f32" in rows
    assert "error" not in out and "load average" in out
