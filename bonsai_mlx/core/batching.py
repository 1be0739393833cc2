"""Batches for both trainers: a deterministic, sharded batch order; padding + label gathering; prefetch."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from queue import Queue
from typing import Any

import numpy as np

from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.images import ImageError, load_image
from bonsai_mlx.core.records import IGNORE, Example


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
            raise UserError(f"{len(lengths)} samples cannot fill one batch of {batch_size} per process")
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
