"""`convert init --tiny`: a from-scratch tiny Pico sized for a user's dataset, by the embedded default's builder.

No pretrained weights needed: the tokenizer is a byte-level BPE trained on the dataset's questions and answers
(plus the chat template's words), the image processor is SigLIP's at the chosen image size, and the weights are
random with the init that makes the embedded default learn. The training preset that goes with it is written
beside the weights as `train.yaml` (the embedded default's, for `train --stage full --config OUT/train.yaml`).
"""

from __future__ import annotations

from pathlib import Path

from bonsai_mlx.core.errors import InputNotFound, OutputExists, UserError
from bonsai_mlx.core.io import atomic_write_text
from bonsai_mlx.core.records import read_records
from bonsai_mlx.tiny import TinyRecipe, make_tiny

# Words every chat-formatted sample carries, so that they are whole tokens rather than bytes.
CHAT_WORDS = ["user", "assistant", "system", "You are a helpful assistant."]

# The embedded default's options that apply to any from-scratch tiny `--stage full` run (not its data, output
# or logging cadence, which belong to the run).
PRESET_KEYS = ("stage", "lr", "warmup", "batch_size", "weight_decay", "max_length", "group_by_length", "max_steps")


def dataset_text(data: str | Path) -> list[str]:
    """Every human/gpt turn's text (the <image> placeholder removed): the tokenizer's training corpus."""
    p = Path(data)
    if not p.exists():
        raise InputNotFound(f"{p}: no such data file")
    recs = read_records(p)
    texts: list[str] = []
    for rec in recs:
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not isinstance(turns, list):
            continue
        for t in turns:
            v = t.get("value") if isinstance(t, dict) else None
            if isinstance(v, str) and v.replace("<image>", "").strip():
                texts.append(v.replace("<image>", "").strip())
    if not texts:
        raise UserError(
            f"{p}: no text to train a tokenizer on (expected records with 'conversations': "
            f"[{{'from': 'human', 'value': ...}}, {{'from': 'gpt', 'value': ...}}]; read {len(recs)} records)"
        )
    return texts


def training_preset() -> dict:
    from bonsai_mlx.embedded import DEFAULT

    return {k: DEFAULT[k] for k in PRESET_KEYS}


def check_images(data: str | Path, image_root: str | Path) -> None:
    """Fail early when none of the records' images is under `image_root` (a wrong --image-root)."""
    root = Path(image_root)
    if not root.is_dir():
        raise InputNotFound(f"{root}: no such image directory")
    names = [r["image"] for r in read_records(data) if isinstance(r, dict) and isinstance(r.get("image"), str)]
    if names and not any((root / n).is_file() for n in names[:200]):
        raise InputNotFound(f"{root}: none of {Path(data).name}'s images is there (first: {names[0]})")


def init_tiny(
    data: str | Path,
    out: str | Path,
    recipe: TinyRecipe | None = None,
    seed: int = 0,
    image_root: str | Path | None = None,
) -> str:
    """Write the tiny Pico to `out` (which must not hold a checkpoint already). Returns a one-line note."""
    recipe = recipe or TinyRecipe()
    recipe.check()
    out = Path(out)
    if (out / "config.json").exists():
        raise OutputExists(f"{out}: already holds a checkpoint (config.json); choose a new directory")
    corpus = dataset_text(data) + CHAT_WORDS
    if image_root is not None:
        check_images(data, image_root)
    model, config = make_tiny(out, corpus, recipe, seed)
    import yaml
    from mlx.utils import tree_flatten

    atomic_write_text(out / "train.yaml", yaml.safe_dump(training_preset(), sort_keys=False))
    n = sum(v.size for _, v in tree_flatten(model.parameters()))
    grid = recipe.image_size // recipe.patch_size
    return (
        f"tiny Pico, {n / 1e6:.2f}M parameters, vocab {config.text.vocab_size}, "
        f"{recipe.image_size}px images as {grid}x{grid} patches; training preset in train.yaml"
    )
