"""python -m bonsai_mlx.distill_vision: a smaller SigLIP tower learns the teacher's projector-input features."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import image
from mlx.utils import tree_flatten

from bonsai_mlx.distill_vision import DistillVisionConfig, Run, distill, list_images, main, pick_layers


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Twelve images: square, 2:1 and 1:2 (the teacher's processor resizes them)."""
    d = tmp_path_factory.mktemp("imgs")
    for i in range(12):
        image(i, [(40, 40), (64, 32), (32, 64)][i % 3]).save(d / f"{i}.png")
    return d


def _cfg(pico_dir: Path, images: Path, out: Path, **kw) -> DistillVisionConfig:
    base = dict(teacher=str(pico_dir), images=str(images), out=str(out), batch_size=12, eval_images=12, warmup=1)
    return DistillVisionConfig(**{**base, **kw})


def test_written_checkpoint_loads_strict_in_mlx_and_transformers(pico_dir, images, tmp_path):
    import torch
    from transformers import LlavaForConditionalGeneration

    from bonsai_mlx.generate import load

    out = tmp_path / "small"
    assert main(["--teacher", str(pico_dir), "--images", str(images), "--out", str(out), "--layers", "2"]
                + ["--width", "32", "--steps", "3", "--batch-size", "4"]) == 0  # fmt: skip
    cfg = json.loads((out / "config.json").read_text())
    v = cfg["vision_config"]
    shape = (v["num_hidden_layers"], v["hidden_size"], v["num_attention_heads"], v["intermediate_size"])
    assert shape == (2, 32, 2, 64)
    assert (v["image_size"], v["patch_size"]) == (32, 8) and cfg["vision_feature_layer"] == -1
    for f in ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (out / f).is_file(), f
    assert not list(tmp_path.glob(".small*")), "temp directories left behind"
    model, proc = load(str(out))  # strict: every tensor the config implies, none more
    ref, info = LlavaForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for size in ((64, 32), (32, 64)):
        px = proc.pixel_values([image(7, size)])
        ours = np.array(model.image_features(mx.array(px)))
        with torch.no_grad():
            theirs = ref.model.get_image_features(pixel_values=torch.tensor(px))
        theirs = getattr(theirs, "pooler_output", theirs)
        theirs = theirs[0] if isinstance(theirs, (list, tuple)) else theirs
        np.testing.assert_allclose(ours.reshape(-1), theirs.numpy().reshape(-1), atol=1e-4)


def test_training_lowers_the_loss_and_beats_the_initial_feature_match(pico_dir, images, tmp_path):
    for init in ("teacher", "random"):
        r = distill(_cfg(pico_dir, images, tmp_path / init, layers=1, width=32, steps=25, lr=3e-3, init=init))
        assert r["last_loss"] < 0.8 * r["first_loss"], r
        assert r["feature_match_final"]["rel_mse"] < r["feature_match_at_init"]["rel_mse"], r
        assert r["feature_match_final"]["cosine"] > r["feature_match_at_init"]["cosine"], r
        assert r["student_tower_parameters"] < r["teacher_tower_parameters"] / 4


def test_a_full_copy_of_the_teacher_reproduces_it_exactly(pico_dir, images, tmp_path):
    """Same shape + teacher init = the teacher's tower: features match exactly and so do the logits."""
    from bonsai_mlx.generate import load

    r = distill(_cfg(pico_dir, images, tmp_path / "copy", steps=0))
    assert r["feature_match_at_init"]["rel_mse"] < 1e-10 and r["feature_match_at_init"]["cosine"] > 0.99999
    (a, proc), (b, _) = load(str(pico_dir)), load(str(tmp_path / "copy"))
    px = mx.array(proc.pixel_values([image(3, (64, 32))]))
    ids = mx.array([[proc.image_token_id] * 16 + [5, 6, 7]])
    np.testing.assert_allclose(np.array(a(ids, px)), np.array(b(ids, px)), atol=1e-5)


def test_fewer_layers_start_from_evenly_spaced_teacher_layers(pico_dir, images, tmp_path):
    assert pick_layers(6, 12) == [0, 2, 4, 7, 9, 11] and pick_layers(2, 3) == [0, 2] and pick_layers(1, 3) == [0]
    run = Run(_cfg(pico_dir, images, tmp_path / "o", layers=2))
    run.initialise()
    t, s = run.model.vision_tower.vision_model.encoder.layers, run.student.tower.vision_model.encoder.layers
    for j, i in enumerate([0, 2]):
        for (k, a), (_, b) in zip(tree_flatten(s[j].parameters()), tree_flatten(t[i].parameters()), strict=True):
            np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=k)


