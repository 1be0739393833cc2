import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# the CLIs' default engine is `auto` (llama.cpp on a Linux CPU when installed); the suite tests MLX unless a test
# names another engine (tests/test_llama_engine.py, tests/app/test_browser.py, tests/test_server.py)
os.environ.setdefault("BONSAI_ENGINE", "mlx")

import bonsai_mlx  # noqa: E402,F401  (OpenBLAS before mlx.core)


@pytest.fixture(scope="session")
def pico_dir(tmp_path_factory) -> Path:
    """The default tiny float32 Pico checkpoint (tied embeddings, last-layer features)."""
    from helpers import make_hf_pico

    return make_hf_pico(tmp_path_factory.mktemp("pico"))


@pytest.fixture(scope="session")
def pico5_dir(tmp_path_factory) -> Path:
    """The tiny Pico as transformers 5 saves model + LlavaProcessor: image processor nested, no preprocessor file."""
    from helpers import make_hf5_pico

    return make_hf5_pico(tmp_path_factory.mktemp("pico5"))


@pytest.fixture(scope="session")
def pico512_dir(tmp_path_factory) -> Path:
    """The tiny Pico with a 512-position context, as the embedded default has."""
    from helpers import make_hf_pico

    return make_hf_pico(tmp_path_factory.mktemp("pico512"), max_positions=512)
