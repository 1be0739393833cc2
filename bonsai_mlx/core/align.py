"""Units a teacher and a student can both see, across different tokenizers and image grids.

Pure Python/NumPy: `train_cuda.extract` (PyTorch) and `bonsai_mlx` (MLX) share it.

Text: both models read the same answer text. A causal LM's state at a token summarises the text up
to that token's end, so a teacher position and a student position describe the same thing when
their tokens end at the same character of that text. Image: the teacher's patch grid (e.g. 24x24)
is area-pooled onto the student's (e.g. 14x14) so that unit k covers the region of the image that student
patch k sees: the teacher (LLaVA-1.5) pads the image to a square, the student (SigLIP) stretches it, and
`grid_weights` maps each student patch's region into the padded teacher grid.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# How a student state is compared with the teacher's at an aligned unit (both sides' losses accept these).
FEAT_LOSSES = ("mse", "cosine")


def token_ends(offsets: list[tuple[int, int]], span: tuple[int, int], lead: int = 0) -> dict[int, int]:
    """{end character relative to span start: token index} for non-empty tokens ending inside `span`; a token
    may start up to `lead` characters before it (the space a template puts before an answer: Llama's "▁A")."""
    lo, hi = span
    out = {}
    for i, (s, e) in enumerate(offsets):
        if e > s and s >= lo - lead and lo < e <= hi:
            out[e - lo] = i
    return out


def text_units(t_offsets, t_span, s_offsets, s_span, t_lead: int = 0, s_lead: int = 0) -> list[tuple[int, int]]:
    """(teacher position, student position) pairs whose tokens end at the same character of the shared text.

    `*_offsets` are each tokenization's (start, end) character offsets in its own rendered prompt;
    `*_span` is where the shared text (e.g. the answer) sits in that prompt. The two spans must hold
    the same string. `*_lead`: whitespace before the span that a token may also cover (see `token_ends`).
    """
    t_end, s_end = token_ends(t_offsets, t_span, t_lead), token_ends(s_offsets, s_span, s_lead)
    return [(t_end[c], s_end[c]) for c in sorted(set(t_end) & set(s_end))]


def axis_weights(src: int, dst: int, length: int | None = None, offset: int = 0, side: int | None = None) -> np.ndarray:
    """(dst, src) area weights: student cell i of an axis `length` pixels long, pasted at `offset` in a square
    of `side` pixels that the teacher's `src` cells tile, averages the teacher cells it overlaps.

    The student stretches the image over its grid; the teacher sees it padded to a square. Each row sums to 1.
    Without `length` both see the same square (plain area pooling)."""
    if length is None:
        length, offset, side = src, 0, src
    side = side or length
    m = np.zeros((dst, src), dtype=np.float64)
    t_edges = np.arange(src + 1) * (side / src)
    for i in range(dst):
        lo, hi = offset + i * length / dst, offset + (i + 1) * length / dst
        m[i] = np.clip(np.minimum(t_edges[1:], hi) - np.maximum(t_edges[:-1], lo), 0, None) / (hi - lo)
    return m


def grid_weights(src: int, dst: int, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) weights mapping a teacher `src` x `src` grid over the padded square image onto the
    student's `dst` x `dst` grid over the same image stretched; `size` = the original (width, height)."""
    if size is None:
        w = axis_weights(src, dst)
        return w, w
    width, height = size
    side, left, top = square_box(width, height)
    return axis_weights(src, dst, height, top, side), axis_weights(src, dst, width, left, side)


def pool_grid(x: np.ndarray, src: int, dst: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """(src*src, D) teacher patch states -> (dst*dst, D) states at the student's patches, row-major like the
    patch order; `size` = the image's (width, height) when it is not square (see `grid_weights`)."""
    if x.shape[0] != src * src:
        raise ValueError(f"expected {src * src} patch states for a {src}x{src} grid, got {x.shape[0]}")
    rows, cols = grid_weights(src, dst, size)
    g = x.reshape(src, src, -1).astype(np.float64)
    t = np.tensordot(rows, g, axes=(1, 0))  # (dst, src, D): separable, two small matmuls
    out = np.matmul(cols[None], t)  # (dst, dst, D)
    return out.reshape(dst * dst, -1).astype(x.dtype)


def square_box(width: int, height: int) -> tuple[int, int, int]:
    """(side, left, top): where `pad_to_square` pastes a width x height image."""
    side = max(width, height)
    return side, (side - width) // 2, (side - height) // 2


def pad_to_square(img: Image.Image, fill: tuple[int, int, int] = (122, 116, 104)) -> Image.Image:
    """LLaVA-1.5's pad-to-square (mean-colour borders): what the teacher sees. The student stretches instead
    (its SigLIP processor resizes), and `grid_weights` maps one onto the other."""
    w, h = img.size
    if w == h:
        return img
    side, left, top = square_box(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, (left, top))
    return out


def layer_norm(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Parameter-free LayerNorm over the last axis (how teacher targets are normalised)."""
    x = x.astype(np.float32)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps)
