"""The public Python API (`from bonsai_mlx import load, generate, stream_generate, ChatSession`)."""

from __future__ import annotations

import subprocess
import sys

from helpers import image


def test_importing_the_package_loads_neither_mlx_nor_torch():
    code = (
        "import sys, bonsai_mlx\n"
        "assert 'mlx.core' not in sys.modules and 'torch' not in sys.modules\n"
        "from bonsai_mlx import load, generate\n"
        "assert callable(load) and callable(generate)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_generate_streams_and_answers_like_a_chat_session(pico_dir, tmp_path):
    from bonsai_mlx import ChatSession, Sampling, generate, load, stream_generate

    img = tmp_path / "wide.png"
    image(3, (64, 32)).save(img)
    model, processor = load(str(pico_dir))
    chunks = list(stream_generate(model, processor, "What is this?", image=str(img), max_tokens=12))
    assert chunks[-1].stats is not None and chunks[-1].stats.generated_tokens >= 1
    text = "".join(c.text for c in chunks)
    assert generate(model, processor, "What is this?", image=str(img), max_tokens=12) == text
    session = ChatSession(model, processor)
    assert "".join(c.text for c in session.ask("What is this?", str(img), Sampling(max_tokens=12))) == text
