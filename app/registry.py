"""Which local models the app offers, and the one loaded model all tabs share."""

from __future__ import annotations

import gc
import json
import threading
from pathlib import Path

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
    """Loads a model once and shares it; switching models frees the previous one first."""

    def __init__(self, models: dict[str, Path]):
        self.models = models
        self.name: str | None = None
        self.model = self.processor = None
        self.load_lock = threading.Lock()
        self.generate_lock = threading.Lock()  # one generation at a time: requests queue, state stays intact

    def get(self, name: str):
        if name not in self.models:
            raise ValueError(f"unknown model {name!r}")
        with self.load_lock:
            if self.name != name:
                import mlx.core as mx

                from bonsai_mlx.generate import load

                self.model = self.processor = None
                gc.collect()
                mx.clear_cache()
                self.model, self.processor = load(str(self.models[name]))
                self.name = name
            return self.model, self.processor
