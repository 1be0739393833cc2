import json
import os

import numpy as np
import pytest
from helpers import image, make_teacher

from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.teacher_cache import CacheReader
from train_cuda.extract import main as extract
from train_cuda.teacher import Teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture
def data(tmp_path):
    (tmp_path / "img").mkdir()
    recs = []
    for i in range(5):
        image(i, size=(60, 40)).save(tmp_path / "img" / f"{i}.png")
        recs.append(
            {
                "id": f"s{i}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the square?"},
                    {"from": "gpt", "value": "The square is red and the triangle is blue."},
                ],
            }
        )
    recs.append({"id": "t", "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    (tmp_path / "d.json").write_text(json.dumps(recs))
    return tmp_path


def _extract(teacher_dir, pico_dir, data, out, *extra, layers="-1,1"):
    args = [
        "--teacher",
        str(teacher_dir),
        "--data",
        str(data / "d.json"),
        "--image-root",
        str(data / "img"),
        "--student-tokenizer",
        str(pico_dir),
        "--layers",
        layers,
        "--out",
        str(out),
        "--per-shard",
        "2",
    ]
    return extract([*args, "--batch-size", "2", *extra])


def test_extract_cache_round_trip(teacher_dir, pico_dir, data, tmp_path, capsys):
    assert _extract(teacher_dir, pico_dir, data, tmp_path / "cache") == 0
    assert "on disk" in capsys.readouterr().out
    proc = Processor(pico_dir, PicoConfig.load(pico_dir))
    cache = CacheReader(tmp_path / "cache", proc.tokenizer)
    assert len(cache) == 6 and cache.manifest["layers"] == [-1, 1]
    e = cache.get("s0")
    s_grid = PicoConfig.load(pico_dir).vision.grid
    assert e.image[-1].shape == (s_grid * s_grid, 48) and e.image[-1].dtype == np.float16
    assert len(e.text_student_pos) == e.text[-1].shape[0] > 3
    assert not cache.get("t").image and cache.get("t").text[1].shape[0] >= 1
    # targets equal the teacher's normalised states at the aligned positions
    t = Teacher.load(str(teacher_dir))
    from bonsai_mlx.core.records import messages_of
    from train_cuda.extract import plan_sample

    rec = json.loads((data / "d.json").read_text())[0]
    plan = plan_sample(rec, t, proc, str(data / "img"))
    from PIL import Image

    from bonsai_mlx.core.align import pool_grid

    px = t.pixel_values(Image.open(data / "img" / "0.png").convert("RGB"))
    st = t.hidden_states([plan.t_ids], px, [-1])[0][0][0]
    np.testing.assert_allclose(e.text[-1], st[[a for a, _ in plan.pairs]], atol=2e-3)
    img_pos = [i for i, x in enumerate(plan.t_ids) if x == t.image_token_id]
    patches = st[img_pos][t.patch_offset :]
    np.testing.assert_allclose(e.image[-1], pool_grid(patches, t.grid, s_grid, (60, 40)), atol=2e-3)
    # the student positions point at tokens that end the same answer characters
    assert all(proc.image_token_id != sid for sid in e.text_student_pos)
    assert messages_of(rec)


def test_resume_skips_finished_shards(teacher_dir, pico_dir, data, tmp_path):
    out = tmp_path / "cache"
    _extract(teacher_dir, pico_dir, data, out)
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    os.remove(out / "shard-00001.json")  # as if interrupted while writing shard 1
    _extract(teacher_dir, pico_dir, data, out)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first
    assert (out / "shard-00001.json").is_file() and len(CacheReader(out)) == 6


def test_mismatched_student_tokenizer_is_refused(teacher_dir, pico_dir, data, tmp_path, capsys):
    from helpers import make_tokenizer

    _extract(teacher_dir, pico_dir, data, tmp_path / "cache")
    other = make_tokenizer(tmp_path / "other")
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="different student tokenizer"):
        CacheReader(tmp_path / "cache", other)
    with pytest.raises(SystemExit):
        _extract(teacher_dir, pico_dir, data, tmp_path / "cache", layers="-1")
    assert "made with different 'layers'" in capsys.readouterr().err


def test_pca_cache_stores_coordinates_and_reads_back_states(teacher_dir, pico_dir, data, tmp_path, capsys):
    full, pca = tmp_path / "full", tmp_path / "pca"
    _extract(teacher_dir, pico_dir, data, full)
    _extract(teacher_dir, pico_dir, data, pca, "--pca", "4")
    assert "4 components keep" in capsys.readouterr().out
    size = lambda d: sum(p.stat().st_size for p in d.glob("shard-*.safetensors"))  # noqa: E731
    assert size(pca) < size(full) / 3
    a, b = CacheReader(full), CacheReader(pca)
    assert b.manifest["pca"] == 4
    from safetensors.numpy import load_file

    basis = load_file(str(pca / "pca.safetensors"))
    mean, comps = basis["mean/-1"], basis["components/-1"]
    assert comps.shape == (4, 48)
    np.testing.assert_allclose(comps @ comps.T, np.eye(4), atol=1e-4)  # orthonormal
    for sid in ("s0", "t"):
        x, y = a.get(sid), b.get(sid)
        for kind in ("text", "image"):
            if not getattr(x, kind):
                continue
            ref = getattr(x, kind)[-1].astype(np.float32)
            expect = mean + ((ref - mean) @ comps.T) @ comps  # the projection of the full states onto the basis
            assert getattr(y, kind)[-1].shape == ref.shape
            np.testing.assert_allclose(getattr(y, kind)[-1], expect, atol=3e-2)
    # a resumed PCA extraction keeps its basis
    stamp = (pca / "pca.safetensors").stat().st_mtime_ns
    os.remove(pca / "shard-00002.json")
    _extract(teacher_dir, pico_dir, data, pca, "--pca", "4")
    assert (pca / "pca.safetensors").stat().st_mtime_ns == stamp and len(CacheReader(pca)) == 6


def test_pca_with_all_components_reproduces_the_states(teacher_dir, pico_dir, data, tmp_path):
    _extract(teacher_dir, pico_dir, data, tmp_path / "full")
    _extract(teacher_dir, pico_dir, data, tmp_path / "pca", "--pca", "48")
    x, y = CacheReader(tmp_path / "full").get("s1"), CacheReader(tmp_path / "pca").get("s1")
    np.testing.assert_allclose(y.text[1], x.text[1].astype(np.float32), atol=3e-2)
    np.testing.assert_allclose(y.image[-1], x.image[-1].astype(np.float32), atol=3e-2)


def test_logits_topk_across_vocabularies_stores_every_unit_and_the_teachers_token_strings(
    teacher_dir, pico_dir, data, tmp_path, capsys
):
    """A teacher with its own tokenizer: no longer refused. Every aligned unit gets the teacher's top-k, the
    logsumexp over its whole vocabulary, and the cache carries the teacher's token strings (format 3)."""
    from bonsai_mlx.core.vocab_map import shared_vocab_of, token_bytes

    assert _extract(teacher_dir, pico_dir, data, tmp_path / "cache", "--logits-topk", "4") == 0
    assert "have an equal-string student token" in capsys.readouterr().out
    cache = CacheReader(tmp_path / "cache")
    assert cache.manifest["format"] == 3 and cache.manifest["logits"]["topk"] == cache.logits_topk == 4
    t = Teacher.load(str(teacher_dir))
    tokens, fallback = cache.teacher_tokens()
    assert tokens == token_bytes(t.tokenizer, t.model.config.text_config.vocab_size)
    e = cache.get("s0")
    proc = Processor(pico_dir, PicoConfig.load(pico_dir))
    from train_cuda.extract import plan_sample

    plan = plan_sample(json.loads((data / "d.json").read_text())[0], t, proc, str(data / "img"))
    # the aligned units, then the answer's start: the last prompt token in each, where both predict "The"
    assert len(plan.starts) == 1
    (t_start, s_start, _) = plan.starts[0]
    assert e.kl_student_pos == e.text_student_pos + [s_start] and e.kl_teacher_pos == e.text_teacher_pos + [t_start]
    assert e.same_next == []  # two vocabularies: no unit compares ids
    from bonsai_mlx.core.records import messages_of, place_image, tokenize

    s_ids = tokenize(proc, place_image(messages_of(json.loads((data / "d.json").read_text())[0]), True)[0])[0]
    first = proc.tokenizer.decode([s_ids[s_start + 1]]).strip()
    assert first and first == t.tokenizer.decode([plan.t_ids[t_start + 1]]).strip() and "The".startswith(first)
    px = t.pixel_values(__import__("PIL.Image").Image.open(data / "img" / "0.png").convert("RGB"))
    _, (vals, ids, lse) = t.hidden_states([plan.t_ids], px, [-1], topk=4)
    np.testing.assert_array_equal(e.topk_ids, ids[0, e.kl_teacher_pos])
    np.testing.assert_allclose(e.topk_logits, vals[0, e.kl_teacher_pos], atol=1e-2)
    np.testing.assert_allclose(e.topk_lse, lse[0, e.kl_teacher_pos], atol=1e-4)
    assert (e.topk_lse >= e.topk_logits.max(-1) - 1e-2).all()  # a normaliser over more than the top-k
    assert len(shared_vocab_of(t.tokenizer, proc.tokenizer)) > 0
    # after the answer, each template ends the turn with its own control token: the same event
    end_t, end_s = cache.manifest["logits"]["end_of_turn"]
    assert t.tokenizer.convert_ids_to_tokens(end_t) == "</s>" and tokens[end_t] is None
    assert end_s in proc.stop_ids
    from bonsai_mlx.core.distill_targets import plan_logits

    plan = plan_logits(cache, proc.tokenizer, "shared-vocab")
    assert plan.student_ids(np.array([[end_t]]))[0, 0] == end_s and end_s in plan.normaliser_ids
    assert "coverage" in plan.describe() and 0 < plan.coverage <= 1 and 0 < plan.topk_mass <= 1


def test_logits_topk_stores_the_teachers_top_logits(pico_dir, data, tmp_path):
    """Shared vocabulary (`--kl-topk`, the old name, still works): units whose next token is the same in both
    tokenizations are marked, which is where same-vocab KL compares ids."""
    from helpers import make_teacher

    teacher = make_teacher(tmp_path / "same-vocab", tokenizer_from=pico_dir)
    assert _extract(teacher, pico_dir, data, tmp_path / "cache", "--kl-topk", "5") == 0
    proc = Processor(pico_dir, PicoConfig.load(pico_dir))
    cache = CacheReader(tmp_path / "cache", proc.tokenizer)
    assert cache.logits_topk == 5
    e = cache.get("s0")
    assert e.topk_ids.shape == e.topk_logits.shape == (len(e.kl_student_pos), 5)
    # shared tokenizer: every answer token but the last (whose successor is each template's own end) compares
    assert len(e.same_next) >= len(e.text_student_pos) - 1 >= 3
    t = Teacher.load(str(teacher))
    from train_cuda.extract import plan_sample

    rec = json.loads((data / "d.json").read_text())[0]
    plan = plan_sample(rec, t, proc, str(data / "img"))
    assert e.same_next == plan.same_next
    px = t.pixel_values(__import__("PIL.Image").Image.open(data / "img" / "0.png").convert("RGB"))
    _, (vals, ids, _) = t.hidden_states([plan.t_ids], px, [-1], topk=5)
    np.testing.assert_array_equal(e.topk_ids, ids[0, e.kl_teacher_pos])
    np.testing.assert_allclose(e.topk_logits, vals[0, e.kl_teacher_pos], atol=1e-2)


def test_a_format_2_cache_still_reads_and_an_unknown_format_is_refused_in_one_line(
    teacher_dir, pico_dir, data, tmp_path
):
    """Caches from before format 3 (kl_topk, top-k only where the next token is shared) keep working for
    same-vocab KL and ULD; a format this version does not know is refused naming the file."""
    from bonsai_mlx.core.distill_targets import plan_logits
    from bonsai_mlx.core.teacher_cache import CacheWriter, Entry

    old = {"teacher": "t", "layers": [-1], "hidden_size": 4, "student_tokenizer": "x", "kl_topk": 2}
    w = CacheWriter(tmp_path / "v2", old)
    e = Entry([3, 5], [2, 4], {-1: np.ones((2, 4), np.float32)}, {}, [1], np.array([[7, 9]]), np.array([[1.0, 0.5]]))
    w.write_shard(0, {"a": e})
    r = CacheReader(tmp_path / "v2")
    assert r.manifest["format"] == 2 and r.logits_topk == 2 and r.teacher_tokens() is None
    got = r.get("a")
    assert got.kl_units == [1] and got.same_next is None and got.topk_lse is None
    proc = Processor(pico_dir, PicoConfig.load(pico_dir))
    assert plan_logits(r, proc.tokenizer, "uld").mode == "uld"
    assert plan_logits(r, proc.tokenizer, "auto").mode == "uld"  # another vocabulary, no token strings
    with pytest.raises(ValueError, match="re-extract it with --logits-topk"):
        plan_logits(r, proc.tokenizer, "shared-vocab")
    m = json.loads((tmp_path / "v2" / "manifest.json").read_text())
    (tmp_path / "v2" / "manifest.json").write_text(json.dumps({**m, "format": 9}))
    with pytest.raises(ValueError, match=r"manifest.json: cache format 9, this version reads formats 1, 2, 3") as ex:
        CacheReader(tmp_path / "v2")
    assert "\n" not in str(ex.value)


def test_manifest_records_the_inputs_and_the_teachers_depth(teacher_dir, pico_dir, data, tmp_path):
    _extract(teacher_dir, pico_dir, data, tmp_path / "cache", "--max-samples", "4")
    m = CacheReader(tmp_path / "cache").manifest
    assert m["teacher_layers"] == 2 and m["layers"] == [-1, 1] and m["max_samples"] == 4
    assert m["data"]["bytes"] == (data / "d.json").stat().st_size and len(m["data"]["sha256"]) == 64
    assert m["image_root"] == str((data / "img").resolve()) and m["load_4bit"] is False
    assert m["teacher_dtype"] == "float32"


def test_resume_after_a_changed_max_samples_redoes_the_shards_that_changed(teacher_dir, pico_dir, data, tmp_path):
    """A smoke run over 3 samples then the full run: shard 1 held only s2; it must be redone with s2 and s3."""
    out = tmp_path / "cache"
    _extract(teacher_dir, pico_dir, data, out, "--max-samples", "3")
    assert len(CacheReader(out)) == 3
    first = (out / "shard-00000.safetensors").stat().st_mtime_ns
    _extract(teacher_dir, pico_dir, data, out)
    cache = CacheReader(out)
    assert sorted(cache.where) == ["s0", "s1", "s2", "s3", "s4", "t"]
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == first  # unchanged shard kept
    assert CacheReader(out).manifest["max_samples"] is None  # the cache covers the whole data now


def test_a_smaller_max_samples_into_a_finished_cache_deletes_nothing(teacher_dir, pico_dir, data, tmp_path, capsys):
    """A smoke run (--max-samples 2) into a finished cache reads what it plans and leaves every shard as it was
    (it used to remove the shards beyond its plan, right after the teacher loaded); the weights never load."""
    out = tmp_path / "cache"
    _extract(teacher_dir, pico_dir, data, out)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    _extract(teacher_dir, pico_dir, data, out, "--max-samples", "2")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json"} == {
        k: v for k, v in before.items() if k != "manifest.json"
    }
    assert "nothing to extract" in capsys.readouterr().out
    cache = CacheReader(out)
    assert sorted(cache.where) == ["s0", "s1", "s2", "s3", "s4", "t"] and cache.manifest["max_samples"] is None


