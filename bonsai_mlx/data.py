"""LLaVA conversation data -> token ids with assistant-only labels. No mlx here: train_cuda uses it too.

Records: {"id", "image" (optional), "conversations": [{"from": "human"|"gpt"|"system", "value"}]},
from a JSON list, JSONL, or a `datasets` directory / hub id with the same columns.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue
from typing import Any

import numpy as np

from bonsai_mlx.images import ImageError, load_image

IGNORE = -100
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(ValueError):
    """A record that cannot be used (missing image, malformed turns...)."""


def read_records(source: str | Path) -> list[dict]:
    p = Path(source)
    if p.is_file():
        text = p.read_text()
        try:
            if p.suffix == ".jsonl":
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of LLaVA records")
        return data
    if p.is_dir() or "/" in str(source):
        import datasets

        ds = datasets.load_from_disk(str(p)) if p.is_dir() else datasets.load_dataset(str(source), split="train")
        return [dict(r) for r in ds]
    raise FileNotFoundError(f"{source}: no such data file")


def messages_of(rec: dict) -> list[dict]:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample("no 'conversations' list")
    msgs = []
    for turn in conv:
        role = ROLES.get(turn.get("from", turn.get("role")) if isinstance(turn, dict) else None)
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise BadSample(f"malformed turn {turn!r:.60}")
        msgs.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadSample("no assistant (gpt) turn to learn from")
    return msgs


def _encode(processor, text: str, base: int, offsets: list | None) -> list[int]:
    if offsets is None:
        return processor.encode_text(text)
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets += [(base + a, base + b) for a, b in enc["offset_mapping"]]
    return enc["input_ids"]


def tokenize(
    processor, msgs: list[dict], max_length: int | None = None, offsets: list | None = None
) -> tuple[list[int], list[int], bool]:
    """ids, labels (IGNORE outside assistant answers and their end token), truncated?

    Pass a list as `offsets` to also get each token's character span in the rendered conversation
    (`processor.render(msgs, add_generation_prompt=False)`), which distillation aligns on.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    stop = processor.stop_ids
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = processor.render(msgs[:k], add_generation_prompt=True)
        full = processor.render(msgs[: k + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError("the chat template does not render conversations prefix-stably; cannot mask labels")
        ctx = _encode(processor, prefix[len(done) :], len(done), offsets)
        ans = _encode(processor, full[len(prefix) :], len(prefix), offsets)
        last = max((i for i, t in enumerate(ans) if t in stop), default=len(ans) - 1)
        ids += ctx + ans
        labels += [IGNORE] * len(ctx) + ans[: last + 1] + [IGNORE] * (len(ans) - last - 1)
        done = full
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
        run = len(ids) - next((i + 1 for i in range(len(ids) - 1, -1, -1) if ids[i] != processor.image_token_id), 0)
        if run % processor.config.num_image_tokens:
            raise BadSample(f"max_length {max_length} cuts through the image tokens")
    return ids, labels, truncated


@dataclass
class Example:
    id: str
    ids: list[int]
    labels: list[int]
    image: str | None
    n_images: int


@dataclass
class Dataset:
    """Tokenized records, bad ones skipped and counted (or raised with on_bad='error')."""

    examples: list[Example]
    bad: dict[str, str] = field(default_factory=dict)
    truncated: int = 0

    @classmethod
    def build(
        cls,
        records: list[dict],
        processor,
        image_root: str | Path | None = None,
        max_length: int | None = None,
        on_bad: str = "skip",
    ) -> Dataset:
        out, bad, trunc = [], {}, 0
        root = Path(image_root) if image_root else None
        for i, rec in enumerate(records):
            rid = str(rec.get("id", f"#{i}")) if isinstance(rec, dict) else f"#{i}"
            try:
                if not isinstance(rec, dict):
                    raise BadSample("record is not an object")
                msgs = messages_of(rec)
                img = rec.get("image")
                n_img = sum(m["content"].count("<image>") for m in msgs)
                if img and n_img == 0:
                    msgs[0] = (
                        {**msgs[0], "content": "<image>\n" + msgs[0]["content"]}
                        if msgs[0]["role"] == "user"
                        else msgs[0]
                    )
                    n_img = 1
                if n_img > 1:
                    raise BadSample(f"{n_img} <image> tags; one image per record is supported")
                if n_img and not img:
                    raise BadSample("<image> in the text but no 'image' field")
                path = None
                if img:
                    path = str(root / img) if root else str(img)
                    if not Path(path).is_file():
                        raise BadSample(f"image file {path} not found")
                ids, labels, t = tokenize(processor, msgs, max_length)
                if all(label == IGNORE for label in labels):
                    raise BadSample("no assistant token left after truncation")
                trunc += t
                out.append(Example(rid, ids, labels, path, n_img))
            except BadSample as e:
                if on_bad == "error":
                    raise ValueError(f"record {rid}: {e}") from None
                bad[rid] = str(e)
        return cls(out, bad, trunc)

    def summary(self) -> str:
        s = f"{len(self.examples)} samples, {len(self.bad)} skipped, {self.truncated} truncated"
        if self.bad:
            first = list(self.bad.items())[:5]
            s += "; skipped: " + "; ".join(f"{k} ({v})" for k, v in first) + (" ..." if len(self.bad) > 5 else "")
        return s


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group: bool = True) -> list[list[int]]:
    """Shuffled batches of indices; with `group`, similar lengths share a batch (less padding)."""
    rng = random.Random(f"{seed}-{epoch}")
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group:
        chunk = batch_size * 32  # sort within large shuffled windows, then shuffle the batches
        idx = [i for w in range(0, len(idx), chunk) for i in sorted(idx[w : w + chunk], key=lambda j: lengths[j])]
    batches = [idx[i : i + batch_size] for i in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


class BatchSchedule:
    """Micro-batch number -> sample indices, epoch after epoch, deterministic from the seed (so resume
    is exact); each epoch's order is computed once, and rank r of `world` takes every world-th batch."""

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int, group: bool = True, rank: int = 0, world: int = 1
    ):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.rank, self.world = rank, world
        self.per_epoch = len(lengths) // batch_size // world
        if self.per_epoch == 0:
            raise ValueError(f"{len(lengths)} samples cannot fill one batch of {batch_size} per process")
        self._epoch, self._order = -1, []

    def __getitem__(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            order = batch_order(self.lengths, self.batch_size, self.seed, epoch, self.group)
            self._epoch, self._order = epoch, order[self.rank :: self.world]
        return self._order[i]


@dataclass
class Batch:
    input_ids: np.ndarray  # (B, L) int32, right-padded
    pixel_values: np.ndarray | None  # (num_images, 3, H, W), in order of appearance
    positions: np.ndarray  # flat indices into B*L of states that predict a supervised token
    targets: np.ndarray  # the tokens they predict
    ids: list[str]
    n_tokens: int  # real (unpadded) tokens
    skipped: dict[str, str] = field(default_factory=dict)  # id -> why (e.g. a corrupt image)


def collate(examples: list[Example], processor, pad_id: int, images: dict[str, Any] | None = None) -> Batch:
    """Pad and gather one batch; examples whose image fails to decode are dropped into `skipped`."""
    pil, kept, skipped = [], [], {}
    for e in examples:
        if e.image:
            try:
                pil.append(images[e.image] if images and e.image in images else load_image(e.image))
            except ImageError as err:
                skipped[e.id] = str(err)
                continue
        kept.append(e)
    examples = kept
    if not examples:
        return Batch(np.zeros((0, 0), np.int32), None, np.zeros(0, np.int32), np.zeros(0, np.int32), [], 0, skipped)
    L = max(len(e.ids) for e in examples)
    B = len(examples)
    ids = np.full((B, L), pad_id, dtype=np.int32)
    pos, tgt = [], []
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = e.ids
        lab = np.asarray(e.labels)
        t = np.nonzero(lab[1:] != IGNORE)[0]  # state t predicts token t+1
        pos.append(b * L + t)
        tgt.append(lab[1:][t])
    pv = processor.pixel_values(pil) if pil else None
    return Batch(
        ids,
        pv,
        np.concatenate(pos).astype(np.int32),
        np.concatenate(tgt).astype(np.int32),
        [e.id for e in examples],
        sum(len(e.ids) for e in examples),
        skipped,
    )


def prefetch(make: Iterator[Batch] | Any, depth: int = 2) -> Iterator[Batch]:
    """Run a batch generator in a background thread so image decoding overlaps compute."""
    q: Queue = Queue(maxsize=depth)
    sentinel = object()
    errors: list[BaseException] = []

    def worker():
        try:
            for item in make:
                q.put(item)
        except BaseException as e:  # surfaced in the consumer
            errors.append(e)
        finally:
            q.put(sentinel)

    threading.Thread(target=worker, daemon=True).start()
    while True:
        item = q.get()
        if item is sentinel:
            if errors:
                raise errors[0]
            return
        yield item


__all__ = [
    "Batch",
    "Dataset",
    "Example",
    "ImageError",
    "batch_order",
    "collate",
    "prefetch",
    "read_records",
    "tokenize",
]
