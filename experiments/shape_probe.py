"""Can a tiny SigLIP-shaped tower learn the embedded task's shapes at all, given the best possible signal?

    python -m experiments.shape_probe --arch vit --patch 24 --steps 1800
    python -m experiments.shape_probe --arch cnn --steps 1800

Issue 16 asks `python -m bonsai_mlx.train` to reach >= 95% on shape questions in 10 minutes on 2 cores. Through the
LM, the tower learns shape only from the answer token of a shape question. This script removes the LM: it crops each
shape's 24x24 cell out of the task's own 48px images (`bonsai_mlx.core.synthetic.draw`, the default `DrawStyle`)
and trains the tower (`bonsai_mlx.vision.VisionTower`, the same code and sizes a Pico uses; mean-pooled, a linear
head) with cross-entropy on the shape directly, batch 64, on fresh crops. What it cannot reach here, the full model
cannot reach through the LM with fewer shape labels. `--arch cnn` trains a three-layer convolutional net on the
same crops: the check that the task itself is learnable (locality and translation invariance, which a ViT with
large patches lacks). One line per evaluation on 1,000 held-out crops.
"""

# ruff: noqa: I001  (bonsai_mlx must be imported before mlx.core: it preloads OpenBLAS)
from __future__ import annotations

import argparse
import random
import time

import bonsai_mlx  # noqa: F401
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from bonsai_mlx.core import synthetic
from bonsai_mlx.core.config import VisionConfig
from bonsai_mlx.vision import VisionTower

CELL = 24  # a cell of the embedded task's 48px image


def cell_crops(n: int, seed: int) -> tuple[mx.array, mx.array]:
    """n (24, 24, 3) crops in [-1, 1] (SigLIP's normalisation), one per drawn shape, and their shape index."""
    xs: list[np.ndarray] = []
    ys: list[int] = []
    i = 0
    while len(xs) < n:
        rng = random.Random(f"probe-{seed}-{i}")
        i += 1
        k = rng.randint(1, 3)
        kinds, colours, cells = (
            rng.sample(synthetic.SHAPES, k),
            rng.sample(list(synthetic.COLOURS), k),
            rng.sample(list(synthetic.CELLS), k),
        )
        items = [synthetic.Item(*t) for t in zip(kinds, colours, cells, strict=True)]
        im = np.asarray(synthetic.draw(items, 2 * CELL, rng), dtype=np.float32) / 127.5 - 1.0
        for it in items:
            cx, cy = synthetic.CELLS[it.cell]
            xs.append(im[cy * CELL : (cy + 1) * CELL, cx * CELL : (cx + 1) * CELL])
            ys.append(synthetic.SHAPES.index(it.kind))
    return mx.array(np.stack(xs[:n])), mx.array(np.array(ys[:n]))


class TowerProbe(nn.Module):
    """The Pico vision tower on one cell, post-norm, mean over its patches, then a 3-way linear head."""

    def __init__(self, patch: int, width: int, layers: int):
        super().__init__()
        cfg = VisionConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            image_size=CELL,
            patch_size=patch,
        )
        self.tower = VisionTower(cfg)
        self.head = nn.Linear(width, len(synthetic.SHAPES))

    def __call__(self, x: mx.array) -> mx.array:
        h = self.tower.hidden_states(x.transpose(0, 3, 1, 2), [-1])[0]
        return self.head(self.tower.vision_model.post_layernorm(h).mean(axis=1))


class ConvProbe(nn.Module):
    """3x3 convolutions, two 2x max-pools, a global max-pool: the smallest net with a CNN's inductive bias."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.c1 = nn.Conv2d(3, width // 2, 3, padding=1)
        self.c2 = nn.Conv2d(width // 2, width, 3, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(width, len(synthetic.SHAPES))

    def __call__(self, x: mx.array) -> mx.array:
        x = self.pool(nn.relu(self.c1(x)))
        x = self.pool(nn.relu(self.c2(x)))
        return self.head(nn.relu(self.c3(x)).max(axis=(1, 2)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("vit", "cnn"), default="vit")
    p.add_argument("--patch", type=int, default=24, help="the tower's patch size (divides 24)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--n-train", type=int, default=0, help="training crops (default: steps x 64, each seen ~once)")
    p.add_argument("--evals", type=int, default=6, help="held-out evaluations along the run")
    a = p.parse_args(argv)
    if CELL % a.patch:
        p.error(f"--patch must divide {CELL}, got {a.patch}")

    t0 = time.perf_counter()
    n_train = a.n_train or a.steps * 64
    x_tr, y_tr = cell_crops(n_train, 0)
    x_ev, y_ev = cell_crops(1000, 1)
    print(f"{n_train} training crops drawn in {time.perf_counter() - t0:.0f} s", flush=True)
    mx.random.seed(0)
    model = ConvProbe() if a.arch == "cnn" else TowerProbe(a.patch, a.width, a.layers)
    opt = optim.AdamW(learning_rate=a.lr, weight_decay=0.01)
    loss_grad = nn.value_and_grad(model, lambda m, x, y: nn.losses.cross_entropy(m(x), y).mean())
    name = "cnn" if a.arch == "cnn" else f"vit p{a.patch} w{a.width} l{a.layers}"
    t0 = time.perf_counter()
    every = max(1, a.steps // a.evals)
    for step in range(1, a.steps + 1):
        idx = mx.array(np.random.default_rng(step).integers(0, n_train, 64))
        loss, grads = loss_grad(model, x_tr[idx], y_tr[idx])
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
        if step % every == 0 or step == a.steps:
            acc = (model(x_ev).argmax(-1) == y_ev).mean().item()
            print(
                f"{name} step {step} ({step * 64} labels): loss {loss.item():.3f}, held-out {acc:.1%} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
