"""Units a teacher and a student can both see, across different tokenizers and image grids.

Pure Python/NumPy: `train_cuda.extract` (PyTorch) and `bonsai_mlx` (MLX) share it.

Text: both models read the same answer text. A causal LM's state at a token summarises the text up
to that token's end, so a teacher position and a student position describe the same thing when
their tokens end at the same character of that text. Image: the teacher's patch grid (e.g. 24x24)
is average-pooled onto the student's (e.g. 14x14), so unit k pairs with student patch k.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# How a student state is compared with the teacher's at an aligned unit (both sides' losses accept these).
FEAT_LOSSES = ("mse", "cosine")


def token_ends(offsets: list[tuple[int, int]], span: tuple[int, int]) -> dict[int, int]:
    """{end character relative to span start: token index} for non-empty tokens inside `span`."""
    lo, hi = span
    out = {}
    for i, (s, e) in enumerate(offsets):
        if e > s and s >= lo and e <= hi:
            out[e - lo] = i
    return out


def text_units(t_offsets, t_span, s_offsets, s_span) -> list[tuple[int, int]]:
    """(teacher position, student position) pairs whose tokens end at the same character of the shared text.

    `*_offsets` are each tokenization's (start, end) character offsets in its own rendered prompt;
    `*_span` is where the shared text (e.g. the answer) sits in that prompt. The two spans must hold
    the same string.
    """
    t_end, s_end = token_ends(t_offsets, t_span), token_ends(s_offsets, s_span)
    return [(t_end[c], s_end[c]) for c in sorted(set(t_end) & set(s_end))]


def _pool_matrix(src: int, dst: int) -> np.ndarray:
    """(dst, src) averaging weights of adaptive average pooling (PyTorch's bin edges)."""
    m = np.zeros((dst, src), dtype=np.float64)
    for i in range(dst):
        a, b = (i * src) // dst, -((-(i + 1) * src) // dst)
        m[i, a:b] = 1.0 / (b - a)
    return m


def pool_grid(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """(src*src, D) patch states on a src x src grid -> (dst*dst, D), row-major like the patch order."""
    if x.shape[0] != src * src:
        raise ValueError(f"expected {src * src} patch states for a {src}x{src} grid, got {x.shape[0]}")
    p = _pool_matrix(src, dst)
    g = x.reshape(src, src, -1).astype(np.float64)
    out = np.einsum("ia,jb,abd->ijd", p, p, g)
    return out.reshape(dst * dst, -1).astype(x.dtype)


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (122, 116, 104)) -> Image.Image:
    """LLaVA-1.5's pad-to-square (mean-colour borders), applied to both models' inputs so grids line up."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Parameter-free LayerNorm over the last axis (how teacher targets are normalised)."""
    x = x.astype(np.float32)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)
