"""Greedy predictions over LLaVA-format eval records."""

from __future__ import annotations

from pathlib import Path

from bonsai_mlx.generate import ChatSession, Sampling


def predict_records(model, proc, records: list[dict], image_root: str | None, max_tokens: int = 32) -> list[str]:
    out = []
    for rec in records:
        q = rec["conversations"][0]["value"].replace("<image>", "").strip()
        img = rec.get("image")
        path = str(Path(image_root) / img) if img and image_root else img
        chunks = list(ChatSession(model, proc).ask(q, path, Sampling(max_tokens=max_tokens)))
        out.append("".join(c.text for c in chunks))
    return out
