import numpy as np
import pytest
from PIL import Image

from bonsai_mlx.core.align import layer_norm, pad_to_square, pool_grid, text_units


def test_text_units_pair_tokens_ending_at_the_same_character():
    text = "a blue triangle"
    # teacher splits: "a"|" blue"|" tri"|"angle" ; student: "a b"|"lue"|" triangle"
    t_off = [(0, 1), (1, 6), (6, 10), (10, 15)]
    s_off = [(0, 3), (3, 6), (6, 15)]
    assert text_units(t_off, (0, len(text)), s_off, (0, len(text))) == [(1, 1), (3, 2)]


def test_text_units_with_prompts_around_the_answer():
    t_text, s_text = "USER: hi ASSISTANT: red square</s>", "<|im_start|>assistant\nred square<|im_end|>"
    ans = "red square"
    ts, ss = t_text.index(ans), s_text.index(ans)
    t_off = [(0, 5), (5, 8), (8, 19), (19, 20), (20, 23), (23, 30), (30, 34)]  # ' ' + 'red' glued differently
    s_off = [(0, 12), (12, 21), (21, 22), (22, 25), (25, 32), (32, 42)]
    pairs = text_units(t_off, (ts, ts + len(ans)), s_off, (ss, ss + len(ans)))
    assert pairs == [(4, 3), (5, 4)]  # "red" and " square" end at the same answer characters


def test_real_tokenizers_split_differently_but_align(tmp_path):
    from helpers import make_tokenizer

    from bonsai_mlx.qwen_vocab import build_qwen25_tokenizer

    qwen = build_qwen25_tokenizer(tmp_path / "qwen")
    small = make_tokenizer(tmp_path / "small")
    text = "The triangle is yellow, and the squares are bigger."
    a = qwen(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    b = small(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    assert a != b
    pairs = text_units(a, (0, len(text)), b, (0, len(text)))
    assert pairs and all(a[i][1] == b[j][1] for i, j in pairs)
    assert (len(a) - 1, len(b) - 1) in pairs  # the final "." ends both


def test_pool_grid_averages_blocks_and_keeps_patch_order():
    x = np.arange(16, dtype=np.float32)[:, None]  # 4x4 grid, value = index
    out = pool_grid(x, 4, 2)[:, 0]
    np.testing.assert_allclose(out, [2.5, 4.5, 10.5, 12.5])
    odd = pool_grid(np.random.rand(24 * 24, 3).astype(np.float32), 24, 14)
    assert odd.shape == (196, 3)
    with pytest.raises(ValueError, match="24x24"):
        pool_grid(np.zeros((10, 3)), 24, 14)


def test_pool_grid_of_a_constant_is_the_constant():
    np.testing.assert_allclose(pool_grid(np.full((576, 2), 3.0, np.float32), 24, 14), 3.0, rtol=1e-6)


def test_pad_to_square_and_layer_norm():
    im = pad_to_square(Image.new("RGB", (40, 20), (255, 0, 0)))
    assert im.size == (40, 40) and im.getpixel((0, 0)) != (255, 0, 0) and im.getpixel((20, 20)) == (255, 0, 0)
    y = layer_norm(np.random.rand(5, 8) * 10)
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)


def _cell_means(img: np.ndarray, grid: int) -> np.ndarray:
    """A 'tower' whose patch state is the patch's mean colour: (grid*grid, 3), row-major."""
    h, w, _ = img.shape
    return img.reshape(grid, h // grid, grid, w // grid, 3).mean((1, 3)).reshape(grid * grid, 3)


@pytest.mark.parametrize("size", [(192, 96), (96, 192)])
def test_teacher_units_see_the_student_patches_region_on_non_square_images(size):
    """Teacher: the image padded to a square, 24x24 patches. Student: the image stretched, 4x4 patches.
    With mean-colour towers, teacher unit k pooled onto the student grid is student patch k's colour."""
    from bonsai_mlx.core.align import grid_weights

    w, h = size
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, size=(h // 8, w // 8, 3)).astype(np.uint8)
    pil = Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8)))
    teacher = _cell_means(np.asarray(pad_to_square(pil), np.float64), 24)
    # the student's stretch to a square, done exactly: each student patch covers w/4 x h/4 original pixels
    student = _cell_means(np.asarray(pil, np.float64), 4)
    pooled = pool_grid(teacher, 24, 4, size)
    np.testing.assert_allclose(pooled, student, atol=1e-9)
    assert np.abs(pool_grid(teacher, 24, 4) - student).mean() > 5  # square pooling mixes in the padding
    rows, cols = grid_weights(24, 4, size)
    np.testing.assert_allclose(rows.sum(1), 1)
    np.testing.assert_allclose(cols.sum(1), 1)


def test_non_dividing_grids_on_a_non_square_image_stay_close():
    """24 -> 14 on a 640x480 photo-like gradient: area weights put every student patch on its own region."""
    w, h = 640, 480
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    pil = Image.fromarray(img.astype(np.uint8))
    padded = np.asarray(pad_to_square(pil).resize((24 * 20, 24 * 20), Image.BOX), np.float64)
    stretched = np.asarray(pil.resize((14 * 20, 14 * 20), Image.BOX), np.float64)
    err = np.abs(pool_grid(_cell_means(padded, 24), 24, 14, (w, h)) - _cell_means(stretched, 14))
    assert err.max() < 3.0  # colour levels, out of 255 (resampling only)
