import io

import numpy as np
import pytest
from PIL import Image

from bonsai_mlx.core.images import ImageError, load_image


def _png(im: Image.Image, fmt="PNG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    im = (
        Image.new("RGB", (8, 6), (200, 40, 10)).convert(mode)
        if mode not in ("I;16", "I", "F")
        else Image.fromarray(
            np.full((6, 8), 1000, dtype=np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32)
        )
    )
    out = load_image(im)
    assert out.mode == "RGB" and out.size == (8, 6)


def test_transparent_pixels_become_white():
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(im).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (20, 10), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display
    out = load_image(_png(im, "JPEG", exif=exif.tobytes()))
    assert out.size == (10, 20)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(ImageError, match="notes.txt: not a readable image"):
        load_image(p)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.png")


def test_truncated_file(tmp_path):
    p = tmp_path / "cut.png"
    p.write_bytes(_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:80])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(p)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(_png(Image.new("L", (3000, 3000))))
    with pytest.raises(ImageError, match="over the 1,000,000-pixel limit"):
        load_image(p, max_pixels=1_000_000)