def test_the_map_is_folded_into_the_projector(pico_dir, images, tmp_path):
    """The written model gives the LM what teacher projector(map(student)) gave during distillation."""
    from bonsai_mlx.generate import load

    run = Run(_cfg(pico_dir, images, tmp_path / "fold", width=32, steps=2))
    run.initialise()
    run.train()
    px = mx.array(run.proc.pixel_values([image(1, (32, 64)), image(2)]))
    want = np.array(run.model.multi_modal_projector(run.student.features(px, False)))
    run.write(tmp_path / "fold")
    model, _ = load(str(tmp_path / "fold"))
    np.testing.assert_allclose(np.array(model.image_features(px)), want, atol=1e-5)


def test_resume_continues_to_the_same_weights(pico_dir, images, tmp_path):
    flags = ["--teacher", str(pico_dir), "--images", str(images), "--layers", "1", "--batch-size", "4", "--steps", "6"]
    assert main([*flags, "--out", str(tmp_path / "a"), "--save-every", "3"]) == 0  # checkpoint at step 3
    assert (tmp_path / "a.ckpt" / "latest").read_text().strip() == "step-0000003"
    (tmp_path / "a.ckpt").rename(tmp_path / "b.ckpt")  # as if the run had been killed after step 3
    assert main([*flags, "--out", str(tmp_path / "b"), "--save-every", "3", "--resume"]) == 0
    wa = mx.load(str(tmp_path / "a" / "model.safetensors"))
    wb = mx.load(str(tmp_path / "b" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        np.testing.assert_allclose(np.array(wa[k]), np.array(wb[k]), atol=1e-6, err_msg=k)


def test_images_from_a_llava_file_are_deduplicated_and_missing_ones_skipped(images, tmp_path, capsys):
    recs = [
        {"image": "0.png", "conversations": []},
        {"id": "x", "image": "0.png", "conversations": []},  # duplicate image, id-less record above
        {"id": "x", "image": "1.png"},  # duplicate id
        {"id": "t", "conversations": []},  # text-only
        {"id": "m", "image": "missing.png"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(recs))
    found = list_images(tmp_path / "d.json", images)
    assert [p.name for p in found] == ["0.png", "1.png"]
    assert "skipped 1 missing image files" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--images", "EMPTY"], "no images found"),
        (["--student-config", '{"patch_size": 4}'], "student patch_size 4 != teacher's 8"),
        (["--student-config", '{"image_size": 64}'], "keeps the teacher's patch grid"),
        (["--width", "128"], "wider than the teacher's 64"),
        (["--layers", "5"], "more than the teacher's 3"),
        (["--student-config", '{"depth": 2}'], "'depth' is not a vision_config field"),
        (["--width", "40"], "not a multiple of the teacher's head size 16"),
    ],
)
def test_bad_input_is_a_one_line_error(pico_dir, images, tmp_path, capsys, extra, message):
    (tmp_path / "EMPTY").mkdir()
    args = ["--teacher", str(pico_dir), "--images", str(images), "--out", str(tmp_path / "o"), "--steps", "1"]
    extra = [str(tmp_path / "EMPTY") if e == "EMPTY" else e for e in extra]
    with pytest.raises(SystemExit) as e:
        main(args + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("distill_vision: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_student_deeper_than_the_feature_layer_is_refused_or_capped(pico_dir, images, tmp_path, capsys):
    """llava-1.5 reads the tower's second-to-last layer (-2): a student as deep as the whole tower would end in a
    layer no teacher layer teaches, the very one the projector reads."""
    import shutil

    teacher = tmp_path / "teacher-l2"
    shutil.copytree(pico_dir, teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["vision_feature_layer"] = -2  # of 3 layers: the projector reads layer 2
    (teacher / "config.json").write_text(json.dumps(cfg))
    args = ["--teacher", str(teacher), "--images", str(images), "--steps", "1", "--batch-size", "4"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "deep"), "--layers", "3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "reads the teacher's layer 2" in err, err
    assert main([*args, "--out", str(tmp_path / "capped")]) == 0  # no --layers: as deep as the feature layer
    v = json.loads((tmp_path / "capped" / "config.json").read_text())["vision_config"]
    assert v["num_hidden_layers"] == 2


def test_the_heal_hint_names_a_sibling_folder_when_out_ends_in_a_slash(pico_dir, images, tmp_path, capsys):
    out = f"{tmp_path / 'pico-v1'}/"  # as the docs type it: --out pico-v6/
    args = ["--teacher", str(pico_dir), "--images", str(images), "--out", out, "--layers", "1", "--steps", "0"]
    assert main(args) == 0
    hint = capsys.readouterr().out.splitlines()[-1]
    assert hint.endswith(f"runs/heal {tmp_path / 'pico-v1'}-healed/"), hint
