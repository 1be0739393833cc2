"""The built-in visual-QA task: shapes drawn with PIL, questions with one-word answers.

Seeded and reproducible. Each image holds 1-3 shapes (distinct kinds and colours) in distinct
quadrants, each of a size varying 3x, anywhere in its quadrant, filled or outlined, on a flat or
gradient background with noise (`DrawStyle`): neither area nor colour-per-patch tells the shapes apart.
Questions ask for the colour or shape at a place, the count, where a colour is, or whether a colour is
present (yes/no). Doubles as sample data for every command (`python -m bonsai_mlx.train --export DIR`).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from bonsai_mlx.core.io import atomic_write_text

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
CELLS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
NUMBERS = {1: "one", 2: "two", 3: "three"}
QTYPES = ("colour", "shape", "count", "position", "yesno")
# The embedded default's draw: samples and image size (the CLI, the runner and shapes_kd read this).
# Three questions per training image: each image encoded serves three answers (held-out stays one per image).
DEFAULT_DATA = dict(n_train=12000, n_eval=400, image_size=48, questions=3, caption_share=0.0)


@dataclass
class Item:
    kind: str
    colour: str
    cell: str


@dataclass
class DrawStyle:
    """How shapes are drawn. The defaults are the embedded task: radii varying 3.1x (as shares of a cell's
    side), anywhere in the cell, half of them outlined, on flat or gradient light backgrounds with noise."""

    r_min: float = 0.14
    r_max: float = 0.44
    outline_share: float = 0.5
    noise: float = 6.0  # largest per-pixel noise std (each image draws its own in [0, noise])
    gradient: bool = True
    anywhere: bool = True  # False: centred in the cell


STYLE = DrawStyle()


def _background(size: int, rng: random.Random, style: DrawStyle) -> Image.Image:
    """A light background: flat, or a gradient between two light colours, with per-pixel noise."""
    a = [rng.randint(190, 255) for _ in range(3)]
    b = [rng.randint(190, 255) for _ in range(3)] if style.gradient and rng.random() < 0.5 else a
    t = np.linspace(0.0, 1.0, size)[:, None] if rng.random() < 0.5 else np.linspace(0.0, 1.0, size)[None, :]
    img = np.stack([a[c] + (b[c] - a[c]) * t * np.ones((size, size)) for c in range(3)], axis=-1)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, rng.uniform(0.0, style.noise), img.shape)
    return Image.fromarray(np.clip(img + noise, 0, 255).astype(np.uint8))


def draw(items: list[Item], size: int, rng: random.Random, style: DrawStyle | None = None) -> Image.Image:
    """Shapes of sizes varying 3x, anywhere in their cell, filled or outlined, on varied backgrounds: so
    neither area nor fill-per-patch tells a circle from a square; only the outline's shape does."""
    style = style or STYLE
    im = _background(size, rng, style)
    d = ImageDraw.Draw(im)
    half = size / 2
    line = max(1, round(size / 32))
    for it in items:
        cx, cy = CELLS[it.cell]
        r = rng.uniform(style.r_min, style.r_max) * half
        if style.anywhere:
            x = cx * half + rng.uniform(r + 1, half - r - 1)
            y = cy * half + rng.uniform(r + 1, half - r - 1)
        else:
            x, y = (cx + 0.5) * half, (cy + 0.5) * half
        box = (x - r, y - r, x + r, y + r)
        col = COLOURS[it.colour]
        style_kw = {"outline": col, "width": line} if rng.random() < style.outline_share else {"fill": col}
        if it.kind == "circle":
            d.ellipse(box, **style_kw)
        elif it.kind == "square":
            d.rectangle(box, **style_kw)
        else:
            pts = [(x, y - r), (x - r, y + r), (x + r, y + r)]
            if "fill" in style_kw:
                d.polygon(pts, fill=col)
            else:
                d.polygon(pts, outline=col, width=line)
    return im


def question(items: list[Item], qtype: str, rng: random.Random) -> tuple[str, str]:
    """Colour and shape are asked of a place, position of a colour (colours are distinct in an image)."""
    it = rng.choice(items)
    if qtype == "colour":
        return f"What colour is the shape at the {it.cell}?", it.colour
    if qtype == "shape":
        return f"What shape is at the {it.cell}?", it.kind
    if qtype == "count":
        return "How many shapes are there?", NUMBERS[len(items)]
    if qtype == "position":
        return f"Where is the {it.colour} shape?", it.cell
    if rng.random() < 0.5:
        return f"Is there a {it.colour} shape?", "yes"
    absent = [c for c in COLOURS if c not in {i.colour for i in items}]
    return f"Is there a {rng.choice(absent)} shape?", "no"


