"""A cache that fits and cannot be destroyed by accident: checked before the teacher loads, refused when the disk
cannot hold it, replaced only with --overwrite, keyed to its data by content, and refused by the trainers'
check (`CacheReader.check_data`, `check_samples`) when their data is not what it was made from."""

import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
from helpers import image, make_teacher

from bonsai_mlx.core.teacher_cache import CacheReader
from train_cuda.extract import main as extract


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


def _extract(teacher_dir, pico_dir, data, out, *extra, layers="-1,1", data_file=None):
    args = ["--teacher", str(teacher_dir), "--data", str(data_file or data / "d.json"), "--image-root",
            str(data / "img"), "--student-tokenizer", str(pico_dir), "--layers", layers, "--out", str(out),
            "--per-shard", "2", "--batch-size", "2"]  # fmt: skip
    return extract([*args, *extra])


def _no_weights(monkeypatch):
    """Make loading the teacher's weights fail loudly: what must happen before it, happens before it."""
    from transformers import LlavaForConditionalGeneration

    def refuse(*args, **kw):
        raise AssertionError("the teacher's weights were loaded")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", refuse)


def test_a_disk_too_small_is_refused_in_one_line_before_the_teacher_loads(
    teacher_dir, pico_dir, data, tmp_path, monkeypatch, capsys
):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    _no_weights(monkeypatch)
    with pytest.raises(SystemExit):
        _extract(teacher_dir, pico_dir, data, tmp_path / "cache")
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs about" in err and "1.0 kB free" in err, err
    assert not (tmp_path / "cache").exists()  # nothing written either


def test_the_estimate_is_printed_for_the_planned_and_the_whole_data_and_is_close(
    teacher_dir, pico_dir, data, tmp_path, capsys
):
    assert _extract(teacher_dir, pico_dir, data, tmp_path / "cache", "--max-samples", "4") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "on disk" in x)
    assert line.startswith("4 of 6 records planned") and "the whole data:" in line and "free at" in line
    from bonsai_mlx.core.provenance import estimate_bytes

    cache = CacheReader(tmp_path / "cache")
    real = sum(p.stat().st_size for p in (tmp_path / "cache").glob("shard-*"))
    est = 0
    for sid in cache.where:
        e = cache.get(sid)
        est += estimate_bytes(len(e.text_student_pos), len(e.image.get(-1, [])), 2, 48)
    assert 0.7 < est / real < 1.3, (est, real)


