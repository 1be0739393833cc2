"""Model locations: a local directory as is, or a hub id fetched (safetensors and text files only)."""

from __future__ import annotations

from pathlib import Path

from bonsai_mlx.core.errors import InputNotFound


def resolve(path_or_id: str | Path) -> Path:
    """A local directory as is; anything else is treated as a hub id and downloaded (safetensors only)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputNotFound(f"{p}: is a file, expected a model directory")
        return p
    s = str(path_or_id)
    # a hub id is exactly owner/name; "pico/" (a folder typed with its slash) is a local path that is missing
    if s.startswith((".", "/", "~")) or s.count("/") != 1 or s.endswith("/"):
        raise InputNotFound(f"{path_or_id}: no such model directory")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
    return Path(snapshot_download(str(path_or_id), allow_patterns=patterns))
