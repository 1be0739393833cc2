"""`convert init --tiny`: a from-scratch tiny Pico for a user's dataset, trained with `train --stage full`
as a user would run it, and the builder the embedded default shares."""

import json

import pytest
from helpers import image

from bonsai_mlx.convert.__main__ import main as convert
from bonsai_mlx.core import synthetic
from bonsai_mlx.generate import Sampling, generate, load
from bonsai_mlx.metrics import vqa_normalize
from bonsai_mlx.tiny import TinyRecipe
from bonsai_mlx.train import main as train

FLAGS = ["--stage", "full", "--batch-size", "8", "--lr", "1e-3", "--warmup", "5", "--log-every", "1"]


def _train(tmp_path, model, data, root, steps):
    out = tmp_path / "run"
    assert train(["--model", str(model), "--data", str(data), "--image-root", str(root), *FLAGS,
                  "--max-steps", str(steps), "--out", str(out)]) == 0  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out / "model", losses


def _answer(model_dir, img, question):
    model, proc = load(str(model_dir))
    return "".join(c.text for c in generate(model, proc, question, img, Sampling(max_tokens=6)))


def test_init_tiny_on_an_exported_dataset_trains_to_a_model_that_answers(tmp_path, capsys):
    """The user's path: export the task, `convert init --tiny --data`, `train --stage full`, generate."""
    train_json, _ = synthetic.export(tmp_path / "d", n_train=64, n_eval=8)
    root = tmp_path / "d" / "images"
    assert convert(["init", "--tiny", "--data", str(train_json), "--image-root", str(root), str(tmp_path / "m")]) == 0
    assert "tiny Pico" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    r = TinyRecipe()
    assert cfg["vision_config"]["patch_size"] == r.patch_size and cfg["text_config"]["hidden_size"] == r.width
    proc_cfg = json.loads((tmp_path / "m" / "preprocessor_config.json").read_text())
    assert proc_cfg["size"] == {"height": r.image_size, "width": r.image_size}
    assert (tmp_path / "m" / "processor_config.json").is_file()  # engine-ready, like every other writer
    # The training preset is the embedded default's, in a file `train --config` reads.
    import yaml

    from bonsai_mlx.embedded import DEFAULT

    preset = yaml.safe_load((tmp_path / "m" / "train.yaml").read_text())
    assert preset["stage"] == "full" and preset["lr"] == DEFAULT["lr"] and preset["warmup"] == DEFAULT["warmup"]
    # The tokenizer was trained on the dataset: its answer words are whole tokens.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "m"))
    assert len(tok("circle", add_special_tokens=False).input_ids) == 1

    model_dir, losses = _train(tmp_path, tmp_path / "m", train_json, root, 30)
    assert losses[-1] < 0.5 * losses[0], losses
    recs = json.loads(train_json.read_text())
    answers = {vqa_normalize(r["conversations"][1]["value"]) for r in recs}
    q = recs[0]["conversations"][0]["value"].replace("<image>\n", "")
    from PIL import Image

    said = _answer(model_dir, Image.open(root / recs[0]["image"]), q)
    assert vqa_normalize(said) in answers, said  # an answer of the task's form, not bytes


def test_init_tiny_with_wide_images_and_id_less_records(tmp_path):
    """2:1 images resized by the SigLIP processor to the chosen square size; records without ids."""
    root = tmp_path / "img"
    root.mkdir()
    recs = []
    for i in range(16):
        image(i, (64, 32)).save(root / f"{i}.png")
        ans = "wide" if i % 2 else "flat"
        recs.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhich way is it?"}, {"from": "gpt", "value": ans}]})  # fmt: skip
    data = tmp_path / "d.json"
    data.write_text(json.dumps(recs))
    m = tmp_path / "m"
    args = ["--image-size", "32", "--patch-size", "8", "--width", "64", "--layers", "2", "--vision-layers", "1"]
    assert convert(["init", "--tiny", "--data", str(data), "--image-root", str(root), *args, str(m)]) == 0
    cfg = json.loads((m / "config.json").read_text())
    assert cfg["vision_config"]["image_size"] == 32 and cfg["text_config"]["num_hidden_layers"] == 2
    model_dir, losses = _train(tmp_path, m, data, root, 12)
    assert losses[-1] < losses[0]
    assert vqa_normalize(_answer(model_dir, image(99, (64, 32)), "Which way is it?")) in {"wide", "flat"}


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (None, [], "no such data file"),
        ([{"image": "a.png"}], [], "no text to train a tokenizer on"),
        ([{"conversations": [{"from": "gpt", "value": "hi"}]}], ["--image-size", "50"], "not divisible"),
        ([{"conversations": [{"from": "gpt", "value": "hi"}]}], ["--image-root", "nowhere"], "no such image"),
    ],
)
def test_init_tiny_bad_input_is_one_line(tmp_path, capsys, make, extra, message):
    data = tmp_path / "d.json"
    if make is not None:
        data.write_text(json.dumps(make))
    with pytest.raises(SystemExit) as e:
        convert(["init", "--tiny", "--data", str(data), *extra, str(tmp_path / "m")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and "\n" not in err, err
    assert not (tmp_path / "m" / "config.json").exists()


def test_init_tiny_refuses_to_overwrite_and_needs_data(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "hi"}]}]))
    for args, message in ((["--data", str(data)], "already holds a checkpoint"), ([], "needs --data")):
        with pytest.raises(SystemExit):
            convert(["init", "--tiny", *args, str(tmp_path / "m")])
        assert message in capsys.readouterr().err


def test_embedded_default_is_built_by_the_same_recipe(tmp_path):
    """One code path: the embedded default's model has `init --tiny`'s default sizes and init; only the patch
    size differs, set by the task's geometry (one patch per cell: bonsai_mlx.embedded.RECIPE)."""
    from bonsai_mlx.embedded import RECIPE, make_default_model

    assert set(RECIPE) == {"patch_size"}
    d = make_default_model(tmp_path / "e", image_size=48, seed=0)
    cfg = json.loads((d / "config.json").read_text())
    vision, text = TinyRecipe(patch_size=RECIPE["patch_size"]).configs()
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "patch_size", "image_size"):
        assert cfg["vision_config"][k] == getattr(vision, k)
    for k in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "max_position_embeddings"):
        assert cfg["text_config"][k] == getattr(text, k)
