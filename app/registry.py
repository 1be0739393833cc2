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

    One lock guards all MLX work (loading, switching, generating), so a switch in one tab waits for a generation
    in another instead of running MLX from two threads. A switch detaches every chat session from the old model
    (their conversations stay, and re-attach on their next turn), so nothing keeps the old weights alive."""

    def __init__(self, models: dict[str, Path]):
        self.models = models
        self.name: str | None = None
        self.model = self.processor = None
        self.lock = threading.Lock()  # a plain Lock: a streamed answer may be resumed and closed on other threads
        self._sessions: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    @property
    def generate_lock(self) -> threading.Lock:
        return self.lock

    def get(self, name: str):
        """(model, processor) of `name`, loading it (and freeing the previous one) if needed."""
        with self.lock:
            return self.load(name)

    def load(self, name: str):
        """As `get`, for a caller that holds `lock`."""
        if name not in self.models:
            raise UserError(f"unknown model {name!r}")
        if self.name != name:
            import mlx.core as mx

            from bonsai_mlx.generate import load

            for s in list(self._sessions.values()):
                s.detach()
            self.model = self.processor = self.name = None
            gc.collect()
            mx.clear_cache()
            self.model, self.processor = load(str(self.models[name]))
            self.name = name
        return self.model, self.processor

    def attach(self, session, name: str) -> None:
        """Give `session` the model `name` (caller holds `lock`); it is detached again if another model is loaded."""
        session.model, session.processor = self.load(name)
        self._sessions[id(session)] = session
