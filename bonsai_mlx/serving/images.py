"""Images on their way in: sized from their header, decoded once, shrunk to what the model sees.

A 64-megapixel single-colour PNG is 200 KB, so a request body could hold a hundred of them. Each image's size is
read from its header (PIL's `open` is lazy) and counted against the request's pixel budget before anything is
decoded; decoding happens one image at a time across the server (a semaphore), so at most one full-size bitmap
is alive; and what is kept is the processor's output (a (3, H, W) array at the model's input size), never the
original. The same bytes sent again (a conversation resends its images every turn) reuse the kept array.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from bonsai_mlx.core.images import ImageError, load_image
from bonsai_mlx.serving.config import Limits
from bonsai_mlx.serving.fetch import fetch
from bonsai_mlx.serving.request import ChatRequest, RequestError

KEEP = 32  # arrays kept for images sent again


@dataclass(frozen=True)
class Picture:
    digest: bytes  # sha256 of the bytes as sent: part of a conversation's identity
    pixels: int  # width x height as sent
    array: np.ndarray  # the processor's output, (3, H, W) float32


def _header(data: bytes) -> Image.Image:
    """The image, opened but not decoded (its size comes from the header)."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # (PIL's own limit, far above the server's)
        raise RequestError(413, "an image has more pixels than this server decodes") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise RequestError(400, f"image_url: image: not a readable image ({type(e).__name__})", "messages") from None


class Ingest:
    """Turns a request's image bytes and URLs into Pictures, within the request's pixel budget."""

    def __init__(self, processor, limits: Limits):
        self.processor, self.limits = processor, limits
        ip = processor.image_processor
        size = getattr(ip, "size", None) or {}
        get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
        self.resample = getattr(ip, "resample", None)
        fixed = get("height") and get("width") and getattr(ip, "do_resize", False) and self.resample is not None
        self.size = (get("width"), get("height")) if fixed else None  # else the processor resizes, as it likes
        self._decode = threading.BoundedSemaphore(1)
        self._kept: OrderedDict[bytes, Picture] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, req: ChatRequest) -> None:
        """Replace every image (bytes or URL) in `req` by its Picture."""
        budget = self.limits.max_pixels
        for t in req.turns:
            for i, src in enumerate(t.images):
                data = fetch(src, self.limits) if isinstance(src, str) else src
                pic = self._picture(data, budget)
                budget -= pic.pixels
                t.images[i] = pic

    def _picture(self, data: bytes, budget: int) -> Picture:
        digest = hashlib.sha256(data).digest()
        with self._lock:
            pic = self._kept.get(digest)
            if pic is not None:
                self._kept.move_to_end(digest)
        if pic is not None:
            self._check(pic.pixels, budget)
            return pic
        im = _header(data)
        w, h = im.size
        self._check(w * h, budget)
        with self._decode:
            try:
                rgb = load_image(im, max_pixels=self.limits.max_pixels)
            except ImageError as e:
                raise RequestError(400, f"image_url: {e}", "messages") from None
            if self.size is not None and rgb.size != self.size:
                rgb = rgb.resize(self.size, resample=self.resample)  # what the processor does first, done once
            array = self.processor.pixel_values([rgb])[0]
        pic = Picture(digest, w * h, array)
        with self._lock:
            self._kept[digest] = pic
            while len(self._kept) > KEEP:
                self._kept.popitem(last=False)
        return pic

    def _check(self, pixels: int, budget: int) -> None:
        if pixels > budget:
            cap = self.limits.max_pixels
            raise RequestError(413, f"the request's images have more than {cap:,} pixels together (the cap)")