def caption(items: list[Item]) -> str:
    """Every cell in reading order, empty ones too: each word is read off one place in the image, the
    same look-up the position-keyed questions need, supervised densely (four cells per sample)."""
    at = {i.cell: i for i in items}
    return "; ".join(f"{c}: {at[c].colour} {at[c].kind}" if c in at else f"{c}: nothing" for c in CELLS) + "."


def sample(index: int, seed: int, size: int = 48, caption_share: float = 0.0, questions: int = 1) -> dict:
    """Sample `index` of the task with `seed`: {id, image (PIL), turns [(question, answer, type)], type}.

    With `questions` > 1 one image carries that many question turns of different types (a multi-turn
    conversation, as in LLaVA-Instruct): more supervised answers per image the model encodes.
    With `caption_share`, that fraction of samples asks for a description instead (LLaVA's stage-1
    caption data, mixed in): every word of it depends on the image, so the model learns to look.
    """
    rng = random.Random(f"{seed}-{index}")
    n = rng.randint(1, 3)
    kinds = rng.sample(SHAPES, n)
    colours = rng.sample(list(COLOURS), n)
    cells = rng.sample(list(CELLS), n)
    items = [Item(k, c, p) for k, c, p in zip(kinds, colours, cells, strict=True)]
    if caption_share and rng.random() < caption_share:
        turns = [("Describe the image.", caption(items), "caption")]
    elif questions == 1:
        qtype = QTYPES[index % len(QTYPES)]
        turns = [(*question(items, qtype, rng), qtype)]
    else:
        turns = [(*question(items, t, rng), t) for t in rng.sample(QTYPES, min(questions, len(QTYPES)))]
    return {"id": f"shapes-{seed}-{index}", "image": draw(items, size, rng), "turns": turns, "type": turns[0][2]}


def split(
    n_train: int, n_eval: int, seed: int = 0, size: int = 48, caption_share: float = 0.0, questions: int = 1
) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out samples (different index ranges of the same generator); held-out is
    one question per image, no captions."""
    train = [sample(i, seed, size, caption_share, questions) for i in range(n_train)]
    held = [sample(10_000_000 + i, seed, size) for i in range(n_eval)]
    return train, held


def to_llava(s: dict, image_name: str) -> dict:
    conv = []
    for i, (q, a, _) in enumerate(s["turns"]):
        conv += [{"from": "human", "value": f"<image>\n{q}" if i == 0 else q}, {"from": "gpt", "value": a}]
    return {"id": s["id"], "image": image_name, "type": s["type"], "conversations": conv}


def corpus() -> list[str]:
    """Every word the task can say, for training its tokenizer."""
    words = [*COLOURS, *SHAPES, *CELLS, *NUMBERS.values(), "yes", "no"]
    qs = [
        question([Item(k, c, p)], t, random.Random(i))
        for i, (k, c, p, t) in enumerate((k, c, p, t) for k in SHAPES for c in COLOURS for p in CELLS for t in QTYPES)
    ]
    chat = ["user", "assistant", "system", "You are a helpful assistant.", "Describe the image.", "at the", "and"]
    caps = [caption([Item(k, c, p)]) for k, c, p in zip(SHAPES * 4, list(COLOURS) * 3, list(CELLS) * 3, strict=False)]
    return [f"{q} {a}" for q, a in qs] + words + chat + caps + ["What shape is the object? How many shapes are there?"]


def export(
    out: str | Path,
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
    size: int = 48,
    caption_share: float = 0.0,
    questions: int = 1,
) -> tuple[Path, Path]:
    """Write train.json / eval.json (LLaVA format) and images/*.png. Returns the two JSON paths."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    train, held = split(n_train, n_eval, seed, size, caption_share, questions)
    paths = []
    for name, rows in (("train", train), ("eval", held)):
        recs = []
        for s in rows:
            fn = f"{s['id']}.png"
            s["image"].save(out / "images" / fn)
            recs.append(to_llava(s, fn))
        p = out / f"{name}.json"
        atomic_write_text(p, json.dumps(recs, indent=1))
        paths.append(p)
    return paths[0], paths[1]
