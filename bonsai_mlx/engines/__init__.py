"""Which engine runs a Pico: MLX (bonsai_mlx itself) or llama.cpp (engines.llama_cpp), or `auto`.

`auto` picks MLX where it has a GPU backend (Metal on Apple silicon, CUDA on NVIDIA), and llama.cpp on any
other CPU when llama-cpp-python is installed: there MLX runs only on its CPU backend, and llama.cpp decodes
the same weights an order of magnitude faster (docs/engines.md has the measurements). Without
llama-cpp-python, `auto` stays on MLX and says how to get the faster engine. Whichever it picks, it says
which and why in one line (`Choice.line`), which the CLIs print at start and the app shows by the model name.

Importing this module is light (no MLX, no llama.cpp): the choice itself only probes.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

from bonsai_mlx.core.cli import opt
from bonsai_mlx.core.errors import UserError

ENGINES = ("auto", "mlx", "llama.cpp")
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
INSTALL_HINT = "pip install -e '.[llama]' (compiles llama.cpp: a few minutes)"


@dataclass
class EngineConfig:
    """The engine flags shared by `python -m bonsai_mlx.generate`, `bonsai app` and `bonsai_mlx.server`."""

    engine: str = opt(
        os.environ.get("BONSAI_ENGINE") or "auto",
        "mlx | llama.cpp | auto (MLX on Apple silicon and CUDA; llama.cpp on other CPUs when llama-cpp-python "
        "is installed); $BONSAI_ENGINE sets the default",
        choices=ENGINES,
    )
    gguf_type: str | None = opt(
        None,
        "llama.cpp: the language model's GGUF type, made on first use beside the model "
        "(default: q4_0 on a CPU, f16 with a GPU build)",
        choices=GGUF_TYPES,
    )
    n_ctx: int = opt(4096, "llama.cpp: context size in tokens (the KV cache it reserves)")
    threads: int | None = opt(None, "llama.cpp: threads (default: one per core)")


@dataclass(frozen=True)
class Choice:
    engine: str  # "mlx" | "llama.cpp"
    reason: str

    def line(self) -> str:
        return f"engine: {self.engine} ({self.reason})"


def llama_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def mlx_gpu() -> str | None:
    """ "metal" or "cuda" when MLX computes on a GPU here, else None (also when MLX is missing)."""
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    try:
        import mlx.core as mx
    except ImportError:
        return None
    try:
        return "cuda" if mx.cuda.is_available() else None
    except AttributeError:  # an MLX without the cuda module
        return None


def choose(requested: str = "auto") -> Choice:
    """The engine for `requested` (mlx | llama.cpp | auto), with the reason in words."""
    if requested not in ENGINES:
        raise UserError(f"--engine {requested!r}: expected one of {', '.join(ENGINES)}")
    if requested == "mlx":
        return Choice("mlx", "asked for")
    if requested == "llama.cpp":
        if not llama_available():
            raise UserError(f"--engine llama.cpp: llama-cpp-python is not installed; {INSTALL_HINT}")
        return Choice("llama.cpp", "asked for")
    gpu = mlx_gpu()
    if gpu == "metal":
        return Choice("mlx", "auto: Apple silicon, MLX runs on Metal")
    if gpu == "cuda":
        return Choice("mlx", "auto: MLX runs on the NVIDIA GPU (CUDA)")
    cpu = f"{platform.system()} {platform.machine()}".strip()
    if llama_available():
        return Choice("llama.cpp", f"auto: {cpu} CPU, where MLX has only its slower CPU backend")
    return Choice("mlx", f"auto: {cpu} CPU and no llama-cpp-python, so MLX's CPU backend; faster: {INSTALL_HINT}")


@dataclass
class Loaded:
    model: object
    processor: object
    choice: Choice

    @property
    def engine(self) -> str:
        return self.choice.engine

    def describe(self) -> str:
        """One line: the engine, why, and (llama.cpp) which files and type."""
        extra = getattr(self.model, "describe", None)
        return self.choice.line() + (f": {extra}" if extra else "")


def load(model_dir: str | Path, cfg: EngineConfig | None = None, choice: Choice | None = None, log=None) -> Loaded:
    """The model and processor on the chosen engine. `log` gets the choice line first (when the choice is made here),
    then progress lines (the GGUF pair being made)."""
    cfg = cfg or EngineConfig()
    if choice is None:  # decided here: say which and why (a caller that decided says it itself)
        choice = choose(cfg.engine)
        if log:
            log(choice.line())
    if choice.engine == "llama.cpp":
        from bonsai_mlx.engines.llama_cpp import LlamaOptions
        from bonsai_mlx.engines.llama_cpp import load as load_llama

        model, proc = load_llama(model_dir, LlamaOptions(cfg.gguf_type, cfg.n_ctx, cfg.threads), log=log)
    else:  # as bonsai_mlx.generate.load (this package never imports generate: generate's CLI imports it)
        from bonsai_mlx import loading
        from bonsai_mlx.core.processing import Processor

        model, config = loading.load(str(model_dir))
        proc = Processor(loading.resolve(str(model_dir)), config)
    return Loaded(model, proc, choice)


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
