"""One function computes the targets for both modes: the online teacher (a no-grad forward in the training step)
gives exactly what the cache gives for the same samples, down to what the loss reads from a collated batch."""

import json

import numpy as np
import pytest
from helpers import image, make_teacher

from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.teacher_cache import CacheReader
from train_cuda.extract import main as extract


@pytest.fixture(scope="module")
def setup(tmp_path_factory, pico_dir):
    root = tmp_path_factory.mktemp("online")
    (root / "img").mkdir()
    recs = []
    for i, size in enumerate([(60, 40), (40, 60), (48, 48)]):
        image(i, size=size).save(root / "img" / f"{i}.png")
        recs.append(
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nIs there a red square? Answer yes or no."},
                    {"from": "gpt", "value": "yes"},
                    {"from": "human", "value": "Describe the image."},
                    {"from": "gpt", "value": "a green circle on the left and a small yellow square."},
                ],
            }
        )
    recs.append({"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    (root / "d.json").write_text(json.dumps(recs))
    teacher = make_teacher(root / "teacher")
    args = ["--teacher", str(teacher), "--data", str(root / "d.json"), "--image-root", str(root / "img"),
            "--student-tokenizer", str(pico_dir), "--layers", "-1,1", "--out", str(root / "cache"),
            "--per-shard", "2", "--batch-size", "2", "--logits-topk", "4", "--dtype", "float32"]  # fmt: skip
    assert extract(args) == 0
    return root, teacher, recs


def _online(setup, pico_dir):
    from train_cuda.online_teacher import OnlineTeacher

    root, teacher, _ = setup
    proc = Processor(pico_dir, PicoConfig.load(pico_dir))
    # float32 on a GPU too (as the cache above): bf16 results depend on the batch's shape, the function does not
    online = OnlineTeacher(str(teacher), proc, [-1, 1], image_root=str(root / "img"), logits_topk=4, dtype="float32")
    return online, proc


def test_online_targets_equal_cached_targets(setup, pico_dir):
    root, _, recs = setup
    online, _ = _online(setup, pico_dir)
    assert not any(p.requires_grad for p in online.teacher.model.parameters()) and not online.teacher.model.training
    cache = CacheReader(root / "cache")
    got = online.targets(recs)  # one batch: images and a text-only record together
    assert sorted(got) == sorted(cache.where) == ["#3", "s0", "s1", "s2"]
    for sid, e in got.items():
        c = cache.get(sid)
        for f in ("text_student_pos", "text_teacher_pos", "kl_student_pos", "kl_teacher_pos", "same_next",
                  "strip_space", "ids_check"):  # fmt: skip
            assert getattr(e, f) == getattr(c, f), (sid, f)
        assert sorted(e.text) == sorted(c.text) and sorted(e.image) == sorted(c.image)
        for kind in ("text", "image"):
            for L, a in getattr(c, kind).items():
                b = getattr(e, kind)[L]
                assert b.dtype == a.dtype == np.float16 and b.shape == a.shape
                np.testing.assert_allclose(b.astype(np.float32), a.astype(np.float32), atol=2e-3, err_msg=sid)
        np.testing.assert_array_equal(e.topk_ids, c.topk_ids)
        np.testing.assert_allclose(e.topk_logits.astype(np.float32), c.topk_logits.astype(np.float32), atol=2e-3)
        np.testing.assert_allclose(e.topk_lse, c.topk_lse, atol=1e-4)
    m = cache.manifest
    for k in ("teacher_layers", "layers", "hidden_size", "student_tokenizer", "teacher_grid", "student_grid",
              "teacher_vocab", "logits"):  # fmt: skip
        assert online.manifest[k] == m[k], k
    assert online.teacher_tokens() == cache.teacher_tokens()


def test_the_loss_reads_the_same_batch_from_either_mode(setup, pico_dir):
    """gather_targets over a collated batch, and the logit plan, are equal whether they read the cache or the
    online teacher's view of the same records."""
    from bonsai_mlx.core.batching import collate
    from bonsai_mlx.core.distill_targets import cache_layer_map, gather_targets, plan_logits
    from bonsai_mlx.core.records import Dataset

    root, _, recs = setup
    online, proc = _online(setup, pico_dir)
    cache = CacheReader(root / "cache", proc.tokenizer, proc.chat_template)
    ds = Dataset.build(recs, proc, str(root / "img"))
    by_id = dict(zip([e.id for e in ds.examples], recs, strict=True))
    batch = collate(ds.examples[1:], proc, proc.tokenizer.pad_token_id or 0)
    view = online.view([by_id[s] for s in batch.ids], batch.ids)
    assert cache_layer_map(None, view, 3, proc.config.vision.grid) == cache_layer_map(None, cache, 3, 4)
    plan_c, plan_o = plan_logits(cache, proc.tokenizer), plan_logits(online.view(recs), proc.tokenizer)
    assert (plan_o.mode, plan_o.coverage) == (plan_c.mode, plan_c.coverage)
    a = gather_targets(cache, batch, proc.image_token_id, [-1, 1], plan_c)
    b = gather_targets(view, batch, proc.image_token_id, [-1, 1], plan_o)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], atol=2e-3, err_msg=k)


def test_a_record_the_teacher_cannot_align_gets_no_targets_and_a_reason(setup, pico_dir):
    online, _ = _online(setup, pico_dir)
    bad = {"id": "x", "image": "missing.png", "conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "gpt", "value": "yes"}]}  # fmt: skip
    view = online.view([bad], ["x"])
    assert "x" not in view and "x" in online.bad
    assert view.get("x").text[-1].shape == (0, online.manifest["hidden_size"])  # reads as no units
