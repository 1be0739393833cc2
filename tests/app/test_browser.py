"""End to end: the real app on a tiny model, driven in headless Chromium by Playwright."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["mlx", "llama.cpp"])
def server(request, pico_dir, tmp_path):
    engine = request.param
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    model, extra = pico_dir, []
    if engine == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="llama-cpp-python: scripts/setup.sh --dev installs it")
        model = tmp_path / "pico"  # its GGUF cache goes beside it: not into the shared fixture
        shutil.copytree(pico_dir, model)
        extra = ["--gguf-type", "f32"]
    log = open(tmp_path / "app.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bonsai_mlx.app", "--model", str(model), "--port", str(port), "--engine", engine]
        + list(extra),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("app did not start: " + (tmp_path / "app.log").read_text()[-2000:])
    if proc.poll() is not None:
        pytest.fail("app exited: " + (tmp_path / "app.log").read_text()[-2000:])
    assert f"engine: {engine} (asked for)" in (tmp_path / "app.log").read_text()  # one line at start
    yield url, engine
    proc.terminate()
    proc.wait(timeout=20)


def test_upload_ask_stream_follow_up_in_chromium(server, tmp_path):
    server, engine = server
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (scripts/setup.sh --dev does)")
    img = tmp_path / "shapes.png"
    image(size=(120, 90)).save(img)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server, wait_until="load")
        page.wait_for_selector("#input textarea", timeout=60_000)
        shown = page.inner_text("#engine")  # the engine, beside the model name
        assert ("llama.cpp, f32 GGUF" if engine == "llama.cpp" else "MLX") in shown and "asked for" in shown
        page.set_input_files("#input input[type=file]", str(img))
        page.wait_for_selector("#input img, #input .thumbnail-item", timeout=30_000)
        page.fill("#input textarea", "What colour is the square?")
        page.press("#input textarea", "Enter")
        page.wait_for_function("document.querySelector('#stats')?.innerText.includes('TTFT')", timeout=120_000)
        bubbles = page.locator("#chat .message")
        assert bubbles.count() >= 2
        assert "TTFT" in page.inner_text("#chat")  # stats under the answer
        assert page.locator("#chat img").count() >= 1  # the uploaded image is shown in the conversation
        first_stats = page.inner_text("#stats")
        page.wait_for_selector("#input textarea:not([disabled])", timeout=60_000)
        page.fill("#input textarea", "And the circle?")
        page.press("#input textarea", "Enter")
        page.wait_for_function("document.querySelector('#chat')?.innerText.includes('And the circle?')", timeout=60_000)
        page.wait_for_function(
            f"(() => {{ const t = document.querySelector('#stats')?.innerText || ''; "
            f"return t.includes('TTFT') && t !== {first_stats!r}; }})()",
            timeout=120_000,
        )
        assert page.locator("#chat .message").count() >= 4
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"app-{engine}.png"), full_page=True)
        browser.close()


def test_no_model_page_explains_how_to_make_one(tmp_path):
    from bonsai_mlx.app.registry import Registry
    from bonsai_mlx.app.ui import build

    demo = build(Registry({}))
    assert "python -m bonsai_mlx.train" in str(demo.config)
