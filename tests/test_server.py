"""The OpenAI-compatible server, as a real process, through the official `openai` client."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import image

from bonsai_mlx.generate import ChatSession, Sampling, generate, load

openai = pytest.importorskip("openai")
KEY = "sk-test-key"
IMAGES = [image(1, (64, 32)), image(2, (32, 64))]  # 2:1 and 1:2


def data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(text: str, img=None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(img)}}] if img is not None else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def server(pico_dir):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "bonsai_mlx.server", "--model", str(pico_dir), "--port", "0", "--api-key", KEY]
    cmd += ["--max-body-mb", "1", "--max-image-mb", "0.05", "--fetch-timeout", "1"]
    cmd += ["--url-fetch", "any"]  # the image host below is on loopback; `public` refuses it (test_server_hardening)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    assert "serving" in line, line
    url = line.strip().rsplit(" ", 1)[-1]
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(pico_dir):
    return load(str(pico_dir))


def expected(local, text: str, img, n: int = 12) -> str:
    model, proc = local
    return "".join(c.text for c in generate(model, proc, text, img, Sampling(max_tokens=n)))


@pytest.mark.parametrize("img", IMAGES, ids=["2:1", "1:2"])
def test_answers_like_bonsai_streamed_or_not(client, local, img):
    want = expected(local, "Describe the image.", img)
    r = client.chat.completions.create(
        model="pico", messages=[ask("Describe the image.", img)], max_tokens=12, temperature=0
    )
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens > local[0].config.num_image_tokens
    stream = client.chat.completions.create(
        model="pico",
        messages=[ask("Describe the image.", img)],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_models_lists_the_served_model(client, pico_dir):
    assert [m.id for m in client.models.list().data] == [pico_dir.name]


def test_two_clients_at_once_get_their_own_answers(server, local):
    want = [expected(local, "Describe the image.", im, 16) for im in IMAGES]
    assert want[0] != want[1]
    got: list = [None, None]

    def run(i: int) -> None:
        c = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)
        got[i] = c.chat.completions.create(
            model="pico", messages=[ask("Describe the image.", IMAGES[i])], max_tokens=16, temperature=0, stream=i == 1
        )

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0].choices[0].message.content == want[0]
    assert "".join(c.choices[0].delta.content or "" for c in got[1] if c.choices) == want[1]


def test_a_continued_conversation_reuses_the_cached_prefix(client, local):
    model, proc = local
    s = ChatSession(model, proc)
    first = "".join(c.text for c in s.ask("Describe the image.", IMAGES[0], Sampling(max_tokens=8)))
    second = "".join(c.text for c in s.ask("where is the star?", None, Sampling(max_tokens=8)))
    msgs = [ask("Describe the image.", IMAGES[0])]
    r1 = client.chat.completions.create(model="pico", messages=msgs, max_tokens=8, temperature=0)
    assert r1.choices[0].message.content == first
    msgs += [{"role": "assistant", "content": first}, ask("where is the star?")]
    r2 = client.chat.completions.create(model="pico", messages=msgs, max_tokens=8, temperature=0)
    assert r2.choices[0].message.content == second
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens > model.config.num_image_tokens  # image + first turn not re-run


def test_stop_seed_temperature_top_p(client, local):
    full = expected(local, "Describe the image.", IMAGES[1], 16)
    stop = full[5:7]
    r = client.chat.completions.create(
        model="pico", messages=[ask("Describe the image.", IMAGES[1])], max_tokens=16, temperature=0, stop=[stop]
    )
    assert r.choices[0].message.content == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model="pico",
        messages=[ask("Describe the image.", IMAGES[1])],
        max_tokens=16,
        temperature=0,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full[: full.index(stop)]
    kw = {"model": "pico", "messages": [ask("hello")], "max_tokens": 12, "temperature": 1.5, "top_p": 0.9}
    a, b = (client.chat.completions.create(**kw, seed=7).choices[0].message.content for _ in range(2))
    assert a == b


def test_image_urls_are_fetched_with_a_size_cap_and_a_timeout(client, local):
    small, big = io.BytesIO(), io.BytesIO()
    IMAGES[0].save(small, format="PNG")
    image(3, (300, 300)).save(big, format="PNG")  # > 0.05 MiB

    class Files(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/slow.png":
                time.sleep(3)
            data = small.getvalue() if self.path == "/a.png" else big.getvalue()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    files = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"

    def with_url(path: str) -> list:
        parts = [
            {"type": "image_url", "image_url": {"url": base + path}},
            {"type": "text", "text": "Describe the image."},
        ]
        return [{"role": "user", "content": parts}]

    try:
        r = client.chat.completions.create(model="pico", messages=with_url("/a.png"), max_tokens=12, temperature=0)
        assert r.choices[0].message.content == expected(local, "Describe the image.", IMAGES[0])
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="pico", messages=with_url("/big.png"), max_tokens=2)
        assert e.value.status_code == 413
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="pico", messages=with_url("/slow.png"), max_tokens=2)
        assert "could not fetch" in e.value.body["message"]
    finally:
        files.shutdown()


def test_each_bad_input_gets_openai_error_json_and_its_status(server, client):
    import httpx

    def bad(messages, **kw):
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model="pico", messages=messages, **kw)
        return e.value

    e = bad([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}]}])
    assert e.status_code == 400 and "data:image/" in e.body["message"]
    e = bad([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}]}])
    assert e.status_code == 400 and "not a readable image" in e.body["message"]
    e = bad([{"role": "user", "content": "a " * 6000}])
    assert e.status_code == 400 and e.code == "context_length_exceeded"
    e = bad([{"role": "user", "content": "hi"}], temperature=5)
    assert e.status_code == 400 and e.param == "temperature"
    e = bad([{"role": "assistant", "content": "hi"}])
    assert e.status_code == 400
    e = bad([{"role": "user", "content": "x" * (2 << 20)}])
    assert e.status_code == 413
    wrong = openai.OpenAI(base_url=server, api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(f"{server}/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # the server still answers after all of that
    assert client.chat.completions.create(model="pico", messages=[ask("hi")], max_tokens=2).usage.completion_tokens


def test_binds_loopback_by_default():
    from bonsai_mlx.server import parser

    assert parser().parse_args(["--model", "m"]).host == "127.0.0.1"