def test_resume_with_another_data_file_is_refused(teacher_dir, pico_dir, data, tmp_path, capsys):
    out = tmp_path / "cache"
    _extract(teacher_dir, pico_dir, data, out, "--max-samples", "2")
    recs = json.loads((data / "d.json").read_text())
    recs[0]["conversations"][1]["value"] = "The square is green."
    (data / "d.json").write_text(json.dumps(recs))
    with pytest.raises(SystemExit):
        _extract(teacher_dir, pico_dir, data, out, "--max-samples", "2")
    assert "made with different 'data'" in capsys.readouterr().err


def test_id_less_records_are_all_cached_under_the_ids_the_trainers_use(teacher_dir, pico_dir, data, tmp_path):
    from bonsai_mlx.core.records import Dataset, read_records

    recs = json.loads((data / "d.json").read_text())
    for r in recs:
        r.pop("id")
    (data / "d.json").write_text(json.dumps(recs))
    _extract(teacher_dir, pico_dir, data, tmp_path / "cache")
    cache = CacheReader(tmp_path / "cache")
    assert len(cache) == 6
    proc = Processor(pico_dir, PicoConfig.load(pico_dir))
    ds = Dataset.build(read_records(str(data / "d.json")), proc, str(data / "img"), 512)
    assert len(ds.examples) == 6 and all(e.id in cache for e in ds.examples)


