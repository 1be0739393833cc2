"""Which local models the app offers, and the one loaded model all tabs share."""

from __future__ import annotations

import gc
import json
import threading
import weakref
from pathlib import Path

from bonsai_mlx.core.errors import UserError

DEFAULT_PLACES = ("runs/shapes/model", "models")


def is_model_dir(p: Path) -> bool:
    try:
        return json.loads((p / "config.json").read_text()).get("model_type") == "llava"
    except (OSError, ValueError):
        return False


def discover(model: str | None = None, models_dir: str | None = None) -> dict[str, Path]:
    """name -> directory, from --model, the subfolders of --models-dir, else the default places."""
    found: dict[str, Path] = {}
    places = [Path(model)] if model else []
    if models_dir:
        places += sorted(p for p in Path(models_dir).iterdir() if p.is_dir()) if Path(models_dir).is_dir() else []
    if not model and not models_dir:
        for d in map(Path, DEFAULT_PLACES):
            places += [d] if is_model_dir(d) else sorted(p for p in d.glob("*") if p.is_dir()) if d.is_dir() else []
    for p in places:
        if is_model_dir(p):
            q = json.loads((p / "config.json").read_text()).get("quantization")
            name = p.name if p.name != "model" else f"{p.parent.name}/{p.name}"
            found[name + (f" ({q['bits']}-bit)" if q else "")] = p
    return found


class Registry:
    """Loads a model once and shares it; switching models frees the previous one first.

    One lock guards all model work (loading, switching, generating), so a switch in one tab waits for a generation
    in another instead of running MLX (or llama.cpp) from two threads. A switch detaches every chat session from the
    old model (their conversations stay, and re-attach on their next turn), so nothing keeps the old weights alive.

    Every model runs on one engine (`engine`: bonsai_mlx.engines.EngineConfig; `auto` is decided once, here)."""

    def __init__(self, models: dict[str, Path], engine=None):
        from bonsai_mlx.engines import EngineConfig, choose

        self.models = models
        self.engine = engine or EngineConfig(engine="mlx")
        self.choice = choose(self.engine.engine)
        self.name: str | None = None
        self.model = self.processor = None
        self.lock = threading.Lock()  # a plain Lock: a streamed answer may be resumed and closed on other threads
        self._sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @property
    def generate_lock(self) -> threading.Lock:
        return self.lock

    def engine_line(self) -> str:
        """Which engine runs the models and why (for llama.cpp: the GGUF type too), in one line."""
        c = self.choice
        if c.engine == "llama.cpp":
            from bonsai_mlx.engines.llama_cpp import default_gguf_type

            return f"llama.cpp, {self.engine.gguf_type or default_gguf_type()} GGUF ({c.reason})"
        return f"MLX ({c.reason})"

    def session_class(self):
        """The chat-session class of this registry's engine (sessions are made before a model is attached)."""
        from bonsai_mlx.generate import ChatSession, LlamaChatSession

        return LlamaChatSession if self.choice.engine == "llama.cpp" else ChatSession

    def get(self, name: str):
        """(model, processor) of `name`, loading it (and freeing the previous one) if needed."""
        with self.lock:
            return self.load(name)

    def load(self, name: str):
        """As `get`, for a caller that holds `lock`."""
        if name not in self.models:
            raise UserError(f"unknown model {name!r}")
        if self.name != name:
            from bonsai_mlx.engines import load, stderr_log

            for s in list(self._sessions.values()):
                s.detach()
            old, self.model, self.processor, self.name = self.model, None, None, None
            close = getattr(old, "close", None)  # llama.cpp frees its context and weights now
            if close is not None:
                close()
            del old
            gc.collect()
            if self.choice.engine == "mlx":
                import mlx.core as mx

                mx.clear_cache()
            loaded = load(str(self.models[name]), self.engine, choice=self.choice, log=stderr_log)
            self.model, self.processor = loaded.model, loaded.processor
            self.name = name
        return self.model, self.processor

    def attach(self, session, name: str) -> None:
        """Give `session` the model `name` (caller holds `lock`); it is detached again if another model is loaded."""
        session.model, session.processor = self.load(name)
        self._sessions[id(session)] = session