def test_the_same_data_under_another_path_resumes_and_other_inputs_need_overwrite(
    teacher_dir, pico_dir, data, tmp_path, capsys
):
    out = tmp_path / "cache"
    _extract(teacher_dir, pico_dir, data, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    shutil.copy(data / "d.json", data / "copy.json")  # the same data, another name: the same cache
    assert _extract(teacher_dir, pico_dir, data, out, data_file=data / "copy.json") == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == stamps
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _extract(teacher_dir, pico_dir, data, out, layers="-1")
    err = capsys.readouterr().err
    assert "made with different 'layers'" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == stamps  # refused: nothing touched
    assert _extract(teacher_dir, pico_dir, data, out, "--overwrite", layers="-1") == 0
    cache = CacheReader(out)
    assert cache.layers == [-1] and len(cache) == 6 and 1 not in cache.get("s0").text
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite removes the cache's files only


def test_a_datasets_directory_is_fingerprinted_by_datasets_not_opened_as_a_file(teacher_dir, pico_dir, data, tmp_path):
    datasets = pytest.importorskip("datasets")
    recs = json.loads((data / "d.json").read_text())
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "cache"
    assert _extract(teacher_dir, pico_dir, data, out, data_file=tmp_path / "ds") == 0
    m = CacheReader(out).manifest
    assert m["data"]["kind"] == "datasets" and m["data"]["fingerprint"] and m["data"]["rows"] == 6
    assert len(CacheReader(out)) == 6
    CacheReader(out).check_data(tmp_path / "ds", data / "img")


def test_plans_are_made_per_shard_not_all_before_the_first(teacher_dir, pico_dir, data, tmp_path, monkeypatch):
    """Planning every record up front cost ~8 GB at 150k samples: beyond the size estimate's sample, a shard's
    records are planned when that shard is made."""
    import train_cuda.extract as ex
    from bonsai_mlx.core.teacher_cache import CacheWriter

    calls, at_first_write = [], []
    real_plan = ex.plan_sample
    target = "write_packed" if hasattr(CacheWriter, "write_packed") else "write_shard"
    real_write = getattr(CacheWriter, target)

    def plan(*args, **kw):
        calls.append(1)
        return real_plan(*args, **kw)

    def write(self, *args, **kw):
        at_first_write.append(len(calls))
        return real_write(self, *args, **kw)

    monkeypatch.setattr(ex, "ESTIMATE_SAMPLES", 2, raising=False)
    monkeypatch.setattr(ex, "plan_sample", plan)
    monkeypatch.setattr(CacheWriter, target, write)
    _extract(teacher_dir, pico_dir, data, tmp_path / "cache")
    assert at_first_write[0] <= 4 < len(calls)  # 2 for the estimate + shard 0's 2, then the others
    assert len(CacheReader(tmp_path / "cache")) == 6


def test_a_shard_is_buffered_in_the_dtype_it_is_stored_in():
    from bonsai_mlx.core.teacher_cache import CacheWriter, Entry

    w = CacheWriter.__new__(CacheWriter)
    w.manifest, w.basis = {}, None
    e = Entry([1, 2], [3, 4], {-1: np.ones((2, 8), np.float32)}, {-1: np.ones((4, 8), np.float32)})
    tensors, meta = w.pack("a", e)
    assert all(t.dtype == np.float16 for t in tensors.values()) and meta["text_student_pos"] == [1, 2]


def test_trainers_refuse_a_cache_made_from_other_data_or_images(teacher_dir, pico_dir, data, tmp_path):
    out = tmp_path / "cache"
    _extract(teacher_dir, pico_dir, data, out)
    cache = CacheReader(out)
    assert cache.check_data(data / "d.json", data / "img") is None
    shutil.copy(data / "d.json", tmp_path / "moved.json")
    assert cache.check_data(tmp_path / "moved.json", data / "img") is None  # content, not path
    recs = json.loads((data / "d.json").read_text())
    (tmp_path / "filtered.json").write_text(json.dumps(recs[1:]))
    with pytest.raises(ValueError, match="made from other data") as e:
        cache.check_data(tmp_path / "filtered.json", data / "img")
    assert "\n" not in str(e.value)
    shutil.copytree(data / "img", tmp_path / "img2")
    with pytest.raises(ValueError, match="--image-root") as e:
        cache.check_data(data / "d.json", tmp_path / "img2")
    assert "\n" not in str(e.value)


def test_a_per_sample_digest_refuses_edited_records(teacher_dir, pico_dir, data, tmp_path):
    """The trainers pass (id, student ids) as they built them: an edited answer is refused, a sample truncated
    after its last target position still checks, one cut before it cannot be checked (and is not refused)."""
    from bonsai_mlx.core.config import PicoConfig
    from bonsai_mlx.core.processing import Processor
    from bonsai_mlx.core.records import Dataset, read_records

    out = tmp_path / "cache"
    _extract(teacher_dir, pico_dir, data, out)
    cache = CacheReader(out)
    proc = Processor(pico_dir, PicoConfig.load(pico_dir))
    ds = Dataset.build(read_records(data / "d.json"), proc, data / "img")
    pairs = [(e.id, e.ids) for e in ds.examples]
    assert cache.check_samples(pairs) == 6
    n = max(cache.get("s0").text_student_pos) + 2
    assert cache.check_samples([("s0", pairs[0][1][:n])]) == 1  # truncated after what the targets use
    assert cache.check_samples([("s0", pairs[0][1][: n - 2])]) == 0  # cut before: cannot tell
    recs = read_records(data / "d.json")
    recs[2]["conversations"][1]["value"] = "The square is green and the triangle is blue."
    edited = Dataset.build(recs, proc, data / "img")
    with pytest.raises(ValueError, match="1 sample\\(s\\) differ.*'s2'") as e:
        cache.check_samples([(x.id, x.ids) for x in edited.examples])
    assert "\n" not in str(e.value)