def test_the_student_fingerprint_covers_a_chat_template_jinja(pico_dir, tmp_path):
    """A template the tokenizer does not carry (chat_template.jinja beside it) still keys the cache."""
    import shutil

    from bonsai_mlx.core.teacher_cache import tokenizer_fingerprint

    template = Processor(pico_dir, PicoConfig.load(pico_dir)).chat_template
    procs = []
    for name, extra in (("a", ""), ("b", "{# changed #}")):
        d = tmp_path / name
        shutil.copytree(pico_dir, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        for f in ("chat_template.json", "chat_template.jinja"):
            (d / f).unlink(missing_ok=True)
        (d / "chat_template.jinja").write_text(template + extra)
        procs.append(Processor(d, PicoConfig.load(d)))
    a, b = procs
    assert b.chat_template.endswith("{# changed #}") and a.tokenizer.get_vocab() == b.tokenizer.get_vocab()
    assert tokenizer_fingerprint(b.tokenizer, b.chat_template) != tokenizer_fingerprint(a.tokenizer, a.chat_template)


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_a_siglip_teacher_counts_its_own_image_tokens(tmp_path, data, pico_dir, strategy):
    """A Pico (SigLIP: no CLS) as the teacher: 'full' keeps grid^2 tokens, 'default' grid^2 - 1 (patch 0
    dropped, filled from its neighbour); extraction works with either."""
    from helpers import make_hf_pico

    t_dir = make_hf_pico(tmp_path / "siglip-teacher", strategy=strategy, image_size=48)
    t = Teacher.load(str(t_dir))
    assert t.grid == 6 and t.num_image_tokens == (36 if strategy == "full" else 35)
    assert t.patch_offset == (0 if strategy == "full" else -1)
    assert _extract(t_dir, pico_dir, data, tmp_path / "cache", "--max-samples", "2") == 0
    s_grid = PicoConfig.load(pico_dir).vision.grid
    assert CacheReader(tmp_path / "cache").get("s0").image[-1].shape == (s_grid * s_grid, 64)


def test_right_padding_without_a_mask_leaves_the_real_positions_unchanged(teacher_dir):
    """The teacher runs with no dense attention mask (SDPA's flash kernel): causal attention alone keeps the
    states of a short sample in a padded batch equal to its states alone."""
    t = Teacher.load(str(teacher_dir))
    short, long = [5, 6, 7, 8], [5, 9, 10, 11, 12, 13, 14, 15]
    alone = t.hidden_states([short], None, [-1, 1])[0]
    batched = t.hidden_states([short, long], None, [-1, 1])[0]
    for a, b in zip(alone, batched, strict=True):
        np.testing.assert_allclose(b[0, : len(short)], a[0], atol=1e-5)
