"""Safe image loading: any common mode to RGB, EXIF orientation, decompression-bomb guard."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from bonsai_mlx.core.errors import BonsaiError

MAX_PIXELS = 64_000_000  # ~8000x8000; larger files are refused before decoding


class ImageError(BonsaiError, ValueError):
    """An input that cannot be used as an image."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = a.max() or 1.0
        im = Image.fromarray((a * (255.0 / hi)).clip(0, 255).astype(np.uint8))
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        lo, hi = a.min(), a.max()
        im = Image.fromarray(((a - lo) * (255.0 / ((hi - lo) or 1.0))).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(src: str | Path | bytes | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `src` (path, bytes or PIL image) as an upright RGB image, or raise ImageError naming it."""
    name = "image" if isinstance(src, (bytes, Image.Image)) else str(src)
    if isinstance(src, Image.Image):
        im = src
    else:
        try:
            im = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        except FileNotFoundError:
            raise ImageError(f"{name}: no such file") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a directory, expected an image file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ImageError(f"{name}: not a readable image ({type(e).__name__})") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} is {w * h:,} pixels, over the {max_pixels:,}-pixel limit")
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image is empty ({w}x{h})")
    try:
        im.load()
        im = ImageOps.exif_transpose(im) or im
        return _to_rgb(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: image data is corrupt or truncated ({e})") from None
